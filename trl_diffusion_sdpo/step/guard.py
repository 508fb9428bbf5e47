"""Stage after the objective: a non-finite loss or gradient never reaches the weights.

The trainer flags a non-finite micro-batch loss, and a non-finite gradient norm (an inf in one gradient element
with a finite loss makes the clip divisor infinite and the update NaN), on the device (:meth:`NonFiniteTracker.flag`);
the tracker turns the flag into a skipped optimizer step (or a checkpoint and an error) without making the host wait
every step. It owns its counters; what it needs of the run (the optimizer, a reduction, a save) it is given.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

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

    Under fp16 with a gradient scaler (``gradient_scaler()`` true) a non-finite gradient norm with a finite loss is an
    ordinary overflow of the scaled gradients: the scaler skips that step and lowers its scale, as it is made to, so
    the tracker leaves it alone (it neither drops the gradients, which would hide the overflow from the scaler, nor
    counts it, nor raises). A non-finite loss is still the tracker's.

    With several processes the flag is summed over processes before every optimizer step, also on a process that
    flagged nothing (it adds 0): every process enters the reduction, and all skip or stop together.

    Args:
        on_nonfinite: ``"skip"`` (warn and go on) or ``"raise"`` (save a checkpoint of the last good state, then
            raise).
        engine_skips: whether the engine already skipped the update (DeepSpeed).
        reduce_sum: sums the flag over processes (``None`` on one process).
        fused_optimizer: returns the fused optimizer that can skip on the device, or ``None``.
        zero_grads: drops every gradient.
        save_checkpoint: saves a checkpoint of the current (last good) state.
        gradient_scaler: whether an fp16 gradient scaler checks the gradients for overflow itself.
        device: where the flag lives (a process with nothing flagged joins the reduction with a zero there).
    """

    def __init__(
        self,
        on_nonfinite: str,
        *,
        engine_skips: bool,
        reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None,
        fused_optimizer: Callable[[], torch.optim.Optimizer | None],
        zero_grads: Callable[[], None],
        save_checkpoint: Callable[[], None],
        gradient_scaler: Callable[[], bool] = lambda: False,
        device: torch.device | str = "cpu",
    ) -> None:
        self.on_nonfinite = on_nonfinite
        self.gradient_scaler, self.device = gradient_scaler, device
        self.engine_skips = engine_skips
        self.reduce_sum = reduce_sum
        self.fused_optimizer = fused_optimizer
        self.zero_grads = zero_grads
        self.save_checkpoint = save_checkpoint
        self.flag_value: torch.Tensor | None = None  # non-finite values seen since the last optimizer step
        self.skipped = 0  # optimizer steps skipped so far, as read by the host
        self.pending: torch.Tensor | None = None  # skips counted on the device, read when logging

    def flag(self, value: torch.Tensor) -> None:
        """Flag ``value`` (a micro-batch loss) if it is not finite; no host sync."""
        self.flag_value = flag_nonfinite(self.flag_value, value)

    def flag_gradient_norm(self, norm: torch.Tensor) -> None:
        """Flag the step's pre-clip gradient ``norm`` if it is not finite (no host sync); under a gradient scaler
        an overflow is the scaler's to skip, not a non-finite step."""
        if not self.gradient_scaler():
            self.flag(norm)

    def reset(self) -> None:
        """Forget what an interrupted earlier ``train()`` left behind in the fused optimizer."""
        fused = self.fused_optimizer()
        if fused is not None:
            fused.grad_scale = fused.found_inf = None

    def before_optimizer_step(self, global_step: int, output_dir: str) -> None:
        flag, self.flag_value = self.flag_value, None
        if self.reduce_sum is not None:  # every process, whatever it flagged: the reduction must be matched
            flag = self.reduce_sum(flag if flag is not None else torch.zeros((), device=self.device))
        elif flag is None:
            return
        if self.engine_skips:
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
            self.zero_grads()
            self._skip(global_step, output_dir)

    def after_optimizer_step(self) -> None:
        # The clip divisor and the skip flag hold for one step only.
        fused = self.fused_optimizer()
        if fused is not None:
            fused.grad_scale = None
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
            self.save_checkpoint()
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
