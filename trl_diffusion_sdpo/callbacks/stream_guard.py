"""Streamed data that is all bad: an optimizer step without one valid pair is never applied, and a stream that keeps
yielding none stops training with an error that says how many rows were skipped and why.

The collator drops a streamed dataset's human ties and bad rows (only its first row is checked up front, strictly
unless ``skip_invalid_rows``), so a micro-batch, and a whole optimizer step, can end up with no pair. Stepping the
optimizer then would still apply weight decay (and Adam's moments) to the weights with no data behind it.
:class:`StreamGuard` counts, per optimizer step, the valid pairs and the skipped rows (host-side: batch shapes and
the collator's ``skip_reasons`` list, no device sync):

* a step with no valid pair is not applied: its gradients are dropped (``grad = None``, so AdamW leaves weights and
  moments alone), with a warning; the step count and scheduler still advance, as for a skipped non-finite step;
* when :func:`stop_threshold` rows in a row (``max(32, rows read per optimizer step)``) were all invalid, or the
  stream ends without one valid pair, training stops with :class:`NoValidPairsError` naming the count and the most
  frequent reasons.

With several processes the counts are summed over processes at every optimizer step (one all-reduce of two numbers,
which the host waits for), whatever the dataset and ``skip_invalid_rows``: the collator drops human ties and bad
streamed rows in any case, and a process that dropped its gradients on its own count would leave the others'
update unapplied on its replica (the replicas drift apart). Every process then decides the same.

Where the engine steps inside the backward of the accumulation window's last micro-batch (DeepSpeed), dropping the
gradients at ``on_pre_optimizer_step`` comes after the step was applied (AdamW's moments move the weights even with
zero gradients). There the counts are summed when that last micro-batch is observed, before its backward, and an empty
step is handed to the engine to leave unapplied (:meth:`~trl_diffusion_sdpo.engines.Engine.skip_next_step`).

The rows a map-style dataset (or a latent cache) dropped before training, ties and invalid rows, are added to the
first micro-batch's ``data/skipped_rows`` of a run that starts at step 0, so the metric counts every dropped row.
"""

from __future__ import annotations

import collections
import logging
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainerCallback

from ..data.validation import DataError

if TYPE_CHECKING:
    from transformers import Trainer

    from ..data.validation import DataReport

__all__ = ["NoValidPairsError", "StreamGuard", "dropped_at_preparation", "stop_threshold"]

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
