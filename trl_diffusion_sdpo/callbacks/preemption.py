"""A signal (SIGTERM, SIGUSR1, or Ctrl-C) finishes the optimizer step, saves a checkpoint on every process and stops,
saying how to resume (:class:`PreemptionCallback`).

Loaded only where a :class:`PreemptionCallback` is used (the command line passes one): a run from Python without one
installs no signal handler and does not import this module; the trainer finds the callback by its ``"module:Class"``
name (``trainer.callbacks_of``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from types import FrameType
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

__all__ = [
    "INTERRUPTED_EXIT_CODE",
    "PREEMPTED_EXIT_CODE",
    "PREEMPTION_SIGNALS",
    "PREEMPTION_SYNC_EVERY",
    "TRAINING_STOPS",
    "exit_code_for",
    "parse_signals",
    "preemption_signal_handlers",
    "PreemptionCallback",
    "resume_advice",
    "TrainingInterrupted",
    "TrainingPreempted",
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


class TrainingPreempted(Exception):
    """Training stopped on a preemption signal after writing ``checkpoint``. The command line ends with
    :attr:`exit_code` (:data:`PREEMPTED_EXIT_CODE`, or :data:`INTERRUPTED_EXIT_CODE` for Ctrl-C) and no traceback; in
    a Python program it is an exception like any other."""

    def __init__(self, checkpoint: str, signal_name: str, step: int) -> None:
        super().__init__(checkpoint, signal_name, step)
        self.checkpoint, self.signal_name, self.step = checkpoint, signal_name, step
        #: the exit status the command line ends with
        self.exit_code = exit_code_for(signal_name)

    def __str__(self) -> str:
        return (
            f"Training preempted by {self.signal_name} after optimizer step {self.step}; checkpoint written to "
            f"{self.checkpoint} (exit status {self.exit_code}). {resume_advice()}"
        )


class TrainingInterrupted(KeyboardInterrupt):
    """A second Ctrl-C: training stops at once, without a checkpoint. A ``KeyboardInterrupt``, as Ctrl-C is without
    the callback; the command line ends with :attr:`exit_code` (:data:`INTERRUPTED_EXIT_CODE`) and no traceback (the
    ``finally`` blocks run: the output folder's lock is released)."""

    #: the exit status the command line ends with
    exit_code = INTERRUPTED_EXIT_CODE

    def __init__(self, step: int) -> None:
        super().__init__(step)
        self.step = step

    def __str__(self) -> str:
        return (
            f"Training interrupted by a second SIGINT during optimizer step {self.step + 1}: stopped at once, no "
            f"checkpoint of this step (exit status {INTERRUPTED_EXIT_CODE})."
        )


#: what ends a run on a signal: the command line turns each into its ``exit_code``
TRAINING_STOPS = (TrainingPreempted, TrainingInterrupted)

#: the signals handled by default: what SLURM and Kubernetes send before killing a job, and Ctrl-C's SIGINT
PREEMPTION_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")
#: under several processes, the optimizer steps between two agreements on the flag (besides every logging step, where
#: the host reads the metrics anyway): a bound on how many steps a signal may wait, never a read per step
PREEMPTION_SYNC_EVERY = 10


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
    """Turns a received preemption signal into a checkpoint and :class:`TrainingPreempted`.

    Opt-in: a trainer given this callback (the command line passes one) handles ``signals`` while ``train()`` runs
    and puts the handlers in place before it back after; without one, ``train()`` leaves the process's signal handling
    alone. The handler only sets a flag. ``on_step_end`` reads it: on one process at every step (a Python flag, no
    device read); under several processes agreed over them (one scalar all-reduce) at every logging step and at least
    every ``sync_every`` optimizer steps, so every process stops after the same step. It then asks for a save
    (``control.should_save``), the trainer's ordinary checkpoint (weights, optimizer, scheduler, RNG states, trainer
    state: resuming continues bit-exactly), and ``on_save``, called right after it, raises :class:`TrainingPreempted`.

    Args:
        signals: the signals handled (names or numbers, :func:`parse_signals`); ``[]`` handles none.
        sync_every: under several processes, the most optimizer steps between two agreements on the flag.
    """

    def __init__(self, signals: Sequence[str] = PREEMPTION_SIGNALS, sync_every: int = PREEMPTION_SYNC_EVERY) -> None:
        if sync_every < 1:
            raise ValueError(f"PreemptionCallback(sync_every=): {sync_every} should be at least 1")
        self.signals = parse_signals(signals)  # a bad name fails here, before training
        self.sync_every = sync_every
        self.received: str | None = None  # name of the first signal received, set by the handler
        self.interrupts = 0  # SIGINTs received: the second one stops at once
        self._state: Any = None  # the trainer's state, from on_train_begin: the step the handler names
        self._stopping = False

    def _step(self) -> int:
        return 0 if self._state is None else self._state.global_step

    def handle(self, signum: int, frame: FrameType | None) -> None:
        """The signal handler: remember the signal, nothing else (it runs between two Python bytecodes). A second
        ``SIGINT`` (Ctrl-C pressed again) raises :class:`TrainingInterrupted` where the program is."""
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.interrupts:
            error = TrainingInterrupted(self._step())
            logger.warning("%s", error)
            raise error
        if name == "SIGINT":
            self.interrupts += 1
            logger.warning(
                "SIGINT received: finishing optimizer step %d, then writing a checkpoint; press Ctrl-C again to stop "
                "at once without one",
                self._step() + 1,
            )
        if self.received is None:
            self.received = name

    def on_train_begin(self, args, state, control, **kwargs):
        self.received, self._stopping, self.interrupts, self._state = None, False, 0, state

    def on_step_end(self, args, state, control, **kwargs):
        if not self.signals:
            return control
        stop = self.received is not None
        if args.world_size > 1 and torch.distributed.is_initialized():
            # every process decides to agree at the same steps (DefaultFlowCallback set should_log before this)
            if not (control.should_log or state.global_step % self.sync_every == 0):
                return control
            flag = torch.full((), float(stop), device=args.device)
            torch.distributed.all_reduce(flag)
            stop = bool(flag.item() > 0)
            if stop and self.received is None:
                self.received = "a preemption signal on another process"
        if stop:
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
        checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        error = TrainingPreempted(checkpoint, self.received or "a signal", state.global_step)
        logger.warning("%s", error)
        raise error


@contextlib.contextmanager
def preemption_signal_handlers(callback: PreemptionCallback | None) -> Iterator[None]:
    """Install ``callback.handle`` for its signals while the block runs (none without a callback); the previous
    handlers come back after it, however it ends (a crashed ``train()`` must not leave ``SIGTERM`` ignored). Outside
    the main thread, where Python cannot install handlers, a warning says preemption is not handled."""
    signals = [] if callback is None else callback.signals
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
