"""The backward stage: how a micro-batch's loss becomes the gradients the optimizer sees.

Diffusion-DPO's is the engine's backward of the loss averaged over the accumulation window (:class:`EngineBackward`).
A safeguard whose rule needs the winner's and the loser's gradients apart (the parameter and update spaces) brings
its own (:class:`~trl_diffusion_sdpo.safeguards.parameter.ParameterSpaceBackward`), behind the same interface
(:class:`Backward`), so the trainer runs one loop whichever runs::

    for gradient_pass in backward.passes(policy, window):
        with gradient_pass:                       # the exact rule's taps are on inside
            predictions = ...(separate_branches=gradient_pass.separate_branches)
            loss = ...                            # errors -> objective
            gradient_pass.backward(loss, predictions)
    gradient_pass.branches                        # None, or the branches' gradients for the safeguard's hook

The engine's backward takes one pass. The exact rule's takes one too, except at a first micro-batch where a layer
could not split the branches inside it: then a second, one forward and backward per branch, on the same noised pair.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from accelerate.utils import DistributedType

from ..objectives import PreferencePredictions

__all__ = ["Backward", "BackwardWindow", "EngineBackward", "GradientPass"]


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


class _EnginePass:
    """The engine's backward of the loss, averaged over the accumulation window; weight zero for a replay."""

    separate_branches = False
    branches = None

    def __init__(self, accelerator: Any, window: BackwardWindow) -> None:
        self.accelerator, self.window = accelerator, window

    def __enter__(self) -> _EnginePass:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def backward(self, loss: torch.Tensor, predictions: PreferencePredictions) -> None:
        if not self.window.contributes:
            loss = loss * 0.0
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:  # DeepSpeed averages over the window
            self.accelerator.backward(loss / self.window.accumulation_steps, scale_wrt_gas=False)
        else:
            self.accelerator.backward(loss / self.window.accumulation_steps)


class EngineBackward:
    """Diffusion-DPO's backward: one forward pass over both branches through the engine's wrapped model, and the
    engine's backward of the loss (accelerate's ``backward``: its loss scale, DeepSpeed's own accumulation)."""

    through_engine = True

    def __init__(self, accelerator: Any) -> None:
        self.accelerator = accelerator

    def passes(self, policy: torch.nn.Module, window: BackwardWindow) -> Iterator[_EnginePass]:
        yield _EnginePass(self.accelerator, window)

    def __repr__(self) -> str:
        return "EngineBackward()"
