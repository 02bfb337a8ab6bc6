"""K-FAC's block-diagonal and block-tridiagonal inverse Fisher approximations (K-FAC §4.2, §4.3, §6.3).

Layers are indexed from 0 here; layer ``k`` is the paper's layer ``i = k + 1``
with weights ``W_i`` of shape ``(d_i, d_{i-1}+1)`` (homogeneous coordinate
last).  The arguments follow docs/design.md §2:

``A_diag[k] = Ā_{k,k}``   (d_k+1, d_k+1)      ``G_diag[k] = G_{k+1,k+1}``  (d_{k+1}, d_{k+1})
``A_off[k]  = Ā_{k,k+1}`` (d_k+1, d_{k+1}+1)  ``G_off[k]  = G_{k+1,k+2}``  (d_{k+1}, d_{k+2})

so the diagonal Fisher block of layer ``k`` is ``Kron(A_diag[k], G_diag[k])``
and the block coupling layers ``k`` and ``k+1`` is ``A_off[k] ⊗ G_off[k]``.

Factored Tikhonov damping (§6.3) with ``gamma`` and a per-layer π is applied to
the diagonal factors *first*, and the damped factors are used everywhere they
appear (inside ``Ψ`` and ``Σ`` too), so :meth:`BlockTridiagInverse.to_dense` is
exactly the inverse of the ``F̂`` that agrees with the damped ``F̃`` on its
tridiagonal blocks.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from ._backend import context, is_numpy, mT, owned_copy
from ._kernels.block_apply import block_apply, block_apply_compiled
from ._kernels.symmetric import stack_asymmetry
from ._linalg import Factor
from ._operator import Operator
from ._validate import (
    LinAlgError,
    check_choice,
    check_finite,
    check_nonempty,
    check_nonneg_scalar,
    check_symmetric,
    first_nonfinite,
    quiet_overflow,
    shape_str,
)
from .damping import check_damping_terms, pi_value
from .stein import KronSumInverse

__all__ = ["BlockDiagInverse", "BlockTridiagInverse", "TridiagPart", "tridiag_parts"]


def _damped(ctx, SA, SG, gamma, pi, ks, own: bool = False):
    """The factor-damped pairs ``(A + πγI, G + (γ/π)I)`` of K-FAC §6.3 of the layers ``ks``: one layer's
    matrices, or stacks ``SA`` (m, p, p), ``SG`` (m, q, q) with one π per layer.  ``ValueError`` (π or the
    damping terms not representable) names layer ``ks[0]``: damp a failing stack layer by layer to name it.

    The results are arrays of the operator's own: new ones, or ``SA``/``SG`` themselves, damped in place,
    when ``own`` (the caller made them, e.g. by stacking the caller's factors).  Nothing is changed before
    the checks pass."""
    xp = ctx.xp
    if gamma == 0.0:
        return (SA, SG) if own else (owned_copy(xp, SA), owned_copy(xp, SG))
    pv = pi_value(ctx, SA, SG, pi, f"A_diag[{ks[0]}]", f"G_diag[{ks[0]}]")
    check_damping_terms(xp, gamma, pv, ctx.dtype, f"pi (layer {ks[0]})")
    pv = xp.astype(pv, xp.float64) if hasattr(pv, "shape") else xp.asarray(float(pv))
    return (_plus_diagonal(xp, SA, xp.astype(pv * gamma, ctx.dtype), own),
            _plus_diagonal(xp, SG, xp.astype(gamma / pv, ctx.dtype), own))


def _plus_diagonal(xp, M, v, in_place: bool):
    """``M + v·I`` (``v`` a scalar, or one per matrix of a stack): NumPy adds to the diagonal of ``M``
    itself (``in_place``) or of one copy (no identity built), other libraries by broadcasting the identity."""
    n = M.shape[-1]
    if is_numpy(xp):
        D = M if in_place else M.copy()
        d = np.einsum("...ii->...i", D)  # a writeable view of the diagonal(s)
        d += np.reshape(v, (-1, 1) if M.ndim == 3 else ())
        return D
    return M + xp.reshape(v, (-1, 1, 1) if M.ndim == 3 else ()) * xp.eye(n, dtype=M.dtype)


def _stack_pair(xp, As, Gs):
    """``(stack(As), stack(Gs), measured)``; NumPy: two views of one allocation, and ``measured`` their
    ``(asym, scale)`` pairs, taken while each matrix is copied in (``stack_asymmetry``; None elsewhere).

    The pair lives and dies together (the damped copies, then the inverses, of one group), and one buffer
    of their joint size is what glibc's malloc keeps for the next refresh: freeing two stacks of half the
    size each at the top of the heap reaches its trim threshold (twice the largest chunk freed so far), so
    every build page-faulted its stacks in again (200 × 64² float32: 4.2 ms of a 26 ms build)."""
    if not is_numpy(xp) or As[0].dtype != Gs[0].dtype:
        return xp.stack(As), xp.stack(Gs), None
    B, p, q = len(As), As[0].shape[-1], Gs[0].shape[-1]
    buf = np.empty(B * (p * p + q * q), dtype=As[0].dtype)  # native: context() converts byte-swapped inputs
    SA, SG = buf[: B * p * p].reshape(B, p, p), buf[B * p * p :].reshape(B, q, q)
    return SA, SG, (stack_asymmetry(np, As, SA), stack_asymmetry(np, Gs, SG))


def _by_shape(shapes) -> list:
    """Indices with equal shapes, grouped in order of first appearance (issue 13 item 3: one stacked call each)."""
    groups: dict = {}
    for i, s in enumerate(shapes):
        groups.setdefault(s, []).append(i)
    return list(groups.values())


def _as_list(x, name: str) -> list:
    if not isinstance(x, (list, tuple)):
        raise TypeError(f"{name} must be a list with one array per layer; got {type(x).__name__}")
    return list(x)


class _LayerBlocks(Operator):
    """Validation, damping and shapes shared by the block-diagonal and block-tridiagonal inverses.

    Right-hand sides are lists of per-layer ``(..., d_i, d_{i-1}+1)`` arrays or
    flat column-stacked ``(..., P)`` arrays (the operator base).
    """

    _layered = True
    _operands = "the factors (A_diag, G_diag, A_off, G_off)"

    def _setup(self, A_diag, G_diag, A_off, G_off, gamma, pi):
        A_diag, G_diag = _as_list(A_diag, "A_diag"), _as_list(G_diag, "G_diag")
        A_off = _as_list(A_off, "A_off")
        G_off = _as_list(G_off, "G_off")
        n = len(A_diag)
        if n == 0 or len(G_diag) != n:
            raise ValueError(
                f"A_diag and G_diag must be non-empty lists of the same length (one per layer); "
                f"got {len(A_diag)} and {len(G_diag)}"
            )
        named = [(f"A_diag[{k}]", M) for k, M in enumerate(A_diag)] + [(f"G_diag[{k}]", M) for k, M in enumerate(G_diag)]
        named += [(f"A_off[{k}]", M) for k, M in enumerate(A_off)] + [(f"G_off[{k}]", M) for k, M in enumerate(G_off)]
        gamma = check_nonneg_scalar(gamma, "gamma")
        # no snapshot: every array the operator keeps is one it made below (a stack, a damped copy, a copy)
        ctx, arrays = context(*named)
        xp = ctx.xp
        names = [name for name, _ in named]
        Ad, Gd = arrays[:n], arrays[n:2 * n]
        Ao, Go = arrays[2 * n:2 * n + len(A_off)], arrays[2 * n + len(A_off):]
        # one quick test of every shape (at 200 layers this loop is a visible part of a build); the loops below
        # find the first offender and name it
        if not (all(M.ndim == 2 and M.shape[0] == M.shape[1] > 0 for M in Ad + Gd)
                and all(M.ndim == 2 and M.shape[0] > 0 and M.shape[1] > 0 for M in Ao + Go)):
            for name, M in zip(names, arrays):
                if M.ndim != 2:
                    raise ValueError(f"{name} must be a matrix; got shape {shape_str(M)}")
                check_nonempty(M, name)
            for M, name in zip(Ad + Gd, names[:2 * n]):
                if M.shape[0] != M.shape[1]:
                    raise ValueError(f"{name} must be square; got shape {shape_str(M)}")
        self._ctx, self.n_layers = ctx, n
        self.gamma = gamma
        self.pi = pi
        self.shapes = [(int(Gd[k].shape[0]), int(Ad[k].shape[0])) for k in range(n)]
        self._blocks = tuple(self.shapes)
        # layers of one shape are stacked once, checked and damped as one stack (issue 13 item 3; kept in
        # self._stacks for the stacked factorizations of BlockDiagInverse); a stack that fails a check is
        # checked matrix by matrix so that the error names the argument
        groups = []
        for ks in _by_shape(self.shapes):
            SA = SG = None
            if len(ks) > 1:
                SA, SG, measured = _stack_pair(xp, [Ad[k] for k in ks], [Gd[k] for k in ks])
                try:
                    for S, m in zip((SA, SG), measured or (None, None)):
                        check_symmetric(xp, S, "a stack", m)  # refuses a non-finite entry too (one pass for both)
                except ValueError:
                    SA = SG = None
            if SA is None:
                for k in ks:
                    for M, name in ((Ad[k], names[k]), (Gd[k], names[n + k])):
                        check_symmetric(xp, M, name)  # refuses a non-finite entry too (one pass for both)
            groups.append((ks, SA, SG))
        for name, M in zip(names[2 * n:], Ao + Go):
            check_finite(xp, M, name)
        Ao, Go = [owned_copy(xp, M) for M in Ao], [owned_copy(xp, M) for M in Go]
        # damp the diagonal factors first (K-FAC §6.3); they are used everywhere below
        self._Ad, self._Gd, self._stacks = [None] * n, [None] * n, []
        for ks, SA, SG in groups:
            st = None
            if SA is not None:
                try:
                    st = _damped(ctx, SA, SG, gamma, pi, ks, own=True)  # the stacks are copies made here
                except ValueError:  # damped layer by layer below, so that the error names the layer
                    pass
            if st is None:
                for k in ks:
                    self._Ad[k], self._Gd[k] = _damped(ctx, Ad[k], Gd[k], gamma, pi, [k])
                continue
            self._stacks.append((ks, st[0], st[1]))
            for j, k in enumerate(ks):
                self._Ad[k], self._Gd[k] = st[0][j, ...], st[1][j, ...]
        # the off-diagonal factors (copies), and the validated inputs, from which BlockDiagInverse._build
        # rebuilds what a factorization consumed (not stored: no reference to the caller's arrays stays)
        return Ao, Go, (Ad, Gd)

    def _forward(self, Xs):
        return self._apply(Xs)

    def apply(self, V_list):
        """The inverse applied to per-layer blocks ``(..., d_i, d_{i-1}+1)`` (or a flat ``(..., P)`` array)."""
        Vs, fmt = self._rhs(V_list, "V_list")
        return self._ret(self._apply(Vs), fmt)

    __matmul__ = apply

    def _dense_from_apply(self, allow_large):
        """Dense matrix of ``apply`` on flat per-layer column-stacked vecs (layers concatenated)."""
        from .kron import DENSE_LIMIT

        xp, P = self._ctx.xp, self.n_params
        if P * P > DENSE_LIMIT and not allow_large:
            raise ValueError(f"to_dense() would build a {P}x{P} matrix; pass allow_large=True if you really want it")
        # row j of the identity is the flat unit vector e_j; row j of the result is F e_j, column j of F
        return self._out(mT(self._flatten(self._apply(self._unflatten(xp.eye(P, dtype=self._ctx.dtype))))))


class BlockDiagInverse(_LayerBlocks):
    """K-FAC §4.2's block-diagonal ``F̆⁻¹ = diag((Ā_{i-1,i-1} ⊗ G_{i,i})⁻¹)`` with factored damping.

    Parameters
    ----------
    A_diag, G_diag : lists of the diagonal factors (see the module docstring)
    gamma : float
        Factored Tikhonov damping strength γ (K-FAC §6.3, §6.6); 0 for none.
    pi : {"trace", "fro", "spectral"} or float
        π per layer from :func:`kronlin.pi_factor`'s norm, or a fixed value.
    """

    def __init__(self, A_diag, G_diag, gamma=0.0, pi="trace"):
        self._build(self._setup(A_diag, G_diag, [], [], gamma, pi)[2])

    def _build(self, sources):
        """The layers' inverses; layers of one shape are factorized and inverted as one stack (issue 13 item 3;
        LAPACK per matrix inside, the checks and mirrors vectorized), a stack that is not all positive
        definite layer by layer (LU, and errors that name the layer).

        A stack is factorized and inverted in its own memory (the damped stacks are this operator's copies):
        no fresh stack, whose first-touch page faults cost about as much as the copy (200 × 64² float32:
        0.91× the time).  A stack whose Cholesky fails, or whose pivots leave a doubt, is consumed by then;
        its layers are damped again from the inputs (``sources``, the validated ``A_diag``, ``G_diag``) and go
        the layer-by-layer way.  Libraries other than NumPy factorize copies (``Factor`` ignores ``overwrite``),
        so their stacks are left as they were."""
        xp = self._ctx.xp
        self.blocks = [None] * self.n_layers
        inv_stacks = []  # (ks, A⁻ᵀ stack, G⁻¹ stack): one batched product per group in apply
        for ks, SA, SG in self._stacks:
            try:
                # symmetric: checked in _setup (damping adds to the diagonal only)
                fa = Factor(xp, SA, "A_diag (damped)", symmetric=True, overwrite=True)
                fg = Factor(xp, SG, "G_diag (damped)", symmetric=True, overwrite=True)
            except LinAlgError:
                for k in ks:  # the stacks may be consumed: the layers again, from the inputs
                    self._redamp(k, sources)
                continue
            if fa.kind != "cholesky" or fg.kind != "cholesky":
                continue
            (_, la), (_, lg) = fa.slogdet(), fg.slogdet()  # Cholesky: positive determinants
            IA, IG = _inv_T(fa, True), fg.inv(overwrite=True)  # the factorizations are not needed afterwards
            p, q = SA.shape[-1], SG.shape[-1]
            logdet = q * la + p * lg
            for j, k in enumerate(ks):
                self.blocks[k] = _KronInverse(IA[j, ...], IG[j, ...], float(logdet[j]))
            inv_stacks.append((ks, IA, IG))
        self._inv_stacks = inv_stacks
        for k in range(self.n_layers):
            if self.blocks[k] is None:
                self.blocks[k] = self._layer_inverse(k, sources)
        # the damped factors served the factorizations only (the stacked ones hold the inverses now): not kept
        self._Ad = self._Gd = None
        self._stacks = []

    def _redamp(self, k, sources) -> None:
        """Layer ``k``'s damped factors again from the validated inputs (a factorization consumed them)."""
        self._Ad[k], self._Gd[k] = _damped(self._ctx, sources[0][k], sources[1][k], self.gamma, self.pi, [k])

    def _layer_inverse(self, k, sources):
        """Layer ``k``'s inverse pair: Cholesky in the damped factors' own memory where the inputs can rebuild
        them (a fresh copy per factor is a fresh page-faulted buffer), else, and after a failure, the general
        way (LU for an indefinite factor, errors that name the layer)."""
        xp = self._ctx.xp
        names = (f"A_diag[{k}] (damped)", f"G_diag[{k}] (damped)")
        try:
            fa = Factor(xp, self._Ad[k], names[0], symmetric=True, overwrite=True)
            fg = Factor(xp, self._Gd[k], names[1], symmetric=True, overwrite=True)
            return _KronInverse.of(fa, fg, overwrite=True)
        except LinAlgError:
            self._redamp(k, sources)
        # symmetric: checked in _setup (damping adds to the diagonal only)
        return _KronInverse.of(Factor(xp, self._Ad[k], names[0], symmetric=True, judge_by_inverse=True),
                               Factor(xp, self._Gd[k], names[1], symmetric=True, judge_by_inverse=True),
                               overwrite=True)

    def update(self, A_diag, G_diag, gamma=None, pi=None):
        """Refresh with new statistics of the same shapes (e.g. every T₃ iterations)."""
        shapes = self.shapes
        sources = self._setup(A_diag, G_diag, [], [], self.gamma if gamma is None else gamma,
                              self.pi if pi is None else pi)[2]
        if self.shapes != shapes:
            raise ValueError(f"update() needs the original layer shapes {shapes}; got {self.shapes}")
        self._build(sources)
        return self

    def apply(self, V_list):
        """The inverse applied to per-layer blocks ``(..., d_i, d_{i-1}+1)`` (or a flat ``(..., P)`` array)."""
        if not isinstance(V_list, (list, tuple)):
            return super().apply(V_list)
        # the results are checked finite (all of them in one decision), which covers the blocks too
        # (see _apply): one pass over the data less (at 200 × 64² one call per block and result cost 30% of
        # the products; on the 784-512-512-10 MLP's blocks, float32, 0.4 ms of 12)
        out = self._apply_compiled(V_list)
        if out is not None:
            return out
        Vs = self._rhs_list(V_list, "V_list", finite=False)
        return self._ret(self._apply(Vs, check=True), "list", checked=True)

    def _apply_compiled(self, V_list):
        """:meth:`apply`'s results where every layer is in a stack and the compiled loop takes every block as it
        comes, judging them itself (:func:`~kronlin._kernels.block_apply.block_apply_compiled`: NumPy arrays of
        the operator's dtype, unbatched, C-contiguous); else None, and :meth:`apply` validates the blocks and
        goes its general way, which also names a non-finite block.  At 200 × 64² float32 the per-block Python
        of the general way (validation, type tests, views, the result list) cost 0.1-0.2 ms, 6-12% of the
        products."""
        ctx, n = self._ctx, self.n_layers
        stacks = getattr(self, "_inv_stacks", ())  # operators pickled before it existed have none
        if (not is_numpy(ctx.xp) or ctx.foreign is not None or len(V_list) != n
                or sum(len(ks) for ks, _, _ in stacks) != n):
            return None
        out = [None] * n
        for ks, IA, IG in stacks:
            got = block_apply_compiled(IG, V_list if len(ks) == n else [V_list[k] for k in ks], IA)
            if got is None or got[1] is not None:  # not served, or a non-finite result: the general way
                return None
            for k, y in zip(ks, got[0]):
                out[k] = y
        return out

    __matmul__ = apply

    def _apply(self, V_list, check: bool = False):
        """``G⁻¹ V A⁻ᵀ`` per layer.  A group of equal-shaped layers with unbatched blocks: NumPy multiplies
        layer by layer with the stacked inverses into one result stack and tests each result finite while it
        is in cache (:func:`~kronlin._kernels.block_apply.block_apply`: one C++ loop of BLAS calls, or its
        NumPy loop); other libraries make one batched product (one launch).  ``check``: check the results
        finite, all in one decision (:func:`~kronlin._validate.first_nonfinite` over what the kernel has not
        tested, one array per group), and name the first block that made one not (see :meth:`apply`)."""
        xp = self._ctx.xp
        out = [None] * self.n_layers
        unchecked, bad = [], False  # results no kernel has tested; whether one kernel found a non-finite result
        for ks, IA, IG in getattr(self, "_inv_stacks", ()):  # operators pickled before it existed have none
            Vs = [V_list[k] for k in ks]
            if all(V.ndim == 2 and V.dtype == IA.dtype for V in Vs):
                if is_numpy(xp):
                    Y, b = block_apply(IG, Vs, IA)
                    bad = bad or b is not None
                else:
                    with quiet_overflow():
                        Y = IG @ xp.stack(Vs) @ IA
                    unchecked.append(Y)
                for j, k in enumerate(ks):
                    out[k] = Y[j, ...]
        for k, (blk, V) in enumerate(zip(self.blocks, V_list)):
            if out[k] is None:
                with quiet_overflow():
                    out[k] = blk.apply(V)
                unchecked.append(out[k])
        if check and (bad or first_nonfinite(xp, unchecked) is not None):
            # the inverses are invertible (no zero row or column of G⁻¹ or A⁻ᵀ), so a NaN or infinity of a block
            # V reaches its result: the results alone are checked (one sum on NumPy, one reduction elsewhere:
            # one host synchronisation on CuPy), the blocks are searched only to name the culprit
            k = first_nonfinite(xp, out)
            check_finite(xp, V_list[k], f"V_list[{k}]")
            raise self._nonfinite(out[k])
        return out

    def logdet(self):
        """``log det F̆`` (of the damped approximate Fisher, not of its inverse)."""
        if any(blk.logdet is None for blk in self.blocks):
            raise LinAlgError("det F̆ is not positive (a damped factor has a negative determinant), so its log is "
                              "undefined")
        return self._scalar(sum(blk.logdet for blk in self.blocks))

    def to_dense(self, allow_large: bool = False):
        """Dense ``F̆⁻¹`` on the concatenation of the layers' column-stacked vecs."""
        return self._dense_from_apply(allow_large)


def _inv_T(f: Factor, overwrite: bool = False):
    """``M⁻ᵀ`` of a factorization: a Cholesky inverse is exactly symmetric (:meth:`Factor.inv`) and is
    returned in its own C order (a transposed view would make each apply's GEMM read it transposed).
    ``overwrite``: ``f`` is not needed afterwards (see :meth:`Factor.inv`)."""
    return f.inv(overwrite) if f.kind == "cholesky" else mT(f.inv())


class _KronInverse:
    """``(A ⊗ G)⁻¹ = A⁻¹ ⊗ G⁻¹`` held as the two explicit factor inverses (K-FAC §4.2).

    The inverses are formed once from the cached factorizations (optimizers
    refresh them every T₃ iterations), so each application is two GEMMs,
    ``G⁻¹ V A⁻ᵀ``, instead of four triangular solves (which BLAS runs at a
    fraction of GEMM speed).  Inverses of symmetric positive definite factors
    are exactly symmetric (:meth:`Factor.inv`).
    """

    def __init__(self, Ainv_T, Ginv, logdet):
        self.Ainv_T, self.Ginv, self.logdet = Ainv_T, Ginv, logdet

    @classmethod
    def of(cls, fa: Factor, fg: Factor, overwrite: bool = False) -> "_KronInverse":
        """From the two factorizations (``overwrite``: they are not needed afterwards, see :meth:`Factor.inv`)."""
        p, q = fa.n, fg.n
        (sa, la), (sg, lg) = fa.slogdet(), fg.slogdet()
        # det(A ⊗ G) = det(A)^q det(G)^p; None when it is not positive (log det undefined)
        positive = float(sa) ** q * float(sg) ** p > 0
        return cls(_inv_T(fa, overwrite), fg.inv(overwrite), q * float(la) + p * float(lg) if positive else None)

    def apply(self, V):
        return self.Ginv @ V @ self.Ainv_T


class BlockTridiagInverse(_LayerBlocks):
    """K-FAC §4.3's block-tridiagonal ``F̂⁻¹ = Ξᵀ Λ Ξ`` with factored damping.

    ``Ψ_{i,i+1} = Ψ^Ā_{i-1,i} ⊗ Ψ^G_{i,i+1}`` with ``Ψ^Ā_{i-1,i} = Ā_{i-1,i} Ā_{i,i}⁻¹`` and
    ``Ψ^G_{i,i+1} = G_{i,i+1} G_{i+1,i+1}⁻¹`` (by solves), and
    ``Σ_{i|i+1} = Ā_{i-1,i-1} ⊗ G_{i,i} − (Ψ^Ā Ā_{i,i} Ψ^Āᵀ) ⊗ (Ψ^G G_{i+1,i+1} Ψ^Gᵀ)``
    inverted by the generalized Stein machinery (``sign=-1``), ``Σ_ℓ = Ā_{ℓ-1,ℓ-1} ⊗ G_{ℓ,ℓ}``.
    ``apply`` is the paper's three passes on weight-shaped blocks: ``Ξ`` (two
    products per layer), ``Λ`` (four plus a fused divide), ``Ξᵀ`` (two); nothing
    of size ``mn × mn`` is ever formed.

    Parameters
    ----------
    A_diag, G_diag, A_off, G_off : lists of factors (see the module docstring)
    gamma, pi : factored damping, as in :class:`BlockDiagInverse`
    method : {"eig", "smith"}
        Stein method for ``Σ_{i|i+1}⁻¹``: ``"eig"`` (default) or the SVD-free
        ``"smith"`` iteration K-FAC §8 mentions.

    Raises
    ------
    numpy.linalg.LinAlgError
        When a ``Σ_{i|i+1}`` is not positive definite (inconsistent statistics,
        e.g. stale cross-layer running averages): the message names the layer
        pair and suggests more damping.
    """

    def __init__(self, A_diag, G_diag, A_off, G_off, gamma=0.0, pi="trace", method="eig"):
        self._prepare(A_diag, G_diag, A_off, G_off, gamma, pi, method)
        self._assemble(self._parts(range(self.n_layers)))

    @classmethod
    def from_parts(cls, A_diag, G_diag, A_off, G_off, parts, gamma=0.0, pi="trace", method="eig"):
        """The operator assembled from set-ups made elsewhere (e.g. on other MPI ranks) by :func:`tridiag_parts`.

        The factors, ``gamma``, ``pi`` and ``method`` are those the parts were
        made from; they are validated and damped again here (cheap, ``O(d²)``
        per factor), the expensive ``O(d³)`` set-ups are taken from ``parts``:
        one :class:`TridiagPart` for each index ``0, …, ℓ − 1``, in any order.
        The result computes what ``BlockTridiagInverse(A_diag, G_diag, A_off,
        G_off, gamma, pi, method)`` computes, bit for bit.
        """
        # snapshot semantics (docs/design.md §2): the operator keeps copies, O(d²) per part against the O(d³) set-up
        return cls._prepared(A_diag, G_diag, A_off, G_off, gamma, pi, method)._install(parts, copy_parts=True)

    @classmethod
    def _prepared(cls, A_diag, G_diag, A_off, G_off, gamma, pi, method) -> "BlockTridiagInverse":
        """An operator validated and damped but not yet set up: :meth:`_parts` makes set-ups from it,
        :meth:`_install` completes it (one validation for a caller that does both, e.g. an MPI rank)."""
        self = cls.__new__(cls)
        self._prepare(A_diag, G_diag, A_off, G_off, gamma, pi, method)
        return self

    def _install(self, parts, copy_parts: bool) -> "BlockTridiagInverse":
        """Complete a :meth:`_prepared` operator with all ``ℓ`` parts (checked; copied unless the caller owns them)."""
        parts = self._check_parts(parts)
        self._assemble(copy.deepcopy(parts) if copy_parts else parts)
        return self

    def _prepare(self, A_diag, G_diag, A_off, G_off, gamma, pi, method):
        """Validation and factored damping of every layer (the same on every caller, so parts fit together)."""
        self.method = check_choice(method, ("eig", "smith"), "method")
        Ao, Go, _ = self._setup(A_diag, G_diag, A_off, G_off, gamma, pi)
        self._check_off(Ao, Go)
        self._Ao, self._Go = Ao, Go

    def _check_off(self, Ao, Go):
        n = self.n_layers
        if len(Ao) != n - 1 or len(Go) != n - 1:
            raise ValueError(
                f"A_off and G_off must hold {n - 1} cross-layer factors for {n} layers; got {len(Ao)} and {len(Go)}"
            )
        for k in range(n - 1):
            wantA = (self._Ad[k].shape[0], self._Ad[k + 1].shape[0])
            wantG = (self._Gd[k].shape[0], self._Gd[k + 1].shape[0])
            if tuple(Ao[k].shape) != wantA:
                raise ValueError(f"A_off[{k}] must have shape {wantA} (Ā_{{{k},{k + 1}}}); got {shape_str(Ao[k])}")
            if tuple(Go[k].shape) != wantG:
                raise ValueError(f"G_off[{k}] must have shape {wantG} (G_{{{k + 1},{k + 2}}}); got {shape_str(Go[k])}")

    def _layer_factors(self, layers) -> dict:
        """``{k: (Factor of Ā_kk, Factor of G_kk)}`` (damped) for ``layers``; all must be positive definite."""
        xp = self._ctx.xp
        # symmetric: checked in _setup (damping adds to the diagonal only)
        fA = {k: Factor(xp, self._Ad[k], f"A_diag[{k}] (damped)", symmetric=True) for k in layers}
        fG = {k: Factor(xp, self._Gd[k], f"G_diag[{k}] (damped)", symmetric=True) for k in layers}
        # F̂ is a covariance: its damped diagonal factors must be positive definite, whichever Stein method
        # inverts Σ (method="smith" would otherwise accept the indefinite statistics "eig" refuses)
        for f in list(fA.values()) + list(fG.values()):
            if f.kind != "cholesky":
                raise LinAlgError(
                    f"{f.name} is not positive definite, so F̂ is not a covariance (inconsistent statistics); "
                    f"increase the damping gamma (now {self.gamma:g})"
                )
        return {k: (fA[k], fG[k]) for k in layers}

    def _parts(self, indices) -> list:
        """The :class:`TridiagPart` of each index (``k < ℓ − 1``: pair ``(k, k+1)``; ``ℓ − 1``: ``Σ_ℓ⁻¹``)."""
        n = self.n_layers
        indices = [int(i) for i in indices]
        bad = [i for i in indices if not 0 <= i < n]
        if bad:
            raise ValueError(f"part indices must be in [0, {n - 1}] for {n} layers; got {bad}")
        needed = sorted({j for i in indices for j in ((i, i + 1) if i < n - 1 else (i,))})
        f = self._layer_factors(needed)
        return [self._pair(i, f) if i < n - 1 else TridiagPart(i, last=_KronInverse.of(*f[i])) for i in indices]

    def _pair(self, k, f) -> "TridiagPart":
        """Pair ``k``'s Stein set-up: ``Ψ^Ā_k``, ``Ψ^G_k`` and ``Σ_{k+1|k+2}⁻¹`` (K-FAC §4.3)."""
        xp, Ao, Go = self._ctx.xp, self._Ao, self._Go
        # Ψ^Ā = Ā_{k,k+1} Ā_{k+1,k+1}⁻¹ and Ψ^G = G_{k+1,k+2} G_{k+2,k+2}⁻¹, by solves (factors symmetric)
        with quiet_overflow():  # overflow is reported below, naming the argument
            psiA = mT(f[k + 1][0].solve(mT(Ao[k])))
            psiG = mT(f[k + 1][1].solve(mT(Go[k])))
            C = psiA @ mT(Ao[k])  # Ψ^Ā Ā_{k+1,k+1} Ψ^Āᵀ = Ā_{k,k+1} Ā_{k+1,k+1}⁻¹ Ā_{k,k+1}ᵀ
            D = psiG @ mT(Go[k])
        for M, name in ((C, f"A_off[{k}]"), (D, f"G_off[{k}]")):
            if not bool(xp.all(xp.isfinite(M))):
                raise ValueError(
                    f"{name} is too large for the diagonal factors: {name} · diag⁻¹ · {name}ᵀ overflows "
                    f"{self._ctx.dtype}; rescale the statistics (cross-layer factors are at most as large as "
                    f"the diagonal ones for consistent statistics)"
                )
        C, D = (C + mT(C)) / 2, (D + mT(D)) / 2  # exact in exact arithmetic; remove round-off asymmetry
        try:
            sigma = KronSumInverse(self._Ad[k], self._Gd[k], C, D, sign=-1, method=self.method,
                                   _factors=f[k])  # reuse the damped factors' Cholesky
        except LinAlgError as exc:
            raise LinAlgError(
                f"Σ_{{{k + 1}|{k + 2}}} (layers {k} and {k + 1}) is not positive definite: the cross-layer "
                f"statistics are inconsistent with the diagonal ones (stale or badly estimated running "
                f"averages); increase the damping gamma (now {self.gamma:g}). Details: {exc}"
            ) from None
        except ValueError as exc:  # the Stein set-up's overflow refusal, in terms of this operator's arguments
            raise ValueError(
                f"Σ_{{{k + 1}|{k + 2}}} (layers {k} and {k + 1}) overflows: the damped A_diag[{k}] and G_diag[{k}] "
                f"(gamma = {self.gamma:g}) are too large for {self._ctx.dtype}; pass a smaller gamma or rescale "
                f"the statistics. Details: {exc}"
            ) from None
        return TridiagPart(k, psi_A=psiA, psi_G=psiG, sigma=sigma)

    def _check_parts(self, parts) -> list:
        """``parts`` in index order, checked: one per index, of the shapes and dtype of these factors."""
        parts = sorted(_as_list(parts, "parts"), key=lambda t: getattr(t, "index", -1))
        n, dtype = self.n_layers, self._ctx.dtype
        if [getattr(t, "index", None) for t in parts] != list(range(n)) or not all(
                isinstance(t, TridiagPart) for t in parts):
            raise ValueError(f"parts must hold one TridiagPart for each index 0, …, {n - 1} ({n} layers); got "
                             f"indices {[getattr(t, 'index', None) for t in parts]}")  # fmt: skip
        for t in parts[:-1]:
            k = t.index
            (q, p), (q1, p1) = self.shapes[k], self.shapes[k + 1]
            ok = (t.sigma is not None and t.last is None and tuple(t.psi_A.shape) == (p, p1)
                  and tuple(t.psi_G.shape) == (q, q1) and (t.sigma.p, t.sigma.q) == (p, q)
                  and t.sigma.method == self.method and t.psi_A.dtype == dtype and t.psi_G.dtype == dtype)  # fmt: skip
            if not ok:
                raise ValueError(f"parts[{k}] is not the set-up of layers {k} and {k + 1} with shapes "
                                 f"{self.shapes[k]}, {self.shapes[k + 1]}, dtype {dtype} and method "
                                 f"{self.method!r} (made from other factors?)")  # fmt: skip
        q, p = self.shapes[-1]
        last = parts[-1].last
        if last is None or tuple(last.Ainv_T.shape) != (p, p) or tuple(last.Ginv.shape) != (q, q) \
                or last.Ginv.dtype != dtype:
            raise ValueError(f"parts[{n - 1}] is not the last layer's inverse (shape {self.shapes[-1]}, dtype {dtype})")
        return parts

    def _assemble(self, parts):
        """Install the parts (in index order) as this operator's set-up."""
        self.psi_A = [t.psi_A for t in parts[:-1]]
        self.psi_G = [t.psi_G for t in parts[:-1]]
        self.sigma = [t.sigma for t in parts[:-1]]
        self.last = parts[-1].last

    def update(self, A_diag, G_diag, A_off, G_off, gamma=None, pi=None):
        """Refresh with new statistics of the same shapes (optimizers refresh every T₃ iterations)."""
        shapes = self.shapes
        self._prepare(A_diag, G_diag, A_off, G_off, self.gamma if gamma is None else gamma,
                      self.pi if pi is None else pi, self.method)
        if self.shapes != shapes:
            raise ValueError(f"update() needs the original layer shapes {shapes}; got {self.shapes}")
        self._assemble(self._parts(range(self.n_layers)))
        return self

    def _apply(self, V):
        n = self.n_layers
        # Ξ: U_k = V_k − Ψ^G_k V_{k+1} Ψ^Āᵀ_k
        X = [V[k] - self.psi_G[k] @ V[k + 1] @ mT(self.psi_A[k]) for k in range(n - 1)] + [V[-1]]
        # Λ: Σ_{k|k+1}⁻¹ and Σ_ℓ⁻¹
        Y = [self.sigma[k].solver.solve(X[k]) for k in range(n - 1)] + [self.last.apply(X[-1])]
        # Ξᵀ: U_k = Y_k − Ψ^Gᵀ_{k-1} Y_{k-1} Ψ^Ā_{k-1}
        return [Y[0]] + [Y[k] - mT(self.psi_G[k - 1]) @ Y[k - 1] @ self.psi_A[k - 1] for k in range(1, n)]

    def logdet(self):
        """``log det F̂ = Σ_i log det Σ_{i|i+1} + log det Σ_ℓ`` (``Ξ`` is unit triangular)."""
        if self.method != "eig":
            raise NotImplementedError("logdet() needs method='eig'")
        if self.last.logdet is None:
            raise LinAlgError("det F̂ is not positive, so its log is undefined")
        return self._scalar(sum(s.solver.logdet() for s in self.sigma) + self.last.logdet)

    def to_dense(self, allow_large: bool = False):
        """Dense ``F̂⁻¹`` on the concatenation of the layers' column-stacked vecs."""
        return self._dense_from_apply(allow_large)



@dataclass(frozen=True)
class TridiagPart:
    """One of the ``ℓ`` independent set-ups of :class:`BlockTridiagInverse` (K-FAC §4.3; :func:`tridiag_parts`).

    ``index = k < ℓ − 1``: the pair of layers ``k`` and ``k + 1`` — ``psi_A``
    (``Ψ^Ā``), ``psi_G`` (``Ψ^G``) and ``sigma``, the :class:`kronlin.KronSumInverse`
    of ``Σ_{k+1|k+2}``; ``index = ℓ − 1``: ``last``, the inverse of
    ``Σ_ℓ = Ā_{ℓ-1,ℓ-1} ⊗ G_{ℓ,ℓ}``.  Parts pickle (arrays and kronlin
    operators), so they can be made on one process and assembled on another
    (:meth:`BlockTridiagInverse.from_parts`).
    """

    index: int
    psi_A: object = None
    psi_G: object = None
    sigma: object = None
    last: object = None


def tridiag_parts(A_diag, G_diag, A_off, G_off, indices, gamma=0.0, pi="trace", method="eig") -> list:
    """The :class:`TridiagPart` of each of ``indices`` (in ``0, …, ℓ − 1``) of ``BlockTridiagInverse(...)``.

    Takes every layer's factors (all of them are validated and damped, as the
    operator does, so that parts made by different callers fit together) but
    factorizes only the layers the requested parts need and sets up only those
    parts: pair ``k`` costs two Cholesky factorizations (layers ``k`` and
    ``k + 1``), the solves for ``Ψ`` and the Stein set-up of ``Σ_{k+1|k+2}``.
    :meth:`BlockTridiagInverse.from_parts` assembles the ``ℓ`` parts into the
    operator (e.g. after ``kronlin.distributed`` made them on different ranks).
    Raises what the constructor raises for those parts.
    """
    return BlockTridiagInverse._prepared(A_diag, G_diag, A_off, G_off, gamma, pi, method)._parts(indices)
