"""The backward stage of a safeguard whose rule needs the winner's and the loser's gradients apart.

Diffusion-DPO's backward, and the output space's, is transformers' own: ``Trainer.training_step`` divides the loss
:meth:`~trl_diffusion_sdpo.trainer.DiffusionSDPOTrainer.compute_loss` returns by the accumulation window and runs the
engine's backward (accelerate's ``backward``: its loss scale, DeepSpeed's own accumulation). The parameter and update
spaces bring their own (:class:`~trl_diffusion_sdpo.safeguards.parameter.ParameterSpaceBackward`), behind this
interface (:class:`Backward`), which the trainer runs in place of transformers' step::

    for gradient_pass in backward.passes(policy, window):
        with gradient_pass:                       # the exact rule's taps are on inside
            predictions = ...(separate_branches=gradient_pass.separate_branches)
            loss = ...                            # errors -> objective
            gradient_pass.backward(loss, predictions)
    gradient_pass.branches                        # the branches' gradients for the safeguard's hook

It takes one pass, except at a first micro-batch where a layer could not split the branches inside it: then a second,
one forward and backward per branch, on the same noised pair.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..objectives import PreferencePredictions

__all__ = ["Backward", "BackwardWindow", "GradientPass"]


@dataclass(frozen=True)
class BackwardWindow:
    """Where a micro-batch stands in its optimizer step's accumulation window.

    Attributes:
        accumulation_steps: micro-batches in the window (each backward averages over them, as transformers does).
        sync_gradients: whether this micro-batch closes the window (the gradients are reduced over processes then).
        contributes: ``False`` for a zero-weighted replay: a process whose micro-batch lost every row runs the same
            passes and collectives as its peers and adds nothing.
        pairs: the micro-batch's number of pairs (the per-pair scope groups its rows by it).
    """

    accumulation_steps: int = 1
    sync_gradients: bool = True
    contributes: bool = True
    pairs: int | None = None


class GradientPass(Protocol):
    """One forward and backward of a micro-batch: entered around the predictions and the objective."""

    #: whether the predictions are taken in one forward pass per branch
    separate_branches: bool
    #: after the pass, the branches' gradients kept apart for a safeguard's hook (``None``: the gradients are formed)
    branches: Any

    def __enter__(self) -> GradientPass: ...

    def __exit__(self, *exc: object) -> None: ...

    def backward(self, loss: torch.Tensor, predictions: PreferencePredictions) -> None:
        """Backpropagate ``loss``, formed from ``predictions`` inside this pass."""


class Backward(Protocol):
    """What the trainer asks for a micro-batch's gradients."""

    #: whether the predictions run through the engine's wrapped model (DDP's hooks, DeepSpeed's partitions); else
    #: through the unwrapped denoiser, the backward reducing what the engine would have
    through_engine: bool

    def passes(self, policy: torch.nn.Module, window: BackwardWindow) -> Iterator[GradientPass]:
        """The micro-batch's passes, one at a time (the next only if the last could not form the gradients)."""
