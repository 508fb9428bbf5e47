"""Counting the host reads of tensors in a training step with a torch-function mode.

On an accelerator, reading a tensor's value on the host (``.item()``, ``.tolist()``, ``bool()``, ``float()``,
``.cpu()``, ...) makes the host wait for the device. On a CPU no such wait exists and ``.tolist()`` dispatches no aten
operation the profiler could mark, so :class:`HostReadCounter` counts the calls themselves, on any tensor, as Python
makes them: a call that reads a tensor on a CPU reads a device tensor where the same code runs on an accelerator. Calls
that torch makes from C++ (a fused optimizer's kernel) are not seen, as they are not host syncs on an accelerator.

:class:`StepHostReads` opens the count at ``on_step_begin`` and closes it at ``on_step_end`` of the optimizer steps it
is asked for: the micro-batches' ``training_step`` (forward, backward, the safeguard's hook), clipping and the
optimizer step; the batch's fetch before it and the logging after it are outside.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

import torch
from torch.overrides import TorchFunctionMode
from transformers import TrainerCallback

__all__ = [
    "HOST_READ_METHODS",
    "SPACES",
    "HostReadCounter",
    "StepHostReads",
    "counted_inside_carried_passes",
    "safeguard_host_reads",
]

# Tensor methods that copy a value to the host (``Tensor.to`` a CPU device is not among them: on a CPU it cannot be
# told from a no-op, and the package's step calls ``.cpu()`` where it moves a tensor to the host).
HOST_READ_METHODS: dict[Callable, str] = {
    torch.Tensor.item: "item",
    torch.Tensor.tolist: "tolist",
    torch.Tensor.__bool__: "bool",
    torch.Tensor.__float__: "float",
    torch.Tensor.__int__: "int",
    torch.Tensor.__index__: "index",
    torch.Tensor.cpu: "cpu",
    torch.Tensor.numpy: "numpy",
}


class HostReadCounter(TorchFunctionMode):
    """Within the mode, each call of :data:`HOST_READ_METHODS` is recorded in :attr:`reads` as ``"method at
    file:line"`` (the calling line), so that a failing count says where the reads are."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = HOST_READ_METHODS.get(func)
        if name is not None:
            caller = sys._getframe(1)
            self.reads.append(f"{name} at {caller.f_code.co_filename}:{caller.f_lineno}")
        return func(*args, **(kwargs or {}))

    def by_place(self) -> Counter:
        return Counter(self.reads)


@contextlib.contextmanager
def counted_inside_carried_passes(counter: Callable[[], HostReadCounter | None]) -> Iterator[None]:
    """Within the block, the exact rule's passes that Trainer's backward carries
    (:class:`~trl_diffusion_sdpo.safeguards.passes.PassesInStep`) run inside ``counter()`` where it returns one:
    autograd runs a backward with no torch-function mode on, so without it a read between the branches' passes goes
    unseen."""
    from trl_diffusion_sdpo.safeguards.passes import PassesInStep

    carried = PassesInStep._backward

    def backward_counted(passes, scale):
        mode = counter()
        with mode if mode is not None else contextlib.nullcontext():
            carried(passes, scale)

    PassesInStep._backward = backward_counted
    try:
        yield
    finally:
        PassesInStep._backward = carried


class StepHostReads(TrainerCallback):
    """Counts the host reads of the optimizer steps ``counted(step)`` selects (``step``: the global step before it
    runs), from ``on_step_begin`` to ``on_step_end``: ``reads[step]`` lists them (see :class:`HostReadCounter`;
    inside the passes Trainer's backward carries too, under :meth:`inside_carried_passes`); ``before_step(step)``
    runs first at every step (e.g. to switch the trainer's safeguard)."""

    def inside_carried_passes(self) -> contextlib.AbstractContextManager:
        """Around the training: the reads inside the exact rule's carried passes are counted too."""
        return counted_inside_carried_passes(lambda: self._counter)

    def __init__(self, counted: Callable[[int], bool], before_step: Callable[[int], None] | None = None) -> None:
        self.counted, self.before_step = counted, before_step
        self.reads: dict[int, list[str]] = {}
        self._counter: HostReadCounter | None = None
        self._step = 0

    def on_step_begin(self, args, state, control, **kwargs):
        if self.before_step is not None:
            self.before_step(state.global_step)
        if self.counted(state.global_step):
            self._step, self._counter = state.global_step, HostReadCounter()
            self._counter.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.reads[self._step], self._counter = self._counter.reads, None


#: the safeguards compared, by name: their config fields (Diffusion-DPO, ``"none"``, first)
SPACES: dict[str, dict] = {
    "none": {"safeguard_space": "none"},
    "output": {"safeguard_space": "output"},
    "parameter": {"safeguard_space": "parameter"},
    "parameter-two-passes": {"safeguard_space": "parameter", "safeguard_passes": "two"},
    "update": {"safeguard_space": "update"},
    "update-two-passes": {"safeguard_space": "update", "safeguard_passes": "two"},
}


def safeguard_host_reads(
    make_trainer: Callable[..., object], names: Sequence[str] = tuple(SPACES), **overrides
) -> dict:
    """``{name: [read, ...]}``: the host reads of one steady-state optimizer step of each safeguard of ``names``
    (:data:`SPACES`), in one run of ``make_trainer(safeguard_space="none", **overrides)`` whose safeguard changes at
    every step, in the order of ``names``, twice: each one's second step is counted (its first takes the decisions
    made once per run, such as whether the one pass can split the branches, which every process takes together)."""
    from trl_diffusion_sdpo.safeguards import safeguard_for

    names = list(names)
    trainer = make_trainer(safeguard_space="none", max_steps=2 * len(names), logging_steps=1000, **overrides)
    denoiser = trainer.family.denoiser
    lora = any("lora_" in name for name, _ in denoiser.named_parameters())
    trainable = sum(p.numel() for p in denoiser.parameters() if p.requires_grad)
    safeguards = {}
    for name in names:
        args = copy.copy(trainer.args)
        for field, value in SPACES[name].items():
            setattr(args, field, value)
        safeguards[name] = safeguard_for(args, trainer.engine, lora=lora, trainable_elements=trainable)

    def before_step(step: int) -> None:
        trainer.safeguard = safeguards[names[step % len(names)]]

    counter = StepHostReads(lambda step: step >= len(names), before_step)
    trainer.add_callback(counter)
    with counter.inside_carried_passes():
        trainer.train()
    return {names[step % len(names)]: reads for step, reads in counter.reads.items()}
