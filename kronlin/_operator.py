"""The operator base: the calling contract of every public operator, written once (docs/design.md §2).

Every operator (``Kron``, ``KronEigh``, ``DampedKron``, ``KronSumInverse``,
``BlockDiagInverse``, ``BlockTridiagInverse``, ``WoodburyFisher``) acts on
weight-shaped blocks: one ``(q, p)`` block for a Kronecker operator, one
``(d_out, d_in)`` block per layer for the layered ones.  :class:`Operator`
holds everything about a call that is not the operator's algebra:

* right-hand sides: a ``(..., q, p)`` array (single-block operators), a list
  of per-layer ``(..., d_out, d_in)`` arrays (layered operators), or a flat
  column-stacked ``(..., P)`` array (both), converted into the compute
  namespace, validated (shape, finiteness) and brought to the list of blocks
  the subclass hooks work on (:meth:`Operator._rhs`), and back
  (:meth:`Operator._ret`);
* results in the caller's library, dtype and device; scalar results as 0-d
  arrays of that library (a NumPy scalar for NumPy) (:meth:`Operator._scalar`);
* finite results: the inputs were checked finite, so a result holding NaN or
  infinity overflowed, and raises ``FloatingPointError`` naming the call and
  what to rescale instead of coming back with a ``RuntimeWarning``
  (:meth:`Operator._out`, one ``isfinite`` pass over each result);
* ``matmat``/``rmatmat`` on ``(P, k)`` columns and ``aslinearoperator()``;
* pickling and deep copies (modules travel as names, see
  :class:`kronlin._backend.ModuleRefs`).

Snapshot semantics come from the constructors, which take their arrays with
``context(..., snapshot=True)``, and from accessors, which hand out copies
(``Ctx.out_copy``).  Cached factorizations are built into locals and
published as one object, so a concurrent caller sees a cache whole or not at
all.
"""

from __future__ import annotations

import sys

import numpy as np

from ._backend import Ctx, ModuleRefs, mT
from ._validate import all_finite, check_finite, nonfinite_result, shape_str

__all__ = ["Operator", "KronShaped", "batch_shape_of"]


def batch_shape_of(A, G, nameA: str = "A", nameG: str = "G") -> tuple:
    """The broadcast batch shape of two stacks of square matrices."""
    try:
        return tuple(np.broadcast_shapes(tuple(A.shape[:-2]), tuple(G.shape[:-2])))
    except ValueError:
        raise ValueError(
            f"the batch dimensions of {nameA} {shape_str(A)} and {nameG} {shape_str(G)} do not broadcast"
        ) from None


class Operator(ModuleRefs):
    """Base of every public operator: the calling contract, once.

    Subclasses set ``_ctx`` (a :class:`kronlin._backend.Ctx`), ``_blocks``
    (the list of ``(q, p)`` block shapes), ``_layered`` (True when right-hand
    sides are per-layer lists) and ``batch_shape``, and implement
    ``_forward(Xs)`` (and ``_forward_T``) on lists of ``(..., q, p)`` blocks
    in the compute namespace for ``matmat``/``rmatmat``/``aslinearoperator``.
    """

    _ctx: Ctx
    _blocks: tuple = ()
    _layered: bool = False
    batch_shape: tuple = ()
    #: what a caller rescales when a result overflows (named in the FloatingPointError)
    _operands: str = "the operator's inputs"

    # -- description --------------------------------------------------------------
    @property
    def dtype(self):
        """The compute dtype (float32 or float64) of the operator and its results."""
        return self._ctx.dtype

    @property
    def n_params(self) -> int:
        """``P``: the length of a flat column-stacked right-hand side."""
        return sum(q * p for q, p in self._blocks)

    @property
    def shape(self) -> tuple:
        """``(P, P)``: the shape of the (unbatched) matrix the operator represents."""
        n = self.n_params
        return (n, n)

    # -- right-hand sides ----------------------------------------------------------
    def _rhs(self, X, name: str = "X", finite: bool = True):
        """Validate ``X`` and return ``(blocks, fmt)``.

        ``blocks`` is a list of ``(..., q, p)`` arrays in the compute namespace
        (one per block); ``fmt`` is ``"matrix"``, ``"list"`` or ``"flat"`` and
        tells :meth:`_ret` how to hand results back.  ``finite=False`` leaves the
        finiteness check to the caller (see :meth:`_rhs_list`).
        """
        ctx = self._ctx
        if self._layered:
            if isinstance(X, (list, tuple)):
                return self._rhs_list(X, name, finite), "list"
            X = ctx.asarray(X, name)
            P = self.n_params
            if X.ndim < 1 or X.shape[-1] != P:
                raise ValueError(
                    f"{name} must be a list of per-layer arrays of shapes (..., d_out, d_in) = {self.layer_shapes} "
                    f"or a flat column-stacked array (..., P) with P = {P}; got shape {shape_str(X)}"
                )
        else:
            X = ctx.asarray(X, name)
            q, p = self._blocks[0]
            if X.ndim >= 2 and X.shape[-1] == p and X.shape[-2] == q:  # the common case first
                if finite:
                    check_finite(ctx.xp, X, name)
                return [X], "matrix"
            P = p * q
            if X.ndim == 1 and X.shape[0] != P:
                raise ValueError(
                    f"{name} is a flat vector of length {X.shape[0]}, but the operator needs length "
                    f"p*q = {P} (column-stacked), or shape (..., q, p) = (..., {q}, {p})"
                )
            if X.ndim < 1 or X.shape[-1] != P:
                raise ValueError(
                    f"{name} must have shape (..., q, p) = (..., {q}, {p}) or be a flat column-stacked "
                    f"array (..., p*q) with p*q = {P}; got shape {shape_str(X)}"
                )
        if finite:
            check_finite(ctx.xp, X, name)
        return self._unflatten(X), "flat"

    def _rhs_list(self, Xs, name: str, finite: bool = True):
        """Validated per-layer blocks; ``finite=False`` leaves the finiteness check to the caller (which
        must make it, e.g. once over a stack of blocks, and name ``{name}[k]`` with :func:`check_finite`)."""
        n = len(self._blocks)
        if len(Xs) != n:
            raise ValueError(
                f"{name} must hold one array per layer ({n} layers of shapes {self.layer_shapes}); got {len(Xs)}"
            )
        out = []
        ctx = self._ctx
        for k, (x, qp) in enumerate(zip(Xs, self._blocks)):
            x = ctx.asarray(x, name, k)
            if tuple(x.shape[-2:]) != tuple(qp):  # (a matrix or a stack: fewer dimensions never match)
                raise ValueError(f"{name}[{k}] must have shape (..., d_out, d_in) = (..., {qp[0]}, {qp[1]}) for layer "
                                 f"{k}; got shape {shape_str(x)}")
            if finite:
                check_finite(ctx.xp, x, f"{name}[{k}]")
            out.append(x)
        leads = {tuple(x.shape[:-2]) for x in out}
        try:  # (np.broadcast_shapes builds an array per shape: 0.15 ms for 200 layers, when one shape is all)
            if len(leads) > 1:
                np.broadcast_shapes(*leads)
        except ValueError:
            shapes = ", ".join(f"{name}[{k}] {shape_str(x)}" for k, x in enumerate(out))
            raise ValueError(f"the leading (batch) dimensions of {shapes} do not broadcast") from None
        return out

    @property
    def layer_shapes(self) -> list:
        """Per-block weight shapes ``(d_out, d_in)`` = ``(q, p)``."""
        return [tuple(b) for b in self._blocks]

    def _unflatten(self, u):
        """``(..., P)`` column-stacked -> list of ``(..., q, p)`` blocks."""
        xp = self._ctx.xp
        lead = tuple(u.shape[:-1])
        if len(self._blocks) == 1:
            q, p = self._blocks[0]
            return [mT(xp.reshape(u, lead + (p, q)))]
        out, o = [], 0
        for q, p in self._blocks:
            out.append(mT(xp.reshape(u[..., o:o + q * p], lead + (p, q))))
            o += q * p
        return out

    def _flatten(self, Ys):
        """List of ``(..., q, p)`` blocks -> ``(..., P)`` column-stacked."""
        xp = self._ctx.xp
        parts = [xp.reshape(mT(y), tuple(y.shape[:-2]) + (q * p,)) for y, (q, p) in zip(Ys, self._blocks)]
        if len(parts) == 1:
            return parts[0]
        lead = tuple(np.broadcast_shapes(*(tuple(a.shape[:-1]) for a in parts)))
        return xp.concat([xp.broadcast_to(a, lead + (a.shape[-1],)) for a in parts], axis=-1)

    def _ret(self, Ys, fmt: str, checked: bool = False):
        """Hand blocks back in the format the right-hand side came in, in the caller's library
        (``checked``: the caller has checked every block finite, as :meth:`_out` would)."""
        out = self._ctx.out if checked else self._out
        if fmt == "matrix":
            return out(Ys[0])
        if fmt == "flat":
            return out(self._flatten(Ys))
        return [out(y) for y in Ys]

    def _out(self, y):
        """A result array, checked finite, in the caller's library (every array result goes through here).

        The inputs were validated finite, so NaN or infinity in ``y`` means the
        computation overflowed the dtype: raise ``FloatingPointError`` naming
        the call and what to rescale (:func:`kronlin._validate.check_result`).
        """
        if not all_finite(self._ctx.xp, y):
            raise self._nonfinite(y)
        return self._ctx.out(y)

    def _scalar(self, value):
        """A scalar result (logdet, trace, quad, ...): a 0-d array of the caller's library, checked finite."""
        if not all_finite(self._ctx.xp, value):
            raise self._nonfinite(value)
        return self._ctx.scalar(value)

    def _nonfinite(self, y, method: str | None = None) -> FloatingPointError:
        """The error for a non-finite result: the call is the outermost public method of ``self`` on the stack.

        Found from the frames (on this error path only), so that every
        method returning through :meth:`_ret`/:meth:`_scalar` is named without
        passing its name along: ``KronEigh.solve`` (which returns through
        ``power``), ``Kron @ X``.  ``method`` names it instead (a product of
        ``aslinearoperator()``, which runs outside the operator's methods).
        """
        frame = None if method else sys._getframe(1)
        while frame is not None:
            if frame.f_locals.get("self") is self:
                name = frame.f_code.co_name
                if not name.startswith("_") or name == "__matmul__":
                    method = name
            frame = frame.f_back
        cls = type(self).__name__
        what = f"{cls} @ X" if method == "__matmul__" else f"{cls}.{method}()" if method else f"a {cls} result"
        return nonfinite_result(
            y, f"the result of {what}",
            f"its magnitude exceeds the dtype's range: rescale {self._operands} (or the right-hand side) and undo "
            f"the scale on the result",
        )

    # -- columns, SciPy -----------------------------------------------------------
    def _forward(self, Xs):  # pragma: no cover - every operator with matmat implements it
        raise NotImplementedError

    def _forward_T(self, Xs):
        return self._forward(Xs)

    def _columns(self, V, fn, name: str):
        xp = self._ctx.xp
        if self.batch_shape:
            raise ValueError(
                f"{name}: a batched operator (batch shape {self.batch_shape}) is a stack of operators, not one "
                f"matrix (its batch dimensions come from {self._operands}); apply it with @ / solve to (..., q, p) "
                f"arrays, or build one operator per item"
            )
        V = self._ctx.asarray(V, "V")
        n = self.n_params
        if V.ndim != 2 or V.shape[0] != n:
            raise ValueError(f"V must have shape (p*q, k) = ({n}, k); got {shape_str(V)}")
        check_finite(xp, V, "V")
        Ys = fn(self._unflatten(mT(V)))
        return self._out(mT(self._flatten(Ys)))

    def matmat(self, V):
        """Apply the operator to the columns of ``V`` (P, k), each a flat column-stacked vector."""
        return self._columns(V, self._forward, "matmat")

    def rmatmat(self, V):
        """Apply the transpose to the columns of ``V`` (P, k)."""
        return self._columns(V, self._forward_T, "rmatmat")

    def aslinearoperator(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (CuPy: ``cupyx``'s) on flat column-stacked vectors.

        It validates its input like the operator: NaN/Inf and complex vectors
        are rejected, and a wrong length is reported with the expected one.
        """
        from .linop import make_linear_operator

        return make_linear_operator(self, self._forward, self._forward_T)


class KronShaped(Operator):
    """An operator on one ``(..., q, p)`` block (Kron, KronEigh, DampedKron, KronSumInverse).

    Subclasses implement ``_apply_matrix(X)`` (and, unless symmetric, a ``T``
    whose ``_apply_matrix`` is the transpose).
    """

    p: int
    q: int

    def _set_shape(self, ctx: Ctx, p: int, q: int, batch_shape: tuple = ()):
        self._ctx, self.p, self.q, self.batch_shape = ctx, int(p), int(q), tuple(batch_shape)
        self._blocks = ((self.q, self.p),)

    def _forward(self, Xs):
        return [self._apply_matrix(Xs[0])]

    def _forward_T(self, Xs):
        return [self.T._apply_matrix(Xs[0])]
