"""Stage after the objective: a non-finite loss or gradient never reaches the weights.

The trainer flags a non-finite micro-batch loss, and a non-finite gradient norm (an inf in one gradient element
with a finite loss makes the clipped gradients and the update NaN), on the device (:meth:`NonFiniteTracker.flag`);
the tracker turns the flag into a skipped optimizer step (or a checkpoint and an error) without making the host wait
every step. It owns its counters; it is given the run's engine, accelerator and optimizer, and what saves a checkpoint.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..engines.base import fused_scaling_optimizer

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ..engines import Engine

__all__ = ["NonFiniteLossGuard", "NonFiniteTracker", "flag_nonfinite"]

logger = logging.getLogger(__name__)


def flag_nonfinite(flag: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    """``flag + (value is NaN or infinite)``, a float32 device tensor (``flag`` ``None`` counts as 0); no host sync.

    An FSDP2 gradient norm is a DTensor: its full value is used (a plain tensor, which the guard can all-reduce)."""
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    new = (~torch.isfinite(value.detach())).any().float()
    return new if flag is None else flag + new.to(flag.device)


class NonFiniteTracker:
    """Keeps gradients of a non-finite loss, or non-finite gradients, away from the optimizer, and counts the skips.

    With a fused optimizer (torch's fused AdamW, the default) and ``on_nonfinite="skip"`` the flag goes to the
    optimizer as ``found_inf`` and its fused kernel skips the whole update on the device, so the host never waits;
    the skips are counted on the device and read when logging (:meth:`take_skipped`). Otherwise the flag is read just
    before the optimizer step, and if set every gradient is dropped. Either way the step is a no-op for all
    parameters: no moment update, no weight decay. Where the engine skips overflowing steps itself (DeepSpeed), the
    tracker only counts.

    Under fp16 with a gradient scaler (``accelerator.scaler``) a non-finite gradient norm with a finite loss is an
    ordinary overflow of the scaled gradients: the scaler skips that step and lowers its scale, as it is made to, so
    the tracker leaves it alone (it neither drops the gradients, which would hide the overflow from the scaler, nor
    counts it, nor raises). A non-finite loss is still the tracker's.

    With several processes the flag is summed over processes before every optimizer step, also on a process that
    flagged nothing (it adds 0): every process enters the reduction, and all skip or stop together.

    Args:
        on_nonfinite: ``"skip"`` (warn and go on) or ``"raise"`` (save a checkpoint of the last good state, then
            raise).
        engine: the run's engine: whether it skips non-finite updates itself (DeepSpeed), or manages the gradients
            (then no fused skip).
        accelerator: the run's accelerator: its processes (the flag's reduction), gradient scaler and device.
        checkpoints: what saves a checkpoint of the current (last good) state: ``checkpoints.save_checkpoint()``
            (the trainer's :class:`~trl_diffusion_sdpo.io.run_files.RunFiles`).

    The optimizer is handed over when the trainer creates it (:attr:`optimizer`): a flagged step's gradients are
    dropped through it (its parameters are the trained ones), and its fused step skips the update on the device.
    """

    def __init__(self, on_nonfinite: str, engine: Engine, accelerator: Accelerator, checkpoints: Any) -> None:
        self.on_nonfinite = on_nonfinite
        self.engine, self.accelerator, self.checkpoints = engine, accelerator, checkpoints
        self.optimizer: torch.optim.Optimizer | None = None  # set by the trainer's create_optimizer
        self.flag_value: torch.Tensor | None = None  # non-finite values seen since the last optimizer step
        self.skipped = 0  # optimizer steps skipped so far, as read by the host
        self.pending: torch.Tensor | None = None  # skips counted on the device, read when logging

    def fused_optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer whose fused step takes ``found_inf`` (:mod:`~trl_diffusion_sdpo.engines.base`), or None."""
        return fused_scaling_optimizer(self.optimizer, self.accelerator.scaler, self.engine.manages_gradients)

    def flag(self, value: torch.Tensor) -> None:
        """Flag ``value`` (a micro-batch loss) if it is not finite; no host sync."""
        self.flag_value = flag_nonfinite(self.flag_value, value)

    def flag_gradient_norm(self, norm: torch.Tensor) -> None:
        """Flag the step's pre-clip gradient ``norm`` if it is not finite (no host sync); under a gradient scaler
        an overflow is the scaler's to skip, not a non-finite step."""
        if self.accelerator.scaler is None:
            self.flag(norm)

    def reset(self) -> None:
        """Forget what an interrupted earlier ``train()`` left behind in the fused optimizer."""
        fused = self.fused_optimizer()
        if fused is not None:
            fused.found_inf = None

    def before_optimizer_step(self, global_step: int, output_dir: str) -> None:
        flag, self.flag_value = self.flag_value, None
        if self.accelerator.num_processes > 1:  # every process, whatever it flagged: the reduction must be matched
            flag = flag if flag is not None else torch.zeros((), device=self.accelerator.device)
            flag = self.accelerator.reduce(flag, reduction="sum")
        elif flag is None:
            return
        if self.engine.skips_nonfinite_steps:
            # DeepSpeed has already stepped, inside backward, and skipped the update: a non-finite loss makes the
            # gradient norm non-finite, which its ZeRO optimizers treat as an overflow. Count it, or stop.
            if bool(flag.item() > 0):
                self._skip(global_step, output_dir)
            return
        fused = self.fused_optimizer()
        if fused is not None and self.on_nonfinite == "skip":
            skipped = (flag > 0).float()
            fused.found_inf = skipped
            self.pending = skipped if self.pending is None else self.pending + skipped
            return
        if bool(flag.item() > 0):
            self.optimizer.zero_grad(set_to_none=True)  # the trained weights' gradients: nothing is applied
            self._skip(global_step, output_dir)

    def after_optimizer_step(self) -> None:
        # The skip flag holds for one step only.
        fused = self.fused_optimizer()
        if fused is not None:
            fused.found_inf = None

    def take_skipped(self) -> int:
        """Read the skips counted on the device since the last call (one host sync, when logging); the total."""
        pending, self.pending = self.pending, None
        skipped = 0 if pending is None else round(float(pending.item()))
        if skipped:
            self.skipped += skipped
            logger.warning(
                "Non-finite loss or gradient norm: %d optimizer step(s) skipped since the last log (%d so far)",
                skipped,
                self.skipped,
            )
        return self.skipped

    def _skip(self, global_step: int, output_dir: str) -> None:
        self.skipped += 1
        if self.on_nonfinite == "raise":
            self.checkpoints.save_checkpoint()
            raise RuntimeError(
                f"Non-finite loss or gradient norm at optimizer step {global_step + 1}; the update was not applied "
                f"and a checkpoint of the last good state was saved in "
                f"{output_dir}/{PREFIX_CHECKPOINT_DIR}-{global_step}. Lower the learning rate or beta, check the "
                "data, or set on_nonfinite_loss='skip'."
            )
        logger.warning(
            "Non-finite loss or gradient norm: optimizer step %d skipped (%d so far)", global_step + 1, self.skipped
        )


class NonFiniteLossGuard(TrainerCallback):
    """Calls a :class:`NonFiniteTracker` around every optimizer step."""

    def __init__(self, tracker: NonFiniteTracker) -> None:
        self.tracker = tracker

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.tracker.before_optimizer_step(state.global_step, args.output_dir)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.tracker.after_optimizer_step()
