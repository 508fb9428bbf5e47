"""Stage after the objective: a non-finite loss or gradient never reaches the weights.

The trainer flags a non-finite micro-batch loss, and a non-finite gradient norm (an inf in one gradient element
with a finite loss makes the clip divisor infinite and the update NaN), on the device with :func:`flag_nonfinite`;
:class:`NonFiniteLossGuard` turns the flag into a skipped optimizer step (or a checkpoint and an error) without
making the host wait every step.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .optimizer import fused_scaling_optimizer

if TYPE_CHECKING:
    from ..trainer import DiffusionSDPOTrainer

__all__ = ["NonFiniteLossGuard", "flag_nonfinite"]

logger = logging.getLogger(__name__)


def flag_nonfinite(flag: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    """``flag + (value is NaN or infinite)``, a float32 device tensor (``flag`` ``None`` counts as 0); no host sync.

    An FSDP2 gradient norm is a DTensor: its full value is used (a plain tensor, which the guard can all-reduce)."""
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    new = (~torch.isfinite(value.detach())).any().float()
    return new if flag is None else flag + new.to(flag.device)


class NonFiniteLossGuard(TrainerCallback):
    """Keeps gradients of a non-finite loss, or non-finite gradients, away from the optimizer.

    The trainer flags a non-finite micro-batch loss and a non-finite gradient norm on the device. With a fused
    optimizer (torch's fused AdamW, the default) and ``on_nonfinite_loss="skip"`` the flag goes to the optimizer as
    ``found_inf`` and its fused kernel skips the whole update on the device, so the host never waits; the skips are
    counted on the device and read when logging. Otherwise the flag is read just before the optimizer step, and if
    set every gradient is dropped (``grad = None``). Either way the step is a no-op for all parameters: no moment
    update, no weight decay.
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
                f"Non-finite loss or gradient norm at optimizer step {state.global_step + 1}; the update was not "
                f"applied and a checkpoint of the last good state was saved in "
                f"{args.output_dir}/{PREFIX_CHECKPOINT_DIR}-{state.global_step}. Lower the learning rate or beta, "
                "check the data, or set "
                "on_nonfinite_loss='skip'."
            )
        logger.warning(
            "Non-finite loss or gradient norm: optimizer step %d skipped (%d so far)",
            state.global_step + 1,
            trainer._nonfinite_skipped,
        )

    def on_optimizer_step(self, args, state, control, **kwargs):
        # The clip divisor and the skip flag hold for one step only.
        fused = fused_scaling_optimizer(self.trainer.optimizer, self.trainer.accelerator)
        if fused is not None:
            fused.grad_scale = None
            fused.found_inf = None
