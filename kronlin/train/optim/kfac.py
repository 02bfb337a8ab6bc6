"""K-FAC: Kronecker-factored approximate curvature (Martens & Grosse 2015).

Registry names ``"kfac"`` (block-diagonal inverse, §4.2) and ``"kfac-tridiag"``
(block-tridiagonal inverse, §4.3; networks of dense layers only).

One iteration ``k`` (1-based) on a mini-batch, K-FAC §9 algorithm 2:

1. forward/backward pass: the batch loss ``h(θ) = ℓ(θ) + (η/2)‖θ‖²`` and its
   gradient ``∇h`` (ℓ₂ term η on every weight and bias, §6.1, §13);
2. a second backward pass with targets sampled from the model's predictive
   distribution (§5) gives the statistics ``Ā_{i,j}``, ``G_{i,j}``, folded into
   exponentially decaying averages with ``ε = min(1 − 1/k, max_decay)``
   (:class:`kronlin.FactorEstimator`);
3. every ``T₃`` iterations (and for ``k ≤ 3``, §8/§9) the approximate inverse
   is rebuilt from the current averages with factored Tikhonov damping γ
   (§6.3, :class:`kronlin.BlockDiagInverse` / :class:`kronlin.BlockTridiagInverse`);
   in between the last one is reused;
4. the proposal ``Δ = −F̆⁻¹ ∇h`` is re-scaled with the momentum of §7,
   ``δ = αΔ + μδ₀``, ``(α, μ)`` minimising the exact-Fisher quadratic model
   ``M(δ) = h + ∇hᵀδ + ½ δᵀ(F + (λ+η)I)δ`` of §6.4 on the mini-batch, whose
   ``F``-products are the ``J v`` products of appendix C;
5. every ``T₂`` iterations γ is chosen greedily among ``{γ, ω₂γ, γ/ω₂}`` by the
   lowest ``M(δ)`` (§6.6); every ``T₁`` iterations λ follows the
   Levenberg–Marquardt rule of §6.5 with the reduction ratio
   ``ρ = (h(θ+δ) − h(θ)) / (M(δ) − M(0))``;
6. ``θ ← θ + δ`` unless the loss there is not finite: such a step is rejected
   (weights unchanged, :meth:`Optimizer.apply_update`), λ and γ are raised
   (``λ ← λ/ω₁``, ``γ ← γ/ω₂``) and the inverse is rebuilt at the next step;
7. optional Polyak averaging of the iterates (§13: ``θ̂ ← ξθ̂ + (1−ξ)θ``),
   available as :attr:`KFAC.averaged_params` (it never feeds back into training).

Ablation switches (no new code needed for Benzing et al. 2022's experiments):

* ``damping="exact"`` — the block ``Ā ⊗ G + γ² I`` of eq. (6) (γ standing for
  ``√(λ+η)`` as in §6.6), solved exactly in the factors' eigenbases
  (:meth:`kronlin.KronEigh.solve`) instead of the factored
  ``(Ā + πγI) ⊗ (G + (γ/π)I)`` of eq. (7) (Benzing §3, "correct" damping);
* ``second_factor=False`` — "dropping the second Kronecker factor" (Benzing
  §4.2): the preconditioner ``(Ā + λ_A I)⁻¹ ⊗ I``.  With factored damping
  ``λ_A = πγ`` is K-FAC's own damping of the first factor, π computed from the
  real ``Ā`` and ``G`` (Benzing app. D.8: "computing E_F E_Fᵀ and λ_A, λ_E as
  in KFAC and then computing the parameter update only using the first
  Kronecker factor"), so the sampled backward pass still runs; with exact
  damping the block is ``Ā ⊗ I + γ²I`` and ``G`` is not needed (the sampled
  pass is skipped).  :attr:`KroneckerOptimizer.factors` keeps the real ``G``.

Convolutions (``Conv2D`` layers, block-diagonal only): the factors are those of
K-BFGS §2.2 / KFC, ``Ā = E_n[Σ_t ā_t ā_tᵀ]`` (summed over the ``T`` positions)
and ``G = E_n[(1/T) Σ_t g_t g_tᵀ]``, which :class:`kronlin.FactorEstimator`
forms from the ``(N, T, d)`` patches directly.  Each layer has its own
estimator; the tridiagonal variant uses one estimator across the layers for
the cross-layer factors.

The shared machinery (damping, re-scaling, adaptation, rejection, averaging,
state) lives in :class:`KroneckerOptimizer`; :mod:`.kfra` reuses it for KFRA
and KFLR with Botev et al.'s curvature.
"""

from __future__ import annotations

import math

import numpy as np

from ... import BlockDiagInverse, BlockTridiagInverse, FactorEstimator, Kron, pi_factor
from . import register
from .base import Optimizer, all_finite, merge_layer_states

from .hparams import HALF_OPEN_UNIT, NONNEGATIVE, POSITIVE, boolean, choice, integer, real

__all__ = ["KFAC", "KFACTridiag", "KroneckerOptimizer", "levenberg_marquardt", "solve_alpha_mu"]

#: λ and γ are kept inside these bounds (a guard against underflow to 0 after
#: long runs of good steps and against runaway growth after many rejections).
DAMPING_BOUNDS = (1e-8, 1e8)


def levenberg_marquardt(lam: float, rho: float, omega: float) -> float:
    """K-FAC §6.5's rule: ``ρ > 3/4 → λ ← ωλ``; ``ρ < 1/4 → λ ← λ/ω``; otherwise unchanged.

    ``ρ = (h(θ+δ) − h(θ)) / (M(δ) − M(0))`` is the reduction ratio and
    ``0 < ω < 1`` the decay constant (``ω₁ = (19/20)^{T₁}``).  A non-finite
    ``ρ`` (no predicted reduction) leaves λ unchanged.
    """
    if not 0.0 < omega < 1.0:
        raise ValueError(f"omega must be in (0, 1); got {omega!r}")
    if not math.isfinite(rho):
        return lam
    if rho > 0.75:
        return omega * lam
    if rho < 0.25:
        return lam / omega
    return lam


def solve_alpha_mu(quad, grad_dot):
    """The coefficients minimising a quadratic model along one or two directions (K-FAC §6.4, §7).

    Parameters
    ----------
    quad : (m, m) array, m ∈ {1, 2}
        ``[[ΔᵀCΔ, ΔᵀCδ₀], [δ₀ᵀCΔ, δ₀ᵀCδ₀]]`` with ``C = F + (λ+η)I`` (or the
        1×1 ``[[ΔᵀCΔ]]`` without momentum).
    grad_dot : (m,) array
        ``[∇hᵀΔ, ∇hᵀδ₀]``.

    Returns
    -------
    coef : (2,) array
        ``(α, μ)`` (``μ = 0`` in the 1-D case, and when ``Δ`` and ``δ₀`` are
        numerically parallel, where the 2×2 system is singular).
    dM : float
        ``M(δ) − M(0) = ½ [α, μ]·grad_dot`` at the minimiser (§6.5).
    """
    Q = np.asarray(quad, dtype=np.float64)
    b = np.asarray(grad_dot, dtype=np.float64)
    if Q.shape == (2, 2):
        det = Q[0, 0] * Q[1, 1] - Q[0, 1] * Q[1, 0]
        if det > 1e-12 * abs(Q[0, 0] * Q[1, 1]) and Q[0, 0] > 0:
            coef = -np.linalg.solve(Q, b)
            return coef, 0.5 * float(coef @ b)
    alpha = -b[0] / Q[0, 0]
    return np.array([alpha, 0.0]), 0.5 * float(alpha * b[0])


def _vdot(U, V) -> float:
    return float(sum(np.vdot(u, v) for u, v in zip(U, V)))


def _is_conv(layer) -> bool:
    return getattr(layer, "T", None) is not None


class _ExactInverse:
    """Per-layer ``(Ā ⊗ G + c I)⁻¹`` from cached eigenbases (Benzing §3's exact damping)."""

    def __init__(self, eighs, damping: float):
        self.eighs, self.damping = eighs, float(damping)

    def apply(self, V_list):
        return [e.solve(V, damping=self.damping) for e, V in zip(self.eighs, V_list)]


class KroneckerOptimizer(Optimizer):
    """Shared machinery of the Kronecker-factored optimizers (K-FAC §6, §7; Botev et al. appendix B).

    A subclass supplies the curvature factors (:meth:`_observe`,
    :meth:`_factors`) and the meaning of γ (:meth:`_strength`,
    :meth:`_tikhonov`); everything else — the ℓ₂ term, factored or exact
    damping, inverse refresh every ``T3``, the exact-Gauss-Newton re-scaling
    with optional momentum, the Levenberg–Marquardt λ, the greedy γ, the
    rejection of non-finite steps, Polyak averaging and the bit-exact state —
    is here.

    Hyper-parameters common to all subclasses (defaults in each subclass's ``defaults``):

    ``lam``       initial Tikhonov λ of the exact quadratic model (Botev's τ)
    ``gamma``     initial γ (``None``: derived from ``lam`` and ``eta``)
    ``eta``       ℓ₂ coefficient η (``(η/2)‖θ‖²`` added to the objective)
    ``T1``        λ adaptation period; ``omega1`` its factor (``None``: ``(19/20)^T1``)
    ``T2``        γ adaptation period (a multiple of ``T3``); ``omega2`` its factor
    ``T3``        inverse refresh period
    ``momentum``  re-scale with ``δ = αΔ + μδ₀`` (§7) instead of ``δ = αΔ`` (§6.4, Botev B.2)
    ``damping``   ``"factored"`` (eq. 7) or ``"exact"`` (eq. 6 / Benzing §3)
    ``second_factor``  ``False`` drops every ``G`` from the preconditioner (Benzing §4.2, D.8)
    ``pi``        the π of factored damping: ``"trace"``, ``"fro"``, ``"spectral"`` or a number
    ``polyak``    ``None`` or the iterate-averaging constant ξ ∈ [0, 1) (§13)
    ``lr``        ``None`` (α, μ from the quadratic model, §6.4/§7) or a fixed step size η: the update is
                  ``δ = ηΔ + βδ₀`` (heavy-ball momentum β with ``momentum=True``, else β = 0) with γ
                  fixed (no greedy γ, no λ rule, no Fisher products) — the protocol of Benzing 2022
                  (fixed step size and damping, momentum 0.9) and of Ren et al.'s K-FAC baseline
    ``beta``      the heavy-ball coefficient of the fixed-step mode (default 0.9)
    ``tau2``      K-FAC §8: the Fisher products of the quadratic model on a random subset of ``⌈τ₂N⌉``
                  examples of the batch (the paper's experiments: 1/4; the gradient stays the whole batch's)
    """

    tridiagonal = False

    #: Hyper-parameters shared by K-FAC, KFRA and KFLR (each subclass adds its own).
    common_defaults = {
        "lam": 0.1,
        "gamma": None,
        "eta": 1e-5,
        "T1": 5,
        "T2": 20,
        "T3": 20,
        "omega1": None,
        "omega2": None,
        "damping": "factored",
        "second_factor": True,
        "pi": "trace",
        "polyak": None,
        "lr": None,
        "beta": 0.9,
        "tau2": 1.0,
    }
    common_spec = {
        "lam": POSITIVE,
        "gamma": real(0, low_open=True, optional=True),
        "eta": NONNEGATIVE,
        "T1": integer(1),
        "T2": integer(1),
        "T3": integer(1),
        "omega1": real(0, 1, low_open=True, high_open=True, optional=True),
        "omega2": real(0, 1, low_open=True, high_open=True, optional=True),
        "damping": choice("factored", "exact"),
        "second_factor": boolean(),
        "pi": real(0, low_open=True, names=("trace", "fro", "spectral")),
        "polyak": real(0, 1, high_open=True, optional=True),
        "lr": real(0, low_open=True, optional=True),
        "beta": HALF_OPEN_UNIT,
        "tau2": real(0, 1, low_open=True),
    }

    def __init__(self, net, loss, *, seed: int = 0, **hparams):
        super().__init__(net, loss, seed=seed, **hparams)
        self._validate()
        h = self.hparams
        self.lam = float(h["lam"])
        self.gamma = float(h["gamma"]) if h["gamma"] is not None else self._initial_gamma()
        self._delta0 = None  # the previous accepted update δ₀ (§7)
        self._frozen = None  # the factors the current inverse was built from
        self._eighs = None  # their eigenbases (exact damping)
        self._inverse = None  # the inverse in use and the γ it was built with
        self._inverse_gamma = None
        self._stale = True  # rebuild at the next step (start, or after a rejection)

    # ----------------------------------------------------------- configuration
    def _validate(self):
        """What ties hyper-parameters together (each one's type and range is in ``spec``)."""
        h = self.hparams
        if h["T2"] % h["T3"]:
            raise ValueError(f"{self.name}: T2 ({h['T2']}) must be a multiple of T3 ({h['T3']}) (K-FAC §6.6)")

    @property
    def omega1(self) -> float:
        """λ's Levenberg–Marquardt factor ``ω₁`` (default ``(19/20)^{T₁}``, K-FAC §6.5)."""
        w = self.hparams["omega1"]
        return (19 / 20) ** self.hparams["T1"] if w is None else float(w)

    @property
    def omega2(self) -> float:
        """γ's greedy factor ``ω₂`` (default ``(√(19/20))^{T₂}``, K-FAC §6.6)."""
        w = self.hparams["omega2"]
        return math.sqrt(19 / 20) ** self.hparams["T2"] if w is None else float(w)

    # -- what γ means (K-FAC: the factored strength itself, ≈ √(λ+η)) --------
    def _initial_gamma(self) -> float:
        """K-FAC §6.6 / algorithm 2: ``γ ← √(λ + η)``."""
        return math.sqrt(self.hparams["lam"] + self.hparams["eta"])

    def _strength(self, gamma: float) -> float:
        """The factored-damping strength handed to the inverse (eq. 7)."""
        return gamma

    def _tikhonov(self, gamma: float) -> float:
        """The multiple of ``I`` added to each block with ``damping="exact"`` (eq. 6)."""
        return gamma * gamma

    # -- curvature (subclasses) -----------------------------------------------
    def _observe(self, trace) -> bool:
        """Fold this batch into running statistics (every iteration); ``False`` if they are not finite."""
        return True

    def _factors(self, trace) -> dict:
        """``{"A_diag", "G_diag", "A_off", "G_off"}`` for an inverse built now: new arrays that nothing else holds
        or changes (the optimizer keeps them as its frozen factors until the next refresh)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- inverses
    def _subset(self, N: int, tau: float) -> np.ndarray:
        """K-FAC §8: ``⌈τN⌉`` distinct examples of the batch, drawn by the optimizer's generator (sorted)."""
        return np.sort(self.rng.choice(N, size=math.ceil(tau * N), replace=False))

    def check_distributed(self) -> None:
        super().check_distributed()
        taus = {k: self.hparams[k] for k in ("tau1", "tau2") if self.hparams.get(k, 1.0) < 1.0}
        if taus:
            raise ValueError(f"--distributed is not available with the §8 subsets {taus}: a subset of the global "
                             "batch would have to be drawn across the ranks' shards")  # fmt: skip

    def _needs_G(self) -> bool:
        """Whether the second factor is estimated: always with it, and without it for D.8's π."""
        return self.hparams["second_factor"] or self.hparams["damping"] == "factored"

    def _refresh(self, trace) -> None:
        f = self._factors(trace)
        # _factors hands out arrays of the caller's own (FactorEstimator's copies, KFRA's fresh products): kept as
        # they are, no second copy (2.9 ms of a 50 ms curves-ae refresh)
        f = {key: [np.asarray(M) for M in f.get(key, [])] for key in ("A_diag", "G_diag", "A_off", "G_off")}
        if not self.hparams["second_factor"] and self.hparams["damping"] == "factored":
            # Benzing D.8: λ_A = π·γ with K-FAC's π of the real Ā and G (a number given as pi is used as is)
            pi = self.hparams["pi"]
            f["pi"] = [float(pi_factor(A, G, norm=pi)) if isinstance(pi, str) else float(pi)
                       for A, G in zip(f["A_diag"], f["G_diag"])]  # fmt: skip
        self._frozen = f
        self._eighs = None
        self._inverse = self._inverse_gamma = None
        self._stale = False

    def _first_factor_only(self, gamma: float) -> list:
        """Benzing D.8's damped first factors ``Ā + π γ I`` (``second_factor=False``, factored damping)."""
        f, s = self._frozen, self._strength(gamma)
        return [A + (p * s) * np.eye(A.shape[0]) for A, p in zip(f["A_diag"], f["pi"])]

    def _G_used(self) -> list:
        """The second factors the preconditioner uses: ``G``, or ``I`` when it is dropped."""
        f = self._frozen
        if self.hparams["second_factor"]:
            return f["G_diag"]
        return [np.eye(L.d_out) for L in self.net.layers]

    def _build(self, gamma: float):
        """The damped approximate inverse for ``gamma`` from the frozen factors."""
        f, h = self._frozen, self.hparams
        if self.dp is not None:
            return self._build_sharded(gamma)
        if h["damping"] == "exact":
            if self._eighs is None:
                self._eighs = [Kron(A, G).eigh() for A, G in zip(f["A_diag"], self._G_used())]
            return _ExactInverse(self._eighs, self._tikhonov(gamma))
        if not h["second_factor"]:  # (Ā + πγI)⁻¹ ⊗ I, damped here (gamma=0 below adds nothing)
            return BlockDiagInverse(self._first_factor_only(gamma), self._G_used(), gamma=0.0)
        if self.tridiagonal:
            return BlockTridiagInverse(f["A_diag"], f["G_diag"], f["A_off"], f["G_off"],
                                       gamma=self._strength(gamma), pi=h["pi"])  # fmt: skip
        return BlockDiagInverse(f["A_diag"], f["G_diag"], gamma=self._strength(gamma), pi=h["pi"])

    def _build_sharded(self, gamma: float):
        """:meth:`_build` under ``--distributed``: each layer's inversion on one rank, shared per the placement.

        :meth:`DataParallel.kfac <kronlin.train.distributed.DataParallel.kfac>`
        assigns the layers by the cost model; the factored inverses (or the
        eigenbases, for exact damping: one eigendecomposition per refresh,
        every candidate γ reusing it) are those of the single-process
        :class:`kronlin.BlockDiagInverse` / :meth:`kronlin.Kron.eigh`.  A
        ``LinAlgError`` on the rank that owns a layer is a ``LinAlgError`` on
        every rank, as in one process (the candidate γ is skipped).  The
        block-tridiagonal inverse's set-ups (pairs of layers) are assigned the
        same way and assembled on every rank (:meth:`DataParallel.tridiag
        <kronlin.train.distributed.DataParallel.tridiag>`), giving the
        single-process :class:`kronlin.BlockTridiagInverse` bit for bit.
        """
        from ...distributed import RankError

        f, h = self._frozen, self.hparams
        shapes = [W.shape for W in self.net.params]
        try:
            if self.tridiagonal:  # _validate: factored damping with both factors
                return self.dp.tridiag(shapes).build(f["A_diag"], f["G_diag"], f["A_off"], f["G_off"],
                                                     gamma=self._strength(gamma), pi=h["pi"])  # fmt: skip
            if h["damping"] == "exact":
                if self._eighs is None:
                    kf = self.dp.kfac(shapes, "exact")
                    self._eighs = kf.refresh(f["A_diag"], self._G_used()).frozen()
                return self._eighs.damped(self._tikhonov(gamma))
            if not h["second_factor"]:  # D.8: only (Ā + πγI)⁻¹ is computed and shared
                kf = self.dp.kfac(shapes, "factored", second_factor=False)
                return kf.refresh(self._first_factor_only(gamma), None, gamma=0.0, pi=1.0).frozen()
            kf = self.dp.kfac(shapes, "factored")
            return kf.refresh(f["A_diag"], f["G_diag"], gamma=self._strength(gamma), pi=h["pi"]).frozen()
        except RankError as exc:
            if exc.only("LinAlgError"):
                raise np.linalg.LinAlgError(str(exc)) from exc
            raise

    def _inverse_for(self, gamma: float):
        if self._inverse is not None and self._inverse_gamma == gamma:
            return self._inverse
        return self._build(gamma)

    @property
    def inverse(self):
        """The approximate inverse currently in use (``apply(V_list)``), or ``None`` before the first step."""
        return self._inverse

    @property
    def block_damping(self) -> float:
        """The multiple of ``I`` added to each Kronecker block at the current γ (exact damping's ``c`` in
        ``Ā ⊗ G + c I``: γ² for K-FAC, eq. 6; γ + η for KFRA/KFLR, Botev eq. 35)."""
        return float(self._tikhonov(self.gamma))

    @property
    def factors(self) -> dict | None:
        """The (undamped) factors the current inverse was built from, or ``None``."""
        return self._frozen

    def precondition(self, grads, gamma: float | None = None) -> list:
        """The proposal ``Δ = −F̆⁻¹ ∇h`` for a gradient list, with the current (or a given) γ."""
        if self._frozen is None:
            raise RuntimeError("no curvature yet: call step() first")
        inv = self._inverse_for(self.gamma if gamma is None else float(gamma))
        return [-U for U in inv.apply(grads)]

    # ------------------------------------------------------------------ step
    def _reject(self, loss_value: float, reason: str) -> dict:
        """Raise λ and γ after a rejected step and rebuild the inverse next time."""
        hi = DAMPING_BOUNDS[1]
        self.lam = min(self.lam / self.omega1, hi)
        self.gamma = min(self.gamma / self.omega2, hi)
        self._stale = True
        return {"loss": float(loss_value), "loss_before": float(loss_value), "accepted": False,
                "reason": reason, "lambda": self.lam, "gamma": self.gamma}  # fmt: skip

    def _quadratic(self, trace, H, grads, Delta, J0, d0):
        """``((α, μ), M(δ) − M(0))`` for the proposal Δ (K-FAC §6.4, §7; Botev B.2).

        The scalars ``ΔᵀFΔ``, ``ΔᵀFδ₀``, ``δ₀ᵀFδ₀`` come from ``J Δ`` and ``J δ₀``
        (one forward-mode pass each, ``Jδ₀`` shared by all candidate γ) and the
        output Hessian ``H`` (:meth:`Loss.hvp_operator`, its curvature computed once per step),
        ``(1/N) Σ_n (Ju)_nᵀ H_n (Jv)_n`` (appendix C).
        """
        N, c = self._batch_size(trace), self.lam + self.hparams["eta"]
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            JD = self.net.jvp(trace, Delta)  # trace: the τ₂ subset when tau2 < 1 (step())
            HJD = H(JD)
            gD, DD = _vdot(grads, Delta), _vdot(Delta, Delta)
            if J0 is None:
                (sD,) = self._sums([np.sum(JD * HJD)])  # over the ranks' examples (one process: as is)
                DFD = float(sD) / N
                return solve_alpha_mu([[DFD + c * DD]], [gD])
            J0, HJ0 = J0
            sD, sd, s0 = self._sums([np.sum(JD * HJD), np.sum(JD * HJ0), np.sum(J0 * HJ0)])
            DFD, DFd, d0Fd0 = float(sD) / N, float(sd) / N, float(s0) / N
            Dd, dd, gd = _vdot(Delta, d0), _vdot(d0, d0), _vdot(grads, d0)
            Q = [[DFD + c * DD, DFd + c * Dd], [DFd + c * Dd, d0Fd0 + c * dd]]
            return solve_alpha_mu(Q, [gD, gd])

    def step(self, X, Y) -> dict:
        """One K-FAC iteration on ``(X, Y)`` (see the module docstring); returns the step record."""
        h = self.hparams
        self.iteration += 1
        k, eta = self.iteration, h["eta"]
        params = self.net.params
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            value, grads, trace = self._loss_and_grads(X, Y)
        sq = _vdot(params, params)
        h0 = value + 0.5 * eta * sq
        if eta:
            grads = [G + eta * W for G, W in zip(grads, params)]
        if not (math.isfinite(h0) and all_finite(grads)):
            self.n_rejected += 1
            return self._reject(value, "non-finite loss or gradient at the current weights")
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            ok = self._observe(trace)
        if not ok:
            self.n_rejected += 1
            return self._reject(value, "non-finite curvature statistics")
        refreshed = self._stale or k <= 3 or k % h["T3"] == 0
        if refreshed:
            self._refresh(trace)
        fixed = h["lr"] is not None  # the fixed-step protocol: no quadratic model, no damping adaptation
        candidates = [self.gamma]
        if k % h["T2"] == 0 and not fixed:  # §6.6 / Botev B.3.2: {γ, ωγ, γ/ω}, kept inside DAMPING_BOUNDS
            lo, hi = DAMPING_BOUNDS
            candidates += [g for g in (self.gamma * self.omega2, self.gamma / self.omega2) if lo <= g <= hi]
        if h["tau2"] < 1.0 and not fixed:  # §8: the quadratic model's Fisher products on a τ₂ subset
            trace = trace.rows(self._subset(trace.N, h["tau2"]))
        J0 = None
        H = None if fixed else self.loss.hvp_operator(trace.out)  # the output curvature, once per step
        if h["momentum"] and self._delta0 is not None and not fixed:
            with np.errstate(over="ignore", invalid="ignore"):
                Jd = self.net.jvp(trace, self._delta0)
                J0 = (Jd, H(Jd))
        best = None
        for gam in candidates:
            try:
                inv = self._inverse_for(gam)
            except np.linalg.LinAlgError:  # e.g. a Σ_{i|i+1} that is not positive definite (tridiagonal)
                continue
            try:  # kronlin's operators (and kronlin.distributed's) refuse a non-finite result from finite gradients ...
                with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                    Delta = [-U for U in inv.apply(grads)]
            except FloatingPointError:  # ... so the proposal overflows for this γ: try the next candidate
                continue
            if fixed:  # δ = ηΔ + βδ₀: no model, so no predicted decrease
                beta = h["beta"] if h["momentum"] and self._delta0 is not None else 0.0
                best = (gam, inv, float("nan"), (float(h["lr"]), beta), Delta)
                break
            coef, dM = self._quadratic(trace, H, grads, Delta, J0, self._delta0)
            if not (all_finite(coef) and math.isfinite(dM)):
                continue
            if best is None or dM < best[2]:
                best = (gam, inv, dM, coef, Delta)
        if best is None:
            self.n_rejected += 1
            return self._reject(value, "no finite update proposal")
        gam, inv, dM, (alpha, mu), Delta = best
        with np.errstate(over="ignore", invalid="ignore"):
            delta = [alpha * D for D in Delta]
            if mu != 0.0:
                delta = [d + mu * d0 for d, d0 in zip(delta, self._delta0)]
        # γ and the inverse chosen for it are kept whatever the outcome (§6.6)
        self.gamma, self._inverse, self._inverse_gamma = gam, inv, gam
        accepted, new_loss = self.apply_update(delta, X, Y)
        if not accepted:  # the base class has put the weights back; report the loss there
            out = self._reject(value, "non-finite loss after the update")
            out["rejected_loss"] = float(new_loss)
            return out
        h1 = new_loss + 0.5 * eta * _vdot(self.net.params, self.net.params)
        rho = (h1 - h0) / dM if dM < 0 else float("nan")
        if k % h["T1"] == 0 and not fixed:
            lo, hi = DAMPING_BOUNDS
            self.lam = min(max(levenberg_marquardt(self.lam, rho, self.omega1), lo), hi)
        self._delta0 = delta
        self._average_iterates(h["polyak"])
        return {"loss": float(new_loss), "loss_before": float(value), "accepted": True,
                "alpha": float(alpha), "mu": float(mu), "model_decrease": float(dM), "rho": float(rho),
                "lambda": self.lam, "gamma": self.gamma, "refreshed": bool(refreshed)}  # fmt: skip

    # ------------------------------------------------------------------ state
    def extra_state(self) -> dict:
        def arrays(L):
            return None if L is None else [np.array(M) for M in L]

        frozen = None if self._frozen is None else {key: arrays(v) for key, v in self._frozen.items()}
        return {"lam": self.lam, "gamma": self.gamma, "delta0": arrays(self._delta0), "frozen": frozen,
                "inverse_gamma": self._inverse_gamma, "stale": self._stale,
                "curvature": self._curvature_state()}  # fmt: skip

    def load_extra_state(self, state: dict) -> None:
        def arrays(L):
            return None if L is None else [np.array(M, dtype=np.float64) for M in L]

        self._validate()
        self.lam, self.gamma = float(state["lam"]), float(state["gamma"])
        self._delta0 = arrays(state["delta0"])
        if state.get("avg") is not None:  # checkpoints written before the average moved to Optimizer's state
            self._avg = arrays(state["avg"])
        fz = state["frozen"]
        self._frozen = None if fz is None else {key: arrays(v) for key, v in fz.items()}
        self._eighs = None
        self._inverse = None
        self._inverse_gamma = state["inverse_gamma"]
        self._stale = bool(state["stale"])
        if self._frozen is not None and self._inverse_gamma is not None:
            self._inverse = self._build(float(self._inverse_gamma))  # deterministic: the same inverse
        self._load_curvature_state(state["curvature"])

    def _curvature_state(self):
        return None

    def _load_curvature_state(self, state) -> None:
        pass


class KFAC(KroneckerOptimizer):
    """K-FAC with the block-diagonal inverse ``F̆⁻¹`` (Martens & Grosse 2015, §4.2; algorithm 2).

    Hyper-parameters (``defaults``):

    ``lam=0.1``         initial λ.  The paper starts at 150 on its MNIST-scale
                        autoencoders and advises erring on the large side (§6.5); on
                        the kronlin.train tasks 0.1 was the best of {0.01, 0.1, 1, 10}
                        (λ then falls by ω₁ per T₁ while ρ > 3/4)
    ``gamma=None``      initial γ; ``None`` gives ``√(λ + η)`` (§6.6)
    ``eta=1e-5``        ℓ₂ coefficient η (§13)
    ``T1=5``            λ adaptation period, ``omega1=None`` → ``(19/20)^T1`` (§6.5)
    ``T2=20``           γ adaptation period, ``omega2=None`` → ``√(19/20)^T2`` (§6.6)
    ``T3=20``           inverse refresh period; also refreshed for ``k ≤ 3`` (§8, §9)
    ``max_decay=0.95``  cap of the averaging decay ``ε = min(1 − 1/k, max_decay)`` (§5)
    ``momentum=True``   §7's ``δ = αΔ + μδ₀``
    ``tau1=1``          §8: the factor statistics from a random ``⌈τ₁N⌉`` of the batch (the paper: 1/8)
    ``damping="factored"``, ``second_factor=True``, ``pi="trace"``, ``polyak=None``, ``lr=None``,
    ``beta=0.9``, ``tau2=1`` (see :class:`KroneckerOptimizer`)

    See the module docstring for the iteration.
    """

    name = "kfac"
    supports_distributed = True
    defaults = {**KroneckerOptimizer.common_defaults, "max_decay": 0.95, "momentum": True, "tau1": 1.0}
    spec = {**KroneckerOptimizer.common_spec, "max_decay": HALF_OPEN_UNIT, "momentum": boolean(),
            "tau1": real(0, 1, low_open=True)}

    def __init__(self, net, loss, *, seed: int = 0, **hparams):
        super().__init__(net, loss, seed=seed, **hparams)
        self._new_estimators()

    def _validate(self):
        super()._validate()
        h = self.hparams
        if self.tridiagonal:
            conv = [i for i, L in enumerate(self.net.layers) if _is_conv(L)]
            if conv:
                raise ValueError(
                    f"{self.name}: the block-tridiagonal inverse (K-FAC §4.3) needs a network of dense layers; "
                    f"layers {conv} are convolutions (use 'kfac')"
                )
            if h["damping"] == "exact":
                raise ValueError(
                    f"{self.name}: exact damping is not available for the block-tridiagonal inverse "
                    "(K-FAC §6.3: it cannot be inverted efficiently); use damping='factored' or 'kfac'"
                )
            if not h["second_factor"]:
                raise ValueError(
                    f"{self.name}: second_factor=False makes every G the identity and every cross-layer "
                    "G zero, which is the block-diagonal method; use 'kfac'"
                )

    def _new_estimators(self):
        # one estimator for all layers: one call per update, and an update that is refused (an overflowing
        # second moment) changes no layer's average rather than only the layers before the failing one
        d = self.hparams["max_decay"]
        self._est = FactorEstimator(max_decay=d, tridiagonal=self.tridiagonal, append_one=False)

    def _observe(self, trace) -> bool:
        """K-FAC §5: one backward pass with targets sampled from the model; fold into the averages.

        With ``tau1 < 1`` (§8) only a random subset of ``⌈τ₁N⌉`` examples of the batch is used.
        """
        if self.hparams["tau1"] < 1.0:
            trace = trace.rows(self._subset(trace.N, self.hparams["tau1"]))
        if self._needs_G():
            Ys = self._sample(trace.out)
            g = self.net.backward(trace, self.loss.grad(trace.out, Ys))
        else:  # second_factor=False with exact damping: G is not used, the sampled pass is skipped
            g = [np.zeros(s.shape[:-1] + (1,)) for s in trace.s]
        acts, errs = list(trace.a), list(g)  # conv layers stay (N, T, d): the estimator forms KFC's factors
        try:
            if self.dp is not None:  # the global batch's factors (one packed all-reduce), folded into the average
                # the ranks agree on refusing before the all-reduce (a rank that raised alone would leave the
                # others waiting in it)
                if not self._all(all_finite(acts) and all_finite(errs)):
                    return False
                self.dp.fold_factors(self._est, acts, errs, self.tridiagonal)
            else:
                self._est.update(acts, errs)  # decides finiteness on the factors' diagonals: no pass over the data
        except FloatingPointError:  # finite inputs whose second moments overflow: kronlin refuses, nothing changed
            return False
        except ValueError:  # a non-finite input (named by the core) is a refused batch; anything else is a bug
            if all_finite(acts) and all_finite(errs):
                raise
            return False
        return True

    def _factors(self, trace) -> dict:
        e = self._est
        if self.tridiagonal:
            return {"A_diag": e.A_diag, "G_diag": e.G_diag, "A_off": e.A_off, "G_off": e.G_off}
        return {"A_diag": e.A_diag, "G_diag": e.G_diag}

    def _curvature_state(self):
        return [self._est.state_dict()]  # a list: the checkpoint format of one estimator per layer, kept

    def _load_curvature_state(self, state) -> None:
        self._new_estimators()
        self._est.load_state_dict(merge_layer_states(state))


class KFACTridiag(KFAC):
    """K-FAC with the block-tridiagonal inverse ``F̂⁻¹ = Ξᵀ Λ Ξ`` (K-FAC §4.3; dense layers only).

    The same iteration and hyper-parameters as :class:`KFAC`; the estimator
    also tracks ``Ā_{i-1,i}`` and ``G_{i,i+1}``, and factored damping is applied
    to the diagonal factors before ``Ψ`` and ``Σ`` are formed
    (:class:`kronlin.BlockTridiagInverse`).  A candidate γ whose ``Σ_{i|i+1}`` is
    not positive definite is skipped; if none works the step is rejected and γ
    raised.  ``damping="exact"`` and ``second_factor=False`` are not available.
    """

    name = "kfac-tridiag"
    tridiagonal = True


register(KFAC.name, KFAC)
register(KFACTridiag.name, KFACTridiag)
