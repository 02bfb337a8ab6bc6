"""KFRA and KFLR: Kronecker-factored recursive and low-rank Gauss-Newton (Botev, Ritter & Barber 2017).

Registry names ``"kfra"`` and ``"kflr"``.  Both approximate each diagonal
block of the Gauss-Newton matrix by ``Q̃_λ ⊗ G̃_λ`` with ``Q̃_λ = (1/N) Σ_n ā ā ᵀ``
(the layer input with its homogeneous 1) and a pre-activation Gauss-Newton
factor ``G̃_λ`` computed *without sampling* (contrast K-FAC §5):

* **KFRA** (Botev appendix G, algorithm 1) averages the output Hessian first,
  ``G̃_L = (1/N) Σ_n H_L^{(n)}``, and back-propagates that single matrix,

      G̃_{λ-1} = (W̄_λᵀ G̃_λ W̄_λ) ⊙ (1/N) Σ_n b_n b_nᵀ,     b_n = f'_{λ-1}(s_{λ-1}^{(n)}),

  with ``W̄_λ`` the weights without the bias column — the batch average of
  ``B_n W̄ᵀ G̃ W̄ B_n`` (appendix A eq. 29 with ``D_λ = 0``) taken with
  ``G̃_λ`` already averaged.  At ``N = 1`` it is the exact pre-activation
  Gauss-Newton block (appendix C.4).
* **KFLR** is the exact per-example version: with ``H_L^{(n)} = C_n C_nᵀ``
  (``loss.hessian_factor``), each column of ``C`` is back-propagated like a
  gradient and ``G̃_λ = (1/N) Σ_n Σ_j g_{nj} g_{nj}ᵀ`` equals
  ``(1/N) Σ_n J_nᵀ H_L^{(n)} J_n``, the exact batch pre-activation Gauss-Newton
  (``r`` backward passes for an output Hessian of rank ``r``).

Convolutions follow K-BFGS §2.2: ``Q̃ = E_n[Σ_t ā_t ā_tᵀ]`` and
``G̃ = E_n[(1/T) Σ_t G_{tt}]``.  KFRA's recursion runs in each layer's
flattened output coordinates, through the transposed convolution
(``layer.input_adjoint``), so it crosses convolutions exactly; the Kronecker
factor of a convolution is the average of the ``T`` diagonal position blocks.

The iteration is :class:`~.kfac.KroneckerOptimizer`'s with Botev et al.'s
damping (appendix B): the step ``δ̃ = −C̃⁻¹∇f`` with ``C̃ = G̃ + (γ + η)I``
inverted approximately by factored damping of strength ``√(γ + η)`` and the
trace-norm ``ω`` (B.1, eq. 36–38; ``damping="exact"`` inverts ``Q̃ ⊗ G̃ + (γ+η)I``
exactly), the step size ``α* = −δ̃ᵀ∇f / δ̃ᵀ(Ḡ + (τ+η)I)δ̃`` from the full
Gauss-Newton quadratic on the mini-batch (B.2, eq. 39–41; ``Ḡ``-products by
forward-mode ``J v``), τ adapted by Levenberg–Marquardt every ``T_τ = 5``
iterations with ``ω_τ = 0.95^{T_τ}`` (B.3.1; Botev's text has "ρ < 0.75" for
the increase, we use K-FAC §6.5's ``ρ < 1/4``, which the paper follows), and
γ chosen greedily among ``{ω_γ γ, γ, γ/ω_γ}`` every ``T_γ = 20`` iterations with
``ω_γ = 0.95^{T_γ}`` (B.3.2).  The hyper-parameter ``lam`` is Botev's τ.

The curvature comes from the current mini-batch only, with no running
average (Botev's algorithm 1), and is computed only when the inverse is
refreshed: for ``k ≤ 3`` and every ``T3 = 20`` iterations by default, as for
K-FAC (§8), so each step's cost stays honest.  ``T3=1`` is Botev's setting
(curvature and inverse from every mini-batch); on ``curves-ae`` (784 outputs)
KFLR's curvature costs about 230 forward-backward passes, so ``T3=1`` is slow there.
"""

from __future__ import annotations

import numpy as np

from . import register
from .hparams import boolean
from .kfac import KroneckerOptimizer

__all__ = ["KFLR", "KFRA", "input_factors", "kflr_factors", "kfra_factors", "mean_output_hessian"]


def _local(values) -> list:
    """The reduction over ranks of one process: the values themselves."""
    return list(values)


def input_factors(trace, reduce=_local) -> list:
    """``Q̃_λ = (1/N) Σ_n ā ā ᵀ`` per layer (``Σ_t`` over positions for a convolution, K-BFGS §2.2).

    ``reduce`` sums a list of arrays over the ranks of a data-parallel run
    (:meth:`Optimizer._sums`); ``trace`` then holds this rank's examples and
    ``N`` is the global batch size.  The default is one process.
    """
    sums = [a.reshape(-1, a.shape[-1]).T @ a.reshape(-1, a.shape[-1]) for a in trace.a]
    *sums, N = reduce(sums + [float(trace.N)])
    return [_sym(S / N) for S in sums]


def _sym(M):
    return (M + M.T) / 2


def _transpose_jacobian(layer, W, U):
    """Rows ``u ↦ K ᵀu`` for the layer map ``K`` from its flat input to its flat pre-activation.

    ``U`` is ``(m, out_size)`` (flattened like ``layer.flatten_out``); the
    result is ``(m, in_size)``: for a dense layer ``U W̄``, for a convolution
    the transposed convolution ``col2im(unflatten(U) W̄)``.
    """
    return layer.input_adjoint(layer.unflatten_out(U) @ W[:, :-1])


def _position_average(layer, G):
    """The Kronecker factor of a layer from its flat pre-activation matrix: ``(1/T) Σ_t G_{tt}`` for a convolution."""
    T = getattr(layer, "T", None)
    if T is None:
        return G
    C = layer.d_out
    G4 = G.reshape(C, T, C, T)  # flatten_out orders the flat index (channel, position)
    return np.einsum("atbt->ab", G4) / T


#: Per-chunk budget (float64 entries) for the per-example arrays KFRA and KFLR form:
#: ``(n, k, k)`` output Hessians and the ``n·r`` back-propagated rows of KFLR.
CHUNK_ENTRIES = 1 << 22


def _output_hessian_sum(loss, out) -> np.ndarray:
    """``Σ_n H_L^{(n)}``, in chunks of examples so that no ``(N, k, k)`` array is formed at once."""
    N, k = out.shape
    step = max(1, CHUNK_ENTRIES // (k * k))
    H = np.zeros((k, k))
    for n0 in range(0, N, step):
        H += loss.hessian(out[n0 : n0 + step]).sum(axis=0)
    return H


def mean_output_hessian(loss, out) -> np.ndarray:
    """``(1/N) Σ_n H_L^{(n)}``, in chunks of examples so that no ``(N, k, k)`` array is formed at once."""
    return _sym(_output_hessian_sum(loss, out) / out.shape[0])


def kfra_factors(net, loss, trace, reduce=_local) -> list:
    """KFRA's ``G̃_λ`` for every layer (Botev appendix G, algorithm 1), from ``E[H_L]`` back.

    ``G̃_L = (1/N) Σ_n H_L^{(n)}``; ``G̃_{λ-1} = (K_λᵀ G̃_λ K_λ) ⊙ (1/N) Σ_n b_n b_nᵀ`` in
    flattened coordinates (``K_λ = W̄_λ`` for a dense layer), then each layer's
    factor is :func:`_position_average` of its matrix.  The batch sums
    (``Σ_n H_L^{(n)}`` and every ``Σ_n b_n b_nᵀ``) do not depend on the recursion,
    so a data-parallel run reduces them in one collective first (``reduce``,
    see :func:`input_factors`) and every rank runs the same recursion.
    """
    layers, params = net.layers, trace.params
    bb = [layers[i - 1].flatten_out(trace.dphi[i - 1]) for i in range(1, len(layers))]
    H, *bb, N = reduce([_output_hessian_sum(loss, trace.out)] + [b.T @ b for b in bb] + [float(trace.N)])
    G = _sym(H / N)
    out = [None] * len(layers)
    for i in range(len(layers) - 1, -1, -1):
        out[i] = _position_average(layers[i], G)
        if i == 0:
            break
        GK = _transpose_jacobian(layers[i], params[i], G)  # G K   (G symmetric)
        KGK = _transpose_jacobian(layers[i], params[i], GK.T)  # Kᵀ G K
        G = _sym(KGK * (bb[i - 1] / N))
    return out


def kflr_factors(net, loss, trace, reduce=_local) -> list:
    """KFLR's ``G̃_λ = (1/N) Σ_n J_nᵀ H_L^{(n)} J_n`` per layer, through the columns of ``H_L = C Cᵀ``.

    Every column ``C_n[:, j]`` is back-propagated like an output gradient
    (``net.backward``), ``r`` per example, in chunks of examples whose ``n·r``
    rows go through one backward pass; ``G̃_λ = (1/N) Σ_{n,j} g_{nj} g_{nj}ᵀ``
    (``1/(N·T)`` and ``Σ_t`` for a convolution).  The per-layer sums are
    reduced over the ranks in one collective (``reduce``, see :func:`input_factors`).
    """
    N, k = trace.out.shape
    acc = [np.zeros((L.d_out, L.d_out)) for L in net.layers[:-1]]
    if acc:
        per_row = sum(int(np.prod(x.shape[1:])) for x in list(trace.a) + list(trace.s)) * 2
        step = max(1, CHUNK_ENTRIES // (max(per_row, k * k) * k))
        for n0 in range(0, N, step):
            sl = slice(n0, min(n0 + step, N))
            C = loss.hessian_factor(trace.out[sl])  # (n, k, r)
            n, _, r = C.shape
            sub = trace.rows(sl, r)
            g = net.backward(sub, C.transpose(0, 2, 1).reshape(n * r, k))
            for i, gi in enumerate(g[:-1]):
                g2 = gi.reshape(-1, gi.shape[-1])
                acc[i] += g2.T @ g2
    # Σ_j C_j C_jᵀ = H_L: the output layer needs no rows
    last, *acc, N = reduce([_output_hessian_sum(loss, trace.out)] + acc + [float(N)])
    res = [_sym(G / (N * (getattr(L, "T", None) or 1))) for L, G in zip(net.layers[:-1], acc)]
    return res + [_sym(last / N)]


class _BotevOptimizer(KroneckerOptimizer):
    """Botev et al.'s γ convention on :class:`KroneckerOptimizer`: ``C̃ = G̃ + (γ + η)I`` (appendix B)."""

    supports_distributed = True  # the curvature's batch sums go through _sums (one collective each)

    defaults = {**KroneckerOptimizer.common_defaults, "momentum": False}
    spec = {**KroneckerOptimizer.common_spec, "momentum": boolean()}

    @property
    def omega2(self) -> float:
        """γ's greedy factor ``ω_γ`` (default ``0.95^{T₂}``, Botev B.3.2)."""
        w = self.hparams["omega2"]
        return 0.95 ** self.hparams["T2"] if w is None else float(w)

    def _initial_gamma(self) -> float:
        """γ starts at τ (``lam``): the two damping terms start equal."""
        return float(self.hparams["lam"])

    def _strength(self, gamma: float) -> float:
        """Factored damping of ``k = γ + η`` has strength ``√k`` (Botev eq. 36)."""
        return float(np.sqrt(gamma + self.hparams["eta"]))

    def _tikhonov(self, gamma: float) -> float:
        """``C̃ = Q̃ ⊗ G̃ + (γ + η) I`` (Botev eq. 35)."""
        return gamma + self.hparams["eta"]

    def _factors(self, trace) -> dict:
        Q = input_factors(trace, self._sums)  # _sums: over the ranks' shards (one process: as is)
        if self._needs_G():  # with the second factor, or without it for Benzing D.8's π (factored damping)
            G = self._pre_activation(trace)
        else:  # second_factor=False with exact damping: G is not used, skip computing it
            G = [np.eye(L.d_out) for L in self.net.layers]
        return {"A_diag": Q, "G_diag": G}

    def _pre_activation(self, trace) -> list:  # pragma: no cover - abstract
        raise NotImplementedError


class KFRA(_BotevOptimizer):
    """KFRA (Botev et al. 2017, appendix G algorithm 1; damping and step of appendix B).

    Hyper-parameters (``defaults``): ``lam=0.1`` (initial τ; as for K-FAC, the
    best of {0.01, 0.1, 1} on the kronlin.train tasks), ``gamma=None`` (initial γ,
    ``None`` → τ), ``eta=1e-5``, ``T1=5`` (``T_τ``), ``T2=20`` (``T_γ``),
    ``T3=20`` (curvature and inverse refresh; ``1`` is Botev's every-batch setting),
    ``omega1=None`` (→ ``0.95^T1``), ``omega2=None`` (→ ``0.95^T2``),
    ``momentum=False`` (Botev's plain re-scaled step; ``True`` adds K-FAC §7's
    momentum), ``damping="factored"``, ``second_factor=True``, ``pi="trace"``,
    ``polyak=None``.  See the module docstring.
    """

    name = "kfra"

    def _pre_activation(self, trace) -> list:
        return kfra_factors(self.net, self.loss, trace, self._sums)


class KFLR(_BotevOptimizer):
    """KFLR (Botev et al. 2017 §3): the exact batch pre-activation Gauss-Newton through the factor of ``H_L``.

    The same iteration and defaults as :class:`KFRA`; the curvature costs one
    backward pass per column of ``loss.hessian_factor`` (``k`` for the losses here).
    """

    name = "kflr"

    def _pre_activation(self, trace) -> list:
        return kflr_factors(self.net, self.loss, trace, self._sums)


register(KFRA.name, KFRA)
register(KFLR.name, KFLR)
