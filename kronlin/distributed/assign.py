"""Which rank inverts which layer: a cost model and greedy longest-processing-time assignment.

A refresh (K-FAC §8: the damped factors' inverses every T₃ iterations, §6.3
factored damping) costs, per layer with factors of sizes ``p`` (``Ā``) and
``q`` (``G``), one Cholesky factorisation and inverse (or one ``eigh``) of each::

    cost(layer) = Σ_{n ∈ {p, q}} (c0 + c3 · n³)

``c0`` is the per-call overhead (LAPACK dispatch, Python) and ``c3`` the
cubic constant; both were fitted to per-factor times measured on the
development machine (``bench/distributed_scaling.py``, ``docs/scaling.md``).
Only the ratios matter for the assignment, so the defaults serve any machine
whose LAPACK scales as ``n³``; pass measured ``costs`` to override them.

The ranks form KAISA's grid (Pauloski et al., SC'21): with ``g`` gradient
workers per layer (``g = grad_worker_fraction · world``, a divisor of the
world size) and ``P = world / g`` columns, rank ``r`` sits in column
``r mod P`` and row ``r div P``.  A layer is given to the least loaded column
and, inside it, to the least loaded rank (its *owner*, which computes the
inverse); the column's ``g`` ranks hold the layer's inverse and compute its
preconditioned gradient, each for the ranks of its row.  Every choice is made
in a fixed order with ties broken by the lowest index, so every rank computes
the identical assignment from the same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["COST_MODELS", "layer_costs", "tridiag_costs", "grad_workers", "Assignment", "assign"]

#: ``(c0 seconds per factor, c3 seconds per n³)`` of one factor's refresh, by
#: damping mode.  Fitted on the development machine (2 vCPU Xeon, OpenBLAS,
#: one BLAS thread per rank): see docs/scaling.md.
COST_MODELS = {
    "factored": (1.2e-4, 1.2e-10),  # one factor's damped Cholesky inverse, fitted to the refresh's layer times
    "exact": (2.2e-4, 5.4e-10),  # symmetric eigendecomposition (Kron.eigh)
}


def layer_costs(shapes, damping: str = "factored"):
    """Modelled refresh cost (seconds) of each layer from its weight shape ``(q, p) = (d_out, d_in+1)``."""
    if damping not in COST_MODELS:
        raise ValueError(f"damping must be one of {sorted(COST_MODELS)}; got {damping!r}")
    c0, c3 = COST_MODELS[damping]
    return [2 * c0 + c3 * (float(p) ** 3 + float(q) ** 3) for q, p in shapes]


def tridiag_costs(shapes):
    """Modelled cost (seconds) of each of the ``ℓ`` set-ups of the block-tridiagonal inverse (K-FAC §4.3).

    Part ``k < ℓ − 1`` (:func:`kronlin.tridiag.tridiag_parts`) factorizes the
    damped factors of layers ``k`` and ``k + 1`` (Cholesky: the ``"factored"``
    model) and solves two generalized symmetric eigenproblems of layer ``k``'s
    sizes for ``Σ_{k+1|k+2}`` (the ``"exact"`` model's ``eigh``); the last part
    is one layer's factored inverse.
    """
    fac, eig = layer_costs(shapes, "factored"), layer_costs(shapes, "exact")
    n = len(fac)
    return [fac[k] + fac[k + 1] + eig[k] for k in range(n - 1)] + ([fac[-1]] if n else [])


def grad_workers(world: int, fraction: float) -> int:
    """KAISA's gradient-worker count ``max(1, fraction · world)``, which must divide ``world``."""
    if not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"grad_worker_fraction must be in [0, 1]; got {fraction!r}")
    g = max(1.0, float(fraction) * world)
    if abs(g - round(g)) > 1e-9 or world % round(g) != 0:
        divisors = [d for d in range(1, world + 1) if world % d == 0]
        raise ValueError(
            f"grad_worker_fraction={fraction!r} gives {g:g} gradient workers for {world} ranks; it must be an integer "
            f"dividing the world size: use a fraction k/{world} with k in {divisors}"
        )
    return int(round(g))


@dataclass(frozen=True)
class Assignment:
    """The result of :func:`assign`: owners, loads and KAISA's grid."""

    owners: tuple  # owners[k]: the rank that inverts layer k
    loads: tuple  # loads[r]: modelled refresh seconds of rank r
    world: int
    n_grad_workers: int  # g: ranks that hold each layer's inverse

    @property
    def n_columns(self) -> int:
        return self.world // self.n_grad_workers

    def column(self, rank: int) -> int:
        return rank % self.n_columns

    def row(self, rank: int) -> int:
        return rank // self.n_columns

    def column_ranks(self, c: int) -> list:
        return list(range(c, self.world, self.n_columns))

    def row_ranks(self, j: int) -> list:
        P = self.n_columns
        return list(range(j * P, (j + 1) * P))

    def layers_of(self, rank: int) -> list:
        """Layers whose inverse ``rank`` computes."""
        return [k for k, o in enumerate(self.owners) if o == rank]

    def layers_of_column(self, c: int) -> list:
        """Layers whose inverse the ranks of column ``c`` hold (the gradient workers of those layers)."""
        return [k for k, o in enumerate(self.owners) if self.column(o) == c]

    @property
    def imbalance(self) -> float:
        """max load / mean load (1 is perfect)."""
        mean = sum(self.loads) / len(self.loads)
        return max(self.loads) / mean if mean > 0 else 1.0


def assign(costs, world: int, grad_worker_fraction: float = 1.0) -> Assignment:
    """Greedy longest-processing-time assignment of layers to ranks (Graham's LPT, ≤ 4/3 of optimal).

    Layers are taken in order of decreasing cost (ties: lower index first);
    each goes to the column with the lowest total load, and to the rank with
    the lowest load inside that column (ties: lower index).  Deterministic: the
    same ``costs`` give the same assignment on every rank.
    """
    costs = [float(c) for c in costs]
    if world < 1:
        raise ValueError(f"world must be >= 1; got {world}")
    if any(not c >= 0.0 for c in costs):
        raise ValueError(f"costs must be non-negative numbers; got {costs}")
    g = grad_workers(world, grad_worker_fraction)
    P = world // g
    loads = [0.0] * world
    owners = [-1] * len(costs)
    for k in sorted(range(len(costs)), key=lambda k: (-costs[k], k)):
        col_loads = [sum(loads[r] for r in range(c, world, P)) for c in range(P)]
        c = min(range(P), key=lambda c: (col_loads[c], c))
        r = min(range(c, world, P), key=lambda r: (loads[r], r))
        owners[k] = r
        loads[r] += costs[k]
    return Assignment(tuple(owners), tuple(loads), world, g)
