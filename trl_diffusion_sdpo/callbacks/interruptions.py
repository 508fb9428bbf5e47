"""What interrupts a step or a run, each decided from flags reduced over every process before it acts:

* a non-finite loss or gradient never reaches the weights: the trainer flags a non-finite micro-batch loss on the
  device (:meth:`NonFiniteTracker.flag`), the tracker flags non-finite gradients just before the optimizer step (an
  inf in one gradient element with a finite loss makes the clipped gradients and the update NaN), and turns the flags
  into a skipped optimizer step (or a checkpoint and an error) without making the host wait every step
  (:class:`NonFiniteLossGuard`);
* a data stream that yields too few valid pairs stops the run, its counts summed over processes
  (:class:`StreamGuard`).

A signal's checkpoint and stop, :class:`~.preemption.PreemptionCallback`, lives in :mod:`.preemption`, which only a run
that uses it loads.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..data.validation import DataError
from ..engines.base import fused_scaling_optimizer, local_gradient_norm, optimizer_parameters

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import Trainer

    from ..data.validation import DataReport
    from ..engines import Engine

__all__ = [
    "dropped_at_preparation",
    "flag_nonfinite",
    "NonFiniteLossGuard",
    "NonFiniteTracker",
    "NoValidPairsError",
    "stop_threshold",
    "StreamGuard",
]

logger = logging.getLogger(__name__)


def flag_nonfinite(flag: torch.Tensor | None, value: torch.Tensor) -> torch.Tensor:
    """``flag + (value is NaN or infinite)``, a float32 device tensor (``flag`` ``None`` counts as 0); no host sync.

    An FSDP2 gradient norm is a DTensor: its full value is used (a plain tensor, which the guard can all-reduce)."""
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    new = (~torch.isfinite(value.detach())).any().float()
    return new if flag is None else flag + new.to(flag.device)


def hand_found_inf(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """Have ``optimizer``'s next fused step skip its update where ``found_inf`` (a float32 scalar on the device) is
    not 0: weights, moments, weight decay and step counts are left as they were, with no host sync.

    This is torch's protocol between its gradient scaler and the optimizers that declare
    ``_step_supports_amp_scaling`` (the fused Adam, AdamW and SGD): ``GradScaler.step`` in
    ``torch/amp/grad_scaler.py`` sets ``optimizer.found_inf`` before ``optimizer.step()`` and deletes it after (its
    comment and FutureWarning state the contract), and ``Adam.step`` in ``torch/optim/adam.py`` (``SGD.step`` in
    ``torch/optim/sgd.py``) passes ``getattr(self, "found_inf", None)`` to the fused kernel. The optimizer comes from
    :func:`~trl_diffusion_sdpo.engines.base.fused_scaling_optimizer`, which returns none where a gradient scaler
    already uses the attribute. :func:`take_found_inf` ends it after the step, as ``GradScaler.step`` does."""
    optimizer.found_inf = found_inf


def take_found_inf(optimizer: torch.optim.Optimizer) -> None:
    """Remove what :func:`hand_found_inf` gave ``optimizer`` (nothing where it gave none): its next step applies."""
    with contextlib.suppress(AttributeError):
        del optimizer.found_inf


class NonFiniteTracker:
    """Keeps gradients of a non-finite loss, or non-finite gradients, away from the optimizer, and counts the skips.

    With a fused optimizer (torch's fused AdamW, the default) and ``on_nonfinite="skip"`` the flag goes to the
    optimizer as ``found_inf``, as ``torch.amp.GradScaler`` hands it (:func:`hand_found_inf`), and its fused kernel
    skips the whole update on the device, so the host never waits;
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

    def flag_gradients(self) -> None:
        """Flag the step's gradients (of the optimizer's parameters, this process's part of each) if any element is
        not finite (no host sync). Read after transformers' clipping, which turns a non-finite norm into non-finite
        gradients (an inf element times a zero factor, or a NaN factor). Under a gradient scaler an overflow is the
        scaler's to skip, not a non-finite step; DeepSpeed has stepped already, and skips an overflow itself."""
        if self.accelerator.scaler is None and not self.engine.skips_nonfinite_steps and self.optimizer is not None:
            self.flag(local_gradient_norm(optimizer_parameters(self.optimizer)))

    def reset(self) -> None:
        """Forget what an interrupted earlier ``train()`` left behind in the fused optimizer."""
        fused = self.fused_optimizer()
        if fused is not None:
            take_found_inf(fused)

    def before_optimizer_step(self, global_step: int, output_dir: str) -> None:
        self.flag_gradients()
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
            hand_found_inf(fused, skipped)
            self.pending = skipped if self.pending is None else self.pending + skipped
            return
        if bool(flag.item() > 0):
            self.optimizer.zero_grad(set_to_none=True)  # the trained weights' gradients: nothing is applied
            self._skip(global_step, output_dir)

    def after_optimizer_step(self) -> None:
        # The skip flag holds for one step only.
        fused = self.fused_optimizer()
        if fused is not None:
            take_found_inf(fused)

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


logger = logging.getLogger(__name__)

_MIN_ROWS_BEFORE_STOP = 32


class NoValidPairsError(DataError, RuntimeError):
    """The training stream yields no valid preference pair."""


def stop_threshold(rows_per_step: int) -> int:
    """How many invalid rows in a row stop training: at least one whole optimizer step's worth, and at least 32, so
    that with a small batch an isolated bad row only skips its step."""
    return max(_MIN_ROWS_BEFORE_STOP, rows_per_step)


class StreamGuard(TrainerCallback):
    """Counts valid pairs and skipped rows per optimizer step; drops an empty step, stops a stream with none.

    The trainer calls :meth:`observe` with every training micro-batch, as the collator made it (before any
    replacement of an empty micro-batch)."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.valid = 0  # valid pairs in this optimizer step
        self.skipped = 0  # rows skipped in this optimizer step
        self.skipped_in_a_row = 0  # rows skipped since the last valid pair
        self.valid_total = 0
        self.reasons: collections.Counter[str] = collections.Counter()
        self.empty_steps = 0
        self.decided: tuple[int, int] | None = None  # the step's summed counts, where taken before its backward
        # Rows dropped when the data was prepared (ties, invalid rows): added once to the first micro-batch's
        # data/skipped_rows, on the main process (the metric is summed over processes).
        self.dropped_before = 0

    def observe(self, inputs: dict[str, Any]) -> None:
        reasons = inputs.get("skip_reasons") or []
        self.valid += int(inputs["time_ids"].shape[0])
        self.skipped += len(reasons)
        self.reasons.update(_kind(r) for r in reasons)
        if self.dropped_before:
            inputs["num_skipped"] = inputs["num_skipped"] + self.dropped_before
            self.dropped_before = 0
        engine = self.trainer.engine
        if engine.steps_in_backward and self.trainer.accelerator.sync_gradients:  # the window's last micro-batch
            self.decided = self._step_counts()
            if self.decided[0] == 0:
                engine.skip_next_step()  # the engine steps inside the coming backward

    def _synced(self) -> bool:
        """Whether the counts are summed over processes: always with several (ties are dropped whatever
        ``skip_invalid_rows`` says, and a decision taken on one process's count alone desynchronises the replicas)."""
        return self.trainer.accelerator.num_processes > 1

    def on_train_begin(self, args, state, control, **kwargs):
        self.valid = self.skipped = self.skipped_in_a_row = self.valid_total = self.empty_steps = 0
        self.decided = None
        self.reasons.clear()
        report = getattr(self.trainer, "train_data_report", None)
        # Counted by the run that started from step 0, not again by a resumed one.
        first = state.global_step == 0 and self.trainer.accelerator.is_main_process and report is not None
        self.dropped_before = dropped_at_preparation(report) if first else 0

    def _step_counts(self) -> tuple[int, int]:
        """This optimizer step's valid pairs and skipped rows, summed over processes where :meth:`_synced`."""
        valid, skipped = self.valid, self.skipped
        if self._synced():
            accelerator = self.trainer.accelerator
            counts = torch.tensor([float(valid), float(skipped)], device=accelerator.device)
            valid, skipped = (int(v) for v in accelerator.reduce(counts, reduction="sum").tolist())
        return valid, skipped

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        valid, skipped = self.decided if self.decided is not None else self._step_counts()
        if self.decided is not None:  # the engine has stepped inside the backward, the step left unapplied or not
            self.trainer.engine.end_skipped_step()
        self.valid = self.skipped = 0
        self.decided = None
        if valid > 0:
            self.valid_total += valid
            self.skipped_in_a_row = 0
            return
        self.skipped_in_a_row += skipped
        self.empty_steps += 1
        self.trainer.model.zero_grad(set_to_none=True)  # nothing reaches the weights: no decay, no moments
        rows_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        if self.skipped_in_a_row >= stop_threshold(rows_per_step):
            raise NoValidPairsError(self._message(f"the last {self.skipped_in_a_row} rows of the training stream"))
        logger.warning(
            "Optimizer step %d has no valid pair (%d rows skipped): not applied (%d such step(s) so far)",
            state.global_step + 1,
            skipped,
            self.empty_steps,
        )

    def on_train_end(self, args, state, control, **kwargs):
        if self.valid_total == 0 and self.skipped_in_a_row > 0:
            raise NoValidPairsError(self._message(f"all {self.skipped_in_a_row} rows of the training stream"))

    def _message(self, which: str) -> str:
        why = "; ".join(f"{n} x {reason}" for reason, n in self.reasons.most_common(3)) or "no reason recorded"
        return (
            f"No valid preference pair: {which} were invalid or ties and skipped; no optimizer step "
            f"was applied without data. Most frequent reasons: {why}. Check the dataset's columns and images "
            "(the warnings 'Skipping streamed row ...' name each row)."
        )


def dropped_at_preparation(report: DataReport) -> int:
    """Rows a prepared dataset (or a latent cache) dropped before training: ties and invalid rows."""
    return report.ties_dropped + report.invalid_skipped


def _kind(reason: str) -> str:
    """The reason without the row's position, so that equal problems are counted together."""
    return reason.split(": ", 1)[1] if reason.startswith("streamed row ") and ": " in reason else reason
