"""The exact rule's backward inside transformers' step: the passes of a safeguard whose rule needs the winner's and
the loser's gradients apart (the parameter and update spaces; loaded with them only).

Diffusion-DPO's backward, and the output space's, is transformers' own: ``Trainer.training_step`` divides the loss
:meth:`~trl_diffusion_sdpo.trainer.DiffusionSDPOTrainer.compute_loss` returns by the accumulation window and runs the
engine's backward (accelerate's ``backward``: its loss scale, DeepSpeed's own accumulation). The parameter and update
spaces bring a stage of their own (:class:`~trl_diffusion_sdpo.safeguards.parameter.ParameterSpaceBackward`), behind
this interface (:class:`Backward`), whose :meth:`Backward.in_step` gives the trainer the passes to run inside
transformers' step (:class:`PassesInStep`)::

    with stage.in_step(policy, ...) as passes:                # the taps' context: the pass is entered in compute_loss
        loss = super().training_step(model, inputs)           # compute_loss: passes.loss(pairs, forward, contributes)
                                                              # Trainer's backward reaches the pass's backward
    safeguard.combine(passes.branches, optimizer)             # lambda, and g_w + lambda * h_l written

Inside, a pass reads::

    with gradient_pass:                       # the exact rule's taps are on inside
        predictions = ...(separate_branches=gradient_pass.separate_branches)
        loss = ...                            # errors -> objective
        gradient_pass.backward(loss, predictions, scale)
    gradient_pass.branches                    # the branches' gradients for the safeguard's hook

It takes one pass, except at a first micro-batch where a layer could not split the branches inside it: then a second,
one forward and backward per branch, on the same noised pair (run inside the same backward of Trainer's).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..engines.base import PASS_PLACEMENTS
from ..objectives import PreferencePredictions

__all__ = ["Backward", "BackwardWindow", "GradientPass", "PassesInStep"]


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

    def backward(
        self, loss: torch.Tensor, predictions: PreferencePredictions, scale: torch.Tensor | None = None
    ) -> None:
        """Backpropagate ``loss``, formed from ``predictions`` inside this pass, multiplied by ``scale`` (what the
        engine's backward multiplies a loss by; ``None``: the stage's own reckoning of it)."""


class Backward(Protocol):
    """What the trainer asks for a micro-batch's gradients."""

    #: whether the predictions run through the engine's wrapped model (DDP's hooks, DeepSpeed's partitions); else
    #: through the unwrapped denoiser, the backward reducing what the engine would have
    through_engine: bool

    def passes(self, policy: torch.nn.Module, window: BackwardWindow) -> Iterator[GradientPass]:
        """The micro-batch's passes, one at a time (the next only if the last could not form the gradients)."""

    def in_step(
        self,
        policy: torch.nn.Module,
        accumulation_steps: int,
        sync_gradients: bool,
        context: Callable[[], contextlib.AbstractContextManager],
        placement: str,
        combine: Callable[[Any], dict[str, Any]] | None,
    ) -> PassesInStep:
        """The passes of a micro-batch of an accumulation window of ``accumulation_steps`` (``sync_gradients``: the
        window's last) inside transformers' step (:class:`PassesInStep`'s other arguments)."""


#: ``run(separate_branches) -> (evaluation, predictions)``: a pass's forward, errors and objective (compute_loss's
#: part); ``evaluation`` has the loss as ``.loss``, or is the loss
PassForward = Callable[[bool], tuple[Any, PreferencePredictions]]


class _CarriedBackward(torch.autograd.Function):
    """The loss :meth:`PassesInStep.loss` returns: its value is the objective's, and the engine's backward reaching it
    runs the micro-batch's passes with the gradient it hands down (the engine's scale: transformers' division by the
    accumulation window, the fp16 grad scaler's scale), as reentrant activation checkpointing runs its recomputation
    inside a backward. Its only differentiable input is a zero-dim anchor: the passes write the weights' gradients
    themselves (split by branch), so nothing flows from here into the graph."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, anchor: torch.Tensor, run_backward: Callable[[torch.Tensor], None]):
        ctx.run_backward = run_backward
        return value.clone()

    @staticmethod
    def backward(ctx, scale: torch.Tensor):
        ctx.run_backward(scale)
        return None, None, None


class PassesInStep:
    """The exact rule's passes of one micro-batch inside transformers' ``Trainer.training_step``.

    The trainer enters it around ``super().training_step`` (the taps' context). Its ``compute_loss`` calls
    :meth:`loss`, which enters the first pass and runs its forward (compute_loss's own, handed in); the loss it
    returns carries the pass's backward, which the engine's backward in Trainer's step runs, with the engine's scale.
    Where the first micro-batch's one pass could not split the branches, the per-branch passes follow inside that same
    backward, on the same noised pair. Afterwards :attr:`branches` holds the branches' gradients for the safeguard's
    hook, and :attr:`evaluation` the micro-batch's errors and objective.

    This is the one place the exact rule meets Trainer's backward: a safeguard stage needs the backward split by
    branch and ``lambda`` chosen between the backward and the optimizer, and Trainer offers no public hook between its
    ``accelerator.backward`` and the step, so the loss carries the split backward (see :class:`_CarriedBackward`).

    Args:
        backward: the safeguard's stage.
        policy: the module the passes run (the unwrapped denoiser unless the stage runs through the engine).
        window: the micro-batch's place in its accumulation window (its ``pairs`` set by :meth:`loss`).
        context: entered around each pass's forward and backward (``Trainer.compute_loss_context_manager``).
        placement: where the passes run, the engine's :attr:`~trl_diffusion_sdpo.engines.base.Engine.passes_placement`
            (:data:`~trl_diffusion_sdpo.engines.base.PASS_PLACEMENTS`): ``"in_backward"``, inside the engine's
            backward of Trainer's step, with its scale; ``"in_compute_loss"``, right after the forward with the
            stage's own scale, the loss then carrying nothing (FSDP); ``"with_combination"``, in ``compute_loss``
            followed by ``combine``, the engine's last backward of the micro-batch deferred (the stage's
            ``engine_backward_deferred``) and carried by the loss into Trainer's ``accelerator.backward``, which steps
            the engine (DeepSpeed).
        combine: the safeguard's hook, needed by ``"with_combination"`` (else the trainer runs it after Trainer's
            step).
    """

    def __init__(
        self,
        backward: Backward,
        policy: torch.nn.Module,
        window: BackwardWindow,
        context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        placement: str = "in_backward",
        combine: Callable[[Any], dict[str, Any]] | None = None,
    ) -> None:
        if placement not in PASS_PLACEMENTS:
            raise ValueError(f"placement must be one of {sorted(PASS_PLACEMENTS)}, got {placement!r}")
        if (placement == "with_combination") != (combine is not None):
            raise ValueError("the 'with_combination' placement, and it alone, takes the safeguard's hook (combine)")
        self.backward, self.policy, self.window, self.context = backward, policy, window, context
        self.placement, self.combine = placement, combine
        #: with ``combine``: what the hook returned (``lambda`` by metric name)
        self.lambdas: dict[str, Any] | None = None
        #: after the step, the branches' gradients for the safeguard's hook
        self.branches: Any = None
        #: what the micro-batch's forward last returned besides its predictions (``None``: :meth:`loss` never ran)
        self.evaluation: Any = None
        self._passes: Iterator[GradientPass] | None = None
        self._open: GradientPass | None = None
        self._forward: PassForward | None = None
        self._formed: tuple[torch.Tensor, PreferencePredictions] | None = None

    def __enter__(self) -> PassesInStep:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._open is not None:  # an error between the forward and the backward: the pass's context closed
            gradient_pass, self._open = self._open, None
            gradient_pass.__exit__(*exc)

    def loss(self, pairs: int, forward: PassForward, contributes: bool = True) -> torch.Tensor:
        """The first pass entered and its forward run (``forward(separate_branches)``) on a micro-batch of ``pairs``
        (``contributes=False``: a zero-weighted replay); the returned loss, of the objective's value, carries the
        passes' backward."""
        self.window = dataclasses.replace(self.window, pairs=pairs, contributes=contributes)
        self._passes, self._forward = self.backward.passes(self.policy, self.window), forward
        self._run(next(self._passes))
        loss = self._loss_of(self._formed[0])
        anchor = torch.zeros((), device=loss.device, requires_grad=True)
        if self.placement == "with_combination":  # the engine steps in its backward: its last one is Trainer's
            with self.backward.engine_backward_deferred() as deferred:
                self._backward(None)
                self.lambdas = self.combine(self.branches)
            carried = _CarriedBackward.apply(loss.detach(), anchor, lambda scale: None)
            # Trainer divides the loss by the window, which the passes' scale holds already: multiplied back
            return carried + sum(s - s.detach() for s in deferred) * self.window.accumulation_steps
        if self.placement == "in_compute_loss":
            self._backward(None)  # now, with the stage's own scale
            return _CarriedBackward.apply(loss.detach(), anchor, lambda scale: None)
        # the loss's value only: its graph is the passes' to backpropagate, never the engine's
        return _CarriedBackward.apply(loss.detach(), anchor, self._backward)

    def _run(self, gradient_pass: GradientPass) -> None:
        gradient_pass.__enter__()
        self._open = gradient_pass
        with torch.enable_grad(), self.context():  # inside a backward (a fallback pass) grad mode is off
            self._formed = self._forward(gradient_pass.separate_branches)
        self.evaluation = self._formed[0]

    @staticmethod
    def _loss_of(evaluation: Any) -> torch.Tensor:
        return getattr(evaluation, "loss", evaluation)

    def _backward(self, scale: torch.Tensor | None) -> None:
        while True:
            gradient_pass, (evaluation, predictions) = self._open, self._formed
            with self.context():
                gradient_pass.backward(self._loss_of(evaluation), predictions, scale)
            self._open, self._formed = None, None
            gradient_pass.__exit__(None, None, None)
            if gradient_pass.branches is not None:
                self.branches = gradient_pass.branches
                return
            following = next(self._passes, None)
            if following is None:
                raise RuntimeError("the safeguard's backward stage formed no gradients for the micro-batch")
            self._run(following)
