"""Stage after the objective: a non-finite loss never reaches the weights.

The trainer flags a non-finite micro-batch loss on the device; :class:`NonFiniteLossGuard` turns the flag into a
skipped optimizer step (or a checkpoint and an error) without making the host wait every step.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .optimizer import fused_scaling_optimizer

if TYPE_CHECKING:
    from ..trainer import DiffusionSDPOTrainer

__all__ = ["NonFiniteLossGuard"]

logger = logging.getLogger(__name__)


class NonFiniteLossGuard(TrainerCallback):
    """Keeps gradients of a non-finite loss away from the optimizer.

    The trainer flags a non-finite micro-batch loss on the device. With a fused optimizer (torch's fused AdamW, the
    default) and ``on_nonfinite_loss="skip"`` the flag goes to the optimizer as ``found_inf`` and its fused kernel
    skips the whole update on the device, so the host never waits; the skips are counted on the device and read
    when logging. Otherwise the flag is read just before the optimizer step, and if set every gradient is dropped
    (``grad = None``). Either way the step is a no-op for all parameters: no moment update, no weight decay.
    """

    def __init__(self, trainer: DiffusionSDPOTrainer) -> None:
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        flag = trainer._nonfinite_flag
        if flag is None:
            return
        trainer._nonfinite_flag = None
        if trainer.accelerator.num_processes > 1:
            flag = trainer.accelerator.reduce(flag, reduction="sum")
        if trainer.is_deepspeed_enabled:
            # DeepSpeed has already stepped, inside backward, and skipped the update: a non-finite loss makes the
            # gradient norm non-finite, which its ZeRO optimizers treat as an overflow. Count it, or stop.
            if bool(flag.item() > 0):
                trainer._nonfinite_skipped += 1
                self._stop_or_warn(args, state)
            return
        fused = fused_scaling_optimizer(trainer.optimizer, trainer.accelerator)
        if fused is not None and args.on_nonfinite_loss == "skip":
            skipped = (flag > 0).float()
            fused.found_inf = skipped
            pending = trainer._nonfinite_skipped_pending
            trainer._nonfinite_skipped_pending = skipped if pending is None else pending + skipped
            return
        if not bool(flag.item() > 0):
            return
        trainer.model.zero_grad(set_to_none=True)
        trainer._nonfinite_skipped += 1
        self._stop_or_warn(args, state)

    def _stop_or_warn(self, args, state) -> None:
        trainer = self.trainer
        if args.on_nonfinite_loss == "raise":
            trainer._save_checkpoint(trainer.model, trial=None)
            raise RuntimeError(
                f"Non-finite loss at optimizer step {state.global_step + 1}; the update was not applied and a "
                f"checkpoint of the last good state was saved in {args.output_dir}/{PREFIX_CHECKPOINT_DIR}-"
                f"{state.global_step}. Lower the learning rate or beta, check the data, or set "
                "on_nonfinite_loss='skip'."
            )
        logger.warning(
            "Non-finite loss: optimizer step %d skipped (%d so far)", state.global_step + 1, trainer._nonfinite_skipped
        )

    def on_optimizer_step(self, args, state, control, **kwargs):
        # The clip divisor and the skip flag hold for one step only.
        fused = fused_scaling_optimizer(self.trainer.optimizer, self.trainer.accelerator)
        if fused is not None:
            fused.grad_scale = None
            fused.found_inf = None
