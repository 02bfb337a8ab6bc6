"""``KronEigh``: ``A ⊗ G`` in its eigenbasis, for exact damped solves and matrix functions.

With ``A = Qa diag(la) Qaᵀ`` and ``G = Qg diag(lg) Qgᵀ``,

    A ⊗ G + λ I = (Qa ⊗ Qg) diag(la ⊗ lg + λ) (Qa ⊗ Qg)ᵀ,

so ``f(A ⊗ G + λI) vec(X) = vec(Qg [(Qgᵀ X Qa) ⊙ f(lg laᵀ + λ)] Qaᵀ)``: four
GEMMs and one elementwise scaling (K-FAC §6.3 eq. 6 and appendix B with the
``ξ I ⊗ I`` term; Botev et al. appendix B.1, the "exact calculation").  The
scaling by ``(lg laᵀ + λ)^power`` runs in the fused kernel of
:mod:`kronlin._kernels.eig_scale`.

:meth:`KronEigh.from_rows` builds a *thin* eigenbasis when a factor is a Gram matrix of fewer rows
than its order (one batch's K-FAC factor ``A = āᵀā/N`` with ``N < p``): ``Qa`` is then ``(p, r)``
with orthonormal columns and ``A``'s eigenvalue is 0 on their complement, so

    f(A ⊗ G + λI) vec(X) = f(λ) vec(X) + vec(Qg [(Qgᵀ X Qa) ⊙ (f(lg laᵀ + λ) − f(λ))] Qaᵀ)

(every eigenvalue product with a complement direction is 0): the same four GEMMs with one
dimension ``r`` instead of ``p``, after an ``N × N`` eigendecomposition instead of a ``p × p`` one.

:meth:`KronEigh.refresh` re-uses an eigenbasis for new factors when a
certified bound on the damped solve allows it (issue 13, item 2; see its
docstring for the derivation).
"""

from __future__ import annotations

import math

import numpy as np

from ._backend import context, dtype_eps, mT
from ._kernels.eig_scale import eig_scale
from ._linalg import eigh, ritz, rows_eigh
from ._operator import KronShaped, batch_shape_of
from ._validate import (
    LinAlgError,
    all_finite,
    check_finite,
    check_nonempty,
    check_nonneg_scalar,
    check_not_subnormal,
    check_positive_scalar,
    check_real_scalar,
    check_square,
    check_symmetric,
    quiet_overflow,
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

    def _init(self, ctx, Qa, la, Qg, lg, shifts=(0.0, 0.0)):
        p, q = int(Qa.shape[-2]), int(Qg.shape[-2])
        self._thin = Qa.shape[-1] < p or Qg.shape[-1] < q
        self._shifts = shifts  # a thin basis' eigenvalue on its complement (A's, G's)
        # the whole spectra (the complement's eigenvalue first: ascending for PSD factors)
        wa, wg = ((_padded(ctx.xp, la, p, shifts[0]), _padded(ctx.xp, lg, q, shifts[1])) if self._thin
                  else (la, lg))
        _check_products(ctx.xp, wa, wg)
        self._Qa, self._la, self._Qg, self._lg, self._wa, self._wg = Qa, la, Qg, lg, wa, wg
        self._set_shape(ctx, p, q, batch_shape_of(Qa, Qg, "Qa", "Qg"))
        self._ext_cache = None
        return self

    @classmethod
    def from_rows(cls, a, g, scale_a: float = 1.0, scale_g: float = 1.0, shift_a: float = 0.0,
                  shift_g: float = 0.0) -> "KronEigh":
        """The eigenbasis of ``A ⊗ G`` with ``A = scale_a·aᵀa + shift_a·I`` and ``G = scale_g·gᵀg + shift_g·I``.

        ``a`` is ``(..., n_a, p)`` and ``g`` ``(..., n_g, q)``: per-example (or per-position) rows such as
        K-FAC's ``ā`` and ``g`` of one batch (``A = āᵀā/N``: ``scale_a = 1/N``; K-FAC eq. 1).  A factor
        with fewer rows than its order has rank at most ``n``; its eigenpairs come from the ``n × n`` Gram
        matrix (``4·n²·p + O(n³)`` flops instead of ``?syevd``'s ``O(p³)``) and its basis is *thin*:
        ``Qa`` is ``(..., p, n)``, with eigenvalue 0 on the complement of its columns
        (zero columns, paired with eigenvalue 0, stand for eigenvalues at the Gram matrix's rounding
        level); with a shift, every eigenvalue including the complement's is raised by it.  K-FAC's
        factored damping (§6.3) is ``from_rows(ā, g, 1/N, c/N, π·γ, γ/π).solve(X)``: the inverse of
        ``(A + πγI) ⊗ (G + (γ/π)I)`` without forming or factorizing either.

        Every method then acts on the whole ``A ⊗ G`` as with :meth:`Kron.eigh`: ``eigvals`` and
        ``logdet`` include the complement's eigenvalues (without shifts these are zeros, so ``solve`` and
        negative powers need ``damping > 0``), ``solve``/``power``/``apply``/``@`` cost GEMMs of the thin
        sizes (module docstring; with ``damping = 0`` each factor is applied on its side).  Unpacking
        and the ``Qa``/``la`` properties give the thin arrays.  A factor with ``n >= p`` rows is
        decomposed as :meth:`Kron.eigh` does (from ``scale·aᵀa``), and so is one with more than ``0.8·p``
        rows, where the Gram route stops being faster (measured crossover ``n ≈ 0.85·p``, float32, one
        thread; float32 ``p = 2049``, ``n = 256``: 10 ms against 610 ms).

        Accuracy: as :meth:`Kron.eigh` of the formed factors (tested to the same tolerances).  A thin
        eigenvector of a small ``μ_i`` is less orthogonal (``~eps·max μ/μ_i``), but it enters every
        result with the weight ``f(lg μ_i + λ) − f(λ) = O(μ_i)``, so its error in the result is
        ``O(eps·max μ·‖G‖·|f'|)``, the dense route's rounding error.

        Raises ``ValueError`` for rows that are not ``(..., n, d)``, empty, non-finite or subnormal, a
        non-positive scale, or batch dimensions that do not broadcast.
        """
        scale_a = check_positive_scalar(scale_a, "scale_a")
        scale_g = check_positive_scalar(scale_g, "scale_g")
        shifts = (check_nonneg_scalar(shift_a, "shift_a"), check_nonneg_scalar(shift_g, "shift_g"))
        ctx, (a, g) = context(("a", a), ("g", g))
        xp = ctx.xp
        for x, nm in ((a, "a"), (g, "g")):
            if x.ndim < 2:
                raise ValueError(f"{nm} must be rows (..., n, d); got shape {shape_str(x)}")
            check_nonempty(x, nm)
        batch_shape_of(a, g, "a", "g")
        for x, nm in ((a, "a"), (g, "g")):
            check_finite(xp, x, nm)
            check_not_subnormal(xp, x, nm)
        la, Qa = rows_eigh(xp, a, scale_a, "a")
        lg, Qg = rows_eigh(xp, g, scale_g, "g")
        if shifts != (0.0, 0.0):
            la, lg = la + shifts[0], lg + shifts[1]
        try:
            return cls.__new__(cls)._init(ctx, Qa, la, Qg, lg, shifts)
        except ValueError as exc:  # the eigenvalue products overflow: say which arguments made them
            raise ValueError(f"{exc}; here A = scale_a·aᵀa + shift_a·I and G = scale_g·gᵀg + shift_g·I: rescale the "
                             f"rows a, g or scale_a, scale_g") from None

    @classmethod
    def _trusted(cls, ctx, Qa, la, Qg, lg):
        return cls.__new__(cls)._init(ctx, Qa, la, Qg, lg)

    def __iter__(self):
        out = self._ctx.out_copy
        return iter((out(self._Qa), out(self._la), out(self._Qg), out(self._lg)))

    def __repr__(self) -> str:
        b = f", batch={self.batch_shape}" if self.batch_shape else ""
        r = f", ranks=({self._Qa.shape[-1]}, {self._Qg.shape[-1]})" if self._thin else ""
        return f"KronEigh(p={self.p}, q={self.q}{r}{b}, dtype={self.dtype}, backend={self._ctx.name})"

    Qa = property(lambda self: self._ctx.out_copy(self._Qa), doc="Eigenvectors of A (a copy; (p, r) if thin).")
    la = property(lambda self: self._ctx.out_copy(self._la), doc="Eigenvalues of A (a copy; r of them if thin).")
    Qg = property(lambda self: self._ctx.out_copy(self._Qg), doc="Eigenvectors of G (a copy; (q, r) if thin).")
    lg = property(lambda self: self._ctx.out_copy(self._lg), doc="Eigenvalues of G (a copy; r of them if thin).")

    # -- eigenbasis transforms ---------------------------------------------------
    def _to_eig(self, X):
        Qa, Qg = self._Qa, self._Qg
        (q, rg), (p, ra) = Qg.shape[-2:], Qa.shape[-2:]
        if rg * p * (q + ra) <= q * ra * (p + rg):  # the cheaper association (the same for square bases)
            return (mT(Qg) @ X) @ Qa
        return mT(Qg) @ (X @ Qa)

    def _from_eig(self, Y):
        Qa, Qg = self._Qa, self._Qg
        (q, rg), (p, ra) = Qg.shape[-2:], Qa.shape[-2:]
        if q * rg * (ra + p) <= rg * p * (ra + q):
            return (Qg @ Y) @ mT(Qa)
        return Qg @ (Y @ mT(Qa))

    def _products(self, damping: float = 0.0):
        """The ``(..., q, p)`` eigenvalue products of the whole spectra (with a thin basis' zeros)."""
        return self._wg[..., :, None] * self._wa[..., None, :] + damping

    def _compressed_products(self, damping):
        """The products with one complement row/column (first) for each thin factor: every distinct value."""
        xp = self._ctx.xp

        def one(w, Q, c):
            return w if Q.shape[-1] == Q.shape[-2] else _padded(xp, w, w.shape[-1] + 1, c)

        wa, wg = one(self._la, self._Qa, self._shifts[0]), one(self._lg, self._Qg, self._shifts[1])
        return wg[..., :, None] * wa[..., None, :] + damping

    def _extremes(self):
        """Per-batch ``(min, max)`` of ``lg la`` products when both spectra are non-negative, else None (cached)."""
        cache = self._ext_cache
        if cache is None:  # one tuple, published whole; ("indef",) marks an indefinite spectrum
            xp = self._ctx.xp
            if bool(xp.all(self._wa >= 0)) and bool(xp.all(self._wg >= 0)):
                lo = xp.min(self._wg, axis=-1) * xp.min(self._wa, axis=-1)
                hi = xp.max(self._wg, axis=-1) * xp.max(self._wa, axis=-1)
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
        alg, ala = xp.abs(self._wg), xp.abs(self._wa)
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
        # X is checked through the result: the orthonormal bases carry a NaN or infinity of X into it (no
        # row of Qᵀ is zero; 0·NaN and 0·inf are NaN), so one pass (one host synchronisation on CuPy) less,
        # and X is searched only to name it
        (B,), fmt = self._rhs(X, finite=False)
        self._check_denominators(power, damping)
        with quiet_overflow():  # a non-finite X or an overflow is reported below
            Y = self._scaled(B, power, damping)
        if not all_finite(self._ctx.xp, Y):
            self._rhs(X)  # raises on a non-finite X, as the check before the product did
            raise self._nonfinite(Y)
        return self._ret([Y], fmt, checked=True)

    def solve(self, X, damping: float = 0.0):
        """Exactly ``(A ⊗ G + damping·I)⁻¹ vec(X)`` (K-FAC eq. 6 with Tikhonov damping)."""
        return self.power(X, -1.0, damping)

    def _damped_solve(self, X, damping: float):
        """``(A ⊗ G + damping·I)⁻¹`` on a validated block in the compute namespace."""
        self._check_denominators(-1.0, damping)
        return self._scaled(X, -1.0, damping)

    def _scaled(self, X, power: float, damping: float):
        """``(A ⊗ G + damping·I) ** power`` on a validated block (denominators already checked)."""
        if not self._thin:
            return self._from_eig(eig_scale(self._ctx.xp, self._to_eig(X), self._lg, self._la, damping, power))
        if damping == 0.0:  # (A ⊗ G)^power = A^power ⊗ G^power: each factor on its side, two thin GEMMs each
            return self._factor_power(self._factor_power(X, power, "A"), power, "G")
        return self._thin_apply(X, self._compressed_products(damping) ** power)

    def _factor_power(self, X, power: float, which: str):
        """``X (A^power)ᵀ`` (``which = "A"``) or ``G^power X``: ``Q diag(l^power) Qᵀ``, on a thin basis
        ``c·I + Q diag(l^power − c) Qᵀ`` with ``c = shift^power`` the complement's value."""
        if which == "A":
            Q, w, shift = self._Qa, self._la, self._shifts[0]
        else:
            Q, w, shift = self._Qg, self._lg, self._shifts[1]
        thin = Q.shape[-1] < Q.shape[-2]
        c = float(shift) ** power if thin else 0.0
        d = w**power - c
        if which == "A":
            out = ((X @ Q) * d[..., None, :]) @ mT(Q)
        else:
            out = Q @ (d[..., :, None] * (mT(Q) @ X))
        if c != 0.0:
            out += c * X
        return out

    def _thin_apply(self, X, S):
        """``f(A ⊗ G)`` on a thin basis: ``S`` holds f of the products with one complement row (G thin) and
        column (A thin) first (:meth:`_compressed_products`).  Splitting ``f`` over the projectors ``Pg_i``,
        ``Pa_j`` and the complements ``Pg⊥``, ``Pa⊥`` (``Σ_i Pg_i + Pg⊥ = I``):

            f(A⊗G) X = F⊥⊥ X + Qg[(F_i⊥ − F⊥⊥) ⊙ QgᵀX] + [XQa ⊙ (F⊥j − F⊥⊥)]Qaᵀ
                       + Qg[(QgᵀXQa) ⊙ (F_ij − F_i⊥ − F⊥j + F⊥⊥)]Qaᵀ,

        with the terms of a square (complement-free) factor folded into the others.  Without shifts every
        product with a complement direction is 0, so ``F_i⊥ = F⊥j = F⊥⊥ = c`` and two terms vanish."""
        Qa, Qg = self._Qa, self._Qg
        ta, tg = Qa.shape[-1] < self.p, Qg.shape[-1] < self.q
        if self._shifts == (0.0, 0.0):  # c·X + Qg[(QgᵀXQa) ⊙ (F − c)]Qaᵀ
            c = S[..., :1, :1]
            Y = self._to_eig(X)
            Y *= S[..., int(tg):, int(ta):] - c
            out = self._from_eig(Y)
            out += c * X
            return out
        if ta and tg:
            c, fg, fa, F = S[..., :1, :1], S[..., 1:, :1], S[..., :1, 1:], S[..., 1:, 1:]
            W = mT(Qg) @ X
            Z = (W @ Qa) * (F - fg - fa + c)
            Z = Qg @ ((fg - c) * W + Z @ mT(Qa))
            Z += ((X @ Qa) * (fa - c)) @ mT(Qa)
            Z += c * X
            return Z
        if ta:  # G square: Qg[F_i⊥ ⊙ W + ((W Qa) ⊙ (F_ij − F_i⊥)) Qaᵀ], W = QgᵀX
            fg, F = S[..., :, :1], S[..., :, 1:]
            W = mT(Qg) @ X
            return Qg @ (fg * W + ((W @ Qa) * (F - fg)) @ mT(Qa))
        fa, F = S[..., :1, :], S[..., 1:, :]  # A square: [F⊥j ⊙ W + Qg((QgᵀW) ⊙ (F_ij − F⊥j))]Qaᵀ, W = XQa
        W = X @ Qa
        return (W * fa + Qg @ ((mT(Qg) @ W) * (F - fa))) @ mT(Qa)

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
            Y = None if self._thin else self._to_eig(X) * scale
        except (ValueError, TypeError):
            raise ValueError(
                f"fn must return values broadcastable to the eigenvalue products of shape "
                f"{tuple(self.batch_shape) + (self.q, self.p)}; got {shape_str(scale)}"
            ) from None
        if not bool(xp.all(xp.isfinite(scale))):
            raise ValueError("fn returned NaN or infinity for some eigenvalue products")
        if self._thin:
            return self._ret([self._thin_apply(X, self._thin_scale(xp, scale, want))], fmt)
        return self._ret([self._from_eig(Y)], fmt)

    def _thin_scale(self, xp, scale, want):
        """``fn``'s values with one complement row/column per thin factor (see :meth:`_thin_apply`): on a
        thin basis ``fn`` must be a function of the products, constant along a complement's directions."""
        S = xp.broadcast_to(scale, want)
        ca, cg = self.p - self._Qa.shape[-1], self.q - self._Qg.shape[-1]  # the complements come first
        if (ca and bool(xp.any(S[..., :, :ca] != S[..., :, :1]))) or (cg and bool(xp.any(S[..., :cg, :] != S[..., :1, :]))):
            raise ValueError(
                "fn must be a function of the eigenvalue products: on this thin eigenbasis (KronEigh.from_rows) "
                "the products along a factor's complement are equal, and fn gave them different values"
            )
        return S[..., max(cg - 1, 0):, max(ca - 1, 0):]

    @property
    def T(self) -> "KronEigh":
        """``A ⊗ G`` is symmetric: its transpose is itself."""
        return self

    def _apply_matrix(self, X):
        if self._thin:
            return self._scaled(X, 1.0, 0.0)  # A ⊗ G factor by factor
        return self._from_eig(self._to_eig(X) * self._products())

    def __matmul__(self, X):
        """``(A ⊗ G) vec(X)`` through the eigenbasis."""
        (X,), fmt = self._rhs(X)
        return self._ret([self._apply_matrix(X)], fmt)

    def eigvals(self, damping: float = 0.0):
        """The ``(..., q, p)`` eigenvalues ``lg[i]·la[j] + damping`` of ``A ⊗ G + damping·I``."""
        damping = check_nonneg_scalar(damping, "damping")
        d = self._products(damping)
        if damping and not all_finite(self._ctx.xp, d):  # the damping alone may leave the dtype's range
            raise FloatingPointError(
                f"KronEigh.eigvals(damping={damping:g}): the eigenvalues lg·la + damping overflow {self.dtype}; pass a "
                f"damping within its range (or rescale A, G and the damping together)"
            )
        return self._out(d)

    def logdet(self, damping: float = 0.0):
        """``log det(A ⊗ G + damping·I)``; raises if the operator is not positive definite."""
        xp = self._ctx.xp
        d = self._products(check_nonneg_scalar(damping, "damping"))
        if bool(xp.any(d <= 0)):
            raise LinAlgError("A ⊗ G + damping·I is not positive definite; pass damping > 0")
        self._check_denominators(-1.0, damping)  # singular to working precision: as Kron.solve/logdet say
        return self._scalar(xp.sum(xp.log(d), axis=(-2, -1)))

    #: How :meth:`refresh` built this eigenbasis: ``{"A": "kept" | "cold", "G": ..., "bound": η, "checked": bool}``
    #: (``η`` the certified relative error of the damped solve, 0 when both are cold) and ``"checked"``
    #: (whether the staleness was measured); None for a cold ``Kron.eigh()``.
    refresh_info = None
    _backoff = (0, 0)  # (failed checks in a row, refreshes left to go cold unchecked); see refresh()

    def refresh(self, A, G, damping: float, rtol: float = 1e-3) -> "KronEigh":
        """The eigenbasis of new factors ``A``, ``G``, re-using this one where a certified bound allows.

        Per factor, with this (old) basis ``Q``: one GEMM ``Y = A_new Q`` gives the Rayleigh quotients
        ``d_j = q_jᵀ A_new q_j`` (the diagonal of ``M = QᵀA_new Q``) and the residuals ``r_j = ‖Y_j − d_j q_j‖``
        (the norms of ``M``'s off-diagonal columns), from which Distributed Shampoo's staleness
        ``‖M − diag M‖_F / ‖M‖_F`` follows.  Kept, the basis gets the corrected eigenvalues ``d``
        (eigenvalue correction, as in EKFAC and SOAP), so the result represents ``Ã ⊗ G̃`` with
        ``Ã = Q diag(d) Qᵀ``.  A factor whose basis is too stale is decomposed cold (``Kron.eigh``);
        both are when one alone does not meet ``rtol``.  ``refresh_info`` on the result says which.

        Guarantee: for every ``X``, ``‖x̃ − x‖ ≤ η ‖x‖ ≤ rtol ‖x‖`` with ``x = (A⊗G + damping·I)⁻¹ vec(X)``
        and ``x̃ = result.solve(X, damping)`` (exact arithmetic; rounding adds the ``O(n·eps·‖A‖)`` the cold
        ``eigh`` also carries).  A larger damping is covered too (``η`` decreases with ``λ``); smaller dampings
        and other powers are not.

        Derivation (a Bauer–Fike/Weyl-type perturbation bound in the old basis; Shampoo's criterion made
        specific to the damped solve).  Write ``K = A⊗G + λI`` and ``K̃ = Ã⊗G̃ + λI``; both are
        ``≥ λI`` because ``d ≥ 0`` for PSD factors.  Then ``x̃ − x = K̃⁻¹(K − K̃)x``, so
        ``‖x̃ − x‖ ≤ ‖K̃⁻¹Δ‖₂ ‖x‖`` with ``Δ = K − K̃``.  In the basis ``Qa ⊗ Qg``,
        ``Ma = Da + Ea`` (diagonal plus off-diagonal), likewise ``Mg``, and
        ``Δ = Ma⊗Mg − Da⊗Dg = Ea⊗Mg + Da⊗Eg``, while ``K̃⁻¹ = W = diag(w_ik)``,
        ``w_ik = 1/(da_i dg_k + λ)``.  Block row ``i`` of ``W(Ea⊗Mg)`` is ``Ea[i,:] ⊗ W_i Mg`` with
        ``‖W_i Mg‖₂ ≤ max_k w_ik dg_k + c_i``, ``c_i = ‖W_i Eg‖_F = (Σ_k w_ik² rg_k²)^½``, and stacked
        rows add in squares; ``W(Da⊗Eg)`` is block diagonal with blocks ``da_i W_i Eg``.  Hence

            ‖K̃⁻¹Δ‖₂ ≤ η_A = (Σ_i ra_i² (max_k w_ik dg_k + c_i)²)^½ + max_i da_i c_i,

        and the same with the roles of ``A`` and ``G`` exchanged (``Δ = Ma⊗Eg + Ea⊗Dg``, ``A⊗G`` and
        ``G⊗A`` are permutation-similar) gives ``η_G``; ``η = min(η_A, η_G)``.  A cold factor has
        ``r = 0``.  With a small relative staleness ``s`` per factor this is about
        ``s·‖A‖‖G‖/λ`` in the worst direction but much less where ``Ea``'s large entries meet large
        ``da_i dg_k`` (for a PSD factor ``|M_ij|² ≤ M_ii M_jj``).

        Parameters
        ----------
        A, G : (..., p, p), (..., q, q) symmetric PSD factors of this operator's shapes and dtype
        damping : float
            The ``λ ≥ 0`` of the solves the result will serve (the bound is for this ``λ``; a larger
            ``λ`` only tightens it).  With ``λ = 0`` both factors must be positive definite.
        rtol : float
            The largest relative error of the damped solve to accept instead of a cold decomposition;
            ``math.inf`` always keeps both bases (``refresh_info["bound"]`` still reports ``η``).

        Returns
        -------
        KronEigh
            A new operator (this one is unchanged); ``refresh_info`` records the route and ``η``.
            Kept eigenvalues are in the order of the kept basis, not sorted.

        Notes
        -----
        Cost: two GEMMs (one per factor) plus ``O(p·q)``: a kept refresh measured 0.26-0.30x a cold one
        (two ``?syevd``) at 256-1024 on one core (bench/results/refresh_sweep.md).  On factors recorded from
        kronlin.train's K-FAC (curves-ae, a 6 x 1024 MLP) no basis could be kept at ``rtol <= 0.1``: even one
        step apart, the step from the previous basis (eigenvalues corrected) differs from the cold one by
        9-20% (bench/results/refresh.md).  A stack decides for the whole stack (the worst ``η`` of its items).
        """
        damping = check_nonneg_scalar(damping, "damping")
        # math.inf keeps every basis (eigenvalue correction only, as SOAP does); refresh_info still has η
        rtol = math.inf if rtol == math.inf else check_positive_scalar(rtol, "rtol")
        ctx, (A, G) = context(("A", A), ("G", G), snapshot=True)
        p, q = check_square(A, "A"), check_square(G, "G")
        got = (p, q, tuple(batch_shape_of(A, G)), ctx.dtype, ctx.name)
        if got != (self.p, self.q, tuple(self.batch_shape), self.dtype, self._ctx.name):
            raise ValueError(
                f"refresh needs factors of this eigenbasis' shapes, dtype and library (p={self.p}, q={self.q}, batch "
                f"{tuple(self.batch_shape)}, {self.dtype}, {self._ctx.name}); got p={got[0]}, q={got[1]}, batch "
                f"{got[2]}, {got[3]}, {got[4]}; use Kron(A, G).eigh() for a new shape"
            )
        xp = self._ctx.xp
        M = {"A": A, "G": G}
        for n in M:
            check_symmetric(xp, M[n], n)  # refuses a non-finite entry too (one pass for both)
        fails, skip = self._backoff if rtol < math.inf else (0, 0)
        st = {}  # factor -> (eigenvalues or Rayleigh quotients, squared residuals, basis, "kept" | "cold")
        if skip == 0 and not self._thin:  # a thin basis spans too little for full-rank factors: cold
            for n, Q in (("A", self._Qa), ("G", self._Qg)):
                dr = ritz(xp, M[n], Q)
                if dr is not None:
                    st[n] = (dr[0], dr[1], Q, "kept")

        def cold(n):
            w, Q = eigh(xp, M[n], n)
            st[n] = (w, xp.zeros_like(w), Q, "cold")

        def bound(a=None, g=None):
            return _warm_bound(xp, a or st["A"][:2], g or st["G"][:2], damping)

        eta = bound() if len(st) == 2 else math.inf
        if len(st) == 2 and eta > rtol:
            # one factor cold may do (cheapest first), judged with its Rayleigh quotients for its eigenvalues
            cands = sorted([(self.q, "G", bound(g=(st["G"][0], xp.zeros_like(st["G"][0])))),
                            (self.p, "A", bound(a=(st["A"][0], xp.zeros_like(st["A"][0]))))])
            pick = next((n for _, n, b in cands if b <= rtol), None)
            if pick is not None:
                cold(pick)
                eta = bound()  # with its actual eigenvalues
        if eta > rtol or len(st) < 2:  # everything cold: exact
            for n in ("A", "G"):
                if n not in st or st[n][3] == "kept":
                    cold(n)
            eta = 0.0
        kept = [n for n in ("A", "G") if st[n][3] == "kept"]
        E = KronEigh._trusted(self._ctx, st["A"][2], st["A"][0], st["G"][2], st["G"][0])
        E.refresh_info = {"A": st["A"][3], "G": st["G"][3], "bound": float(eta), "checked": skip == 0}
        # a failed check costs ~0.2-0.3x a cold refresh (one GEMM per factor against ?syevd): after f failures
        # in a row the next 2^f - 1 (at most 7) refreshes go cold unchecked, which keeps the guarantee
        if skip:
            E._backoff = (fails, skip - 1)
        elif not kept:
            E._backoff = (fails + 1, min(2 ** (fails + 1) - 1, 7))
        return E

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


def _padded(xp, w, n, c=0.0):
    """Eigenvalues ``w`` (..., r) of a thin basis preceded by the ``n − r`` eigenvalues ``c`` of its complement."""
    r = w.shape[-1]
    if r == n:
        return w
    return xp.concat([xp.full(tuple(w.shape[:-1]) + (n - r,), c, dtype=w.dtype), w], axis=-1)


def _warm_bound(xp, a, g, damping: float) -> float:
    """``η = min(η_A, η_G)`` of :meth:`KronEigh.refresh` from ``a = (da, ra²)`` and ``g = (dg, rg²)``
    (Rayleigh quotients and squared residual norms); the worst item of a stack; inf where
    ``da_i dg_k + damping`` vanishes.

    ``max_k w_ik dg_k`` is at ``dg_max`` (``x/(x·da_i + λ)`` grows with ``x ≥ 0``) and ``c`` is a product of
    ``W²`` with a vector, so the cost is one ``(q, p)`` array and two matrix-vector products.
    """
    (da, ra2), (dg, rg2) = a, g
    den = dg[..., :, None] * da[..., None, :] + damping  # (..., q, p), rows k over G, columns i over A
    if not bool(xp.all(den > 0)):
        return math.inf
    W2 = 1.0 / (den * den)

    def one(dx, rx2, dy, cx):  # x the outer factor, cx_i = (Σ_k w_ik² ry_k²)^½
        dmax = xp.max(dy, axis=-1, keepdims=True)
        m = dmax / (dmax * dx + damping)
        return xp.sqrt(xp.sum(rx2 * (m + cx) ** 2, axis=-1)) + xp.max(dx * cx, axis=-1)

    ca = xp.sqrt((rg2[..., None, :] @ W2)[..., 0, :])  # (..., p)
    cg = xp.sqrt((W2 @ ra2[..., :, None])[..., 0])  # (..., q)
    eta = xp.minimum(one(da, ra2, dg, ca), one(dg, rg2, da, cg))
    return float(xp.max(eta))
