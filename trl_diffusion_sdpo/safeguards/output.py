"""Diffusion-DPO without a safeguard, and the authors' output-space rule.

Both take the predictions in one forward pass and leave the backward to the engine. The output space chooses
``lambda`` on the policy's residuals before the objective
(:func:`~trl_diffusion_sdpo.step.safeguard.output_space_lambda`) and scales the gradient of the loser's error by it
(:func:`~trl_diffusion_sdpo.step.safeguard.scale_gradient`).
"""

from __future__ import annotations

import torch

from ..distributed import all_reduce_sum
from ..objectives import PreferencePredictions
from ..step.safeguard import output_space_lambda
from .base import MicroBatch, Safeguard, StepResult
from .margin import SafeguardMargin

__all__ = ["DiffusionDPO", "OutputSpace", "OutputSpaceRule"]


class DiffusionDPO(Safeguard):
    """No safeguard (``safeguard=False``): the objective's gradient as it is (the base class's step)."""

    name = "none"


class OutputSpaceRule:
    """The authors' ``lambda`` with the config's margin, cap and scope: with ``safeguard_scope="global"`` on several
    processes its sums are added up over processes first (every process enters that reduction at every micro-batch;
    a replay adds zeros)."""

    def __init__(self, args, num_processes: int, margin: SafeguardMargin | None = None) -> None:
        self.margin = margin if margin is not None else SafeguardMargin.from_config(args, num_processes)
        self.max_lambda = args.safeguard_max_lambda
        self.reduce_sum = all_reduce_sum if args.safeguard_scope == "global" and num_processes > 1 else None

    @property
    def mu(self) -> float | torch.Tensor:
        return self.margin.value

    def __call__(self, predictions: PreferencePredictions, contributes: bool) -> torch.Tensor:
        return output_space_lambda(predictions, self.mu, self.max_lambda, self.reduce_sum, contributes=contributes)


class OutputSpace(Safeguard):
    """``safeguard_space="output"``: ``lambda`` from the residuals, the loser error's gradient scaled by it."""

    name = "output"
    metric_names = ("safeguard/lambda",)

    def __init__(self, args, engine) -> None:
        super().__init__(args, engine)
        self.rule = OutputSpaceRule(args, engine.num_processes, self.margin)

    def step(self, batch: MicroBatch) -> StepResult:
        predictions = batch.predict(False)
        lam = self.rule(predictions, batch.contributes)
        evaluation = batch.evaluate(predictions, loser_scale=lam)
        self.backward(evaluation.loss, batch)
        return StepResult(evaluation.loss.detach(), evaluation.errors, evaluation.output, {"safeguard/lambda": lam})

    def evaluation_lambdas(self, predictions: PreferencePredictions, contributes: bool) -> dict[str, torch.Tensor]:
        return {"safeguard/lambda": self.rule(predictions, contributes)}
