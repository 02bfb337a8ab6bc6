"""K-BFGS and K-BFGS(L): Kronecker-factored quasi-Newton (Ren, Bahamou & Goldfarb 2021, algorithm 2).

Registry names ``"kbfgs"`` (``H_G`` by dense BFGS) and ``"kbfgs-l"`` (``H_G`` by
L-BFGS in the compact, loop-free form of Byrd, Nocedal & Schnabel 1994).

Per layer the Hessian block is approximated by ``A ⊗ G`` (paper eq. 8, 9)
with ``A = E_n[Σ_t ā_t ā_tᵀ]`` (``(d_in+1)²``, the homogeneous 1 last) and
``G = E_n[(1/|T|) Σ_t ∂²f/∂h_t²]`` (``d_out²``), and its inverse by
``H_A ⊗ H_G``.  In kronlin's convention (weight ``(d_out, d_in+1)``, ``vec``
stacking columns) ``vec(H_G M H_A) = (H_A ⊗ H_G) vec(M)``, so the step is

    m ← β m + ∇W,        W ← W − α · H_G m H_A          (algorithm 2, lines 8–10)

One iteration ``k`` (1-based):

1. forward/backward pass on the mini-batch: loss, mean gradient ``∇W`` and the
   trace (``ā``, ``s = h``, per-example ``g = Dh``); at ``k = 1`` every
   ``H_A = (A + λ_A I)⁻¹`` is formed from this first mini-batch (line 3), unless
   ``warm_start=True`` formed it before from the whole training set (§4: "A_l is
   computed from the whole dataset before first iteration", through
   :meth:`Optimizer.prepare`, which the training loop calls for a fresh run);
2. momentum and the preconditioned step above, written with
   :meth:`Optimizer.apply_update` (non-finite steps are rejected);
3. every ``T`` iterations (``k ≡ 0 mod T``) and only after an accepted step,
   a second forward/backward pass on the same batch at the new weights gives
   ``h̄⁺``, ``Dh̄⁺``, and for every layer

   * ``H_A`` by "mini-batched" Hessian-action BFGS (§3.2.1, eq. 14, 15):
     ``s_A = H_A â``, ``y_A = A s_A + λ_A s_A`` with ``â = E_n[(1/|T|) Σ_t ā_t]``
     and ``A s_A = E_n[Σ_t (ā_tᵀ s_A) ā_t]`` from the first pass' activations
     (``A`` is never formed);
   * ``s_G ← β s_G + (1−β)(h̄⁺ − h̄)``, ``y_G ← β y_G + (1−β)(Dh̄⁺ − Dh̄)``
     (eq. 12, 13 with the moving averages of §A.2; ``X̄`` averages over the
     positions and the batch), double damped by ``D_P D_LM`` (algorithm 1)
     with ``H = H_G``, ``μ₁ = 0.2``, ``μ₂ = λ_G``, then a BFGS update of
     ``H_G`` (K-BFGS) or a new L-BFGS pair (K-BFGS(L); ``H₀ = λ_G⁻¹ I``).

BFGS update (eq. 11): ``H⁺ = (I − ρ s yᵀ) H (I − ρ y sᵀ) + ρ s sᵀ``, ``ρ = 1/(sᵀy)``,
symmetrised and **stored** (``self.H_A[i]``, ``self.H_G[i]`` are replaced by
the new arrays).  A pair with ``sᵀy ≤ 0`` or non-finite entries is skipped.

Damping split (§3.2.2, §A.3): ``λ_A = √|T| √λ``, ``λ_G = √λ / √|T|`` for a
convolution with ``|T|`` positions, ``λ_A = λ_G = √λ`` for a dense layer.

Rejection: a step whose update or loss is not finite leaves the weights, the
momentum and the curvature as they were, and halves the learning-rate scale
``lr_scale`` (K-BFGS has no adaptive damping to raise); a batch whose own loss
or gradient is not finite is rejected before anything is touched.

Defaults: ``lr=0.03``, ``damping=0.3`` are the paper's best values for K-BFGS
and K-BFGS(L) on the MNIST autoencoder (table 6, ``T = 1``), ``T = 1``,
``beta = 0.9``, ``mu1 = 0.2`` and ``memory = 100`` L-BFGS pairs (§A.3); no
change was needed.  With them, 200 steps of batch 256 (seed 0) train every
kronlin.train task without a rejected step: digits-clf 2.36 → 0.06, digits-ae
46.3 → 17.1, digits-conv 2.40 → 0.12, curves-ae 546 → 133 (full-set loss).
``lr=0.1`` is better on the digits tasks (0.014 / 16.1 / 0.029) but worse on
curves-ae (162); ``lr=0.3`` spikes on digits-ae (a batch loss of 301 before
it recovers).  By default the first ``H_A`` is built from the first
mini-batch; ``warm_start=True`` builds it from the whole training set, as the
paper does (its time is kept out of the step times, as in the paper's figures).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.linalg import solve_triangular

from . import register
from .base import Optimizer, all_finite
from .hparams import HALF_OPEN_UNIT, OPEN_UNIT, POSITIVE, boolean, integer

__all__ = [
    "KBFGS",
    "KBFGSL",
    "bfgs_update",
    "double_damping",
    "lbfgs_apply",
    "lbfgs_two_loop",
]


# --------------------------------------------------------------- primitives
def bfgs_update(H: np.ndarray, s: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The symmetrised BFGS inverse update (eq. 11) as a **new** array; ``H⁺ y = s``.

    ``H⁺ = (I − ρ s yᵀ) H (I − ρ y sᵀ) + ρ s sᵀ`` with ``ρ = 1/(sᵀy)``, expanded
    as ``H − ρ (s (Hy)ᵀ + (Hy) sᵀ) + (ρ² yᵀHy + ρ) s sᵀ`` and symmetrised.
    Requires ``sᵀy > 0``.
    """
    sy = float(s @ y)
    if not sy > 0:
        raise ValueError(f"BFGS needs s·y > 0; got {sy!r}")
    rho = 1.0 / sy
    Hy = H @ y
    Hn = H - rho * (np.outer(s, Hy) + np.outer(Hy, s)) + (rho * rho * float(y @ Hy) + rho) * np.outer(s, s)
    return 0.5 * (Hn + Hn.T)


def double_damping(s, y, Hy, mu1: float, mu2: float):
    """``D_P D_LM`` (algorithm 1): Powell's damping on ``H``, then LM damping on ``H⁻¹``.

    ``Hy`` is ``H y`` for the current inverse approximation ``H``.  Returns
    ``(s̃, ỹ, θ₁)`` with ``s̃ = θ₁ s + (1−θ₁) H y`` and ``ỹ = y + μ₂ s̃``; then
    ``s̃ᵀy ≥ μ₁ yᵀHy ≥ 0`` and ``s̃ᵀỹ ≥ μ₂ ‖s̃‖²``.
    """
    sy, yHy = float(s @ y), float(y @ Hy)
    theta = (1.0 - mu1) * yHy / (yHy - sy) if sy < mu1 * yHy else 1.0
    s_t = theta * s + (1.0 - theta) * Hy
    return s_t, y + mu2 * s_t, theta


def lbfgs_apply(S: np.ndarray, Y: np.ndarray, gamma: float, M: np.ndarray) -> np.ndarray:
    """``H M`` for the L-BFGS matrix of pairs ``S, Y`` (rows, oldest first) and ``H₀ = γ I``.

    Byrd, Nocedal & Schnabel (1994) compact form, no loop over the pairs::

        H = γI + [S  γY] [[R⁻ᵀ(D + γYᵀY)R⁻¹, −R⁻ᵀ], [−R⁻¹, 0]] [Sᵀ; γYᵀ]

    with ``R = triu(SᵀY)`` and ``D = diag(s_iᵀ y_i)`` (``S``, ``Y`` here are
    ``(m, d)``, i.e. the transposes of the paper's column matrices).  ``M`` is
    ``(d,)`` or ``(d, c)``.
    """
    if S.shape[0] == 0:
        return gamma * M
    SY = S @ Y.T  # (m, m): s_i · y_j
    R = np.triu(SY)
    P, Q = S @ M, Y @ M
    u = solve_triangular(R, P, lower=False)  # R⁻¹ Sᵀ M
    mid = np.diag(SY)[:, None] * u if u.ndim == 2 else np.diag(SY) * u
    mid = mid + gamma * ((Y @ Y.T) @ u) - gamma * Q
    top = solve_triangular(R, mid, lower=False, trans="T")
    return gamma * M + S.T @ top - gamma * (Y.T @ u)


def lbfgs_two_loop(S, Y, gamma: float, v):
    """The classical two-loop recursion for ``H v`` (reference for :func:`lbfgs_apply`)."""
    q = np.array(v, dtype=np.float64)
    alphas = []
    for s, y in zip(S[::-1], Y[::-1]):
        a = (s @ q) / (s @ y)
        alphas.append(a)
        q = q - a * y
    r = gamma * q
    for (s, y), a in zip(zip(S, Y), alphas[::-1]):
        b = (y @ r) / (s @ y)
        r = r + (a - b) * s
    return r


def _is_conv(layer) -> bool:
    return getattr(layer, "T", None) is not None


def _flat_rows(x: np.ndarray) -> np.ndarray:
    """``(N, d)`` or ``(N, T, d)`` → ``(N·T, d)``."""
    return x.reshape(-1, x.shape[-1])


# ---------------------------------------------------------------- optimizer
class KBFGS(Optimizer):
    """K-BFGS (algorithm 2 with dense BFGS for ``H_G``); see the module docstring.

    Hyper-parameters (``defaults``):

    ``lr=0.03``       learning rate α (paper table 6, MNIST autoencoder)
    ``damping=0.3``   overall damping λ; ``λ_A λ_G = λ`` split by §3.2.2
    ``T=1``           curvature update period (paper: 1 on MLPs, 20 on CNNs / K-BFGS†)
    ``beta=0.9``      momentum of the gradient and decay of ``(s_G, y_G)`` (§A.2)
    ``mu1=0.2``       Powell's constant in ``D_P D_LM``
    """

    name = "kbfgs"
    limited = False
    defaults = {"lr": 0.03, "damping": 0.3, "T": 1, "beta": 0.9, "mu1": 0.2, "warm_start": False}
    spec = {"lr": POSITIVE, "damping": POSITIVE, "T": integer(1), "beta": HALF_OPEN_UNIT, "mu1": OPEN_UNIT,
            "warm_start": boolean()}

    def __init__(self, net, loss, *, seed: int = 0, **hparams):
        super().__init__(net, loss, seed=seed, **hparams)
        self._validate()
        self._reset_buffers()

    def _reset_buffers(self):
        self.H_A = None  # list of (d_in+1)² inverse factors
        self.H_G = None  # list of d_out² inverse factors (K-BFGS)
        self.pairs = None  # list of (S, Y) arrays (m, d_out) (K-BFGS(L))
        self.s_G = [np.zeros(L.d_out) for L in self.net.layers]
        self.y_G = [np.zeros(L.d_out) for L in self.net.layers]
        self.momentum = None
        self.lr_scale = 1.0

    # -- damping split (§3.2.2) ------------------------------------------------
    def lambdas(self, i: int) -> tuple[float, float]:
        """``(λ_A, λ_G)`` of layer ``i``."""
        lam = math.sqrt(self.hparams["damping"])
        L = self.net.layers[i]
        if _is_conv(L):
            r = math.sqrt(L.T)
            return r * lam, lam / r
        return lam, lam

    # -- H_G operations ---------------------------------------------------------
    def _init_G(self):
        self.H_G = [np.eye(L.d_out) / self.lambdas(i)[1] for i, L in enumerate(self.net.layers)]

    def apply_HG(self, i: int, M: np.ndarray) -> np.ndarray:
        """``H_G M`` for layer ``i``."""
        return self.H_G[i] @ M

    def _update_HG(self, i: int, s: np.ndarray, y: np.ndarray) -> None:
        self.H_G[i] = bfgs_update(self.H_G[i], s, y)

    def dense_HG(self, i: int) -> np.ndarray:
        """``H_G`` of layer ``i`` as a dense matrix."""
        return self.apply_HG(i, np.eye(self.net.layers[i].d_out))

    # -- curvature ------------------------------------------------------------------
    def _init_A(self, sums, N: int) -> None:
        """Line 3: ``H_A = (A + λ_A I)⁻¹`` with ``A = E_n[Σ_t ā ā ᵀ] = sums / N``; and the initial ``H_G``."""
        H_A = []
        for i, S in enumerate(sums):
            H = np.linalg.inv(S / N + self.lambdas(i)[0] * np.eye(S.shape[0]))
            H_A.append(0.5 * (H + H.T))
        self.H_A = H_A
        if self.limited:
            self.pairs = [(np.zeros((0, L.d_out)), np.zeros((0, L.d_out))) for L in self.net.layers]
        else:
            self._init_G()

    @staticmethod
    def _activation_sums(trace) -> list:
        """``Σ_n Σ_t ā ā ᵀ`` per layer of one forward pass."""
        return [r.T @ r for r in map(_flat_rows, trace.a)]

    def prepare(self, X_train, batch: int = 0, chunk: int = 1024) -> bool:
        """The paper's warm start (§4, algorithm 2 line 3 over the whole data set), when ``warm_start=True``.

        ``A`` is accumulated over ``X_train`` in chunks of ``chunk`` examples (one forward pass each, at the
        initial weights), so it equals the single-pass ``E_n[Σ_t ā ā ᵀ]`` of the whole set.  ``batch``
        (the training loop's mini-batch size) is not needed here.
        """
        if not self.hparams["warm_start"] or self.H_A is not None:
            return False
        X_train = np.asarray(X_train, dtype=np.float64)
        N = X_train.shape[0]
        sums = None
        for lo in range(0, N, chunk):
            part = self._activation_sums(self.net.forward(X_train[lo:lo + chunk]))
            sums = part if sums is None else [S + P for S, P in zip(sums, part)]
        if not all_finite(sums):
            raise FloatingPointError("warm_start: the activations of the training set are not finite at the "
                                     "initial weights")
        self._init_A(sums, N)
        return True

    def precondition(self, grads) -> list:
        """``H_G M H_A`` per layer (``(H_A ⊗ H_G) vec(M)``)."""
        return [self.apply_HG(i, M) @ HA for i, (M, HA) in enumerate(zip(grads, self.H_A))]

    def _curvature_update(self, trace, trace_new) -> dict:
        """Lines 13–21 for every layer; returns counters for the step record."""
        h = self.hparams
        beta, mu1 = h["beta"], h["mu1"]
        N = trace.N
        skipped, powell = 0, 0
        for i, L in enumerate(self.net.layers):
            lam_A, lam_G = self.lambdas(i)
            # H_A: mini-batched Hessian action (eq. 14, 15)
            rows = _flat_rows(trace.a[i])
            a_hat = rows.mean(axis=0)
            s_A = self.H_A[i] @ a_hat
            y_A = rows.T @ (rows @ s_A) / N + lam_A * s_A
            if all_finite([s_A, y_A]) and float(s_A @ y_A) > 0:
                self.H_A[i] = bfgs_update(self.H_A[i], s_A, y_A)
            else:
                skipped += 1
            # H_G: moving-averaged (s, y) of pre-activation means / gradients (eq. 12, 13)
            ds = _flat_rows(trace_new.s[i]).mean(axis=0) - _flat_rows(trace.s[i]).mean(axis=0)
            dg = _flat_rows(trace_new.g[i]).mean(axis=0) - _flat_rows(trace.g[i]).mean(axis=0)
            sG = beta * self.s_G[i] + (1.0 - beta) * ds
            yG = beta * self.y_G[i] + (1.0 - beta) * dg
            if not all_finite([sG, yG]):
                skipped += 1
                continue
            self.s_G[i], self.y_G[i] = sG, yG
            s_t, y_t, theta = double_damping(sG, yG, self.apply_HG(i, yG), mu1, lam_G)
            powell += theta < 1.0
            if all_finite([s_t, y_t]) and float(s_t @ y_t) > 0:
                self._update_HG(i, s_t, y_t)
            else:
                skipped += 1
        return {"skipped_pairs": skipped, "powell_damped": int(powell)}

    # --------------------------------------------------------------------- step
    def _rejected(self, value, reason):
        self.lr_scale *= 0.5
        return {"loss": float(value), "loss_before": float(value), "accepted": False, "reason": reason,
                "lr": self.hparams["lr"] * self.lr_scale, "updated": False}  # fmt: skip

    def step(self, X, Y) -> dict:
        """One iteration of algorithm 2 on ``(X, Y)``; returns the step record."""
        h = self.hparams
        self.iteration += 1
        k = self.iteration
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            value, grads, trace = self.net.loss_and_grads(X, Y, self.loss)
        if not (math.isfinite(value) and all_finite(grads) and all_finite(trace.a)):
            self.n_rejected += 1
            return self._rejected(value, "non-finite loss or gradient at the current weights")
        if self.H_A is None:
            self._init_A(self._activation_sums(trace), trace.N)
        mom_old = self.momentum
        mom = grads if mom_old is None else [h["beta"] * m + g for m, g in zip(mom_old, grads)]
        lr = h["lr"] * self.lr_scale
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            deltas = [-lr * P for P in self.precondition(mom)]
        accepted, new_loss, trace_new = self.apply_update(deltas, X, Y, return_trace=True)
        if not accepted:
            out = self._rejected(value, "non-finite update or loss after the update")
            out["rejected_loss"] = float(new_loss)
            return out
        self.momentum = mom
        info = {"loss": float(new_loss), "loss_before": float(value), "accepted": True, "lr": lr, "updated": False}
        if k % h["T"] == 0:
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                # the new gradient on the same batch: one backward pass through the forward pass that gave new_loss
                trace_new.g = self.net.backward(trace_new, self.loss.grad(trace_new.out, Y))
                info.update(self._curvature_update(trace, trace_new))
            info["updated"] = True
        return info

    # -------------------------------------------------------------------- state
    def extra_state(self) -> dict:
        def arrays(L):
            return None if L is None else [np.array(M) for M in L]

        return {
            "H_A": arrays(self.H_A),
            "H_G": arrays(self.H_G),
            "pairs": None if self.pairs is None else [[np.array(S), np.array(Yp)] for S, Yp in self.pairs],
            "s_G": arrays(self.s_G),
            "y_G": arrays(self.y_G),
            "momentum": arrays(self.momentum),
            "lr_scale": float(self.lr_scale),
        }

    def load_extra_state(self, state: dict) -> None:
        def arrays(L):
            return None if L is None else [np.array(M, dtype=np.float64) for M in L]

        self._validate()
        self.H_A, self.H_G = arrays(state["H_A"]), arrays(state["H_G"])
        p = state["pairs"]
        self.pairs = None if p is None else [(np.array(S, dtype=np.float64), np.array(Yp, dtype=np.float64)) for S, Yp in p]
        self.s_G, self.y_G = arrays(state["s_G"]), arrays(state["y_G"])
        self.momentum = arrays(state["momentum"])
        self.lr_scale = float(state["lr_scale"])


class KBFGSL(KBFGS):
    """K-BFGS(L): ``H_G`` by L-BFGS with ``memory`` pairs and ``H₀ = λ_G⁻¹ I``, applied in compact form.

    Same iteration and hyper-parameters as :class:`KBFGS`, plus ``memory=100``
    (the number of ``(s̃_G, ỹ_G)`` pairs kept, §A.3).
    """

    name = "kbfgs-l"
    limited = True
    defaults = {**KBFGS.defaults, "memory": 100}
    spec = {**KBFGS.spec, "memory": integer(1)}

    def apply_HG(self, i: int, M: np.ndarray) -> np.ndarray:
        S, Yp = self.pairs[i]
        return lbfgs_apply(S, Yp, 1.0 / self.lambdas(i)[1], M)

    def _update_HG(self, i: int, s: np.ndarray, y: np.ndarray) -> None:
        S, Yp = self.pairs[i]
        m = int(self.hparams["memory"])
        self.pairs[i] = (np.vstack([S, s[None]])[-m:], np.vstack([Yp, y[None]])[-m:])


register(KBFGS.name, KBFGS)
register(KBFGSL.name, KBFGSL)
