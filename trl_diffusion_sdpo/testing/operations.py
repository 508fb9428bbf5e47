"""Counting the aten operations and the allocated bytes of a training step with ``torch.profiler``, for tests and
CPU benchmarks.

An operation counts once where Python or autograd calls it: the operations a kernel runs inside it (a CPU ``bmm``
over small batches, a foreach call's per-tensor fallback on a CPU) are not counted again, as on an accelerator they
are one launch. :class:`StepOperations` records, per profiled optimizer step, every top-level operation and those
run outside the backward pass (not under an ``autograd::engine::evaluate_function`` record): the latter is the work
a safeguard adds around the backward (its inner products, combination, search), where Diffusion-DPO has none.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

import torch
from transformers import TrainerCallback

__all__ = [
    "HOST_READ_OPERATIONS",
    "StepOperations",
    "count_operations",
    "event_tree",
    "host_reads",
    "peak_allocated_bytes",
]

_BACKWARD = "autograd::engine::evaluate_function"


def event_tree(profile: torch.profiler.profile) -> list:
    """The roots of ``profile``'s tree of nested CPU calls as the profiler built it (each event's ``children``): what
    ``profile.events()`` rebuilds in Python, event by event, at about sixty times the cost on a training step."""
    return profile.profiler.kineto_results.experimental_event_tree()


def count_operations(profile: torch.profiler.profile) -> dict[str, collections.Counter]:
    """``{"all": ..., "outside_backward": ...}``: per aten operation name, how often it was called at the top level
    (its caller not an aten operation) in ``profile``, in all and outside the backward pass."""
    counts = {"all": collections.Counter(), "outside_backward": collections.Counter()}
    stack = [(root, False, False) for root in event_tree(profile)]  # (event, its caller is aten, under a backward)
    while stack:
        event, in_operation, backward = stack.pop()
        operation = event.name.startswith("aten::")
        if operation and not in_operation:
            counts["all"][event.name] += 1
            if not backward:
                counts["outside_backward"][event.name] += 1
        backward = backward or event.name.startswith(_BACKWARD)
        stack.extend((child, operation, backward) for child in event.children)
    return counts


class StepOperations(TrainerCallback):
    """Profiles the optimizer steps ``profiled(step)`` selects (``step``: the global step before it runs) and keeps
    ``records[step] = {"all": Counter, "outside_backward": Counter, "seconds": float}``; ``before_step(step)`` runs
    first (e.g. to switch the trainer's safeguard).

    A step's window runs from ``on_step_begin`` to ``on_step_end``, or with ``whole_step`` from the previous step's
    ``on_step_end`` (the start of training for the first) to its own: the batch's fetch and collation, and whatever
    runs between two steps, counted too."""

    def __init__(
        self,
        profiled: Callable[[int], bool],
        before_step: Callable[[int], None] | None = None,
        *,
        whole_step: bool = False,
    ) -> None:
        self.profiled, self.before_step, self.whole_step = profiled, before_step, whole_step
        self.records: dict[int, dict] = {}
        self._profile: torch.profiler.profile | None = None
        self._clock = 0.0

    def _begin(self, step: int) -> None:
        if self.before_step is not None:
            self.before_step(step)
        if self.profiled(step):
            self._profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self._profile.__enter__()
            self._clock = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        if self.whole_step:
            self._begin(state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        if not self.whole_step:
            self._begin(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self._profile is not None:
            seconds = time.perf_counter() - self._clock
            self._profile.__exit__(None, None, None)
            self.records[state.global_step - 1] = {**count_operations(self._profile), "seconds": seconds}
            self._profile = None
        if self.whole_step and state.global_step < state.max_steps:
            self._begin(state.global_step)


def peak_allocated_bytes(fn: Callable[[], object]) -> int:
    """The most bytes ``fn`` held allocated beyond what was allocated when it started, at any moment of its run: each
    operation's own allocations and frees (``torch.profiler``'s memory events), summed in time order. What is freed
    inside one operation nets out there."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        fn()
    events = sorted((e for e in profile.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    held = peak = 0
    for event in events:
        held += event.self_cpu_memory_usage
        peak = max(peak, held)
    return peak


# Operations that copy a value to the host, or whose output's size depends on the values (which the host must read
# before it can allocate the output): on an accelerator each makes the host wait for the device.
HOST_READ_OPERATIONS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::_unique2")


def host_reads(profile: torch.profiler.profile) -> int:
    """How often ``profile`` read a tensor's values back to the host (:data:`HOST_READ_OPERATIONS`:
    ``aten::_local_scalar_dense`` is under ``.item()``, ``float()``, ``bool()``, ``.tolist()``; ``nonzero`` under
    boolean-mask indexing) outside ``Optimizer.step``. On an accelerator each is a host sync; the optimizer's are left
    out because on a CPU the fused AdamW reads its step counter once per tensor, where its accelerator kernel reads
    nothing back. A read nested in another (``masked_select`` calls ``nonzero``) counts once."""
    count = 0
    stack = [(root, False, False) for root in event_tree(profile)]  # (event, under Optimizer.step, under another read)
    while stack:
        event, in_optimizer, in_read = stack.pop()
        read = event.name in HOST_READ_OPERATIONS
        count += read and not in_optimizer and not in_read
        in_optimizer = in_optimizer or event.name.startswith("Optimizer.step")
        stack.extend((child, in_optimizer, in_read or read) for child in event.children)
    return count
