"""Forward/backward hooks that collect each supported layer's inputs and output gradients.

Shared by :class:`kronlin.torch.KFAC` and :class:`kronlin.torch.NaturalGradient`.

Conventions (K-FAC §2.1; curvlinops' ``separate_weight_and_bias=False``)
------------------------------------------------------------------------
* A supported layer is an ``nn.Linear`` or an ``nn.Conv2d`` with ``groups=1`` and
  ``padding_mode="zeros"`` whose weight requires a gradient.  Its parameters
  form one block ``[W | b]`` of shape ``(d_out, d_in + 1)`` (``(d_out, d_in)``
  without a bias): the bias is the last column, the homogeneous coordinate of
  ``ā = [a; 1]``.  A convolution's weight ``(C_out, C_in, kh, kw)`` is the
  matrix ``(C_out, C_in·kh·kw)``, whose column order is that of
  ``torch.nn.functional.unfold``'s patches.
* Activations are ``(N, d_in[+1])`` for a dense layer and ``(N, T, d_in[+1])``
  for a layer shared over ``T`` positions (the ``T = H_out·W_out`` patches of a
  convolution, or the middle axes of a Linear layer applied to ``(N, …, d_in)``).
* Errors ``ĝ`` are the per-example gradients ``∂ℓ_n/∂s`` of the layer's
  output ``s``, where the loss is ``(1/N) Σ_n ℓ_n`` (``reduction="mean"``) or
  ``Σ_n ℓ_n`` (``reduction="sum"``).  For a mean-reduced loss the gradients
  autograd hands the hooks are ``ĝ/N``, so they are multiplied by ``N``.  For
  ``nn.MSELoss(reduction="mean")``, which divides by ``N·C``, this makes
  ``ℓ_n = (1/C) ‖f_n − y_n‖²``, whose Hessian in ``f_n`` is ``(2/C)·I``; with
  ``reduction="sum"`` it is ``ℓ_n = ‖f_n − y_n‖²`` and ``2·I`` (curvlinops' convention).
* The curvature of the reduced loss is ``c · (1/N) Σ_n ∇ℓ_n ∇ℓ_nᵀ`` with
  ``c = 1`` for ``"mean"`` and ``c = N`` for ``"sum"`` (the Fisher of a sum is
  the sum of the Fishers), as in curvlinops.

Fisher types
------------
``fisher="empirical"``: ``ĝ`` are the gradients of the loss the user
back-propagates (the labels of the data).  ``fisher="mc"``: after each forward
pass of the model that will feed a statistics update, labels ``ŷ`` are drawn
from the model's predictive distribution (K-FAC §5) and ``Σ_n ℓ_n(f_n, ŷ_n)``
is back-propagated with ``torch.autograd.grad`` (``.grad`` is left alone):
for cross-entropy ``ŷ ~ Categorical(softmax(f))``; for squared error
``ŷ ~ N(f, (C/2)·I)`` (``"mean"``) or ``N(f, ½·I)`` (``"sum"``), so that
``E[ĝ ĝᵀ]`` is ``(2/C)·I`` or ``2·I``, the Hessian of ``ℓ_n``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

from .._validate import check_choice, check_nonneg_scalar, check_positive_int, check_seed
from ._convert import SUPPORTED_DTYPES, to_array

__all__ = ["CurvatureHooks"]

FISHERS = ("empirical", "mc")
REDUCTIONS = ("mean", "sum")
LOSSES = ("cross_entropy", "mse")


class _Inert:
    """What a copy of a preconditioner's hook becomes: a (pre-)forward hook that does nothing."""

    __slots__ = ()

    def __call__(self, *args):
        return None


class _Hook:
    """A forward hook of a preconditioner, registered on the user's model.

    A copy of the model (``copy.deepcopy``, or ``torch.save(model)`` and ``torch.load``: an EMA or evaluation
    copy, a whole-model checkpoint) carries its modules' hooks along.  Copied as they are, the hooks would
    feed the copy's forward and backward passes into this preconditioner's statistics (and, for
    ``fisher="mc"``, draw labels from its generator), and pickling them would pickle the preconditioner with
    the model or fail on a local function.  So a copy of a ``_Hook`` is an :class:`_Inert` one: the copy of
    the model trains unhooked, and the preconditioner stays with the model it was built on.
    """

    __slots__ = ("fn",)

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)

    def __reduce__(self):
        return (_Inert, ())

    def __deepcopy__(self, memo):
        return _Inert()


class _Record:
    """One forward call of a layer: its input, the model's forward pass it belongs to, and the output
    gradients seen for it."""

    __slots__ = ("inp", "forward", "grad", "seen")

    def __init__(self, inp, forward: int):
        self.inp, self.forward, self.grad, self.seen = inp, forward, None, False


def _conv_pads(module: nn.Conv2d):
    """``(left, right, top, bottom)`` zero padding of a convolution (string paddings resolved)."""
    pad = module.padding
    if isinstance(pad, str):
        if pad == "valid":
            return (0, 0, 0, 0)
        # "same" (stride 1, enforced by torch): total d·(k−1), the extra one on the right/bottom
        out = []
        for k, d in zip(reversed(module.kernel_size), reversed(module.dilation)):
            total = d * (k - 1)
            out += [total // 2, total - total // 2]
        return tuple(out)
    ph, pw = pad
    return (pw, pw, ph, ph)


class _Layer:
    """A supported module, its parameter block ``[W | b]`` and the records of its calls."""

    def __init__(self, name: str, module: nn.Module):
        self.name, self.module = name or type(module).__name__, module
        self.conv = isinstance(module, nn.Conv2d)
        self.weight = module.weight
        self.bias = module.bias if (module.bias is not None and module.bias.requires_grad) else None
        d_out = self.weight.shape[0]
        d_in = math.prod(self.weight.shape[1:])
        self.shape = (d_out, d_in + (self.bias is not None))
        self.records: list[_Record] = []
        self.positions = 1
        if self.conv:
            self._pads = _conv_pads(module)

    # -- per-example data in kronlin's layout --------------------------------------------
    def acts(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, d_in[+1])`` or ``(N, T, d_in[+1])`` activations with the homogeneous coordinate last."""
        if self.conv:
            m = self.module
            if x.ndim != 4:
                raise ValueError(f"layer {self.name!r}: kronlin.torch needs batched (N, C, H, W) inputs; got {tuple(x.shape)}")
            if any(self._pads):
                x = F.pad(x, self._pads)
            cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=0, stride=m.stride)  # (N, d, T)
            a = cols.transpose(1, 2)
        else:
            if x.ndim < 2:
                raise ValueError(f"layer {self.name!r}: kronlin.torch needs batched (N, ..., d_in) inputs; got {tuple(x.shape)}")
            a = x if x.ndim == 2 else x.reshape(x.shape[0], -1, x.shape[-1])
        if self.bias is not None:
            a = torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)
        return a.contiguous()

    def errs(self, g: torch.Tensor) -> torch.Tensor:
        """``(N, d_out)`` or ``(N, T, d_out)`` output gradients."""
        if self.conv:
            g = g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2)
        elif g.ndim > 2:
            g = g.reshape(g.shape[0], -1, g.shape[-1])
        return g.contiguous()

    # -- the gradient block ------------------------------------------------------------------
    def grad_block(self) -> torch.Tensor:
        """``[∇W | ∇b]`` of shape ``(d_out, d_in[+1])``."""
        gw = self.weight.grad
        if gw is None or (self.bias is not None and self.bias.grad is None):
            raise RuntimeError(
                f"layer {self.name!r} has no gradient (.grad is None): call loss.backward() before step()"
            )
        gw = gw.reshape(self.shape[0], -1)
        if self.bias is None:
            return gw
        return torch.cat([gw, self.bias.grad.reshape(-1, 1)], dim=1)

    def set_grad(self, V: torch.Tensor) -> None:
        """Write a ``(d_out, d_in[+1])`` block back into ``.grad``."""
        V = V.to(device=self.weight.grad.device, dtype=self.weight.grad.dtype)
        with torch.no_grad():
            if self.bias is None:
                self.weight.grad.copy_(V.reshape(self.weight.shape))
            else:
                self.weight.grad.copy_(V[:, :-1].reshape(self.weight.shape))
                self.bias.grad.copy_(V[:, -1])


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every entry is finite: a finite sum proves it (a NaN or an infinity makes the sum
    non-finite), so the full elementwise test runs only when the one-pass sum is not finite."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _supported(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return module.weight.requires_grad
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and module.padding_mode == "zeros" and module.weight.requires_grad
    return False


def _parse_loss(loss, reduction):
    """``(kind, reduction)`` from ``loss`` (a name, an nn loss module or None) and ``reduction``."""
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"reduction must be 'mean' or 'sum' (how the loss combines its N per-example terms); got {reduction!r}: "
            "other reductions cannot be represented by a Fisher of per-example gradients"
        )
    if loss is None or isinstance(loss, str):
        if loss is not None and loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, an nn.CrossEntropyLoss / nn.MSELoss, or None; got {loss!r}")
        return loss, reduction
    if isinstance(loss, nn.CrossEntropyLoss):
        kind = "cross_entropy"
        if loss.weight is not None:
            raise ValueError(
                "nn.CrossEntropyLoss with class weights divides by the sum of the weights, not by N: its reduction "
                "cannot be represented; use reduction='sum' with weights folded in yourself, or no weights"
            )
        if loss.label_smoothing != 0.0:
            raise ValueError("nn.CrossEntropyLoss with label_smoothing has no sampling distribution for fisher='mc'; "
                             "use label_smoothing=0.0")
    elif isinstance(loss, nn.MSELoss):
        kind = "mse"
    else:
        raise ValueError(f"loss must be nn.CrossEntropyLoss, nn.MSELoss, 'cross_entropy', 'mse' or None; got {type(loss).__name__}")
    if loss.reduction not in REDUCTIONS:
        raise ValueError(
            f"{type(loss).__name__}(reduction={loss.reduction!r}) cannot be represented: kronlin.torch needs a loss "
            "reduced by 'mean' or 'sum' over the batch"
        )
    return kind, loss.reduction


class CurvatureHooks:
    """Hook management, data collection and checks shared by the torch preconditioners."""

    def __init__(self, model, damping, fisher, loss, reduction, seed, accumulation_steps=1):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        damping = check_nonneg_scalar(damping, "damping")
        self.accumulation_steps = check_positive_int(accumulation_steps, "accumulation_steps")
        check_choice(fisher, FISHERS, "fisher")
        self.loss, self.reduction = _parse_loss(loss, reduction)
        if fisher == "mc" and self.loss is None:
            raise ValueError("fisher='mc' samples labels from the model's predictive distribution and needs "
                             "loss='cross_entropy' or loss='mse' (or the nn loss module)")
        self.model, self.damping, self.fisher = model, damping, fisher
        self.layers = [_Layer(n, m) for n, m in model.named_modules() if _supported(m)]
        if not self.layers:
            raise ValueError(
                f"{type(model).__name__} has no supported layer: kronlin.torch preconditions nn.Linear and "
                "nn.Conv2d (groups=1, padding_mode='zeros') layers whose weights require gradients"
            )
        self._by_module = {ly.module: ly for ly in self.layers}
        self._phase = "user"
        self.seed = check_seed(seed)
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(self.seed)
        self.sampled_targets = None  # the labels of the last MC draw (for inspection and tests)
        self._steps = 0
        self._forwards = 0  # the model's forward passes so far (a record's pass tells accumulation from reuse)
        self._handles = [model.register_forward_pre_hook(_Hook(self._count_forward))]
        self._handles += [ly.module.register_forward_hook(_Hook(self._forward_hook(ly))) for ly in self.layers]
        if fisher == "mc":
            self._handles.append(model.register_forward_hook(_Hook(self._model_hook)))

    @property
    def steps(self) -> int:
        """How many steps were taken."""
        return self._steps

    # -- to be provided by subclasses -------------------------------------------------------
    def _collecting(self) -> bool:
        """Whether the coming step needs this forward pass's statistics."""
        return True

    # -- hooks --------------------------------------------------------------------------------
    def _count_forward(self, module, inputs):
        self._forwards += 1

    def _forward_hook(self, layer: _Layer):
        def hook(module, inputs, output):
            if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
                return
            rec = _Record(inputs[0].detach() if self._collecting() else None, self._forwards)
            layer.records.append(rec)
            # a tensor hook on the output, not a module backward hook: it survives in-place
            # activations applied to the output (pytorch issue 61519)
            output.register_hook(lambda g, rec=rec: self._grad_hook(rec, g))

        return hook

    def _grad_hook(self, rec: _Record, g):
        if self._phase == "user":
            rec.seen = True
        if rec.inp is not None and self._phase == ("user" if self.fisher == "empirical" else "mc"):
            g = g.detach()
            rec.grad = g if rec.grad is None else rec.grad + g  # several backward passes through one forward add

    def _model_hook(self, module, inputs, output):
        """fisher='mc': draw labels from the predictive distribution and back-propagate their loss."""
        if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
            return
        if not self._collecting():
            return
        if output.ndim != 2:
            raise ValueError(f"fisher='mc' needs model outputs of shape (N, C); got {tuple(output.shape)}")
        f = output.detach()
        with torch.no_grad():
            if self.loss == "cross_entropy":
                p = torch.softmax(f, dim=1)
                y = torch.multinomial(p.cpu(), 1, generator=self._generator).squeeze(1).to(f.device)
            else:
                var = (f.shape[1] if self.reduction == "mean" else 1.0) / 2.0
                eps = torch.randn(f.shape, generator=self._generator, dtype=f.dtype).to(f.device)
                y = f + math.sqrt(var) * eps
        self.sampled_targets = y
        if self.loss == "cross_entropy":
            total = F.cross_entropy(output, y, reduction="sum")
        else:
            total = ((output - y) ** 2).sum() / (output.shape[1] if self.reduction == "mean" else 1.0)
        params = [ly.weight for ly in self.layers]
        self._phase = "mc"
        try:
            torch.autograd.grad(total, params, retain_graph=True, allow_unused=True)
        finally:
            self._phase = "user"

    def remove_hooks(self) -> None:
        """Detach the preconditioner from the model."""
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- checkpoints ------------------------------------------------------------------------
    @staticmethod
    def _checked_state(state, fmt: str, keys) -> int:
        """``state['steps']`` of a :meth:`state_dict` of format ``fmt`` holding ``keys``; ``ValueError`` naming
        what is wrong otherwise."""
        if not isinstance(state, dict) or state.get("format") != fmt:
            raise ValueError(f"not a {fmt} state dict")
        missing = [k for k in keys if k not in state]
        if missing:
            raise ValueError(f"the state is missing {', '.join(repr(k) for k in missing)}")
        steps = state["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"state['steps'] must be an integer >= 0; got {steps!r}")
        return steps

    def _load_generator(self, g) -> None:
        """Restore the MC labels' generator (unchanged, and ``ValueError``, if ``g`` is not a generator state)."""
        try:
            self._generator.set_state(g)
        except (TypeError, RuntimeError) as exc:
            raise ValueError(f"state['generator'] is not a torch generator state ({exc})") from None

    # -- collection -------------------------------------------------------------------------
    def _layer_of(self, module) -> _Layer:
        try:
            return self._by_module[module]
        except (KeyError, TypeError):
            raise ValueError(f"{module!r} is not one of the layers this preconditioner handles") from None

    def _clear(self) -> None:
        for ly in self.layers:
            ly.records = []

    def _check_backward(self) -> None:
        """Raise unless a backward pass reached every layer since the last step."""
        seen = [any(r.seen for r in ly.records) for ly in self.layers]
        if not any(seen):
            raise RuntimeError(
                "step() called before any backward pass since the last step: run the forward pass and "
                "loss.backward() first"
            )
        missing = [ly.name for ly, s in zip(self.layers, seen) if not s]
        if missing:
            raise RuntimeError(
                f"layer(s) {missing} saw no data: no forward and backward pass went through them since the last "
                "step(); exclude them (requires_grad=False) or use them in the forward pass"
            )
        K = self.accumulation_steps
        for ly in self.layers:
            # only forward passes the user's backward went through count (an extra forward under
            # grad, e.g. for logging, draws MC labels too but is never back-propagated)
            passes = [r.forward for r in ly.records if r.seen]
            if len(set(passes)) < len(passes):
                raise RuntimeError(f"layer {ly.name!r} ran several times in one forward pass with gradients: a layer "
                                   "applied several times in one forward pass is not supported")  # fmt: skip
            if len(passes) != K:
                raise RuntimeError(
                    f"layer {ly.name!r} ran {len(passes)} time{'s' if len(passes) > 1 else ''} with gradients since "
                    f"the last step(), but accumulation_steps={K}: call step() after "
                    + ("each backward pass" if K == 1 else f"every {K} forward and backward passes")
                    + " (gradient accumulation: pass accumulation_steps)"
                )

    def _dtype(self) -> torch.dtype:
        dts = {ly.weight.dtype for ly in self.layers}
        if len(dts) != 1 or next(iter(dts)) not in SUPPORTED_DTYPES:
            raise TypeError(f"kronlin.torch supports layers of one dtype, float32 or float64; got {sorted(map(str, dts))}")
        return next(iter(dts))

    def _collect(self, check: bool = True):
        """Per-layer ``(acts, errs)`` tensors in kronlin's layout and the batch size ``N`` (all micro-batches of
        an accumulated step together); ``check``: raise naming the layer if one is not finite (else the caller
        must, see :meth:`_check_collected`)."""
        acts, errs, N = [], [], None
        K = self.accumulation_steps
        for ly in self.layers:
            # the passes the user's backward went through, counted by _check_backward
            recs = [r for r in ly.records if r.seen]
            if any(r.grad is None for r in recs):
                raise RuntimeError(
                    f"layer {ly.name!r} saw no data: no output gradient of the "
                    f"{'sampled' if self.fisher == 'mc' else 'loss'} labels reached it since the last step()"
                )
            parts_a, parts_g = [], []
            for r in recs:
                a, g = ly.acts(r.inp), ly.errs(r.grad)
                if self.fisher == "empirical" and self.reduction == "mean":
                    # autograd's gradients of a mean over n examples, divided by K when accumulating, are ĝ/(n·K)
                    g = g * (a.shape[0] * K)
                parts_a.append(a)
                parts_g.append(g)
            if len({tuple(a.shape[1:]) for a in parts_a}) > 1:
                raise RuntimeError(f"layer {ly.name!r} saw micro-batches of different shapes "
                                   f"{[tuple(a.shape) for a in parts_a]}: accumulated micro-batches must agree "
                                   "in everything but their number of examples")  # fmt: skip
            a = parts_a[0] if K == 1 else torch.cat(parts_a)
            g = parts_g[0] if K == 1 else torch.cat(parts_g)
            n = a.shape[0]
            if N is None:
                N = n
            elif n != N:
                raise RuntimeError(f"layer {ly.name!r} saw {n} examples but {self.layers[0].name!r} saw {N}")
            ly.positions = a.shape[1] if a.ndim == 3 else 1
            acts.append(a)
            errs.append(g)
        if check:
            self._check_collected(acts, errs)
        return acts, errs, N

    def _check_collected(self, acts, errs) -> None:
        """``FloatingPointError`` naming the first layer with a non-finite input or output gradient."""
        for ly, a, g in zip(self.layers, acts, errs):
            for what, t in (("inputs", a), ("output gradients", g)):
                if not _all_finite(t):
                    raise FloatingPointError(
                        f"layer {ly.name!r} has non-finite {what} (inf or nan): step refused, nothing was changed"
                    )

    def _grad_blocks(self, check: bool = True):
        """Every layer's ``[∇W | ∇b]``; ``check``: raise naming the layer if one is not finite (else the
        caller must, see :meth:`_check_blocks`)."""
        blocks = [ly.grad_block() for ly in self.layers]
        if check:
            self._check_blocks(blocks)
        return blocks

    def _check_blocks(self, blocks) -> None:
        """``FloatingPointError`` naming the first layer with a non-finite gradient block."""
        for ly, V in zip(self.layers, blocks):
            if not _all_finite(V):
                raise FloatingPointError(f"layer {ly.name!r} has a non-finite gradient: step refused, nothing was changed")

    def _curvature_scale(self, N: int) -> float:
        """``c`` of the module docstring: 1 for a mean-reduced loss, N for a summed one."""
        return 1.0 if self.reduction == "mean" else float(N)

    @staticmethod
    def _np(ts):
        return [to_array(t) for t in ts]
