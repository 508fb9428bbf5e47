"""Resuming on another number of processes: the global batch, the samples seen and the data order are kept.

The rule. A checkpoint records (``run_identity.json``) the number of processes ``P``, the per-device batch ``b``, the
gradient accumulation ``A``, the global batch ``G = P * b * A`` and the samples seen ``S = global_step * G``. A run
resuming from it on ``P'`` processes must keep ``G``:

* ``P' * b' * A' == G``: training continues at sample ``S`` of the same global order. transformers fast-forwards
  each process's dataloader past ``global_step * A'`` of its batches (``skip_first_batches``); accelerate gives
  process ``i`` every ``P'``-th batch of ``b'`` rows of one seeded permutation (``SeedableRandomSampler``, seeded by
  ``seed`` and the epoch, the same on every process whatever ``P'``), so each skipped per-process batch is ``P' * b'``
  samples of that permutation and ``global_step * A' * P' * b' = global_step * G = S``. Optimizer step ``k`` sees
  the samples ``[k * G, (k + 1) * G)`` of the permutation whatever ``P'``, ``b'`` and ``A'``. When the global
  micro-batch ``P' * b'`` is also kept (so ``A' = A``), every micro-batch holds the same pairs with the same keyed
  draws (:class:`~trl_diffusion_sdpo.step.stages.MicroBatchDraws`) as in the uninterrupted run; otherwise the
  micro-batches are split differently and
  the per-micro-batch draws and safeguard ``lambda`` are those of the new split (logged).
* ``G`` would change: refused (:class:`ResumeConfigError`), naming the per-device batch and
  accumulation that keep it on ``P'`` processes. A new global batch would move the dataloader to a position that
  matches no sample count of the run (transformers skips ``global_step * A'`` batches of the new size) and change what
  one optimizer step is.

The per-process random states (``rng_state_{i}.pth``) are not restored across counts (transformers reads
``rng_state.pth`` on one process, ``rng_state_{i}.pth`` on several, and warns when its file is missing): nothing of a
step depends on them, every draw is keyed by ``(seed, step, micro-batch)``; dropout inside the denoiser (LoRA
``lora_dropout > 0``) would.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..engines.base import ResumeConfigError

__all__ = ["ResumeConfigError", "samples_seen"]


def samples_seen(global_step: int, global_batch: int) -> int:
    """The pairs a run with global batch ``global_batch`` consumed in ``global_step`` optimizer steps."""
    return global_step * global_batch


def batch_options(global_batch: int, processes: int) -> list[tuple[int, int]]:
    """Every ``(per_device_train_batch_size, gradient_accumulation_steps)`` giving ``global_batch`` on ``processes``
    processes, largest per-device batch first."""
    if global_batch % processes:
        return []
    per_process = global_batch // processes
    return [(b, per_process // b) for b in range(per_process, 0, -1) if per_process % b == 0]


@dataclasses.dataclass(frozen=True)
class ProcessCountChange:
    """A resume on another number of processes that keeps the global batch."""

    old_processes: int
    new_processes: int
    global_batch: int
    global_step: int
    same_micro_batches: bool  # the global micro-batch (processes x per-device batch) is kept as well

    @property
    def samples_seen(self) -> int:
        return samples_seen(self.global_step, self.global_batch)

    def describe(self) -> str:
        split = (
            "the same micro-batches and draws as the uninterrupted run"
            if self.same_micro_batches
            else "the micro-batches split differently, so their keyed draws and the safeguard's per-micro-batch "
            "lambda are those of the new split"
        )
        return (
            f"Resuming on {self.new_processes} process(es) from a checkpoint written by {self.old_processes}: global "
            f"batch {self.global_batch} kept; {self.samples_seen} samples were seen in {self.global_step} steps, "
            f"training continues at sample {self.samples_seen} of the same data order, with {split}."
        )


def plan_process_count_change(
    saved: dict[str, Any], current: dict[str, Any], global_step: int
) -> ProcessCountChange | None:
    """What resuming from a checkpoint whose run identity is ``saved`` does on a run whose identity is ``current``
    (both with ``num_processes``, ``per_device_train_batch_size``, ``gradient_accumulation_steps``); ``None`` when the
    process count is unchanged (or the checkpoint predates the count being recorded).

    Raises:
        ValueError (:class:`ResumeConfigError`): the global batch would change; the message names the
        settings that keep it.
    """
    old, new = saved.get("num_processes"), current["num_processes"]
    if old is None or old == new:
        return None
    old_batch = saved.get("global_batch_size")
    if old_batch is None:  # written before the batch was recorded: the per-device batch and accumulation
        old_batch = old * saved["per_device_train_batch_size"] * saved["gradient_accumulation_steps"]
    new_batch = new * current["per_device_train_batch_size"] * current["gradient_accumulation_steps"]
    if new_batch != old_batch:
        options = batch_options(old_batch, new)
        flags = [f"--per_device_train_batch_size {b} --gradient_accumulation_steps {a}" for b, a in options[:3]]
        keep = (
            f"Keep it with {' or '.join(flags)} on {new} process(es)"
            if options
            else f"No per-device batch gives {old_batch} pairs on {new} processes; resume on a number of processes "
            f"dividing {old_batch}"
        )
        raise ResumeConfigError(
            f"Cannot resume on {new} process(es) from a checkpoint written by {old}: the global batch would change "
            f"from {old_batch} to {new_batch} pairs per optimizer step ({new} x per_device_train_batch_size "
            f"{current['per_device_train_batch_size']} x gradient_accumulation_steps "
            f"{current['gradient_accumulation_steps']}), so the {samples_seen(global_step, old_batch)} samples seen "
            f"would not be where the data order resumes. {keep} (docs/reliability.md)."
        )
    old_micro = saved.get("per_device_train_batch_size")
    same_micro = old_micro is not None and old * old_micro == new * current["per_device_train_batch_size"]
    return ProcessCountChange(old, new, old_batch, global_step, same_micro)
