"""Losses on the network output, with everything curvature methods need from them.

The network output ``out`` of shape ``(N, k)`` is the last layer's
pre-activation ``s_ℓ`` (the logits); each loss applies its own link function
(softmax, logistic sigmoid, identity).  All three are *canonical-link* losses
of an exponential family ``R_{y|z}`` (K-FAC §2.2, §5; Botev et al. §2), so
the Hessian of the per-example loss with respect to ``out`` does not depend
on the target and equals the Fisher ``F_R`` of the predictive distribution;
the Gauss-Newton matrix ``Jᵀ H J`` of the network then coincides with the
Fisher ``Jᵀ F_R J`` (K-FAC §5, Botev et al. §2.2).

Every method is per example and batch-first:

==============================  ===========================================================
``value(out, Y)``               mean over the ``N`` examples of the per-example loss (float)
``grad(out, Y)``                ``∂ℓ_n/∂out_n`` per example, ``(N, k)`` — *not* divided by N
``sample(out, rng)``            targets drawn from the predictive distribution ``R_{y|out}``
                                (K-FAC §5's "sampled targets"), in a format ``grad`` accepts
``hessian(out)``                ``∂²ℓ_n/∂out_n²``, ``(N, k, k)``
``hessian_factor(out)``         ``C`` of shape ``(N, k, r)`` with ``hessian = C Cᵀ`` per example
``hvp(out, V)``                 ``hessian @ v`` per example, ``(N, k)``, without forming ``(N, k, k)``
``predict(out)``                the mean of the predictive distribution (probabilities, or ``out``)
==============================  ===========================================================

The factor ``C`` is what KFLR propagates (Botev et al. §3, "C_ℓ C_ℓᵀ = H_ℓ"),
and ``E[grad(out, y) grad(out, y)ᵀ] = hessian(out)`` for ``y ~ sample(out)``.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit, log_softmax, softmax

__all__ = ["Loss", "SoftmaxCrossEntropy", "SigmoidBinaryCrossEntropy", "SquaredError", "get_loss", "LOSSES"]


def _as_out(out) -> np.ndarray:
    out = np.asarray(out, dtype=np.float64)
    if out.ndim != 2:
        raise ValueError(f"out must be the network output of shape (N, k); got shape {out.shape}")
    return out


class Loss:
    """Base class: a per-example loss ``ℓ(out_n, y_n)`` on the network output.

    Subclasses implement ``per_example``, ``grad``, ``sample``, ``hessian``,
    ``hessian_factor`` and ``hvp_operator``; ``value`` is the mean of ``per_example``
    and ``hvp`` applies ``hvp_operator`` once.
    """

    name = "loss"

    def per_example(self, out, Y) -> np.ndarray:  # pragma: no cover - abstract
        """The ``(N,)`` per-example losses."""
        raise NotImplementedError

    def value(self, out, Y) -> float:
        """Mean over the examples of the per-example loss."""
        return float(np.mean(self.per_example(out, Y)))

    def grad(self, out, Y) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def sample(self, out, rng: np.random.Generator):  # pragma: no cover - abstract
        raise NotImplementedError

    def hessian(self, out) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def hessian_factor(self, out) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def hvp(self, out, V) -> np.ndarray:
        """``H_n v_n`` for every example: the output Hessian applied to ``V`` ``(N, k)``."""
        return self.hvp_operator(out)(V)

    def hvp_operator(self, out):  # pragma: no cover - abstract
        """``V ↦ H V`` with the output curvature at ``out`` computed once (for several products at one point,
        e.g. K-FAC's ``HJΔ`` and ``HJδ₀``, appendix C)."""
        raise NotImplementedError

    def predict(self, out) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_targets(self, out, Y) -> tuple[np.ndarray, np.ndarray]:
        out = _as_out(out)
        Y = np.asarray(Y, dtype=np.float64)
        if Y.shape != out.shape:
            raise ValueError(f"{self.name}: targets must have the output's shape {out.shape}; got {Y.shape}")
        return out, Y

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SoftmaxCrossEntropy(Loss):
    """Softmax cross-entropy ``ℓ = −Σ_j y_j log softmax(out)_j`` (multinomial predictive distribution).

    Targets are integer class labels ``(N,)`` or (soft) one-hot rows ``(N, k)``.
    ``hessian = diag(p) − p pᵀ`` with ``p = softmax(out)``; its factor is
    ``C = diag(√p) − p √pᵀ`` (``C Cᵀ = diag(p) − p pᵀ`` because ``Σ p = 1``).
    ``sample`` returns integer labels drawn from ``Categorical(p)``.
    """

    name = "softmax_ce"

    def _onehot(self, out, Y) -> tuple[np.ndarray, np.ndarray]:
        out = _as_out(out)
        Y = np.asarray(Y)
        N, k = out.shape
        if Y.ndim == 1:
            if Y.shape[0] != N:
                raise ValueError(f"softmax_ce: {Y.shape[0]} labels for {N} outputs")
            if not np.issubdtype(Y.dtype, np.integer):
                if not np.all(np.equal(np.mod(Y, 1), 0)):
                    raise ValueError("softmax_ce: 1-D targets must be integer class labels")
                Y = Y.astype(np.int64)
            if Y.size and (Y.min() < 0 or Y.max() >= k):
                raise ValueError(f"softmax_ce: class labels must lie in [0, {k}); got [{Y.min()}, {Y.max()}]")
            T = np.zeros((N, k))
            T[np.arange(N), Y] = 1.0
            return out, T
        return self._check_targets(out, Y)

    def per_example(self, out, Y) -> np.ndarray:
        out, T = self._onehot(out, Y)
        return -np.einsum("nk,nk->n", T, log_softmax(out, axis=1))

    def grad(self, out, Y) -> np.ndarray:
        out, T = self._onehot(out, Y)
        return softmax(out, axis=1) * T.sum(axis=1, keepdims=True) - T

    def sample(self, out, rng: np.random.Generator) -> np.ndarray:
        p = softmax(_as_out(out), axis=1)
        u = rng.random((p.shape[0], 1))
        labels = (np.cumsum(p, axis=1) < u).sum(axis=1)  # inverse CDF
        return np.minimum(labels, p.shape[1] - 1).astype(np.int64)

    def hessian(self, out) -> np.ndarray:
        p = softmax(_as_out(out), axis=1)
        H = -p[:, :, None] * p[:, None, :]
        idx = np.arange(p.shape[1])
        H[:, idx, idx] += p
        return H

    def hessian_factor(self, out) -> np.ndarray:
        p = softmax(_as_out(out), axis=1)
        r = np.sqrt(p)
        C = -p[:, :, None] * r[:, None, :]
        idx = np.arange(p.shape[1])
        C[:, idx, idx] += r
        return C

    def hvp_operator(self, out):
        p = softmax(_as_out(out), axis=1)

        def apply(V):
            V = np.asarray(V, dtype=np.float64)
            return p * V - p * np.sum(p * V, axis=1, keepdims=True)

        return apply

    def predict(self, out) -> np.ndarray:
        return softmax(_as_out(out), axis=1)


class SigmoidBinaryCrossEntropy(Loss):
    """Logistic-sigmoid binary cross-entropy summed over the ``k`` outputs (autoencoders).

    ``ℓ = Σ_j softplus(out_j) − y_j out_j = −Σ_j [y_j log σ_j + (1−y_j) log(1−σ_j)]``
    with targets ``y ∈ [0, 1]`` of shape ``(N, k)`` (independent Bernoulli
    predictive distribution).  ``hessian = diag(σ(1−σ))``, factor its square root;
    ``sample`` returns 0/1 floats.  The loss is not zero at ``y = σ`` for
    fractional targets (it is the cross-entropy, as in the papers' autoencoder
    benchmarks, not the KL divergence).
    """

    name = "sigmoid_bce"

    def per_example(self, out, Y) -> np.ndarray:
        out, Y = self._check_targets(out, Y)
        # softplus(x) = max(x, 0) + log1p(exp(−|x|)): the same to rounding (≤ 1e-15 abs.) as
        # logaddexp(0, x), stable for every x, and 2.5x faster at 256 × 784 (one thread)
        softplus = np.maximum(out, 0.0) + np.log1p(np.exp(-np.abs(out)))
        return np.sum(softplus - Y * out, axis=1)

    def grad(self, out, Y) -> np.ndarray:
        out, Y = self._check_targets(out, Y)
        return expit(out) - Y

    def sample(self, out, rng: np.random.Generator) -> np.ndarray:
        p = expit(_as_out(out))
        return (rng.random(p.shape) < p).astype(np.float64)

    def _curv(self, out) -> np.ndarray:
        p = expit(_as_out(out))
        return p * (1.0 - p)

    def hessian(self, out) -> np.ndarray:
        c = self._curv(out)
        N, k = c.shape
        H = np.zeros((N, k, k))
        idx = np.arange(k)
        H[:, idx, idx] = c
        return H

    def hessian_factor(self, out) -> np.ndarray:
        c = np.sqrt(self._curv(out))
        N, k = c.shape
        C = np.zeros((N, k, k))
        idx = np.arange(k)
        C[:, idx, idx] = c
        return C

    def hvp_operator(self, out):
        c = self._curv(out)
        return lambda V: c * np.asarray(V, dtype=np.float64)

    def predict(self, out) -> np.ndarray:
        return expit(_as_out(out))


class SquaredError(Loss):
    """Squared error ``ℓ = ½ ‖out − y‖²`` (Gaussian predictive distribution ``N(out, I)``).

    ``hessian = I``, factor ``I``; ``sample`` returns ``out + ε`` with ``ε ~ N(0, I)``.
    """

    name = "squared"

    def per_example(self, out, Y) -> np.ndarray:
        out, Y = self._check_targets(out, Y)
        return 0.5 * np.sum((out - Y) ** 2, axis=1)

    def grad(self, out, Y) -> np.ndarray:
        out, Y = self._check_targets(out, Y)
        return out - Y

    def sample(self, out, rng: np.random.Generator) -> np.ndarray:
        out = _as_out(out)
        return out + rng.standard_normal(out.shape)

    def hessian(self, out) -> np.ndarray:
        N, k = _as_out(out).shape
        return np.broadcast_to(np.eye(k), (N, k, k)).copy()

    hessian_factor = hessian

    def hvp_operator(self, out):
        _as_out(out)
        return lambda V: np.array(V, dtype=np.float64)

    def predict(self, out) -> np.ndarray:
        return _as_out(out).copy()


LOSSES = {
    "softmax_ce": SoftmaxCrossEntropy,
    "sigmoid_bce": SigmoidBinaryCrossEntropy,
    "squared": SquaredError,
}


def get_loss(name: str) -> Loss:
    """A new loss by name: ``"softmax_ce"``, ``"sigmoid_bce"`` or ``"squared"``."""
    try:
        return LOSSES[name]()
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}") from None
