"""A small, exact NumPy network: forward, backward, forward-mode and curvature products.

Notation follows K-FAC §2.1.  Layer ``i`` (0-based here; the paper's ``i+1``)
maps its input ``a_{i-1}`` to the pre-activation

    s_i = W_i ā_{i-1},      ā_{i-1} = [a_{i-1}; 1],      a_i = φ_i(s_i),

with ``W_i`` of shape ``(d_out_i, d_in_i + 1)`` and the bias in the **last**
column (homogeneous coordinate last).  The network output ``out`` is the last
layer's pre-activation ``s_ℓ`` (logits); the loss applies its own link
(:mod:`kronlin.train.losses`), so the last layer must be ``"linear"``.

A :class:`Conv2D` layer is the same thing applied at ``T`` weight-sharing
positions: its ``ā`` is the ``(N, T, C·kh·kw + 1)`` array of image patches
(docs/design.md §1's batch-first ``(N, T, d)`` layout, patch features ordered
``(channel, row, column)``), its ``s`` is ``(N, T, out_channels)``, and its
weight gradient is summed over positions, ``Σ_n Σ_t g_{n,t} ā_{n,t}ᵀ``, which
is what K-FAC-style factors for convolutions sum over (K-BFGS §2.2).  Output
positions ``t`` run row-major over the ``(H_out, W_out)`` grid.  Conv layers
come first; a :class:`Dense` layer after a convolution flattens its
``(C_out, H_out, W_out)`` output in C order.

Products with the network's Jacobian ``J = ∂out/∂θ`` (per example, ``(k, P)``):

* :meth:`Net.backward` — ``Jᵀ u`` as back-propagated vectors ``g_i = ∂⟨u, out⟩/∂s_i``;
  :meth:`Net.weight_grads` turns them into weight-shaped sums.
* :meth:`Net.jvp` — ``J v`` by forward-mode linearisation (one extra forward pass).
* :meth:`Net.gn_vp` — ``(1/N) Σ_n J_nᵀ H_n J_n v``, the Gauss-Newton (= Fisher,
  for the canonical-link losses here) matrix-vector product.
* :meth:`Net.quad` — ``vᵀ F w = (1/N) Σ_n (J v)_nᵀ H_n (J w)_n`` from ``jvp``
  only (K-FAC appendix C: half the cost of a full ``F v``).

Flat parameter vectors (:meth:`Net.flatten`) concatenate the layers' weights,
each stacked column by column (``vec``, docs/design.md §1).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from scipy.special import expit

from .losses import Loss

__all__ = ["Dense", "Conv2D", "Net", "Trace", "ACTIVATIONS", "im2col", "col2im"]

ACTIVATIONS = ("tanh", "logistic", "relu", "linear")


def _activate(name: str, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(φ(s), φ'(s))`` for the named activation."""
    if name == "tanh":
        h = np.tanh(s)
        return h, 1.0 - h * h
    if name == "logistic":
        h = expit(s)
        return h, h * (1.0 - h)
    if name == "relu":
        pos = s > 0
        return np.where(pos, s, 0.0), pos.astype(np.float64)
    if name == "linear":
        return s, np.ones_like(s)
    raise ValueError(f"unknown activation {name!r}; choose one of {ACTIVATIONS}")


def _append_one(a: np.ndarray) -> np.ndarray:
    return np.concatenate([a, np.ones(a.shape[:-1] + (1,))], axis=-1)


def _pair(v, name: str) -> tuple[int, int]:
    if np.ndim(v) == 0:
        v = (v, v)
    v = tuple(int(x) for x in v)
    if len(v) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints; got {v}")
    return v


def im2col(x: np.ndarray, kernel, stride=1, padding=0) -> np.ndarray:
    """Patches of images ``x`` ``(N, C, H, W)`` as ``(N, T, C·kh·kw)``.

    Positions ``t`` run row-major over the ``(H_out, W_out)`` output grid and
    patch features are ordered ``(channel, kernel row, kernel column)``; the
    images are zero-padded by ``padding`` on each side first.
    """
    (kh, kw), (sh, sw), (ph, pw) = _pair(kernel, "kernel"), _pair(stride, "stride"), _pair(padding, "padding")
    if ph or pw:
        x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    N, C = x.shape[:2]
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
    Ho, Wo = win.shape[2:4]
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(N, Ho * Wo, C * kh * kw)


def col2im(P: np.ndarray, image_shape, kernel, stride=1, padding=0) -> np.ndarray:
    """The adjoint of :func:`im2col`: scatter-add patches ``(N, T, C·kh·kw)`` back to ``(N, C, H, W)``."""
    (kh, kw), (sh, sw), (ph, pw) = _pair(kernel, "kernel"), _pair(stride, "stride"), _pair(padding, "padding")
    C, H, W = image_shape
    Hp, Wp = H + 2 * ph, W + 2 * pw
    Ho, Wo = (Hp - kh) // sh + 1, (Wp - kw) // sw + 1
    N = P.shape[0]
    P = P.reshape(N, Ho, Wo, C, kh, kw)
    out = np.zeros((N, C, Hp, Wp))
    for i in range(kh):
        for j in range(kw):
            out[:, :, i : i + sh * (Ho - 1) + 1 : sh, j : j + sw * (Wo - 1) + 1 : sw] += P[:, :, :, :, i, j].transpose(
                0, 3, 1, 2
            )
    return out[:, :, ph : ph + H, pw : pw + W]


class Dense:
    """A fully connected layer: ``s = W [a; 1]``, ``W`` of shape ``(d_out, d_in + 1)``.

    ``activation`` (``"tanh"``, ``"logistic"``, ``"relu"``, ``"linear"``) is
    applied to this layer's pre-activation to give the next layer's input.
    """

    kind = "dense"

    def __init__(self, d_in: int, d_out: int, activation: str = "tanh"):
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {ACTIVATIONS}")
        if int(d_in) < 1 or int(d_out) < 1:
            raise ValueError(f"Dense needs d_in, d_out >= 1; got {d_in}, {d_out}")
        self.d_in, self.d_out, self.activation = int(d_in), int(d_out), activation
        self.in_size, self.out_size = self.d_in, self.d_out
        self.T = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.d_out, self.d_in + 1)

    def inputs(self, x: np.ndarray) -> np.ndarray:
        """The layer input (without the homogeneous 1) from the flat previous output ``(N, in_size)``."""
        return x

    def input_adjoint(self, dA: np.ndarray) -> np.ndarray:
        return dA

    def flatten_out(self, s: np.ndarray) -> np.ndarray:
        return s

    def unflatten_out(self, x: np.ndarray) -> np.ndarray:
        return x

    def __repr__(self) -> str:
        return f"Dense({self.d_in}, {self.d_out}, {self.activation!r})"


class Conv2D:
    """A 2-D convolution with weight sharing, as a dense layer on patches.

    ``in_shape = (C, H, W)``; the weight is ``(out_channels, C·kh·kw + 1)``
    (bias last) and acts on every patch: ``s[n, t] = W [patch_{n,t}; 1]``.
    ``d_in = C·kh·kw`` (the patch length), ``d_out = out_channels`` and ``T =
    H_out·W_out`` positions with ``H_out = (H + 2·padding − kh) // stride + 1``.
    """

    kind = "conv2d"

    def __init__(self, in_shape, out_channels: int, kernel=(3, 3), stride=1, padding=0, activation: str = "tanh"):
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {ACTIVATIONS}")
        in_shape = tuple(int(v) for v in in_shape)
        if len(in_shape) != 3 or min(in_shape) < 1:
            raise ValueError(f"Conv2D in_shape must be (C, H, W) with positive entries; got {in_shape}")
        self.in_shape = in_shape
        self.kernel, self.stride, self.padding = _pair(kernel, "kernel"), _pair(stride, "stride"), _pair(padding, "padding")
        C, H, W = in_shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.padding
        Ho, Wo = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
        if Ho < 1 or Wo < 1 or min(sh, sw) < 1:
            raise ValueError(f"Conv2D: kernel {self.kernel} with padding {self.padding} does not fit input {in_shape}")
        self.out_shape = (int(out_channels), Ho, Wo)
        self.d_in, self.d_out, self.activation = C * kh * kw, int(out_channels), activation
        self.T = Ho * Wo
        self.in_size, self.out_size = C * H * W, self.d_out * self.T

    @property
    def shape(self) -> tuple[int, int]:
        return (self.d_out, self.d_in + 1)

    def inputs(self, x: np.ndarray) -> np.ndarray:
        return im2col(x.reshape((x.shape[0],) + self.in_shape), self.kernel, self.stride, self.padding)

    def input_adjoint(self, dA: np.ndarray) -> np.ndarray:
        lead = dA.shape[:-2]  # (N,) or (r, N)
        P = dA.reshape((-1,) + dA.shape[-2:])
        return col2im(P, self.in_shape, self.kernel, self.stride, self.padding).reshape(lead + (self.in_size,))

    def flatten_out(self, s: np.ndarray) -> np.ndarray:
        """``(..., T, C_out)`` → ``(..., C_out·H_out·W_out)`` in ``(C_out, H_out, W_out)`` C order."""
        return np.swapaxes(s, -1, -2).reshape(s.shape[:-2] + (-1,))

    def unflatten_out(self, x: np.ndarray) -> np.ndarray:
        return np.swapaxes(x.reshape(x.shape[:-1] + (self.d_out, self.T)), -1, -2)

    def __repr__(self) -> str:
        return (
            f"Conv2D({self.in_shape}, {self.d_out}, kernel={self.kernel}, stride={self.stride}, "
            f"padding={self.padding}, activation={self.activation!r})"
        )


@dataclass
class Trace:
    """What one forward pass leaves behind (all lists have one entry per layer).

    Attributes
    ----------
    a : list
        ``a[i] = ā_{i-1}``, the input of layer ``i`` with the homogeneous 1
        appended: ``(N, d_in+1)`` (dense) or ``(N, T, d_in+1)`` (conv patches).
    s : list
        Pre-activations ``(N, d_out)`` / ``(N, T, d_out)``.
    out : ndarray
        ``(N, k)``, the network output (``s[-1]``).
    dphi : list
        ``φ_i'(s_i)`` shaped like ``s[i]`` for the hidden layers (``None`` for the last).
    params : list
        The weight arrays the pass was run with (the same objects, not copies;
        ``backward``/``jvp`` linearise there, so do not modify them in place
        while the trace is in use).
    g : list or None
        The back-propagated vectors of the true-target loss, filled in by
        :meth:`Net.loss_and_grads` (``None`` after a bare :meth:`Net.forward`).
    """

    a: list
    s: list
    out: np.ndarray
    dphi: list
    params: list
    g: list | None = field(default=None)

    @property
    def N(self) -> int:
        return self.out.shape[0]

    def rows(self, index, repeat: int = 1) -> "Trace":
        """The trace of the examples ``index`` (a slice or an index array), each repeated ``repeat`` times
        (rows ``(n, j)``, ``j`` fastest); the true-target gradients ``g`` are dropped."""

        def take(x):
            return None if x is None else np.repeat(x[index], repeat, axis=0)

        return replace(self, a=[take(a) for a in self.a], s=[take(s) for s in self.s],
                                   out=take(self.out), dphi=[take(d) for d in self.dphi], g=None)  # fmt: skip


class Net:
    """A feed-forward network of :class:`Conv2D` and :class:`Dense` layers in float64.

    Parameters
    ----------
    layers : list of Dense / Conv2D
        Consecutive layers; each layer's ``in_size`` must equal the previous
        layer's flattened output size and the last must be ``"linear"``.
    rng : numpy.random.Generator
        Source of the initial weights (the only randomness used).
    init : {"sparse", "gaussian"}
        ``"sparse"`` (Martens 2010, used by K-FAC §13): each unit gets exactly
        ``min(15, d_in)`` non-zero incoming weights drawn from ``N(0, scale²)``
        at random positions.  ``"gaussian"`` (scaled Gaussian): every incoming
        weight ``~ N(0, scale²/d_in)``.  Biases (the last column) start at 0.
    scale : float
        The weight scale above (default 1).

    Attributes
    ----------
    params : list of ndarray
        ``W_i`` of shape ``(d_out_i, d_in_i + 1)``, bias last; optimizers update
        them in place or by reassignment (``net.params[i] = ...``).
    """

    def __init__(self, layers, rng: np.random.Generator, init: str = "sparse", scale: float = 1.0):
        layers = list(layers)
        if not layers:
            raise ValueError("Net needs at least one layer")
        for i, L in enumerate(layers):
            if not isinstance(L, (Dense, Conv2D)):
                raise TypeError(f"layers[{i}] is {type(L).__name__}; expected Dense or Conv2D")
            if i > 0:
                prev = layers[i - 1]
                if isinstance(L, Conv2D) and not isinstance(prev, Conv2D):
                    raise ValueError(f"layers[{i}] is a Conv2D after a Dense layer; conv layers come first")
                if isinstance(L, Conv2D) and L.in_shape != prev.out_shape:
                    raise ValueError(f"layers[{i}].in_shape {L.in_shape} != layers[{i - 1}] output shape {prev.out_shape}")
                if L.in_size != prev.out_size:
                    raise ValueError(
                        f"layers[{i}] takes {L.in_size} inputs but layers[{i - 1}] gives {prev.out_size}"
                        + (f" (its output {prev.out_shape} flattened)" if isinstance(prev, Conv2D) else "")
                    )
        if layers[-1].activation != "linear":
            raise ValueError(
                f"the last layer's activation is {layers[-1].activation!r}; it must be 'linear' "
                "(the loss applies the output link to the logits)"
            )
        if not isinstance(layers[-1], Dense):
            raise ValueError("the last layer must be Dense (the output is (N, k))")
        if init not in ("sparse", "gaussian"):
            raise ValueError(f"unknown init {init!r}; choose 'sparse' or 'gaussian'")
        self.layers = layers
        self.init, self.scale = init, float(scale)
        self.params = [self._init_weight(L, rng) for L in layers]

    def _init_weight(self, L, rng) -> np.ndarray:
        W = np.zeros(L.shape)
        if self.init == "gaussian":
            W[:, :-1] = rng.standard_normal((L.d_out, L.d_in)) * (self.scale / np.sqrt(L.d_in))
        else:
            m = min(15, L.d_in)
            for r in range(L.d_out):
                cols = rng.choice(L.d_in, size=m, replace=False)
                W[r, cols] = rng.standard_normal(m) * self.scale
        return W

    # ------------------------------------------------------------------ basics
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def shapes(self) -> list[tuple[int, int]]:
        return [L.shape for L in self.layers]

    @property
    def n_params(self) -> int:
        return int(sum(a * b for a, b in self.shapes))

    @property
    def in_size(self) -> int:
        return self.layers[0].in_size

    @property
    def out_size(self) -> int:
        return self.layers[-1].d_out

    def copy_params(self) -> list:
        """Copies of the weights (a new list of new arrays)."""
        return [W.copy() for W in self.params]

    def set_params(self, params) -> None:
        """Replace the weights by copies of ``params`` (shapes checked)."""
        self.params = self._check_like_params(params, "params", copy=True)

    def flatten(self, V) -> np.ndarray:
        """A params-shaped list as one vector: each layer column-stacked (``vec``), layers concatenated."""
        V = self._check_like_params(V, "V")
        return np.concatenate([M.reshape(-1, order="F") for M in V])

    def unflatten(self, v) -> list:
        """The inverse of :meth:`flatten`."""
        v = np.asarray(v, dtype=np.float64)
        if v.shape != (self.n_params,):
            raise ValueError(f"expected a vector of length {self.n_params}; got shape {v.shape}")
        out, o = [], 0
        for shp in self.shapes:
            n = shp[0] * shp[1]
            out.append(v[o : o + n].reshape(shp, order="F").copy())
            o += n
        return out

    def _check_like_params(self, V, name: str, copy: bool = False) -> list:
        V = list(V)
        if len(V) != self.n_layers:
            raise ValueError(f"{name} must hold {self.n_layers} arrays (one per layer); got {len(V)}")
        out = []
        for i, (M, shp) in enumerate(zip(V, self.shapes)):
            M = np.array(M, dtype=np.float64, copy=copy) if copy else np.asarray(M, dtype=np.float64)
            if M.shape != shp:
                raise ValueError(f"{name}[{i}] must have shape {shp}; got {M.shape}")
            out.append(M)
        return out

    # ----------------------------------------------------------------- passes
    def forward(self, X, params=None) -> Trace:
        """Run the network on ``X`` (``(N, in_size)``, or ``(N, C, H, W)`` for a conv first layer)."""
        params = list(self.params) if params is None else self._check_like_params(params, "params")
        X = np.asarray(X, dtype=np.float64)
        N = X.shape[0]
        x = X.reshape(N, -1)
        if x.shape[1] != self.in_size:
            raise ValueError(f"X has {x.shape[1]} features per example; the first layer takes {self.in_size}")
        a, s, dphi = [], [], []
        last = self.n_layers - 1
        for i, (L, W) in enumerate(zip(self.layers, params)):
            abar = _append_one(L.inputs(x))
            si = abar @ W.T
            a.append(abar)
            s.append(si)
            if i < last:
                h, d = _activate(L.activation, si)
                dphi.append(d)
                x = L.flatten_out(h)
            else:
                dphi.append(None)
        return Trace(a=a, s=s, out=s[-1], dphi=dphi, params=params)

    def backward(self, trace: Trace, dout) -> list:
        """Back-propagate per-example output vectors ``dout`` ``(N, k)``.

        Returns ``g`` with ``g[i]`` shaped like ``trace.s[i]`` and
        ``g_i = ∂(Σ_n ⟨dout_n, out_n⟩)/∂s_i`` — that is ``J_nᵀ dout_n`` in
        back-propagated form; no ``1/N`` anywhere.  With ``dout =
        loss.grad(out, loss.sample(out, rng))`` this is K-FAC §5's second
        backward pass with targets sampled from the model.

        ``dout`` may also be a stack ``(r, N, k)`` of such arrays (for instance
        the columns of ``loss.hessian_factor(out)`` moved to the front, as
        KFLR back-propagates them); then every ``g[i]`` gets the same leading
        ``r`` axis.  It is one pass with the ``r`` directions batched.
        """
        dout = np.asarray(dout, dtype=np.float64)
        if dout.shape[-2:] != trace.out.shape or dout.ndim > 3:
            raise ValueError(f"dout must have the output's shape {trace.out.shape} (or (r,) + that); got {dout.shape}")
        g = [None] * self.n_layers
        g[-1] = dout
        for i in range(self.n_layers - 1, 0, -1):
            W = trace.params[i]
            dx = self.layers[i].input_adjoint(g[i] @ W[:, :-1])
            g[i - 1] = self.layers[i - 1].unflatten_out(dx) * trace.dphi[i - 1]
        return g

    def backward_sampled(self, trace: Trace, loss: Loss, rng: np.random.Generator) -> list:
        """K-FAC §5's second backward pass: ``backward`` of ``loss.grad`` at targets drawn from the model.

        Exactly ``net.backward(trace, loss.grad(trace.out, loss.sample(trace.out, rng)))``;
        ``E[g gᵀ]`` over the draws gives the Fisher's back-propagated statistics.
        """
        return self.backward(trace, loss.grad(trace.out, loss.sample(trace.out, rng)))

    def weight_grads(self, trace: Trace, g) -> list:
        """``Σ_n (Σ_t) g_i ā_{i-1}ᵀ`` per layer, shape ``(d_out, d_in+1)`` (summed, not averaged)."""
        out = []
        for a, gi in zip(trace.a, g):
            out.append(gi.reshape(-1, gi.shape[-1]).T @ a.reshape(-1, a.shape[-1]))
        return out

    def loss_and_grads(self, X, Y, loss: Loss, params=None) -> tuple[float, list, Trace]:
        """Mean loss on ``(X, Y)`` and its gradient list (÷N); the trace keeps ``g`` in ``trace.g``."""
        trace = self.forward(X, params)
        value = loss.value(trace.out, Y)
        g = self.backward(trace, loss.grad(trace.out, Y))
        trace.g = g
        N = trace.N
        return value, [G / N for G in self.weight_grads(trace, g)], trace

    def loss(self, X, Y, loss: Loss, params=None) -> float:
        """Mean loss on ``(X, Y)`` (one forward pass)."""
        return loss.value(self.forward(X, params).out, Y)

    def jvp(self, trace: Trace, V) -> np.ndarray:
        """``J v``: the forward-mode derivative of ``out`` in the direction ``V`` (params-shaped), ``(N, k)``."""
        V = self._check_like_params(V, "V")
        last = self.n_layers - 1
        dx = None
        for i, (L, a, W, Vi) in enumerate(zip(self.layers, trace.a, trace.params, V)):
            ds = a @ Vi.T
            if dx is not None:
                ds = ds + L.inputs(dx) @ W[:, :-1].T
            if i < last:
                dx = L.flatten_out(trace.dphi[i] * ds)
        return ds

    def gn_vp(self, trace: Trace, loss: Loss, V) -> list:
        """The Gauss-Newton / Fisher product ``(1/N) Σ_n J_nᵀ H_n J_n v`` as a params-shaped list."""
        Hu = loss.hvp(trace.out, self.jvp(trace, V))
        N = trace.N
        return [G / N for G in self.weight_grads(trace, self.backward(trace, Hu))]

    def quad(self, trace: Trace, loss: Loss, V, W=None) -> float:
        """``vᵀ F w = (1/N) Σ_n (J v)_nᵀ H_n (J w)_n`` through ``jvp`` only (K-FAC appendix C).

        ``W`` defaults to ``V`` (then one ``jvp``, i.e. about half the work of a full ``F v``).
        """
        Jv = self.jvp(trace, V)
        Jw = Jv if W is None else self.jvp(trace, W)
        return float(np.sum(Jv * loss.hvp(trace.out, Jw)) / trace.N)

    def __repr__(self) -> str:
        return "Net([" + ", ".join(map(repr, self.layers)) + "])"
