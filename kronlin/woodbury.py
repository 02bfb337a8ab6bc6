"""The subsampled Fisher through the Woodbury identity (Benzing 2022, app. I and C).

A Fisher or Gauss-Newton matrix estimated on a mini-batch of ``N`` inputs,

    F = scale · Σ_c vec(g_c) vec(g_c)ᵀ = scale · G Gᵀ,

has rank at most ``M`` (the number of per-example gradients ``g_c``: ``N`` times
the labels per input ``S``), so with ``K = scale · GᵀG`` (``M × M``)

    (λI + F)⁻¹ u = λ⁻¹ (u − scale · G (λI + K)⁻¹ Gᵀ u)        (Benzing eq. 20)

is exact and costs two passes over the parameters plus an ``M × M`` Cholesky
factorization.  The ``P × M`` matrix ``G`` of per-example gradients is never
formed: for a layer with activations ``A`` and back-propagated errors ``E`` the
per-example gradient is ``g_c = E_cᵀ A_i`` (a rank-one ``e_c a_iᵀ`` for a dense
layer, a sum of ``T`` of them for a weight-sharing layer), and

* ``Gᵀu`` is ``Σ_k rowsum((A_k U_kᵀ) ⊙ E_k)`` (Benzing eq. 21: only the diagonal
  of ``A_k U_kᵀ E_kᵀ``),
* ``GᵀG`` is ``Σ_k (A_k A_kᵀ) ⊙ (E_k E_kᵀ)`` for dense layers (eq. 22) and a
  tiled kernel for weight-sharing ones (:mod:`kronlin._kernels.woodbury_gram`),
* ``G w`` is ``Σ_k (w ⊙ E_k)ᵀ A_k`` (eq. 23).

Products that only need scalars (``uᵀFu``, ``uᵀFv``) use ``Gᵀu`` alone, the
trick of K-FAC appendix C (``(Ju)ᵀ F_R (Jv)`` instead of a full ``F v``).
"""

from __future__ import annotations

import math

import numpy as np

from ._backend import Ctx, canonical_arrays, context, is_numpy, mT
from ._kernels.woodbury_gram import gram_dense, gram_shared
from ._linalg import Factor
from ._operator import Operator
from ._validate import (
    LinAlgError,
    check_choice,
    check_finite,
    check_flag,
    check_nonneg_scalar,
    check_overflow,
    check_positive_scalar,
    check_result,
    shape_str,
)
from .kron import DENSE_LIMIT

__all__ = ["WoodburyFisher"]

_GRAM_METHODS = ("auto", "pairs", "kernel", "grad", "reference")


class _Layer:
    """One layer in canonical form: ``A`` (N, T, d_in), ``E`` (N, S, T, d_out)."""

    __slots__ = ("A", "E", "shared", "N", "S", "T", "da", "de")

    def __init__(self, xp, A, E, shared: bool):
        self.A, self.E, self.shared = A, E, shared
        self.N, self.S, self.T, self.de = (int(d) for d in E.shape)
        self.da = int(A.shape[-1])

    def __reduce__(self):
        return (_restore_layer, (self.A, self.E, self.shared))

    @property
    def shape(self) -> tuple:
        return (self.de, self.da)

    @property
    def size(self) -> int:
        return self.de * self.da


def _restore_layer(A, E, shared):
    return _Layer(None, canonical_arrays(A), canonical_arrays(E), shared)


def _layer_lists(acts, errs, prefix: str = ""):
    for name, x in ((f"{prefix}acts", acts), (f"{prefix}errs", errs)):
        if not isinstance(x, (list, tuple)):
            raise TypeError(
                f"{name} must be a list with one array per layer (a single layer is [array]); "
                f"got {type(x).__name__}"
            )
    if len(acts) != len(errs) or len(acts) == 0:
        raise ValueError(
            f"{prefix}acts and {prefix}errs must hold one array per layer each (at least one layer); "
            f"got {len(acts)} and {len(errs)}"
        )


def _canonical(xp, arrays, n_layers: int, prefix: str = ""):
    """Validate per-layer shapes and bring them to (N, T, d_in) / (N, S, T, d_out)."""
    layers = []
    N = S = None
    first_n = first_s = None
    for k in range(n_layers):
        A, E = arrays[k], arrays[n_layers + k]
        an, en = f"{prefix}acts[{k}]", f"{prefix}errs[{k}]"
        if A.ndim == 2:
            shared = False
            if E.ndim not in (2, 3):
                raise ValueError(
                    f"{en} must have shape (N, d_out), or (N, S, d_out) with S labels per input, to match the "
                    f"dense layer {an} of shape {shape_str(A)}; got shape {shape_str(E)}"
                )
            s = 1 if E.ndim == 2 else int(E.shape[1])
            A4 = xp.reshape(A, (A.shape[0], 1, A.shape[1]))
            E4 = xp.reshape(E, (E.shape[0], s, 1, E.shape[-1]))
        elif A.ndim == 3:
            shared = True
            if E.ndim not in (3, 4):
                raise ValueError(
                    f"{en} must have shape (N, T, d_out), or (N, S, T, d_out) with S labels per input, to match "
                    f"the weight-sharing layer {an} of shape {shape_str(A)}; got shape {shape_str(E)}"
                )
            if E.shape[-2] != A.shape[1]:
                raise ValueError(
                    f"{en} (shape {shape_str(E)}) has T = {E.shape[-2]} positions but {an} (shape {shape_str(A)}) "
                    f"has T = {A.shape[1]}; both must hold the same weight-sharing positions"
                )
            s = 1 if E.ndim == 3 else int(E.shape[1])
            A4 = A
            E4 = xp.reshape(E, (E.shape[0], s) + tuple(E.shape[-2:]))
        else:
            raise ValueError(
                f"{an} must have shape (N, d_in) for a dense layer or (N, T, d_in) for a weight-sharing layer; "
                f"got shape {shape_str(A)}"
            )
        if A.shape[-1] == 0 or E.shape[-1] == 0:
            raise ValueError(
                f"layer {k} has d_in = {A.shape[-1]} and d_out = {E.shape[-1]} ({an} {shape_str(A)}, {en} "
                f"{shape_str(E)}): kronlin operators need factors of order >= 1 (a size-0 layer has no "
                f"parameters; leave it out)"
            )
        for name, x in ((an, A), (en, E)):
            n = int(x.shape[0])
            if N is None:
                N, first_n = n, name
            elif n != N:
                raise ValueError(
                    f"{name} has batch size {n} but {first_n} has {N}: every layer needs the same N examples, "
                    f"in the same order, on axis 0"
                )
        if S is None:
            S, first_s = s, en
        elif s != S:
            raise ValueError(
                f"{en} has S = {s} labels per input but {first_s} has S = {S}: every layer needs the same "
                f"N·S gradient columns"
            )
        layers.append(_Layer(xp, A4, E4, shared))
    if N == 0:
        raise ValueError(f"{prefix}acts[0] has batch size 0; the Fisher needs at least one example")
    for k in range(n_layers):
        check_finite(xp, arrays[k], f"{prefix}acts[{k}]")
        check_finite(xp, arrays[n_layers + k], f"{prefix}errs[{k}]")
    return layers, N, S


def _check_scale(scale) -> float:
    return check_positive_scalar(scale, "scale")


def _batch_sum(xp, layer: _Layer):
    """``Σ_c g_c`` of one layer: ``(Σ_s E_s)ᵀ A`` over all inputs and positions."""
    Es = xp.sum(layer.E, axis=1) if layer.S > 1 else layer.E[:, 0, ...]
    Ef = xp.reshape(Es, (layer.N * layer.T, layer.de))
    Af = xp.reshape(layer.A, (layer.N * layer.T, layer.da))
    return mT(Ef) @ Af


#: Bytes per chunk of the in-place ``Y += a·U`` at the end of a solve (NumPy has no
#: axpy): the ``a·U`` temporary is one cache-sized chunk, never a P-sized array.
_AXPY_CHUNK_BYTES = 1 << 20


def _axpy_inplace(Y, U, a: float) -> None:
    """``Y += a·U`` for C-contiguous NumPy ``Y`` of ``U``'s shape, in cache-sized chunks."""
    Y2 = Y.reshape(-1, Y.shape[-1])
    U2 = U.reshape(-1, U.shape[-1])
    step = max(1, _AXPY_CHUNK_BYTES // max(1, Y2.shape[1] * Y2.itemsize))
    for r0 in range(0, Y2.shape[0], step):
        Y2[r0 : r0 + step] += U2[r0 : r0 + step] * a


class WoodburyFisher(Operator):
    """The damped subsampled Fisher/GGN ``λI + F``, ``F = scale · Σ_c vec(g_c) vec(g_c)ᵀ``.

    Exact products, solves, log-determinants and posterior samples without
    forming per-example gradients (Benzing 2022, app. I.2–I.3 and C.1).

    Parameters
    ----------
    acts : list of arrays, one per layer
        Layer inputs (activations): ``(N, d_in)`` for a dense layer, ``(N, T, d_in)``
        for a layer whose weights are shared over ``T`` positions (a convolution
        after patch extraction).  Include a column of ones for a bias.
    errs : list of arrays, one per layer
        Back-propagated errors ``∂L/∂s`` (pre-activation gradients): ``(N, d_out)``
        or ``(N, T, d_out)``.  Several labels per input (an MC Fisher with ``S``
        sampled labels, or the exact Fisher over classes with errors weighted by
        ``√p_c``) add an axis after the batch axis: ``(N, S, d_out)`` or
        ``(N, S, T, d_out)``; column ``c = i·S + s`` of ``G`` is then the
        gradient of input ``i`` for label ``s``, ``g_c = Σ_t e_{i,s,t} a_{i,t}ᵀ``.
        The activations are shared by the ``S`` labels and stored once.
    damping : float
        ``λ >= 0``.  ``solve``, ``logdet`` and ``sample`` need ``λ > 0`` (F has
        rank at most ``M = N·S``, far below the parameter count); ``matvec``,
        ``quad``, ``bilinear`` and ``gram`` work at ``λ = 0``.
    scale : float, optional
        ``F = scale · G Gᵀ``; default ``1/N`` with ``N`` the number of inputs,
        so each input's sum over its labels counts once.  That is right for
        the exact Fisher over classes (errors weighted by ``√p_c``); for an MC
        Fisher with ``S`` sampled labels pass ``scale=1/(N*S)``.
    gram_method : {"auto", "pairs", "kernel", "grad", "reference"}, keyword-only
        How the Gram of weight-sharing layers is computed (dense layers always
        use eq. 22): ``"pairs"`` sums ``(A_i A_jᵀ) ⊙ (E_i E_jᵀ)`` over
        positions (``O(N² T² (d_in + S² d_out))``, no gradient memory; the
        compiled tiled kernel where it beats the einsum/GEMM composition),
        ``"kernel"`` / ``"reference"`` force the kernel / the composition,
        ``"grad"`` forms per-example gradients chunked over output features
        (``O(N S d_in d_out (T + N S/2))``), ``"auto"`` the cheaper by the cost
        model of :mod:`kronlin._kernels.woodbury_gram`.

    Notes
    -----
    Shapes follow docs/design.md §1: a layer's weight (and every argument ``U``) is
    ``(d_out, d_in)``; ``vec`` stacks columns; the flat vector of all layers is
    the concatenation of the per-layer column-stacked vecs (length ``P``).
    Every method taking ``U`` accepts a list of per-layer arrays
    ``(..., d_out, d_in)`` (returning a list) or a flat array ``(..., P)``
    (returning a flat array); leading dimensions broadcast.

    The Gram ``K = scale · GᵀG`` and the Cholesky factor of ``λI + K`` are
    computed on first use and cached; :meth:`with_damping` reuses ``K``.

    Benzing app. I.5 (less biased natural gradients): the curvature and the
    gradient it preconditions should come from independent mini-batches.
    Build the operator on one batch and pass the gradient of another, either
    as ``U`` (any vector, e.g. from backprop) or as ``batch=(acts2, errs2)``
    to :meth:`solve` / :meth:`matvec`, which forms that batch's mean gradient
    ``(1/N₂) Σ_i g_i`` with one GEMM per layer (see :meth:`batch_gradient`).

    References
    ----------
    F. Benzing, "Gradient descent on neurons and its link to approximate
    second-order optimization", ICML 2022: app. I.2–I.3 (eqs. 19–23), I.5, C.1
    (eqs. 7–14).  J. Martens and R. Grosse, "Optimizing neural networks with
    Kronecker-factored approximate curvature", ICML 2015: app. C.

    Examples
    --------
    >>> import numpy as np, kronlin
    >>> rng = np.random.default_rng(0)
    >>> acts, errs = [rng.standard_normal((8, 5))], [rng.standard_normal((8, 3))]
    >>> F = kronlin.WoodburyFisher(acts, errs, damping=0.1)
    >>> U = [rng.standard_normal((3, 5))]
    >>> X = F.solve(U)                      # (0.1 I + F)^{-1} vec(U)
    >>> bool(np.allclose(F.matvec(X)[0] + 0.1 * X[0], U[0]))
    True
    """

    _operands = "acts and errs (or scale)"

    def __init__(self, acts, errs, damping, scale=None, *, gram_method: str = "auto"):
        _layer_lists(acts, errs)
        L = len(acts)
        named = [(f"acts[{k}]", a) for k, a in enumerate(acts)] + [(f"errs[{k}]", e) for k, e in enumerate(errs)]
        damping = check_nonneg_scalar(damping, "damping")
        check_choice(gram_method, _GRAM_METHODS, "gram_method")
        ctx, arrays = context(*named, snapshot=True)
        layers, N, S = _canonical(ctx.xp, arrays, L)
        scale = 1.0 / N if scale is None else _check_scale(scale)
        self._init(ctx, layers, N, S, damping, scale, gram_method, None)

    def _init(self, ctx: Ctx, layers, N, S, damping, scale, gram_method, K):
        self._ctx, self._layers = ctx, layers
        self._blocks = tuple(ly.shape for ly in layers)
        self.batch_size, self.labels = int(N), int(S)
        self._damping, self._scale, self._gram_method = float(damping), float(scale), gram_method
        self._K, self._factor = K, None
        return self

    # -- description -------------------------------------------------------------
    @property
    def damping(self) -> float:
        """``λ``."""
        return self._damping

    @property
    def scale(self) -> float:
        """``F = scale · G Gᵀ``."""
        return self._scale

    @property
    def n_columns(self) -> int:
        """``M = N·S``: the number of per-example gradients, the order of the Gram."""
        return self.batch_size * self.labels

    def __repr__(self) -> str:
        kinds = ", ".join(
            f"{ly.de}x{ly.da}" + (f"@T={ly.T}" if ly.shared else "") for ly in self._layers
        )
        return (
            f"WoodburyFisher(layers=[{kinds}], N={self.batch_size}, S={self.labels}, damping={self._damping:g}, "
            f"scale={self._scale:g}, dtype={self.dtype}, backend={self._ctx.name})"
        )

    def with_damping(self, damping) -> "WoodburyFisher":
        """The same Fisher with another ``λ``, sharing the cached Gram (only the Cholesky is redone)."""
        damping = check_nonneg_scalar(damping, "damping")
        new = WoodburyFisher.__new__(WoodburyFisher)
        return new._init(self._ctx, self._layers, self.batch_size, self.labels, damping, self._scale,
                         self._gram_method, self._K)

    # -- right-hand sides: the operator base (lists of (..., d_out, d_in) or flat (..., P)) ---------
    _layered = True

    def _rhs_or_batch(self, U, batch, what: str):
        if (U is None) == (batch is None):
            raise TypeError(f"{what}() takes exactly one of U and batch=(acts, errs)")
        if U is not None:
            return self._rhs(U, "U")
        if not isinstance(batch, (list, tuple)) or len(batch) != 2:
            raise TypeError(f"batch must be a pair (acts, errs) of per-layer lists; got {type(batch).__name__}")
        return self._batch_gradient(batch[0], batch[1], None, prefix="batch "), "list"

    # -- G and Gᵀ (Benzing eqs. 21 and 23) -------------------------------------------
    def _gt(self, Us):
        """``Gᵀu`` (..., M), unscaled: per layer the diagonal of ``A_k U_kᵀ E_kᵀ``, never the whole product."""
        xp = self._ctx.xp
        v = None
        for ly, U in zip(self._layers, Us):
            Ut = mT(U)  # (..., d_in, d_out)
            if not ly.shared:
                W = xp.reshape(ly.A, (ly.N, ly.da)) @ Ut  # (..., N, d_out)
                if ly.S == 1:
                    part = xp.sum(W * xp.reshape(ly.E, (ly.N, ly.de)), axis=-1)
                else:
                    part = xp.sum(W[..., :, None, :] * xp.reshape(ly.E, (ly.N, ly.S, ly.de)), axis=-1)
            else:
                W = xp.reshape(ly.A, (ly.N * ly.T, ly.da)) @ Ut  # (..., N*T, d_out)
                W = xp.reshape(W, tuple(W.shape[:-2]) + (ly.N, 1, ly.T, ly.de))
                part = xp.sum(W * ly.E, axis=(-2, -1))  # (..., N, S)
            if ly.S > 1 or ly.shared:  # (..., N, S) -> (..., M)
                part = xp.reshape(part, tuple(part.shape[:-2]) + (self.n_columns,))
            v = part if v is None else v + part
        return v

    def _g(self, w):
        """``G w`` as per-layer ``(..., d_out, d_in)`` arrays: ``(w ⊙ E_k)ᵀ A_k`` (eq. 23)."""
        xp = self._ctx.xp
        lead = tuple(w.shape[:-1])
        out = []
        for ly in self._layers:
            wr = xp.reshape(w, lead + (ly.N, ly.S))
            if ly.S == 1:
                Et = wr[..., 0][..., None, None] * ly.E[:, 0, ...]  # (..., N, T, d_out)
            else:
                Et = xp.sum(wr[..., None, None] * ly.E, axis=-3)
            Et = xp.reshape(Et, lead + (ly.N * ly.T, ly.de))
            out.append(mT(Et) @ xp.reshape(ly.A, (ly.N * ly.T, ly.da)))
        return out

    # -- the Gram and its factorization ----------------------------------------------
    def _gram(self):
        if self._K is None:
            xp = self._ctx.xp
            K = None
            for ly in self._layers:
                if ly.shared:
                    part = gram_shared(xp, ly.A, ly.E, self._gram_method)
                else:
                    part = gram_dense(xp, xp.reshape(ly.A, (ly.N, ly.da)), xp.reshape(ly.E, (ly.N, ly.S, ly.de)))
                K = part if K is None else K + part
            K = K * self._scale
            check_result(xp, K, "gram() = scale·GᵀG", "the per-example gradients are too large for the dtype: "
                         "rescale acts and errs (F scales with max|acts|²·max|errs|²) or pass a smaller scale")
            self._K = (K + mT(K)) * 0.5  # our own GEMM output: symmetric to round-off, made exact
        return self._K

    def gram(self):
        """``K = scale · GᵀG`` (M × M), ``K[c1, c2] = scale · <g_c1, g_c2>`` (Benzing eq. 22); cached."""
        return self._ctx.out_copy(self._gram())

    def _require_damping(self, what: str, inverse: bool = False) -> None:
        """``damping > 0`` (and, for ``inverse``, ``1/damping`` representable: the Woodbury form multiplies by it)."""
        if self._damping > 0:
            if inverse:
                check_overflow(1.0 / self._damping, float(self._ctx.xp.finfo(self.dtype).max),
                               f"{what}: 1/damping (damping = {self._damping:.3g})",
                               "pass a larger damping: (λI + F)⁻¹ scales the directions F does not see by 1/λ")
            return
        P, M = self.n_params, self.n_columns
        if P > M:
            why = (
                f"F has rank at most M = {M} (N = {self.batch_size} inputs x S = {self.labels} labels) < "
                f"P = {P} parameters, so damping·I + F = F is singular"
            )
        else:
            why = (
                f"the Woodbury form (λI + F)⁻¹ = λ⁻¹(I − scale·G(λI + K)⁻¹Gᵀ) divides by λ "
                f"(with P = {P} <= M = {M}, factor the dense to_dense() instead)"
            )
        raise LinAlgError(
            f"{what} needs damping > 0 but damping = 0: {why}; pass damping > 0 to WoodburyFisher or use "
            f"with_damping(λ)"
        )

    def _factorized(self):
        if self._factor is None:
            xp = self._ctx.xp
            K = self._gram()
            C = K + self._damping * xp.eye(self.n_columns, dtype=K.dtype)
            self._factor = Factor(xp, C, "damping·I + gram()")
        return self._factor

    def _cinv(self, v):
        """``(λI + K)⁻¹ v`` for ``v`` (..., M)."""
        return self._factorized().solve(v[..., None])[..., 0]

    # -- products ---------------------------------------------------------------------
    def _matvec_list(self, Us):
        v = self._gt(Us)
        return self._g(v * self._scale)

    def matvec(self, U=None, *, batch=None):
        """``F u = scale · G (Gᵀu)`` (undamped), per layer ``(..., d_out, d_in)``.

        ``batch=(acts, errs)`` instead of ``U`` applies ``F`` to the mean
        gradient of that (independent) batch, as in :meth:`solve`.
        """
        Us, fmt = self._rhs_or_batch(U, batch, "matvec")
        return self._ret(self._matvec_list(Us), fmt)

    def _forward(self, Us):
        return self._matvec_list(Us)

    def quad(self, U):
        """``uᵀ F u = scale · |Gᵀu|²`` from ``Gᵀu`` alone (K-FAC app. C); shape: ``U``'s batch dims."""
        Us, _ = self._rhs(U, "U")
        xp = self._ctx.xp
        v = self._gt(Us)
        return self._scalar(self._scale * xp.sum(v * v, axis=-1))

    def bilinear(self, U, V):
        """``uᵀ F v = scale · (Gᵀu) · (Gᵀv)`` (K-FAC app. C); batch dims broadcast."""
        Us, _ = self._rhs(U, "U")
        Vs, _ = self._rhs(V, "V")
        xp = self._ctx.xp
        return self._scalar(self._scale * xp.sum(self._gt(Us) * self._gt(Vs), axis=-1))

    def _solve_list(self, Us):
        xp = self._ctx.xp
        inv = 1.0 / self._damping
        # w = -(scale/λ) (λI + K)⁻¹ Gᵀu, so that the result is G w + u/λ
        w = self._cinv(self._gt(Us)) * (-self._scale * inv)
        Ys = self._g(w)
        out = []
        for Y, U in zip(Ys, Us):
            if is_numpy(xp) and Y.shape == U.shape and Y.flags.c_contiguous and Y.flags.writeable:
                _axpy_inplace(Y, U, inv)
                out.append(Y)
            else:
                out.append(Y + U * inv)
        return out

    def solve(self, U=None, *, batch=None):
        """``(λI + F)⁻¹ u = λ⁻¹ (u − scale · G (λI + K)⁻¹ Gᵀu)`` (Benzing eq. 20), exactly.

        Parameters
        ----------
        U : list of (..., d_out, d_in) arrays, or a flat (..., P) array
            Any right-hand side, e.g. a gradient from backprop on another batch.
        batch : (acts, errs), keyword-only
            Instead of ``U``: per-layer activations and errors of a mini-batch
            (shapes as in the constructor; its size may differ) whose mean
            gradient ``(1/N₂) Σ_i g_i`` is preconditioned.  Passing a batch
            independent of the one ``F`` was estimated on removes the bias of
            using one batch for both (Benzing app. I.5).

        Costs two GEMMs per layer (``Gᵀu`` and ``G w``) and two triangular
        solves with the cached ``M × M`` Cholesky factor of ``λI + K``.
        Needs ``damping > 0``.
        """
        self._require_damping("solve()", inverse=True)
        Us, fmt = self._rhs_or_batch(U, batch, "solve")
        return self._ret(self._solve_list(Us), fmt)

    def logdet(self):
        """``log det(λI + F) = (P − M) log λ + log det(λI + K)`` (matrix determinant lemma).

        Needs ``damping > 0``.  Returns a 0-d array in the operator's namespace and dtype.
        """
        self._require_damping("logdet()")
        xp = self._ctx.xp
        sign, logabs = self._factorized().slogdet()
        if bool(xp.any(sign <= 0)):
            raise LinAlgError("damping·I + gram() is not positive definite; its log-determinant is undefined")
        P, M = self.n_params, self.n_columns
        return self._scalar(logabs + (P - M) * math.log(self._damping))

    def sample(self, rng, size: int = 1):
        """Exact draws from ``N(0, (λI + F)⁻¹)`` (the Laplace posterior with prior precision ``λI``).

        Benzing app. C.1 (eq. 11, after Doucet 2010): with ``y ~ N(0, I_P)`` and
        ``z ~ N(0, I_M)``,

            x = λ^{-1/2} (y − G (λI + K)⁻¹ (scale · Gᵀy + √(scale·λ) z))

        has covariance ``λ⁻¹(I − scale·G(λI + K)⁻¹Gᵀ) = (λI + F)⁻¹``.  One
        ``Gᵀ``, one ``G`` product and one ``M × M`` solve for all draws.

        Parameters
        ----------
        rng : numpy.random.Generator
            The only source of randomness: ``y`` is drawn layer by layer, then
            ``z``, as standard normals in the operator's dtype (on the host,
            then moved to the operator's namespace).
        size : int
            Number of draws.

        Returns
        -------
        list of arrays
            One ``(size, d_out, d_in)`` array per layer.

        Raises ``ValueError`` when ``1/damping`` overflows the dtype, as :meth:`solve` does: the directions
        ``F`` does not see have variance ``1/λ``, a covariance the dtype cannot hold.
        """
        if not isinstance(rng, np.random.Generator):
            raise TypeError(
                f"rng must be a numpy.random.Generator (np.random.default_rng(seed)); got {type(rng).__name__}"
            )
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0:
            raise ValueError(f"size must be a non-negative integer; got {size!r}")
        size = int(size)
        self._require_damping("sample()", inverse=True)  # the covariance (λI + F)⁻¹ scales by 1/λ
        xp = self._ctx.xp
        np_dtype = np.float64 if self.dtype == xp.float64 else np.float32
        Ys = [xp.asarray(rng.standard_normal((size,) + ly.shape, dtype=np_dtype)) for ly in self._layers]
        z = xp.asarray(rng.standard_normal((size, self.n_columns), dtype=np_dtype))
        lam, s = self._damping, self._scale
        w = self._cinv(self._gt(Ys) * s + z * math.sqrt(s * lam))
        Gw = self._g(w)
        c = 1.0 / math.sqrt(lam)
        return [self._out((y - g) * c) for y, g in zip(Ys, Gw)]

    # -- Benzing I.5: gradients of another batch -------------------------------------------
    def _batch_gradient(self, acts, errs, scale, prefix: str):
        _layer_lists(acts, errs, prefix)
        L = len(self._layers)
        if len(acts) != L:
            raise ValueError(f"{prefix}acts must hold one array per layer of the operator ({L}); got {len(acts)}")
        arrays = [self._ctx.asarray(a, f"{prefix}acts[{k}]") for k, a in enumerate(acts)]
        arrays += [self._ctx.asarray(e, f"{prefix}errs[{k}]") for k, e in enumerate(errs)]
        layers, N, _ = _canonical(self._ctx.xp, arrays, L, prefix)
        for k, (ly, mine) in enumerate(zip(layers, self._layers)):
            if ly.shape != mine.shape:
                raise ValueError(
                    f"{prefix}acts[{k}]/{prefix}errs[{k}] give layer {k} the weight shape (d_out, d_in) = {ly.shape} "
                    f"but the operator's layer {k} is {mine.shape}"
                )
        s = 1.0 / N if scale is None else _check_scale(scale)
        return [_batch_sum(self._ctx.xp, ly) * s for ly in layers]

    @staticmethod
    def batch_gradient(acts, errs, scale=None):
        """``scale · Σ_c g_c`` per layer (default ``scale = 1/N``): the mean gradient of a batch.

        Same layouts as the constructor; one GEMM per layer, no per-example
        gradients.  With the true-label errors of a batch this is the
        mini-batch gradient; precondition it with an operator built on an
        independent batch (Benzing app. I.5).
        """
        _layer_lists(acts, errs)
        L = len(acts)
        named = [(f"acts[{k}]", a) for k, a in enumerate(acts)] + [(f"errs[{k}]", e) for k, e in enumerate(errs)]
        ctx, arrays = context(*named)
        layers, N, _ = _canonical(ctx.xp, arrays, L)
        s = 1.0 / N if scale is None else _check_scale(scale)
        out = []
        for k, ly in enumerate(layers):
            g = _batch_sum(ctx.xp, ly) * s
            check_result(ctx.xp, g, f"batch_gradient() of layer {k}",
                         f"the sum of gradients errs[{k}]ᵀ·acts[{k}] is too large for the dtype: rescale acts and errs")
            out.append(ctx.out(g))
        return out

    # -- dense forms and SciPy interop ----------------------------------------------------
    def to_dense(self, allow_large: bool = False):
        """The dense ``P × P`` matrix ``F`` (undamped), for checks on small models.

        Forms the per-example gradients explicitly; refuses more than
        :data:`kronlin.DENSE_LIMIT` entries unless ``allow_large=True``.
        """
        allow_large = check_flag(allow_large, "allow_large")
        P, M = self.n_params, self.n_columns
        if P * max(P, M) > DENSE_LIMIT and not allow_large:
            raise ValueError(
                f"to_dense() would build a {P}x{P} matrix (and a {P}x{M} gradient matrix) beyond DENSE_LIMIT = "
                f"{DENSE_LIMIT} entries; pass allow_large=True if you really want it"
            )
        xp = self._ctx.xp
        cols = []
        for ly in self._layers:
            g = mT(ly.E) @ xp.reshape(ly.A, (ly.N, 1, ly.T, ly.da))  # (N, S, d_out, d_in)
            cols.append(xp.reshape(mT(g), (M, ly.size)))  # column-stacked vec of each g_c
        Gt = cols[0] if len(cols) == 1 else xp.concat(cols, axis=-1)  # (M, P)
        return self._out((mT(Gt) @ Gt) * self._scale)

    def aslinearoperator(self, inverse: bool = False):
        """A ``scipy.sparse.linalg.LinearOperator`` (CuPy: ``cupyx``'s) of shape ``(P, P)``.

        ``F`` (``inverse=False``) or ``(λI + F)⁻¹`` (``inverse=True``), both
        symmetric, on flat vectors: the concatenation of the layers'
        column-stacked vecs (docs/design.md §1).  For ``λI + F`` add
        ``λ * scipy.sparse.linalg.aslinearoperator(scipy.sparse.eye(P))``.
        """
        from .linop import make_linear_operator

        if check_flag(inverse, "inverse"):
            self._require_damping("aslinearoperator(inverse=True)", inverse=True)
            self._factorized()
        fn = self._solve_list if inverse else self._matvec_list
        return make_linear_operator(self, fn, fn)
