"""Preemption: on a signal, finish the optimizer step, write a complete checkpoint and exit with a distinct status.

Cluster schedulers warn a job before killing it: SLURM and Kubernetes send ``SIGTERM`` (then ``SIGKILL`` after a
grace period), and SLURM can send ``SIGUSR1`` earlier with ``--signal=USR1@SECONDS``. While ``train()`` runs, the
signals the :class:`PreemptionCallback` handles (:data:`PREEMPTION_SIGNALS` unless it is given others) only set a
flag. At the end of the optimizer step during which the flag was
set, the trainer writes a checkpoint (the atomic save of :mod:`.checkpoints`), logs its path and raises
:class:`TrainingPreempted`, a ``SystemExit`` with status :data:`PREEMPTED_EXIT_CODE` (75, ``EX_TEMPFAIL`` of
``sysexits.h``: "try again"), so a job script can requeue on that status and resume with
``resume_from_checkpoint=True``.

``SIGINT`` (Ctrl-C) is in the default signals too: the first one stops training the same way (the process exits with
status :data:`INTERRUPTED_EXIT_CODE`, 130, as a shell reports Ctrl-C, so a requeue script that waits for 75 does not
requeue a run its user stopped); a second one exits at once, without a checkpoint.

With several processes the signal may reach them at different steps (or only some of them). The flag is all-reduced
at every step end (one scalar ``all_reduce`` per optimizer step, and the host waits for it; none on one process or
with ``PreemptionCallback(signals=[])``), so every process stops after the same step and takes part in the same save.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from types import FrameType
from typing import TYPE_CHECKING

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

if TYPE_CHECKING:
    from transformers import Trainer

__all__ = [
    "INTERRUPTED_EXIT_CODE",
    "PREEMPTED_EXIT_CODE",
    "PREEMPTION_SIGNALS",
    "PreemptionCallback",
    "TrainingPreempted",
    "parse_signals",
    "preemption_signal_handlers",
]

logger = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: a temporary failure, the job may be retried (and resumed)
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT: what a shell reports for Ctrl-C; a user's stop, not a scheduler's


def exit_code_for(signal_name: str) -> int:
    """The exit status after a preemption by ``signal_name``: 130 for Ctrl-C, 75 for a scheduler's signal."""
    return INTERRUPTED_EXIT_CODE if signal_name == "SIGINT" else PREEMPTED_EXIT_CODE


def resume_advice() -> str:
    """How to resume, in both forms: the command line's and Python's."""
    return "Resume with --resume_from_checkpoint true (command line) or trainer.train(resume_from_checkpoint=True)."


class TrainingPreempted(SystemExit):
    """Training stopped on a preemption signal after writing ``checkpoint``. Uncaught, the process exits with
    :data:`PREEMPTED_EXIT_CODE` and no traceback."""

    def __init__(self, checkpoint: str, signal_name: str, step: int) -> None:
        super().__init__(exit_code_for(signal_name))
        self.checkpoint, self.signal_name, self.step = checkpoint, signal_name, step

    def __str__(self) -> str:
        return (
            f"Training preempted by {self.signal_name} after optimizer step {self.step}; checkpoint written to "
            f"{self.checkpoint} (exit status {self.code}). {resume_advice()}"
        )


class TrainingInterrupted(SystemExit):
    """A second Ctrl-C: training stops at once, without a checkpoint. Uncaught, the process exits with
    :data:`INTERRUPTED_EXIT_CODE` and no traceback (the ``finally`` blocks run: the output folder's lock is
    released)."""

    def __init__(self, step: int) -> None:
        super().__init__(INTERRUPTED_EXIT_CODE)
        self.step = step

    def __str__(self) -> str:
        return (
            f"Training interrupted by a second SIGINT during optimizer step {self.step + 1}: stopped at once, no "
            f"checkpoint of this step (exit status {INTERRUPTED_EXIT_CODE})."
        )


#: the signals handled by default: what SLURM and Kubernetes send before killing a job, and Ctrl-C's SIGINT
PREEMPTION_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")


def parse_signals(names: Sequence[str] | None) -> list[signal.Signals]:
    """``["SIGTERM", "USR1", "10"]`` -> signals; ``None``, ``[]`` or ``["none"]`` -> ``[]`` (preemption handling off).

    A ValueError names an unknown signal and those that cannot be caught (``SIGKILL``, ``SIGSTOP``)."""
    if not names or [str(n).lower() for n in names] == ["none"]:
        return []
    found = []
    for name in names:
        text = str(name).strip().upper()
        if not text.isdigit() and not text.startswith("SIG"):
            text = f"SIG{text}"
        try:
            sig = signal.Signals(int(text)) if text.isdigit() else signal.Signals[text]
        except (KeyError, ValueError):
            raise ValueError(
                f"PreemptionCallback(signals=): {name!r} is not a signal name of this platform (e.g. 'SIGTERM', "
                "'SIGUSR1'); use [] to turn preemption handling off"
            ) from None
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ValueError(f"PreemptionCallback(signals=): {sig.name} cannot be caught; use SIGTERM or SIGUSR1")
        found.append(sig)
    return found


class PreemptionCallback(TrainerCallback):
    """Turns a received preemption signal into a checkpoint and :class:`TrainingPreempted` at the next step end.

    ``on_step_end`` agrees on the flag over processes and asks the trainer for a save (``control.should_save``);
    ``on_save``, called right after that save, raises. The save is therefore the trainer's ordinary checkpoint
    (weights, optimizer, scheduler, RNG states, trainer state), and resuming from it continues bit-exactly.
    """

    def __init__(self, trainer: Trainer | None = None, signals: Sequence[str] = PREEMPTION_SIGNALS) -> None:
        self.trainer = trainer  # set by the trainer when the callback is passed in ``callbacks=``
        self.signals = parse_signals(signals)  # a bad name fails here, before training
        self.received: str | None = None  # name of the first signal received, set by the handler
        self.enabled = bool(self.signals)  # False with signals=[]: no per-step all-reduce then
        self.interrupts = 0  # SIGINTs received: the second one stops at once
        self._stopping = False

    def handle(self, signum: int, frame: FrameType | None) -> None:
        """The signal handler: remember the signal, nothing else (it runs between two Python bytecodes). A second
        ``SIGINT`` (Ctrl-C pressed again) raises :class:`TrainingInterrupted` where the program is."""
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.interrupts:
            error = TrainingInterrupted(self.trainer.state.global_step)
            logger.warning("%s", error)
            raise error
        if name == "SIGINT":
            self.interrupts += 1
            logger.warning(
                "SIGINT received: finishing optimizer step %d, then writing a checkpoint; press Ctrl-C again to stop "
                "at once without one",
                self.trainer.state.global_step + 1,
            )
        if self.received is None:
            self.received = name

    def on_train_begin(self, args, state, control, **kwargs):
        self.received, self._stopping, self.interrupts = None, False, 0

    def on_step_end(self, args, state, control, **kwargs):
        if not self.enabled:
            return control
        accelerator = self.trainer.accelerator
        local = self.received is not None
        if accelerator.num_processes > 1:  # every process stops after the same step
            flag = torch.full((), float(local), device=accelerator.device)
            local = bool(accelerator.reduce(flag, reduction="sum").item() > 0)
            if local and self.received is None:
                self.received = "a preemption signal on another process"
        if local:
            self._stopping = True
            control.should_save = True
            logger.warning(
                "%s received: stopping after optimizer step %d and writing a checkpoint",
                self.received,
                state.global_step,
            )
        return control

    def on_save(self, args, state, control, **kwargs):
        if not self._stopping:
            return control
        run_dir = self.trainer._get_output_dir(trial=None)
        checkpoint = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        error = TrainingPreempted(checkpoint, self.received or "a signal", state.global_step)
        logger.warning("%s", error)
        raise error


@contextlib.contextmanager
def preemption_signal_handlers(callback: PreemptionCallback, signals: Sequence[signal.Signals]) -> Iterator[None]:
    """Install ``callback.handle`` for ``signals`` while the block runs; the previous handlers come back after it,
    however it ends (a crashed ``train()`` must not leave ``SIGTERM`` ignored). Outside the main thread, where Python
    cannot install handlers, a warning says preemption is not handled."""
    if not signals:
        yield
        return
    if threading.current_thread() is not threading.main_thread():
        logger.warning("train() runs outside the main thread: preemption signals %s are not handled", list(signals))
        yield
        return
    previous = {sig: signal.signal(sig, callback.handle) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
