"""The exact damped subsampled natural gradient for torch.nn models (Benzing 2022, app. I)."""

from __future__ import annotations

import kronlin

from kronlin._validate import check_positive_scalar

from ._convert import from_array
from ._hooks import CurvatureHooks

__all__ = ["NaturalGradient"]

_STATE_FORMAT = "kronlin.torch.NaturalGradient/1"


class NaturalGradient(CurvatureHooks):
    r"""``(λI + F)⁻¹ g`` over all supported parameters jointly, exactly, for the batch's Fisher.

    ``F = c·(1/N) Σ_n ∇ℓ_n ∇ℓ_nᵀ`` is the Fisher of the batch (the empirical
    Fisher for ``fisher="empirical"``, its Monte-Carlo counterpart with labels
    drawn from the model for ``fisher="mc"``), over the ``[W | b]`` blocks of all
    supported layers (``nn.Linear``, ``nn.Conv2d``), and ``g`` is their
    gradient as back-propagated (the gradient of the mean loss for
    ``reduction="mean"``; ``c = 1`` then, ``c = N`` for ``"sum"``).

    The solve goes through :class:`kronlin.WoodburyFisher`: with the ``P × N``
    matrix ``J`` of per-example gradients, ``(λI + F)⁻¹ g = λ⁻¹(g − J(λ N/c·I +
    JᵀJ)⁻¹ Jᵀ g)`` (Benzing 2022, app. I.2, eq. 20), where ``Jᵀg`` and ``JᵀJ`` come
    from the layers' activations and output gradients (eqs. 21–23): ``J`` itself
    is never formed.  Cost: ``O(N² Σ d)`` plus an ``N × N`` Cholesky per step.

    Usage::

        ng = kronlin.torch.NaturalGradient(model, damping=1e-2)
        loss_fn(model(x), y).backward()
        ng.step(); opt.step()

    Parameters
    ----------
    model : torch.nn.Module
    damping : float
        ``λ > 0``.
    fisher : {"empirical", "mc"}
    loss : {"cross_entropy", "mse"}, nn.CrossEntropyLoss, nn.MSELoss or None
        Needed for ``fisher="mc"``.
    reduction : {"mean", "sum"}
    seed : int
        Seed of the generator that samples the MC labels.
    accumulation_steps : int
        Gradient accumulation, as for :class:`kronlin.torch.KFAC`: :meth:`step` follows this many forward and
        backward passes, whose examples together are the batch of ``F``.
    """

    def __init__(self, model, damping: float = 1e-3, *, fisher: str = "empirical", loss=None,
                 reduction: str = "mean", seed: int = 0, accumulation_steps: int = 1):
        # λ > 0: the batch Fisher has rank at most N, so λI + F is singular without it
        damping = check_positive_scalar(damping, "damping")
        super().__init__(model, damping, fisher, loss, reduction, seed, accumulation_steps)

    def fisher_operator(self):
        """The :class:`kronlin.WoodburyFisher` ``λI + F`` of the data collected since the last step."""
        self._check_backward()
        self._dtype()
        acts, errs, N = self._collect()
        return kronlin.WoodburyFisher(self._np(acts), self._np(errs), self.damping,
                                      scale=self._curvature_scale(N) / N)

    def step(self) -> None:
        """Replace the ``.grad`` of every supported layer by the natural gradient (after ``loss.backward()``)."""
        fisher = self.fisher_operator()
        blocks = self._grad_blocks()
        out = fisher.solve(self._np(blocks))
        for ly, x, b in zip(self.layers, out, blocks):
            ly.set_grad(from_array(x))
        self._steps += 1
        self._clear()

    def state_dict(self) -> dict:
        return {"format": _STATE_FORMAT, "steps": self._steps, "generator": self._generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`; a malformed state raises ``ValueError`` and changes nothing."""
        steps = self._checked_state(state, _STATE_FORMAT, ("steps", "generator"))
        self._load_generator(state["generator"])
        self._steps = steps
        self._clear()
