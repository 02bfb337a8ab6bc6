"""Random well-posed problems and their dense references, for testing kronlin and code built on it.

Public for testing (docs/design.md §6): the self-check (``python -m kronlin``),
kronlin's test suite and the benchmarks in ``bench/`` draw their problems and
build their dense references here, so a problem means the same thing in all
three.  Nothing here calls kronlin's operators: every reference is plain
NumPy (``np.kron``, ``np.linalg``), so a result checked against it is checked
against an independent computation.

Every generator takes an explicit ``numpy.random.Generator`` (docs/design.md §5)
and returns NumPy float64 arrays; the same generator state gives the same
problem.  The conventions are kronlin's (docs/design.md §1): ``vec`` stacks
columns, ``A ⊗ G`` acts on ``(q, p)`` arrays, per-example data is batch-first,
a layer's homogeneous coordinate is its last input.

Generators
----------
:func:`orthonormal`, :func:`symmetric` (a given spectrum in a random basis),
:func:`spd` (log-spaced spectrum of a given condition), :func:`general`
(non-symmetric, given singular values), :func:`wishart`;
:func:`symmetric_pencil` and :func:`general_pencil` (second factors of
contractive Kronecker sums ``A ⊗ B ± C ⊗ D``); :func:`tanh_mlp` (activations
and back-propagated vectors of a random network), :func:`per_example_data`
(activations and errors of dense and weight-sharing layers).

Dense references
----------------
:func:`vec`, :func:`unvec`, :func:`layers_vec`; :func:`kron_rows` (rows of
``np.kron`` too large to form); :func:`kfac_factors` (K-FAC's batch factors),
:func:`damped_tridiag` (the damped ``F̃`` on its tridiagonal blocks) and
:func:`chain_inverse` (K-FAC §4.3's ``F̂⁻¹`` from those blocks);
:func:`per_example_grads` and :func:`gradient_matrix` (the per-example
gradients behind ``WoodburyFisher``).

Examples
--------
>>> import numpy as np
>>> from kronlin import Kron, testing
>>> rng = np.random.default_rng(0)
>>> A, G = testing.spd(rng, 3, cond=10.0), testing.spd(rng, 2, cond=10.0)
>>> X = rng.standard_normal((2, 3))
>>> np.allclose(testing.vec(Kron(A, G) @ X), np.kron(A, G) @ testing.vec(X))
True
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "orthonormal",
    "symmetric",
    "spd",
    "general",
    "wishart",
    "symmetric_pencil",
    "general_pencil",
    "tanh_mlp",
    "per_example_data",
    "vec",
    "unvec",
    "layers_vec",
    "kron_rows",
    "kfac_factors",
    "damped_tridiag",
    "chain_inverse",
    "per_example_grads",
    "gradient_matrix",
]


# -- matrices ----------------------------------------------------------------------------------


def orthonormal(rng: np.random.Generator, n: int) -> np.ndarray:
    """A random ``(n, n)`` orthogonal matrix (Haar: QR of a Gaussian matrix, signs fixed by ``R``'s diagonal)."""
    Q, R = np.linalg.qr(rng.standard_normal((n, n)))
    return Q * np.sign(np.diag(R))


def symmetric(rng: np.random.Generator, eigenvalues) -> np.ndarray:
    """``Q diag(eigenvalues) Qᵀ`` with a random orthonormal ``Q``, exactly symmetric."""
    w = np.asarray(eigenvalues, dtype=np.float64)
    Q = orthonormal(rng, w.shape[0])
    M = (Q * w) @ Q.T
    return (M + M.T) / 2


def spd(rng: np.random.Generator, n: int, cond: float = 10.0, batch=()) -> np.ndarray:
    """Symmetric positive definite ``(*batch, n, n)``, eigenvalues log-spaced in ``[1, cond]``, exactly symmetric."""
    if batch:
        return np.stack([spd(rng, n, cond) for _ in range(int(np.prod(batch)))]).reshape(tuple(batch) + (n, n))
    return symmetric(rng, np.geomspace(1.0, cond, n) if n > 1 else np.ones(1))


def general(rng: np.random.Generator, singular_values) -> np.ndarray:
    """Non-symmetric ``U diag(singular_values) Wᵀ`` with random orthonormal ``U``, ``W``."""
    s = np.asarray(singular_values, dtype=np.float64)
    U, W = orthonormal(rng, s.shape[0]), orthonormal(rng, s.shape[0])
    return (U * s) @ W.T


def wishart(rng: np.random.Generator, n: int, shift: float = 0.1) -> np.ndarray:
    """``W Wᵀ / n + shift·I`` with ``W`` Gaussian ``(n, n)``: a curvature-like SPD factor, eigenvalues in
    about ``[shift, 4 + shift]``, exactly symmetric."""
    W = rng.standard_normal((n, n))
    M = W @ W.T / n
    M = (M + M.T) / 2
    M[np.diag_indices(n)] += shift
    return M


def symmetric_pencil(rng: np.random.Generator, L: np.ndarray, r: float) -> np.ndarray:
    """Symmetric ``L S Lᵀ`` with ``S`` of eigenvalues ``r·linspace(-1, 1)``: ``ρ((L Lᵀ)⁻¹ C) = r``.

    ``(L Lᵀ)⁻¹ L S Lᵀ = L⁻ᵀ S Lᵀ`` is similar to ``S``, so with ``A = L Lᵀ`` (``L``
    its Cholesky factor) the generalized eigenvalues of ``(C, A)`` are those of
    ``S``, both signs included: ``A ⊗ B ± C ⊗ D`` is positive definite for
    both signs when the two radii multiply to less than one.
    """
    n = L.shape[0]
    Q = orthonormal(rng, n)
    s = r * (np.linspace(-1.0, 1.0, n) if n > 1 else np.ones(1))
    M = L @ ((Q * s) @ Q.T) @ L.T
    return (M + M.T) / 2


def general_pencil(rng: np.random.Generator, A: np.ndarray, r: float) -> np.ndarray:
    """Non-symmetric ``A R`` with ``‖R‖₂ = r`` (singular values log-spaced in ``[r/10, r]``), so ``ρ(A⁻¹C) <= r``."""
    n = A.shape[0]
    return A @ (r * general(rng, np.logspace(0.0, -1.0, n) if n > 1 else np.ones(1)))


# -- networks ----------------------------------------------------------------------------------


def tanh_mlp(rng: np.random.Generator, widths, N: int):
    """Activations ``(N, d_k)`` and back-propagated vectors ``(N, d_{k+1})`` of a random tanh MLP.

    Layer ``k`` maps ``d_k -> d_{k+1}`` with homogeneous weights ``(d_{k+1}, d_k + 1)``
    (K-FAC §2); the output's back-propagated vectors are standard normal (the
    Fisher of a squared-error model with targets sampled from its predictive
    distribution, K-FAC §5).  Returns ``(acts, grads)``, one array per layer.
    """
    L = len(widths) - 1
    Ws = [rng.standard_normal((widths[k + 1], widths[k] + 1)) / math.sqrt(widths[k] + 1) for k in range(L)]
    a = rng.standard_normal((N, widths[0]))
    acts, pre = [], []
    for k, W in enumerate(Ws):
        acts.append(a)
        s = np.concatenate([a, np.ones((N, 1))], axis=1) @ W.T
        pre.append(s)
        a = np.tanh(s) if k < L - 1 else s
    g = rng.standard_normal((N, widths[-1]))
    grads = [g] * L
    for k in range(L - 1, -1, -1):
        grads[k] = g
        if k > 0:
            g = (g @ Ws[k][:, :-1]) * (1.0 - np.tanh(pre[k - 1]) ** 2)
    return acts, grads


def per_example_data(rng: np.random.Generator, layers, N: int, S: int = 1):
    """Standard normal activations and errors of ``WoodburyFisher``'s layers, batch-first.

    ``layers`` holds ``("dense", d_in, d_out)`` or ``("shared", T, d_in, d_out)``
    (``T`` weight-sharing positions); per layer the activations are ``(N, d_in)``
    or ``(N, T, d_in)`` and the errors ``(N, d_out)`` or ``(N, T, d_out)``, with
    a label axis of length ``S`` after the batch axis when ``S > 1``.  Returns
    ``(acts, errs)``.
    """
    acts, errs = [], []
    for layer in layers:
        lead = () if layer[0] == "dense" else (layer[1],)
        da, de = layer[-2], layer[-1]
        acts.append(rng.standard_normal((N,) + lead + (da,)))
        errs.append(rng.standard_normal((N,) + ((S,) if S > 1 else ()) + lead + (de,)))
    return acts, errs


# -- dense references ----------------------------------------------------------------------------


def vec(X) -> np.ndarray:
    """Column-stacking ``vec`` of the last two axes (docs/design.md §1); leading axes are kept."""
    X = np.asarray(X)
    return np.swapaxes(X, -1, -2).reshape(X.shape[:-2] + (-1,))


def unvec(v, q: int, p: int) -> np.ndarray:
    """The inverse of :func:`vec`: ``(..., p*q)`` to ``(..., q, p)``."""
    v = np.asarray(v)
    return np.swapaxes(v.reshape(v.shape[:-1] + (p, q)), -1, -2)


def layers_vec(Us) -> np.ndarray:
    """The :func:`vec` of per-layer ``(..., d_out, d_in)`` arrays, concatenated in layer order: ``(..., P)``."""
    return np.concatenate([vec(u) for u in Us], axis=-1)


def kron_rows(A: np.ndarray, G: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Rows ``rows`` of ``np.kron(A, G)`` without forming it: row ``r`` is ``np.kron(A[r // q], G[r % q])``."""
    p, q = A.shape[0], G.shape[0]
    return (A[rows // q][:, :, None] * G[rows % q][:, None, :]).reshape(len(rows), p * q)


def kfac_factors(acts, grads) -> dict:
    """K-FAC's batch factors in NumPy float64: ``ā_kᵀ ā_j / N`` and ``g_kᵀ g_j / N`` for ``j ∈ {k, k+1}``.

    ``ā = [a, 1]`` (homogeneous coordinate last).  Returns ``{"A_diag", "G_diag",
    "A_off", "G_off"}``, lists as the layered operators take them.
    """
    N = acts[0].shape[0]
    A = [np.concatenate([np.asarray(a, dtype=np.float64), np.ones((N, 1))], axis=1) for a in acts]
    G = [np.asarray(g, dtype=np.float64) for g in grads]
    n = len(A)
    return {
        "A_diag": [a.T @ a / N for a in A],
        "G_diag": [g.T @ g / N for g in G],
        "A_off": [A[k].T @ A[k + 1] / N for k in range(n - 1)],
        "G_off": [G[k].T @ G[k + 1] / N for k in range(n - 1)],
    }


def damped_tridiag(f: dict, gamma: float):
    """The damped ``F̃`` (K-FAC §6.3 factored damping, π by the trace rule) on its tridiagonal blocks.

    ``f`` holds ``A_diag``, ``G_diag``, ``A_off``, ``G_off`` (``A_off`` empty for
    the block-diagonal ``F̆``).  Returns the dense ``P x P`` matrix (zero outside
    the tridiagonal blocks), the layer offsets (``P = off[-1]``) and the damped
    diagonal factor pairs.  Works in the dtype of ``f``.
    """
    pairs = []
    for A, G in zip(f["A_diag"], f["G_diag"]):
        pi = math.sqrt((np.trace(A) / A.shape[0]) / (np.trace(G) / G.shape[0]))
        pairs.append((A + pi * gamma * np.eye(A.shape[0], dtype=A.dtype),
                      G + gamma / pi * np.eye(G.shape[0], dtype=G.dtype)))
    sizes = [A.shape[0] * G.shape[0] for A, G in pairs]
    off = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    F = np.zeros((off[-1], off[-1]), dtype=pairs[0][0].dtype)
    for k, (A, G) in enumerate(pairs):
        F[off[k]:off[k + 1], off[k]:off[k + 1]] = np.kron(A, G)
    for k, (Ao, Go) in enumerate(zip(f["A_off"], f["G_off"])):
        B = np.kron(Ao, Go)
        F[off[k]:off[k + 1], off[k + 1]:off[k + 2]] = B
        F[off[k + 1]:off[k + 2], off[k]:off[k + 1]] = B.T
    return F, off, pairs


def chain_inverse(F: np.ndarray, off) -> np.ndarray:
    """The inverse of the matrix that agrees with ``F`` on its tridiagonal blocks and has a
    block-tridiagonal inverse (K-FAC §4.3's ``F̂⁻¹``), from ``F``'s blocks alone.

    A chain of layers is a decomposable graph: ``F̂⁻¹ = Σ_k pad(F_{k:k+2, k:k+2}⁻¹) − Σ_k pad(F_{k,k}⁻¹)``
    over the neighbouring pairs and the interior layers they share.
    """
    n = len(off) - 1
    if n == 1:
        return np.linalg.inv(F)
    out = np.zeros_like(F)
    for k in range(n - 1):
        s = slice(off[k], off[k + 2])
        out[s, s] += np.linalg.inv(F[s, s])
    for k in range(1, n - 1):
        s = slice(off[k], off[k + 1])
        out[s, s] -= np.linalg.inv(F[s, s])
    return (out + out.T) / 2


def per_example_grads(a, e) -> np.ndarray:
    """One layer's per-example gradients ``g_c = Σ_t e_{c,t} a_{i,t}ᵀ`` as ``(M, d_out, d_in)``, ``c = i·S + s``.

    ``a`` is ``(N, d_in)`` or ``(N, T, d_in)``; ``e`` is ``a``'s batch shape with
    ``d_out`` last and an optional label axis after the batch axis.  Computed
    in the inputs' dtype.
    """
    a, e = np.asarray(a), np.asarray(e)
    N = a.shape[0]
    a3 = a[:, None, :] if a.ndim == 2 else a  # (N, T, d_in)
    e4 = e.reshape(N, -1, a3.shape[1], e.shape[-1])  # (N, S, T, d_out)
    g = np.einsum("nsto,nti->nsoi", e4, a3)
    return g.reshape((g.shape[0] * g.shape[1],) + g.shape[2:])


def gradient_matrix(acts, errs) -> np.ndarray:
    """The dense ``P x M`` matrix ``G`` whose column ``c`` is the column-stacked per-example gradient ``g_c``,
    layers concatenated: ``WoodburyFisher``'s ``F = scale · G Gᵀ`` (Benzing app. I).  In the inputs' dtype."""
    return np.concatenate([vec(per_example_grads(a, e)) for a, e in zip(acts, errs)], axis=1).T
