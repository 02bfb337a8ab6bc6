"""K-FAC for torch.nn models on kronlin's core (Martens & Grosse 2015; KFC, Grosse & Martens 2016)."""

from __future__ import annotations

import copy
import math
import re

import numpy as np
import torch

import kronlin
from kronlin._validate import check_choice, check_positive_int, check_real_scalar

from ._convert import array_namespace, from_array, to_array
from ._hooks import CurvatureHooks

__all__ = ["KFAC"]

DAMPING_MODES = ("exact", "factored")
STRUCTURES = ("blockdiag", "tridiagonal")
_STATE_FORMAT = "kronlin.torch.KFAC/1"
_KEYS = ("A_diag", "G_diag", "A_off", "G_off")
_STATE_KEYS = ("options", "steps", "estimator_step", "stats", "scale", "positions", "inverse_factors", "generator")
# and, since the one-batch inverses from the rows, "rows" and "inverse_rows" (states written before have neither)


def _stacked(arrays, ks):
    """``arrays[ks[0]]`` for one layer, else the layers' arrays as one stack (a group of equal shapes)."""
    if len(ks) == 1:
        return arrays[ks[0]]
    return array_namespace(arrays[ks[0]]).stack([arrays[i] for i in ks])


class KFAC(CurvatureHooks):
    r"""K-FAC preconditioner for the ``nn.Linear`` and ``nn.Conv2d`` layers of a torch model.

    Usage (any torch optimizer steps on the preconditioned gradient)::

        pre = kronlin.torch.KFAC(model, damping=1e-3)
        loss_fn(model(x), y).backward()
        pre.step(); opt.step()

    Each supported layer's parameters ``[W | b]`` (bias as the last column, K-FAC
    §2.1) get the Kronecker-factored Fisher block ``Ā ⊗ G`` (K-FAC §3, eq. 1;
    convolutions: KFC's factors through kronlin's ``(N, T, d)`` patch path), and
    :meth:`step` replaces their ``.grad`` by the damped inverse applied to it.
    Other parameters keep their gradient.

    Parameters
    ----------
    model : torch.nn.Module
    damping : float
        Tikhonov damping ``λ >= 0``.
    damping_mode : {"exact", "factored"}
        ``"exact"``: ``(Ā⊗G + λI)⁻¹`` through the eigenbases of ``Ā`` and ``G``
        (:class:`kronlin.KronEigh`); ``"factored"``: K-FAC §6.3,
        ``(Ā + πγI)⁻¹ ⊗ (G + (γ/π)I)⁻¹`` with ``γ = √λ`` and π from the trace
        norm (:func:`kronlin.factored_damping`).
    fisher : {"empirical", "mc"}
        ``"empirical"``: output gradients of the loss the user back-propagates;
        ``"mc"``: of labels sampled from the model's predictive distribution
        (K-FAC §5), back-propagated by ``torch.autograd.grad`` after the forward
        pass (``.grad`` untouched); needs ``loss``.
    loss : {"cross_entropy", "mse"}, nn.CrossEntropyLoss, nn.MSELoss or None
        The loss (for ``fisher="mc"``; a module also sets ``reduction``).
    reduction : {"mean", "sum"}
        How the loss combines its per-example terms (see :mod:`kronlin.torch`).
    update_period : int
        Fold the batch statistics into the running averages every this many
        steps (K-FAC §5: ``ε = min(1 − 1/k, max_decay)`` at the ``k``-th update,
        so the first :meth:`step` uses exactly the first batch's statistics).
    refresh_period : int
        Recompute the damped inverses (eigen/Cholesky factorizations) every this
        many steps (K-FAC §8's ``T₃``).
    max_decay : float
        The cap of ``ε`` (0.95 in K-FAC).  ``0`` keeps no average: every update's factors are that batch's
        statistics (what curvlinops' ``KFACLinearOperator`` computes).  Whenever the factors are one
        batch's (the first update, or ``max_decay=0``), a layer with a factor of fewer rows (``N``, or
        ``N·T``) than ``0.8×`` its order (``0.4×`` with factored damping) is inverted from its rows by
        :meth:`kronlin.KronEigh.from_rows` (an ``N × N`` eigendecomposition instead of the ``p × p`` one;
        float32, ``N = 256``, a 2049-input layer: 10 ms against 610 ms), and the state keeps those rows.
    structure : {"blockdiag", "tridiagonal"}
        ``"tridiagonal"``: K-FAC §4.3's block-tridiagonal inverse
        (:class:`kronlin.BlockTridiagInverse`) for a sequential stack of
        ``nn.Linear`` layers; needs ``damping_mode="factored"`` (the paper damps
        the diagonal factors, §6.3).
    seed : int
        Seed of the generator that samples the MC labels.
    accumulation_steps : int
        Gradient accumulation: :meth:`step` follows this many forward and backward passes (micro-batches),
        whose examples together are the step's batch.  With ``reduction="mean"`` each micro-batch's loss is
        its mean divided by ``accumulation_steps`` (PyTorch's accumulation recipe: the accumulated ``.grad``
        is the batch mean's gradient); with ``"sum"`` it is its sum.  Another count of passes is refused.

    Notes
    -----
    :meth:`factors` returns ``(A, G)`` scaled as curvlinops' ``KFACLinearOperator``
    (``separate_weight_and_bias=False``, ``kfac_approx="expand"``) for the same
    Fisher type: for a convolution with ``T`` output positions
    ``A = (1/(N·T)) Σ_{n,t} ā āᵀ`` and ``G = c·(1/N) Σ_{n,t} ĝ ĝᵀ``
    (kronlin's KFC split, ``Σ_t`` on the activation side, differs by ``T``;
    ``Ā ⊗ G`` and the factored damping with the trace-norm π do not).
    """

    def __init__(self, model, damping: float = 1e-3, *, damping_mode: str = "exact", fisher: str = "empirical",
                 loss=None, reduction: str = "mean", update_period: int = 1, refresh_period: int = 1,
                 max_decay: float = 0.95, structure: str = "blockdiag", seed: int = 0, accumulation_steps: int = 1):
        check_choice(damping_mode, DAMPING_MODES, "damping_mode")
        check_choice(structure, STRUCTURES, "structure")
        if structure == "tridiagonal" and damping_mode != "factored":
            raise ValueError("structure='tridiagonal' damps the diagonal factors (K-FAC §4.3, §6.3): "
                             "use damping_mode='factored'")
        self.update_period = check_positive_int(update_period, "update_period")
        self.refresh_period = check_positive_int(refresh_period, "refresh_period")
        max_decay = check_real_scalar(max_decay, "max_decay")
        if not 0.0 <= max_decay < 1.0:
            raise ValueError(f"max_decay must be in [0, 1); got {max_decay!r}")
        self.damping_mode, self.structure, self.max_decay = damping_mode, structure, max_decay
        super().__init__(model, damping, fisher, loss, reduction, seed, accumulation_steps)
        if structure == "tridiagonal":
            try:
                self._check_chain()
            except ValueError:
                self.remove_hooks()  # leave the model as it was
                raise
        self._estimator = kronlin.FactorEstimator(max_decay=self.max_decay, tridiagonal=structure == "tridiagonal",
                                                  append_one=False)
        self._scale = None         # c of the hooks' docstring at the last update
        self._inv = None           # [(layer indices, operator)]: KronEigh (exact or from rows; a stack for several
        #                            layers), BlockDiagInverse, or one BlockTridiagInverse
        self._inv_factors = None   # the (scaled) factors the current inverse was built from
        self._rows = None          # (acts, errs, N) of the last update when the averages are that one batch
        self._inv_rows = None      # the rows the current inverse was built from (or None)

    def _check_chain(self):
        for ly in self.layers:
            if ly.conv:
                raise ValueError(f"structure='tridiagonal' needs a sequential stack of nn.Linear layers; "
                                 f"{ly.name!r} is a convolution")
        for a, b in zip(self.layers, self.layers[1:]):
            if a.module.out_features != b.module.in_features:
                raise ValueError(
                    f"structure='tridiagonal' needs a sequential stack of nn.Linear layers: {a.name!r} has "
                    f"{a.module.out_features} outputs but the next, {b.name!r}, has {b.module.in_features} inputs"
                )

    # -- schedule ---------------------------------------------------------------------------
    def _collecting(self) -> bool:
        return self._steps % self.update_period == 0

    # -- the step ---------------------------------------------------------------------------
    def step(self) -> None:
        """Replace the ``.grad`` of every supported layer by its preconditioned gradient.

        Call after ``loss.backward()`` and before the optimizer's ``step()``.
        Raises (and changes nothing) on missing or non-finite data.
        """
        self._check_backward()
        self._dtype()
        update = self._collecting()
        # the data are checked finite by the core, on what it computes from them (a NaN or infinity of an input
        # reaches its factor's diagonal, one of a gradient block its preconditioned block): one pass over each
        # array less; the binding searches them, to name the layer, only when the core refuses
        if update:
            acts_t, errs_t, N = self._collect(check=False)
            if self.structure == "tridiagonal" and any(a.ndim != 2 for a in acts_t):
                raise ValueError("structure='tridiagonal' needs (N, d) inputs for every layer (no weight sharing)")
        blocks = self._grad_blocks(check=False)
        saved = (copy.copy(self._estimator), self._scale, self._inv, self._inv_factors, self._rows,
                 self._inv_rows)  # references, no array copies
        try:
            if update:
                acts, errs = self._np(acts_t), self._np(errs_t)
                one_batch = self._estimator.decay() == 0.0  # the averages become exactly this batch's statistics
                try:
                    self._estimator.update(acts, errs)
                except (ValueError, FloatingPointError) as exc:  # the core names acts[k]/grads[k]
                    self._check_collected(acts_t, errs_t)  # a non-finite input: say which layer
                    if not isinstance(exc, FloatingPointError):
                        raise
                    raise FloatingPointError(
                        f"{self._layer_named_in(exc)} has non-finite statistics ({exc}): step refused, nothing was "
                        "changed; lower the learning rate or use float64"
                    ) from None
                self._scale = self._curvature_scale(N)
                self._rows = (acts, errs, N) if one_batch else None
            if self._inv is None or self._steps % self.refresh_period == 0:
                self._refresh()
            try:
                solved = self._apply(blocks)
            except (ValueError, FloatingPointError, np.linalg.LinAlgError):
                self._check_blocks(blocks)  # a non-finite gradient: say which layer
                raise
        except Exception:
            # refuse the step: the running averages and the inverse stay what they were
            self._estimator = saved[0]
            self._scale, self._inv, self._inv_factors, self._rows, self._inv_rows = saved[1:]
            raise
        for ly, V in zip(self.layers, solved):
            ly.set_grad(V)
        self._steps += 1
        self._clear()

    def _current_factors(self):
        """The running averages as curvature factors (G scaled by c), kronlin's split."""
        est, c = self._estimator, self._scale

        def scaled(Ms):  # c is 1 for a mean-reduced loss: no product then
            return Ms if c == 1.0 else [G * c for G in Ms]

        out = {"A_diag": est.A_diag, "G_diag": scaled(est.G_diag)}
        if self.structure == "tridiagonal":
            out["A_off"], out["G_off"] = est.A_off, scaled(est.G_off)
        return out

    def _refresh(self, factors=None, rows=None):
        """Rebuild the damped inverses from the current averages (or given ``factors`` and their ``rows``)."""
        f = self._current_factors() if factors is None else factors
        rows = self._rows if factors is None else rows
        gamma = math.sqrt(self.damping)
        n = len(self.layers)
        if self.structure == "tridiagonal":
            self._inv = [(list(range(n)), kronlin.BlockTridiagInverse(f["A_diag"], f["G_diag"], f["A_off"], f["G_off"],
                                                                    gamma=gamma, pi="trace"))]
            self._inv_factors, self._inv_rows = f, None
            return
        thin = self._thin_layers(rows)
        parts = self._rows_parts(thin, f, rows, gamma)
        rest = [i for i in range(n) if i not in thin]
        if rest and self.damping_mode == "exact":
            parts += self._eigh_parts(rest, f)
        elif rest:
            # (A + πγI)⁻¹ ⊗ (G + γ/π I)⁻¹ formed once per refresh (potri), so that each step applies it with
            # two GEMMs; BlockDiagInverse factorizes layers of one shape as one stack (issue 13 item 3)
            try:
                parts.append((rest, kronlin.BlockDiagInverse([f["A_diag"][i] for i in rest],
                                                             [f["G_diag"][i] for i in rest], gamma=gamma, pi="trace")))
            except (ValueError, np.linalg.LinAlgError) as exc:
                raise type(exc)(f"{self._layer_named_in(exc, rest)}: {exc}") from exc
        self._inv = parts
        self._inv_factors, self._inv_rows = f, rows if thin else None

    def _eigh_parts(self, layers, f):
        """``(A⊗G + λI)⁻¹`` through the eigenbases (four GEMMs and a divide per application); layers of equal
        ``(p, q)`` as one stack, ``Kron(A_stack, G_stack).eigh()``, applied in one batched solve (issue 13
        item 3).  A stack that fails is decomposed layer by layer, so that the error names the layer."""
        groups: dict = {}
        for i in layers:
            groups.setdefault((f["A_diag"][i].shape, f["G_diag"][i].shape), []).append(i)
        def eigh(ks):
            return kronlin.Kron(_stacked(f["A_diag"], ks), _stacked(f["G_diag"], ks)).eigh()

        parts = []
        for ks in groups.values():
            if len(ks) > 1:
                try:
                    parts.append((ks, eigh(ks)))
                    continue
                except (ValueError, np.linalg.LinAlgError):
                    pass
            for i in ks:
                try:
                    parts.append(([i], eigh([i])))
                except (ValueError, np.linalg.LinAlgError) as exc:
                    raise type(exc)(f"{self._layers_named([i])}: {exc}") from exc
        return parts

    def _thin_layers(self, rows):
        """Layers whose factors are one batch's, with a factor of fewer rows than ``ρ×`` its order: their inverse
        comes from the rows (:meth:`kronlin.KronEigh.from_rows`).  ``ρ = 0.8`` for exact damping (the Gram
        route's crossover against ``?syevd``); ``ρ = 0.4`` for factored damping, where the alternative is
        ``potrf`` + ``potri`` (measured, float32, one thread, N = 256: 14 against 20 ms for refresh + apply of
        a 785-wide A, 14 against 11 ms at 513)."""
        if rows is None:
            return []
        acts, errs, _ = rows
        num, den = (4, 5) if self.damping_mode == "exact" else (2, 5)

        def count(x):
            return x.shape[0] * (x.shape[1] if x.ndim == 3 else 1)

        return [i for i, (a, g) in enumerate(zip(acts, errs))
                if any(den * count(x) <= num * x.shape[-1] for x in (a, g))]

    def _rows_parts(self, layers, f, rows, gamma):
        """The damped inverses of ``layers`` from their rows: ``A = āᵀā/N``, ``G = c·ĝᵀĝ/(N·T)`` (the estimator's
        split) by :meth:`kronlin.KronEigh.from_rows`; exact damping stacks layers of equal row shapes into one
        call, factored damping is the shifts ``πγ`` and ``γ/π`` per layer (π from the factors' traces, as
        BlockDiagInverse's)."""
        if not layers:
            return []
        acts, errs, N = rows
        a_rows = {i: acts[i].reshape(-1, acts[i].shape[-1]) for i in layers}  # (N·T, d) rows
        g_rows = {i: errs[i].reshape(-1, errs[i].shape[-1]) for i in layers}
        groups: dict = {}
        for i in layers:
            key = (acts[i].shape, errs[i].shape) if self.damping_mode == "exact" else i
            groups.setdefault(key, []).append(i)
        parts = []
        for ks in groups.values():
            T = acts[ks[0]].shape[1] if acts[ks[0]].ndim == 3 else 1
            scales = (1.0 / N, self._curvature_scale(N) / (N * T))  # c of the update the rows come from
            try:
                shifts = (0.0, 0.0)
                if self.damping_mode == "factored":  # one layer a group
                    pi = kronlin.pi_factor(f["A_diag"][ks[0]], f["G_diag"][ks[0]])
                    shifts = (pi * gamma, gamma / pi)
                parts.append((ks, kronlin.KronEigh.from_rows(_stacked(a_rows, ks), _stacked(g_rows, ks), *scales,
                                                             *shifts)))
            except (ValueError, np.linalg.LinAlgError) as exc:
                raise type(exc)(f"{self._layers_named(ks)}: {exc}") from exc
        return parts

    def _layers_named(self, ks) -> str:
        """``"layer 'a'"`` or ``"layers 'a', 'b'"`` for the layer indices ``ks`` (errors of a stacked call)."""
        return f"layer{'s' if len(ks) > 1 else ''} " + ", ".join(repr(self.layers[i].name) for i in ks)

    def _layer_named_in(self, exc, layers=None) -> str:
        """``"layer 'name'"`` of the first block index the core's error names (``acts[k]``, ``grads[k]``,
        ``A_diag[k]``, ``G_diag[k]``: the core knows positions, this binding the modules), else ``"a layer"``;
        ``layers`` maps the core's positions to layer indices when it saw a subset."""
        layers = list(range(len(self.layers))) if layers is None else layers
        m = re.search(r"(?:acts|grads|[AG]_diag)\[(\d+)\]", str(exc))
        return f"layer {self.layers[layers[int(m.group(1))]].name!r}" if m and int(m.group(1)) < len(layers) else "a layer"

    def _apply(self, blocks):
        V = self._np(blocks)
        out = [None] * len(V)
        for ks, op in self._inv:
            if isinstance(op, kronlin.KronEigh):  # exact: (A⊗G + λI)⁻¹; factored from rows: shifted, λ = 0
                lam = self.damping if self.damping_mode == "exact" else 0.0
                try:
                    Y = op.solve(_stacked(V, ks), damping=lam)
                except (ValueError, np.linalg.LinAlgError) as exc:  # singular (λ = 0): say which layer(s)
                    raise type(exc)(f"{self._layers_named(ks)}: {exc}") from exc
                ys = [Y] if len(ks) == 1 else [Y[j] for j in range(len(ks))]
            else:
                ys = op.apply([V[i] for i in ks])
            for i, y in zip(ks, ys):
                out[i] = y
        return [from_array(x) for x in out]

    # -- inspection -------------------------------------------------------------------------
    def factors(self, module):
        """``(A, G)`` of ``module``'s layer as torch tensors, in curvlinops' scaling (see the class notes).

        ``A`` is ``(d_in+1, d_in+1)`` with the bias coordinate last; ``G`` is
        ``(d_out, d_out)``.  These are the running averages (no damping).
        """
        ly = self._layer_of(module)
        if self._estimator.step == 0:
            raise RuntimeError("no statistics yet: factors() needs at least one step()")
        k = self.layers.index(ly)
        A = self._estimator.A_diag[k] / ly.positions
        G = self._estimator.G_diag[k] * (self._scale * ly.positions)
        return from_array(A), from_array(G)

    # -- checkpoints ------------------------------------------------------------------------
    def _options(self) -> dict:
        return {"damping": self.damping, "damping_mode": self.damping_mode, "fisher": self.fisher,
                "loss": self.loss, "reduction": self.reduction, "update_period": self.update_period,
                "refresh_period": self.refresh_period, "max_decay": self.max_decay, "structure": self.structure,
                "layers": [ly.name for ly in self.layers], "shapes": [list(ly.shape) for ly in self.layers]}

    def state_dict(self) -> dict:
        """Everything needed to resume bit-exactly (tensors, numbers and strings: ``torch.save`` works)."""
        def tens(xs):
            return [from_array(x.copy()) for x in xs]  # copies: the state must not alias live statistics

        est = self._estimator.state_dict()
        stats = None if est["stats"] is None else {k: tens(v) for k, v in est["stats"].items()}
        inv = None if self._inv_factors is None else {k: tens(v) for k, v in self._inv_factors.items()}

        def rows(r):  # one batch's rows (see _thin_layers): the next refresh and the current inverse use them
            return None if r is None else {"acts": tens(r[0]), "errs": tens(r[1]), "N": r[2]}

        inv_rows = "rows" if self._inv_rows is not None and self._inv_rows is self._rows else rows(self._inv_rows)
        return {"format": _STATE_FORMAT, "options": self._options(), "steps": self._steps,
                "estimator_step": est["step"], "stats": stats, "scale": self._scale,
                "positions": [ly.positions for ly in self.layers], "inverse_factors": inv,
                "rows": rows(self._rows), "inverse_rows": inv_rows, "generator": self._generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict` (the model's own state is restored separately).

        A state of another configuration or a malformed one raises ``ValueError`` naming the entry
        (``state['stats']['A_diag'][1]``, ``state['rows']``, ...) and changes nothing.
        """
        steps, positions, scale, estimator, own_rows, inv, inv_rows = self._checked_parts(state)
        saved = (self._estimator, self._steps, self._scale, [ly.positions for ly in self.layers],
                 self._generator.get_state(), self._rows, self._inv, self._inv_factors, self._inv_rows)
        try:
            self._estimator, self._steps, self._scale = estimator, steps, scale
            for ly, T in zip(self.layers, positions):
                ly.positions = T
            self._load_generator(state["generator"])
            self._rows = own_rows
            self._inv = self._inv_factors = self._inv_rows = None
            if inv is not None:
                self._refresh(inv, inv_rows)
        except Exception as exc:
            self._estimator, self._steps, self._scale, pos, gen, self._rows, self._inv, self._inv_factors, \
                self._inv_rows = saved
            for ly, T in zip(self.layers, pos):
                ly.positions = T
            self._generator.set_state(gen)
            if isinstance(exc, (TypeError, KeyError, IndexError)):  # e.g. a tridiagonal inverse without A_off
                raise ValueError(f"state['inverse_factors'] or state['inverse_rows'] is malformed: {exc!r}") from exc
            raise
        self._clear()

    def _checked_parts(self, state):
        """The pieces of a :meth:`state_dict` for :meth:`load_state_dict`, each checked against this preconditioner
        (``ValueError`` naming the entry): steps, positions, scale, a loaded estimator, the rows, the inverse's
        factors and its rows."""
        steps = self._checked_state(state, _STATE_FORMAT, _STATE_KEYS)
        mine, theirs = self._options(), state["options"]
        for key in ("fisher", "loss", "reduction", "structure", "layers", "shapes"):
            if not isinstance(theirs, dict) or mine[key] != theirs.get(key):
                got = theirs.get(key) if isinstance(theirs, dict) else theirs
                raise ValueError(f"the state was saved with {key}={got!r}; this preconditioner has {mine[key]!r}")
        positions = state["positions"]
        if (not isinstance(positions, (list, tuple)) or len(positions) != len(self.layers)
                or any(isinstance(T, bool) or not isinstance(T, int) or T < 1 for T in positions)):
            raise ValueError(f"state['positions'] must hold one positive integer per layer ({len(self.layers)}); "
                             f"got {positions!r}")
        scale = state["scale"]
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                  or not math.isfinite(scale) or scale <= 0):
            raise ValueError(f"state['scale'] must be None or a positive finite number; got {scale!r}")
        device = self.layers[0].weight.device

        def arrs(xs, what):
            if not isinstance(xs, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in xs):
                raise ValueError(f"{what} must be a list of tensors")
            return [to_array(t.to(device)) for t in xs]

        def rows(r, what):
            if r is None:
                return None
            if not isinstance(r, dict) or not {"acts", "errs", "N"} <= r.keys():
                raise ValueError(f"{what} must be None or a dict with 'acts', 'errs' and 'N'")
            acts, errs, N = arrs(r["acts"], f"{what}['acts']"), arrs(r["errs"], f"{what}['errs']"), r["N"]
            if len(acts) != len(self.layers) or len(errs) != len(self.layers):
                raise ValueError(f"{what} must hold one array per layer ({len(self.layers)}) in 'acts' and 'errs'")
            if isinstance(N, bool) or not isinstance(N, int) or N < 1:
                raise ValueError(f"{what}['N'] must be a positive integer; got {N!r}")
            return acts, errs, N

        stats = state["stats"]
        if stats is not None and not isinstance(stats, dict):
            raise ValueError(f"state['stats'] must be None or a dict of factor lists; got {type(stats).__name__}")
        est_step = state["estimator_step"]
        if (isinstance(est_step, bool) or not isinstance(est_step, int) or est_step < 0
                or (stats is None) != (est_step == 0)):
            raise ValueError(f"state['estimator_step'] must be an integer >= 0, 0 exactly when state['stats'] is None; "
                             f"got {est_step!r}")

        def check_shapes(f, what):  # the options' shapes match this model; the factors must match them too
            if len(f["A_diag"]) != len(self.layers) or len(f["G_diag"]) != len(self.layers):
                raise ValueError(f"{what} must hold one factor per layer ({len(self.layers)})")
            for k, ly in enumerate(self.layers):
                want = ((ly.shape[1],) * 2, (ly.shape[0],) * 2)
                got = (tuple(f["A_diag"][k].shape), tuple(f["G_diag"][k].shape))
                if got != want:
                    raise ValueError(f"{what} gives layer {ly.name!r} factors of shapes {got}; it needs {want}")

        stats = None if stats is None else {k: arrs(v, f"state['stats'][{k!r}]") for k, v in stats.items()}
        estimator = kronlin.FactorEstimator(max_decay=self.max_decay, append_one=False).load_state_dict({
            "step": state["estimator_step"], "max_decay": self.max_decay,
            "tridiagonal": self.structure == "tridiagonal", "append_one": False, "stats": stats,
        })
        if stats is not None:  # well-formed now (the estimator checked them): their shapes against the layers
            check_shapes(stats, "state['stats']")
        own_rows = rows(state.get("rows"), "state['rows']")  # states written before the rows were kept have none
        inv_rows = state.get("inverse_rows")
        inv_rows = own_rows if inv_rows == "rows" else rows(inv_rows, "state['inverse_rows']")
        inv = state["inverse_factors"]
        if inv is not None:
            if not isinstance(inv, dict) or not {"A_diag", "G_diag"} <= inv.keys():
                raise ValueError("state['inverse_factors'] must be None or a dict of factor lists with 'A_diag' and "
                                 "'G_diag'")
            inv = {k: arrs(v, f"state['inverse_factors'][{k!r}]") for k, v in inv.items()}
            check_shapes(inv, "state['inverse_factors']")
        return steps, positions, scale, estimator, own_rows, inv, inv_rows

