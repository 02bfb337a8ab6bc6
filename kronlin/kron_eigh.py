"""``KronEigh``: ``A ⊗ G`` in its eigenbasis, for exact damped solves and matrix functions.

With ``A = Qa diag(la) Qaᵀ`` and ``G = Qg diag(lg) Qgᵀ``,

    A ⊗ G + λ I = (Qa ⊗ Qg) diag(la ⊗ lg + λ) (Qa ⊗ Qg)ᵀ,

so ``f(A ⊗ G + λI) vec(X) = vec(Qg [(Qgᵀ X Qa) ⊙ f(lg laᵀ + λ)] Qaᵀ)``: four
GEMMs and one elementwise scaling (K-FAC §6.3 eq. 6 and appendix B with the
``ξ I ⊗ I`` term; Botev et al. appendix B.1, the "exact calculation").  The
scaling by ``(lg laᵀ + λ)^power`` runs in the fused kernel of
:mod:`kronlin._kernels.eig_scale`.
"""

from __future__ import annotations

import math

import numpy as np

from ._backend import context, dtype_eps, mT
from ._kernels.eig_scale import eig_scale
from ._operator import KronShaped, batch_shape_of
from ._validate import (
    LinAlgError,
    check_finite,
    check_nonempty,
    check_nonneg_scalar,
    check_real_scalar,
    shape_str,
    singular_tol,
)

__all__ = ["KronEigh", "ORTH_RTOL_FACTOR"]

#: ``KronEigh(Qa, la, Qg, lg)`` checks ``max|QᵀQ - I| <= ORTH_RTOL_FACTOR · n · eps``:
#: eigenvectors from ``eigh`` are orthonormal to a few ``n·eps``; anything
#: larger is not an eigenbasis and every solve with it would be silently wrong.
ORTH_RTOL_FACTOR = 100.0


def _input_eps(x) -> float:
    """eps of an argument's own float dtype (float32 eigenvectors stay float32-accurate after promotion)."""
    name = str(getattr(x, "dtype", "float64")).split(".")[-1]
    return float(np.finfo(np.float32).eps) if name == "float32" else float(np.finfo(np.float64).eps)


def _check_orthonormal(xp, Q, name, eps=0.0):
    n = Q.shape[-1]
    tol = ORTH_RTOL_FACTOR * n * max(dtype_eps(xp, Q.dtype), eps)
    dev = float(xp.max(xp.abs(mT(Q) @ Q - xp.eye(n, dtype=Q.dtype))))
    if not dev <= tol:
        raise ValueError(
            f"{name} (shape {shape_str(Q)}) must have orthonormal columns (eigenvectors from eigh): "
            f"max|{name}ᵀ{name} - I| = {dev:.3g} exceeds {tol:.3g}; pass the Q of eigh, or build with Kron(A, G).eigh()"
        )


def _check_products(xp, la, lg) -> None:
    """The eigenvalue products ``lg_i·la_j`` and their rounding bounds must be representable.

    ``max|la|·max|lg| < max/8``: room for the rounding-error bound
    ``|lg_i|·max|la| + |la_j|·max|lg|`` of the singularity check; beyond it
    every result would overflow, or the check would call ``A ⊗ G`` singular.
    """
    big = float(xp.finfo(la.dtype).max)
    La, Lg = xp.max(xp.abs(la), axis=-1), xp.max(xp.abs(lg), axis=-1)
    if not bool(xp.all((La / big) * Lg < 0.125)):  # La/big <= 1: no overflow on the way
        raise ValueError(
            f"A ⊗ G's eigenvalue products lg·la overflow {la.dtype} (max|la| = {float(xp.max(La)):.3g}, max|lg| = "
            f"{float(xp.max(Lg)):.3g}); rescale A and G (the solution of A ⊗ G scaled by c is the solution divided by c)"
        )


class KronEigh(KronShaped):
    """Eigenbasis ``(Qa, la, Qg, lg)`` of ``A ⊗ G`` (from :meth:`Kron.eigh`).

    Unpacks as ``Qa, la, Qg, lg = Kron(A, G).eigh()``.

    Parameters
    ----------
    Qa : (..., p, p) orthonormal eigenvectors of ``A`` (columns)
    la : (..., p) eigenvalues of ``A``
    Qg : (..., q, q) orthonormal eigenvectors of ``G``
    lg : (..., q) eigenvalues of ``G``
    """

    _operands = "the factors A and G (la and lg)"

    def __init__(self, Qa, la, Qg, lg):
        eps_in = (_input_eps(Qa), _input_eps(Qg))
        ctx, (Qa, la, Qg, lg) = context(("Qa", Qa), ("la", la), ("Qg", Qg), ("lg", lg), snapshot=True)
        pairs = ((Qa, la, "Qa", "la"), (Qg, lg, "Qg", "lg"))
        for Q, w, nq, nw in pairs:  # shapes of both pairs before any numerical check
            if (Q.ndim < 2 or Q.shape[-1] != Q.shape[-2] or w.ndim != Q.ndim - 1 or w.shape[-1] != Q.shape[-1]
                    or w.shape[:-1] != Q.shape[:-2]):
                raise ValueError(
                    f"{nq} must be (..., n, n) and {nw} (..., n) with the same batch dimensions; got {nq} "
                    f"{shape_str(Q)} and {nw} {shape_str(w)}"
                )
            check_nonempty(Q, nq)
        for (Q, w, nq, nw), eps in zip(pairs, eps_in):
            check_finite(ctx.xp, Q, nq)
            check_finite(ctx.xp, w, nw)
            _check_orthonormal(ctx.xp, Q, nq, eps)
        self._init(ctx, Qa, la, Qg, lg)

    def _init(self, ctx, Qa, la, Qg, lg):
        _check_products(ctx.xp, la, lg)
        self._Qa, self._la, self._Qg, self._lg = Qa, la, Qg, lg
        self._set_shape(ctx, Qa.shape[-1], Qg.shape[-1], batch_shape_of(Qa, Qg, "Qa", "Qg"))
        self._ext_cache = None
        return self

    @classmethod
    def _trusted(cls, ctx, Qa, la, Qg, lg):
        return cls.__new__(cls)._init(ctx, Qa, la, Qg, lg)

    def __iter__(self):
        out = self._ctx.out_copy
        return iter((out(self._Qa), out(self._la), out(self._Qg), out(self._lg)))

    def __repr__(self) -> str:
        b = f", batch={self.batch_shape}" if self.batch_shape else ""
        return f"KronEigh(p={self.p}, q={self.q}{b}, dtype={self.dtype}, backend={self._ctx.name})"

    Qa = property(lambda self: self._ctx.out_copy(self._Qa), doc="Eigenvectors of A (a copy).")
    la = property(lambda self: self._ctx.out_copy(self._la), doc="Eigenvalues of A (a copy).")
    Qg = property(lambda self: self._ctx.out_copy(self._Qg), doc="Eigenvectors of G (a copy).")
    lg = property(lambda self: self._ctx.out_copy(self._lg), doc="Eigenvalues of G (a copy).")

    # -- eigenbasis transforms ---------------------------------------------------
    def _to_eig(self, X):
        return mT(self._Qg) @ X @ self._Qa

    def _from_eig(self, Y):
        return self._Qg @ Y @ mT(self._Qa)

    def _products(self, damping: float = 0.0):
        return self._lg[..., :, None] * self._la[..., None, :] + damping

    def _extremes(self):
        """Per-batch ``(min, max)`` of ``lg la`` products when both spectra are non-negative, else None (cached)."""
        cache = self._ext_cache
        if cache is None:  # one tuple, published whole; ("indef",) marks an indefinite spectrum
            xp = self._ctx.xp
            if bool(xp.all(self._la >= 0)) and bool(xp.all(self._lg >= 0)):
                lo = xp.min(self._lg, axis=-1) * xp.min(self._la, axis=-1)
                hi = xp.max(self._lg, axis=-1) * xp.max(self._la, axis=-1)
                cache = (float(xp.min(lo)), float(xp.max(hi)), lo, hi)
            else:
                cache = ("indef",)
            self._ext_cache = cache
        return None if len(cache) == 1 else cache

    def _check_denominators(self, power: float, damping: float) -> None:
        """Raise when ``(lg laᵀ + damping) ** power`` is undefined, numerically infinite or overflows.

        Singularity follows the one policy (:data:`kronlin._validate.SINGULAR_RTOL_FACTOR`) with the
        reciprocal-condition estimate ``(lg_i la_j + δ) / (|lg_i| max|la| + |la_j| max|lg| + δ)``: each
        eigenvalue product against its rounding error (eigh's eigenvalues are accurate to
        ``eps·max|λ|``), so ``A ⊗ G`` is singular exactly when one of its factors is.
        """
        if not (float(power) == int(power) and power >= 0):
            self._check_singular(power, damping)
        self._check_power_overflow(power, damping)

    def _check_singular(self, power: float, damping: float) -> None:
        """Raise when ``lg laᵀ + damping`` is singular to working precision (or indefinite for a fractional power)."""
        xp = self._ctx.xp
        tol = singular_tol(dtype_eps(xp, self.dtype))  # the one singularity policy
        ext = self._extremes()
        if ext is not None and ext[0] + damping > tol * (2.0 * ext[1] + damping):
            return  # fast path: every batch item is fine
        d = self._products(damping)
        if float(power) != int(power) and bool(xp.any(d < 0)):
            raise LinAlgError(
                f"power={power!r}: a fractional power of an indefinite A ⊗ G is not real; use a PSD operator "
                f"or an integer power"
            )
        alg, ala = xp.abs(self._lg), xp.abs(self._la)
        La, Lg = xp.max(ala, axis=-1), xp.max(alg, axis=-1)
        err = alg[..., :, None] * La[..., None, None] + ala[..., None, :] * Lg[..., None, None] + damping
        bad = xp.abs(d) <= tol * err
        if bool(xp.any(bad)):
            raise LinAlgError(
                f"A ⊗ G + {damping:g}·I is singular to working precision (smallest eigenvalue "
                f"{float(xp.min(xp.abs(d))):.3g}, largest {float(xp.max(xp.abs(d))):.3g}; a factor's eigenvalue is "
                f"zero to within rounding); pass damping > 0"
            )

    def _check_power_overflow(self, power: float, damping: float) -> None:
        """``(lg laᵀ + damping) ** power`` must be representable: refuse a power that overflows it."""
        if power == 0.0 or power == 1.0:
            return
        xp = self._ctx.xp
        eps = dtype_eps(xp, self.dtype)
        if abs(power) * eps > 0.01:  # eigenvalues known to a relative ~eps: (1 ± eps) ** power has no digit left
            raise ValueError(
                f"power={power!r} is too large for {self.dtype}: the eigenvalues carry relative rounding errors of "
                f"~eps = {eps:.3g}, which the power multiplies by |power|; use |power| <= {0.01 / eps:.3g}"
            )
        ext = self._extremes()
        if ext is not None:
            lo, hi = ext[0] + damping, ext[1] + damping
        else:
            a = xp.abs(self._products(damping))
            lo, hi = float(xp.min(a)), float(xp.max(a))
        big = math.log(float(xp.finfo(self.dtype).max)) - 2.0  # room for the GEMMs around the scaling
        logs = [math.log(v) for v in (lo, hi) if v > 0]
        if any(abs(power) * abs(v) > big for v in logs) or (lo == 0 and power < 0):
            raise ValueError(
                f"power={power!r} overflows: (A ⊗ G + damping·I) ** power has eigenvalues from "
                f"{lo:.3g} ** {power:.3g} to {hi:.3g} ** {power:.3g}, beyond {self.dtype}; use a moderate power "
                f"(|power| <= {big / max(abs(v) for v in logs) if logs and max(abs(v) for v in logs) else float('inf'):.3g} here)"
            )

    def power(self, X, power: float, damping: float = 0.0):
        """``(A ⊗ G + damping·I) ** power`` applied to ``X`` (..., q, p) or a flat vector.

        ``power = -1`` is the damped inverse, ``-1/2`` and ``-1/4`` the inverse
        roots of Shampoo-style preconditioners.  Runs the fused scaling kernel.
        """
        damping = check_nonneg_scalar(damping, "damping")
        power = check_real_scalar(power, "power")
        (X,), fmt = self._rhs(X)
        self._check_denominators(power, damping)
        return self._ret([self._scaled(X, power, damping)], fmt)

    def solve(self, X, damping: float = 0.0):
        """Exactly ``(A ⊗ G + damping·I)⁻¹ vec(X)`` (K-FAC eq. 6 with Tikhonov damping)."""
        return self.power(X, -1.0, damping)

    def _damped_solve(self, X, damping: float):
        """``(A ⊗ G + damping·I)⁻¹`` on a validated block in the compute namespace."""
        self._check_denominators(-1.0, damping)
        return self._scaled(X, -1.0, damping)

    def _scaled(self, X, power: float, damping: float):
        """``(A ⊗ G + damping·I) ** power`` on a validated block (denominators already checked)."""
        return self._from_eig(eig_scale(self._ctx.xp, self._to_eig(X), self._lg, self._la, damping, power))

    def apply(self, X, fn):
        """``f(A ⊗ G)`` applied to ``X``.

        ``fn`` receives the ``(..., q, p)`` array of eigenvalue products
        ``lg[i]·la[j]`` (an array of the caller's library) and returns the
        values to scale by (same shape, or broadcastable to it), e.g.
        ``lambda d: (d + 1e-3) ** -0.25``.
        """
        if not callable(fn):
            raise TypeError(f"fn must be a function of the eigenvalue products; got {type(fn).__name__}")
        (X,), fmt = self._rhs(X)
        xp = self._ctx.xp
        scale = fn(self._ctx.out(self._products()))
        scale = self._ctx.asarray(scale, "fn(products)")
        want = tuple(self.batch_shape) + (self.q, self.p)
        try:
            if tuple(np.broadcast_shapes(tuple(scale.shape), want)) != want:  # (7, 7) would broadcast (1, 1)
                raise ValueError
            Y = self._to_eig(X) * scale
        except (ValueError, TypeError):
            raise ValueError(
                f"fn must return values broadcastable to the eigenvalue products of shape "
                f"{tuple(self.batch_shape) + (self.q, self.p)}; got {shape_str(scale)}"
            ) from None
        if not bool(xp.all(xp.isfinite(scale))):
            raise ValueError("fn returned NaN or infinity for some eigenvalue products")
        return self._ret([self._from_eig(Y)], fmt)

    @property
    def T(self) -> "KronEigh":
        """``A ⊗ G`` is symmetric: its transpose is itself."""
        return self

    def _apply_matrix(self, X):
        return self._from_eig(self._to_eig(X) * self._products())

    def __matmul__(self, X):
        """``(A ⊗ G) vec(X)`` through the eigenbasis."""
        (X,), fmt = self._rhs(X)
        return self._ret([self._apply_matrix(X)], fmt)

    def eigvals(self, damping: float = 0.0):
        """The ``(..., q, p)`` eigenvalues ``lg[i]·la[j] + damping`` of ``A ⊗ G + damping·I``."""
        return self._out(self._products(check_nonneg_scalar(damping, "damping")))

    def logdet(self, damping: float = 0.0):
        """``log det(A ⊗ G + damping·I)``; raises if the operator is not positive definite."""
        xp = self._ctx.xp
        d = self._products(check_nonneg_scalar(damping, "damping"))
        if bool(xp.any(d <= 0)):
            raise LinAlgError("A ⊗ G + damping·I is not positive definite; pass damping > 0")
        self._check_denominators(-1.0, damping)  # singular to working precision: as Kron.solve/logdet say
        return self._scalar(xp.sum(xp.log(d), axis=(-2, -1)))

    def aslinearoperator(self, power: float = 1.0, damping: float = 0.0):
        """``(A ⊗ G + damping·I) ** power`` as a ``scipy.sparse.linalg.LinearOperator`` (symmetric)."""
        from .linop import make_linear_operator

        damping = check_nonneg_scalar(damping, "damping")
        power = check_real_scalar(power, "power")
        if power == 1.0 and damping == 0.0:
            return make_linear_operator(self, self._forward, self._forward)
        self._check_denominators(power, damping)

        def fn(Xs):
            return [self._scaled(Xs[0], power, damping)]

        return make_linear_operator(self, fn, fn)
