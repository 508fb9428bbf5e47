"""The exact rule: ``lambda`` from the parameter gradients of the two branches, or from the optimizer's update.

``safeguard_space="parameter"`` chooses ``lambda`` so that ``<g_w, g_w + lambda h_l> >= mu |g_w|^2`` on the
trainable weights' gradients (per micro-batch, per process or for the global micro-batch; or per pair with
``safeguard_scope="pair"``); ``safeguard_space="update"`` so that the optimizer's actual update keeps the winner's
error from rising to first order. Both run the backward themselves
(:class:`~trl_diffusion_sdpo.step.parameter_space.ParameterSpaceBackward`: one pass with the branches split inside it,
or one pass per branch) on the unwrapped denoiser, and reduce over processes what the engine's own backward would
have. Each step also records the authors' output-space ``lambda`` on the same micro-batch, for comparison.
"""

from __future__ import annotations

import torch

from ..step.parameter_space import PAIR_SCOPE_MAX_FULL_BYTES, ParameterSpaceBackward, pair_scope_memory_bytes
from .base import MicroBatch, Safeguard, StepResult
from .output import OutputSpaceRule

__all__ = ["ParameterSpace", "UpdateSpace", "check_pair_scope_memory"]


def check_pair_scope_memory(args, *, lora: bool, trainable_elements: int) -> None:
    """Refuse the per-pair scope for full tuning whose per-image gradients would take more than
    :data:`~trl_diffusion_sdpo.step.parameter_space.PAIR_SCOPE_MAX_FULL_BYTES`, stating that figure."""
    pairs = args.per_device_train_batch_size
    need = pair_scope_memory_bytes(trainable_elements, pairs)
    if args.safeguard_scope == "pair" and not lora and need > PAIR_SCOPE_MAX_FULL_BYTES:
        raise ValueError(
            f"safeguard_scope='pair' keeps one float32 gradient of the trainable weights per image: 2 x {pairs} x "
            f"{trainable_elements:,} weights = {need / 2**30:.1f} GiB for full tuning here (SD1.5's UNet at 4 "
            f"pairs: 25.6 GiB; full tuning is accepted up to {PAIR_SCOPE_MAX_FULL_BYTES / 2**30:g} GiB). Train "
            "LoRA adapters (peft_config) with it, or use safeguard_scope='local'."
        )


class ParameterSpace(Safeguard):
    """``safeguard_space="parameter"``: ``lambda`` from ``<g_w, g_w>`` and ``<g_w, h_l>``.

    Args:
        lora: whether LoRA adapters are trained (the per-pair scope's memory check).
        trainable_elements: the number of trainable weights (the same check).
    """

    name = "parameter"
    metric_names = ("safeguard/lambda", "safeguard/output_lambda")
    engine_backward = False
    update_space = False

    def __init__(self, args, engine, *, lora: bool = True, trainable_elements: int = 0) -> None:
        super().__init__(args, engine)
        check_pair_scope_memory(args, lora=lora, trainable_elements=trainable_elements)
        self.backward_stage = ParameterSpaceBackward(
            engine,
            args.safeguard_mu,
            args.safeguard_max_lambda,
            args.safeguard_scope == "global",
            update_space=self.update_space,
            max_grad_norm=args.max_grad_norm,
            pair_scope=args.safeguard_scope == "pair",
            passes=args.safeguard_passes,
        )
        self.output_rule = OutputSpaceRule(args, engine.num_processes)

    def step(self, batch: MicroBatch) -> StepResult:
        evaluation, lam, predictions = self.backward_stage(
            batch.model,
            batch.predict,
            batch.evaluate,
            self.backward_scale(batch, self.engine.accelerator.device),
            contributes=batch.contributes,
            sync_gradients=batch.sync_gradients,
            optimizer=batch.optimizer,
            pairs=batch.pairs,
        )
        # Every process enters this reduction (the global scope), replays included.
        output_lambda = self.output_rule(predictions, batch.contributes)
        lambdas = self._lambdas(lam, output_lambda)
        return StepResult(evaluation.loss.detach(), evaluation.errors, evaluation.output, lambdas)

    def _lambdas(self, lam: torch.Tensor, output_lambda: torch.Tensor) -> dict[str, torch.Tensor | None]:
        return {"safeguard/lambda": lam, "safeguard/output_lambda": output_lambda}


class UpdateSpace(ParameterSpace):
    """``safeguard_space="update"``: ``lambda`` chosen on the optimizer's update of ``g_w + lambda h_l``."""

    name = "update"
    metric_names = (*ParameterSpace.metric_names, "safeguard/update_infeasible")
    update_space = True

    def _lambdas(self, lam: torch.Tensor, output_lambda: torch.Tensor) -> dict[str, torch.Tensor | None]:
        return {**super()._lambdas(lam, output_lambda), "safeguard/update_infeasible": self.backward_stage.infeasible}
