"""Generalized Stein / Sylvester equations with general factors: the real generalized Schur (QZ) method.

Solves ``B U Aᵀ + sign·D U Cᵀ = V`` — equivalently
``(A ⊗ B + sign·C ⊗ D) vec(U) = vec(V)`` with column-stacking ``vec`` (K-FAC
appendix B, docs/design.md §1) — for *general* real square factors: non-symmetric,
indefinite, defective.  K-FAC appendix B (Martens & Grosse 2015) inverts
``A ⊗ B ± C ⊗ D`` through symmetric eigendecompositions, which needs
symmetric positive (semi-)definite factors; for anything else a diagonalizing
basis may not exist or may be arbitrarily ill-conditioned.  The method here,
Gardiner, Laub, Amato & Moler (1992), "Solution of the Sylvester matrix
equation AXBᵀ + CXDᵀ = E" (ACM TOMS 18(2), 223–231), the generalization of
Bartels–Stewart, uses orthogonal transformations only:

1. real QZ decompositions ``(B, D) = (Q1 S1 Z1ᵀ, Q1 T1 Z1ᵀ)`` and
   ``(A, C) = (Q2 S2 Z2ᵀ, Q2 T2 Z2ᵀ)``, ``S`` quasi-upper-triangular (2×2
   diagonal blocks for complex-conjugate eigenvalue pairs), ``T`` upper
   triangular — once, in the constructor;
2. ``W = Q1ᵀ V Q2``, so that ``S1 Y S2ᵀ + sign·T1 Y T2ᵀ = W``;
3. back-substitution for ``Y`` (:mod:`kronlin._kernels.gsylv`: a compiled
   O(pq(p+q)) kernel, or its NumPy reference);
4. ``U = Z1 Y Z2ᵀ``.

Each solve costs four GEMMs and one back-substitution, like the eigenbasis
method of K-FAC appendix B, and is backward stable whatever the factors'
normality.
"""

from __future__ import annotations

import numpy as np

from .._backend import ModuleRefs, is_numpy, to_numpy
from .._kernels.gsylv import gsylv_backsub_raw, check_pivot
from .._validate import check_sign, shape_str

__all__ = ["SchurStein"]


def _np_dtype(xp, dtype):
    """The NumPy float dtype matching ``dtype`` of namespace ``xp`` (float32 stays, all else float64)."""
    if is_numpy(xp):
        return np.float32 if np.dtype(dtype) == np.float32 else np.float64
    return np.float32 if dtype == getattr(xp, "float32", None) else np.float64


class SchurStein(ModuleRefs):
    """``(A ⊗ B + sign·C ⊗ D)⁻¹`` for general real square factors, by the generalized Schur method.

    Solves the generalized Stein / generalized Sylvester equation

        ``B U Aᵀ + sign · D U Cᵀ = V``  ⇔  ``(A ⊗ B + sign·C ⊗ D) vec(U) = vec(V)``

    (``vec`` stacks columns) by the method of Gardiner, Laub, Amato & Moler
    (1992): real QZ decompositions of the pencils ``(B, D)`` and ``(A, C)``
    once, then per right-hand side two orthogonal transformations, a
    quasi-triangular back-substitution and two transformations back.  It is
    the general-matrix counterpart of the eigenbasis formula of K-FAC
    (Martens & Grosse 2015) appendix B, which needs symmetric positive
    semi-definite factors; here the factors may be non-symmetric, indefinite
    or defective (no eigenvector basis is ever formed).

    Parameters
    ----------
    xp : module
        The array namespace of the factors and of the results.
    A, C : (p, p) arrays
        The input-side factors (already validated: finite, one dtype).
    B, D : (q, q) arrays
        The output-side factors.
    sign : {+1, -1}
        The sign of the second Kronecker term.

    Attributes
    ----------
    p, q : int
        The factor orders; ``solve`` takes arrays of shape ``(..., q, p)``.
    sign : int
    dtype :
        The factors' dtype (in ``xp``).
    pivot_ratio : float
        The smallest relative pivot of the back-substitution,
        ``min|pivot| / (max|S1|·max|S2| + max|T1|·max|T2|)``; roughly the
        reciprocal of a condition number of the Kronecker sum (``inf`` when
        ``p`` or ``q`` is 0).

    Raises
    ------
    numpy.linalg.LinAlgError
        When the equation is singular to working precision: a product ``λ·μ``
        of generalized eigenvalues of ``(B, D)`` and ``(A, C)`` equals
        ``-sign`` to within rounding.  The rule, shared with the kernel's NumPy
        reference, is kronlin's one singularity policy
        ``pivot_ratio <= SINGULAR_RTOL_FACTOR·eps`` with the eps of
        the input dtype (see :mod:`kronlin._kernels.gsylv` and
        :data:`kronlin._validate.SINGULAR_RTOL_FACTOR`).  It is checked here, once, and again by
        every solve.
    ValueError
        When the factors are not square 2-D matrices of matching orders or
        ``sign`` is not ±1.

    Notes
    -----
    *Precision.*  The QZ decompositions and every solve run in float64 on
    NumPy, whatever the input dtype; float32 inputs give float32 results
    rounded from the float64 solution.  Measured on 30×30 and 40×40 problems
    (random, shifted and non-normal pencils), float32 QZ plus float32 solves
    gave relative errors 1e-6 to 5e-5, float64 QZ plus float32 solves 2e-7 to
    4e-6, all-float64 3e-8 to 5e-8 (the float32 rounding of the answer).  A
    float32 solve therefore costs what a float64 one does.  The singularity
    verdict uses float32's eps for float32 data, as every other method does.

    *Namespaces.*  LAPACK's QZ (``scipy.linalg.qz``) has no CuPy or array-API
    counterpart, so factors in another namespace (CuPy, array_api_strict, ...)
    are copied to NumPy with :func:`kronlin._backend.to_numpy`, everything is
    computed there (with the compiled CPU kernel when available), and results
    are moved back with ``xp.asarray``; for CuPy each solve is a device→host
    →device round trip.

    *Cost.*  Set-up: two QZ decompositions, O(p³ + q³) with a large constant,
    plus one back-substitution on a zero right-hand side to test singularity.
    Each solve: four GEMMs (O(pq(p + q))) and the O(pq(p + q)) back-substitution.

    References
    ----------
    J. D. Gardiner, A. J. Laub, J. J. Amato, C. B. Moler, "Solution of the
    Sylvester matrix equation AXBᵀ + CXDᵀ = E", ACM Trans. Math. Softw. 18(2),
    1992, 223–231.
    J. Martens, R. Grosse, "Optimizing neural networks with Kronecker-factored
    approximate curvature", ICML 2015, appendix B.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> A, C = rng.standard_normal((2, 3, 3)); B, D = rng.standard_normal((2, 4, 4))
    >>> V = rng.standard_normal((4, 3))
    >>> U = SchurStein(np, A, B, C, D, -1).solve(V)
    >>> bool(np.allclose(B @ U @ A.T - D @ U @ C.T, V))
    True
    """

    def __init__(self, xp, A, B, C, D, sign):
        import scipy.linalg

        sign = check_sign(sign)
        for M, name in ((A, "A"), (B, "B"), (C, "C"), (D, "D")):
            if M.ndim != 2 or M.shape[0] != M.shape[1]:
                raise ValueError(
                    f"method='schur' needs square 2-D factors; {name} has shape {shape_str(M)} "
                    f"(stacks of factors are not supported by the Schur method)"
                )
        if A.shape != C.shape or B.shape != D.shape:
            raise ValueError(
                f"A and C must share one shape (p, p) and B and D one shape (q, q); got A {shape_str(A)}, "
                f"C {shape_str(C)}, B {shape_str(B)}, D {shape_str(D)}"
            )
        self._xp = xp
        self.dtype = A.dtype
        self.sign = int(sign)
        self.p, self.q = int(A.shape[0]), int(B.shape[0])
        An, Bn, Cn, Dn = (np.array(to_numpy(M), dtype=np.float64) for M in (A, B, C, D))
        self.pivot_ratio = float("inf")
        if self.p == 0 or self.q == 0:
            return
        # (B, D) = (Q1 S1 Z1ᵀ, Q1 T1 Z1ᵀ) and (A, C) = (Q2 S2 Z2ᵀ, Q2 T2 Z2ᵀ)
        S1, T1, Q1, Z1 = scipy.linalg.qz(Bn, Dn, output="real", overwrite_a=True, overwrite_b=True,
                                         check_finite=False)
        S2, T2, Q2, Z2 = scipy.linalg.qz(An, Cn, output="real", overwrite_a=True, overwrite_b=True,
                                         check_finite=False)
        self._S1, self._T1, self._S2, self._T2 = (np.ascontiguousarray(M) for M in (S1, T1, S2, T2))
        self._Q1, self._Z1, self._Q2, self._Z2 = Q1, Z1, Q2, Z2
        # the pivots depend on the Schur forms only: find them once with a zero right-hand side
        _, rel = gsylv_backsub_raw(
            np, self._S1, self._T1, self._S2, self._T2, np.zeros((1, self.q, self.p)), self.sign
        )
        self.pivot_ratio = rel
        # the one singularity policy, with the eps of the *input* dtype (the data's precision; the arithmetic
        # here is float64 whatever the dtype), so every method gives the same verdict on the same problem
        self._eps = float(np.finfo(_np_dtype(xp, A.dtype)).eps)
        check_pivot(rel, self._eps, self.p, self.q, self.sign)

    def __repr__(self) -> str:
        return f"SchurStein(p={self.p}, q={self.q}, sign={self.sign:+d}, pivot_ratio={self.pivot_ratio:.3g})"

    def solve(self, V):
        """``U`` with ``B U Aᵀ + sign·D U Cᵀ = V``.

        Parameters
        ----------
        V : (..., q, p) array in the constructor's namespace
            One right-hand side or a stack of them.

        Returns
        -------
        U : (..., q, p) array
            In the constructor's namespace, with ``V``'s dtype (float32 stays
            float32, anything else is float64).

        Raises
        ------
        ValueError
            When ``V``'s last two axes are not ``(q, p)``.
        numpy.linalg.LinAlgError
            When the equation is singular to working precision.
        """
        xp = self._xp
        if V.ndim < 2 or tuple(V.shape[-2:]) != (self.q, self.p):
            raise ValueError(
                f"V must have shape (..., q, p) = (..., {self.q}, {self.p}) to match B, D (q, q) and A, C (p, p); "
                f"got {shape_str(V)}"
            )
        out_dtype = _np_dtype(xp, V.dtype)
        Vn = np.asarray(to_numpy(V), dtype=np.float64)
        if Vn.size == 0:
            U = np.zeros(Vn.shape, dtype=out_dtype)
        else:
            W = self._Q1.T @ Vn @ self._Q2  # a fresh C-contiguous array, overwritten by Y
            Y, rel = gsylv_backsub_raw(np, self._S1, self._T1, self._S2, self._T2, W, self.sign)
            check_pivot(rel, self._eps, self.p, self.q, self.sign)
            U = (self._Z1 @ Y @ self._Z2.T).astype(out_dtype, copy=False)
        return U if is_numpy(xp) else xp.asarray(U)
