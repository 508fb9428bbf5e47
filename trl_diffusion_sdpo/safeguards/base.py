"""The interface every safeguard implements: how one micro-batch's predictions become its gradient.

The trainer chooses a safeguard once (:func:`~trl_diffusion_sdpo.safeguards.safeguard_for`), as it chooses its
engine, and from then on one training step reads::

    batch -> noised pair -> safeguard.step(micro_batch) -> non-finite guard -> metrics
                            (predictions -> errors -> objective -> lambda -> backward)

A safeguard owns what differs between Diffusion-DPO and the safeguarded variants: how the predictions are taken (one
forward pass, or the branches kept apart), when ``lambda`` is chosen (before the objective, on the predictions; or
after the backward, on the parameter gradients or the optimizer's update), the backward itself, its checks against the
config and the engine, and the metrics it records. It never calls back into the trainer: everything a step needs
comes in the :class:`MicroBatch`, and what it computed goes back in the :class:`StepResult`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
from accelerate.utils import DistributedType

from ..engines import Engine
from ..objectives import DenoisingErrors, ObjectiveOutput, PreferenceObjective, PreferencePredictions
from ..step.predictions import Evaluation, evaluate_objective
from ..step.stages import MicroBatchStages, NoisedMicroBatch
from .margin import SafeguardMargin

if TYPE_CHECKING:
    from ..config import DiffusionSDPOConfig

__all__ = ["MicroBatch", "Safeguard", "StepResult"]


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch, up to its noised pair, as a safeguard receives it: data, and the two stages a safeguard runs
    on it (:meth:`predict`, :meth:`evaluate`), which call :mod:`trl_diffusion_sdpo.step.stages` with these fields.

    Attributes:
        model: the denoiser the predictions run through: the engine's wrapped model where the safeguard's
            :attr:`~Safeguard.engine_backward` is true, else the unwrapped denoiser.
        stages: the step's stages (the family, the reference), which predict on ``noised``.
        noised: the micro-batch's noised pair, prompt embeddings and time ids.
        objective: the preference objective.
        pair_scores: the pairs' scores, for objectives that weight by them (SmPO), else ``None``.
        contributes: ``False`` for a zero-weighted replay: a process whose micro-batch lost every row joins its
            peers' collectives and adds nothing.
        accumulation_steps: micro-batches in this accumulation window (the backward averages over them).
        sync_gradients: whether this micro-batch closes the accumulation window.
        optimizer: the training optimizer (read, never changed, by the update space).
    """

    model: torch.nn.Module
    stages: MicroBatchStages
    noised: NoisedMicroBatch
    objective: PreferenceObjective
    pair_scores: torch.Tensor | None = None
    contributes: bool = True
    accumulation_steps: int = 1
    sync_gradients: bool = True
    optimizer: torch.optim.Optimizer | None = None

    @property
    def pairs(self) -> int:
        """The micro-batch's number of pairs."""
        return self.noised.num_pairs

    def predict(self, separate_branches: bool) -> PreferencePredictions:
        """The policy's (and the reference's) predictions on the noised pair: one forward pass over both branches,
        or one per branch. Called twice, it predicts the same noised pair."""
        return self.stages.predict_noised(self.model, self.noised, separate_branches)

    def evaluate(self, predictions: PreferencePredictions, errors: DenoisingErrors | None = None) -> Evaluation:
        """Errors and objective on ``predictions`` (``errors``: formed by the caller, as the output space does)."""
        return evaluate_objective(self.objective, predictions, self.pair_scores, errors)


@dataclass(frozen=True)
class StepResult:
    """What a safeguard's step computed: the micro-batch's loss (detached, not yet averaged over the accumulation
    window), its errors and objective output, and each ``lambda`` it records by metric name."""

    loss: torch.Tensor
    errors: DenoisingErrors
    output: ObjectiveOutput
    lambdas: dict[str, torch.Tensor | None] = field(default_factory=dict)


class Safeguard:
    """How a micro-batch's gradient is formed from its two branches; as it stands, none: Diffusion-DPO's gradient.
    A safeguard subclasses it, sets :attr:`name`, :attr:`metric_names` and :attr:`engine_backward`, and overrides
    :meth:`step`.

    Args:
        args: the training's ``DiffusionSDPOConfig`` (``safeguard_mu``, ``safeguard_max_lambda``,
            ``safeguard_scope`` and the rest of the fields a safeguard reads).
        engine: the training engine; its accelerator runs the plain backward.
    """

    #: the ``safeguard_space`` it implements (``"none"``: Diffusion-DPO)
    name: ClassVar[str] = "base"
    #: the metrics its steps record, the same on every process (they are reduced together)
    metric_names: ClassVar[tuple[str, ...]] = ()
    #: ``True``: the predictions run through the engine's wrapped model and its backward (DDP's hooks, DeepSpeed's
    #: partitions); ``False``: through the unwrapped denoiser, the safeguard reducing what the engine would have
    engine_backward: ClassVar[bool] = True

    def __init__(self, args: DiffusionSDPOConfig, engine: Engine) -> None:
        self.args = args
        self.engine = engine
        #: ``mu``, fixed or ``"auto"`` (:mod:`.margin`): the rules read it at every micro-batch
        self.margin = SafeguardMargin.from_config(args, engine.num_processes)

    def step(self, batch: MicroBatch) -> StepResult:
        """Predict, evaluate the objective, choose ``lambda`` and add this micro-batch's gradient to ``.grad``.

        Here Diffusion-DPO's: one forward pass, the objective, the engine's backward, no ``lambda``."""
        evaluation = batch.evaluate(batch.predict(False))
        self.backward(evaluation.loss, batch)
        return StepResult(evaluation.loss.detach(), evaluation.errors, evaluation.output)

    def evaluation_lambdas(self, predictions: PreferencePredictions, contributes: bool) -> dict[str, torch.Tensor]:
        """The ``lambda`` an evaluation micro-batch records (no backward runs there); none by default."""
        return {}

    def backward(self, loss: torch.Tensor, batch: MicroBatch) -> None:
        """The engine's backward of ``loss`` averaged over the accumulation window (as ``transformers.Trainer``
        does it: DeepSpeed averages itself), with weight zero for a replay."""
        if not batch.contributes:
            loss = loss * 0.0
        accelerator = self.engine.accelerator
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            accelerator.backward(loss / batch.accumulation_steps, scale_wrt_gas=False)
        else:
            accelerator.backward(loss / batch.accumulation_steps)

    def backward_scale(self, batch: MicroBatch, device: torch.device) -> torch.Tensor:
        """What the engine's backward multiplies a loss by: the accumulation average and the fp16 grad scaler's
        current scale (a device tensor: no host sync)."""
        scale = torch.full((), 1.0 / batch.accumulation_steps, device=device)
        scaler = self.engine.accelerator.scaler
        return scale if scaler is None else scaler.scale(scale)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
