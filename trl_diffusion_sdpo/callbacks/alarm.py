"""One alarm callback: a signal it reads and an action it takes, each acting in transformers' callback events.

:class:`AlarmCallback` ``(signal, action)`` is a ``TrainerCallback``. Its signal says, at the event it reads, whether
the alarm fires; its action says what then happens:

* :class:`TrainingLogSignal` reads the training logs in ``on_log``: ``state.log_history`` (whose last entry is the
  log being written, reduced over processes by the trainer's ``log`` before transformers appends it) by a
  :class:`~.health.PathologyRule` (:func:`~.health.winner_pathology`; the calibrated :data:`~.health.RULE` by
  default), and warns once, naming the remedies the run does not use;
* :class:`~.probe_signal.ProbeSignal` reads the held-out probe in ``on_step_end``: the reading the probe published at
  the end of the same step (:attr:`~.probe.ProbeCallback.last_reading`; the probe stands before the alarm), its
  unhealthy probes in a row counted by :class:`~.rewind.ProbeAlarmRule` (:mod:`.probe_signal`, loaded by a run that
  probes);
* an action is :class:`~.guards.PathologyAction` (``warn``, ``escalate``, ``stop``, ``safeguard``: the config's
  ``on_pathology``) or, on the probe, :class:`~.rewind.RewindAction` (``on_pathology="rewind"``).

The flags an alarm writes (``health/winner_pathology``, ``health/safeguard_on``, ``health/escalations``,
``safeguard/mu``) go into the ``logs`` transformers hands to ``on_log`` (so the callbacks after it, the console's
printer among them, see them) and into ``state.log_history[-1]`` (the entry transformers appended before ``on_log``,
which the model card and the end-of-run summary read). A reporting integration (``report_to``: wandb, TensorBoard)
runs before every callback passed in ``callbacks=`` (transformers registers them first), so it does not see the flags
of the log in which they are written.

The probe alarm's flags (``health/probe_alarm``, ``health/rewind_to``, ``health/rewinds``) are written the same way
into the next training log. The trainer builds the alarms its config asks for once it is built, and registers them
after the callbacks it is given (docs/compose.md, "Events and order"); it calls none of their events itself. A Python
user builds one as TRL's ``LogCompletionsCallback(trainer, ...)`` is built: ``AlarmCallback(signal, action,
trainer=trainer)``, added with ``trainer.add_callback(alarm)``, takes what its signal and action leave unset from the
trainer's public surface (the safeguard's switch, the remedies of its config, the probe, the rewind's snapshot). One
that needs nothing of a trainer (a ``TrainingLogSignal`` with ``PathologyAction("warn")`` or ``"stop"``) may be given
in ``callbacks=`` without it; one that needs the trainer is refused without it, in one line naming the fix.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from . import health
from .guards import PathologyAction
from .health import ENDED_AT_START, EVIDENCE, RULE, PathologyRule, describe, remedies, start_weights_sentence

if TYPE_CHECKING:
    from .probe_signal import ProbeSignal

__all__ = [
    "AlarmCallback",
    "TrainingLogAlarm",
    "TrainingLogSignal",
]

# the pathology's warning keeps the logger name of the rule's module, which users filter on
logger = logging.getLogger(health.__name__)

#: the flag a training log carries where the training-log signal reads it (1.0: the alarm fired at that log)
PATHOLOGY_FLAG = "health/winner_pathology"


class TrainingLogSignal:
    """Diffusion-DPO's pathology in the training logs: fires at a training log when ``rule`` holds on
    ``state.log_history`` up to it (:func:`~.health.winner_pathology`). A log without ``delta/winner`` (an evaluation
    log, a reference-free objective) is not read. Warns once, at the first firing, naming the remedies the run does
    not use (:func:`~.health.remedies` of its config).

    The remedies are read from the run as it trains when the warning is written: the config's, with the safeguard
    in force then (:func:`~.health.config_in_force`: one a rewind or ``on_pathology="safeguard"`` switched on, a
    ``mu`` escalated), so a safeguard switched on is never named as not in use. What the warning named, and at which
    step, is kept (:attr:`named`, :attr:`warned_at`) for the run's records, in every checkpoint.

    Args:
        rule: when it fires (:class:`~.health.PathologyRule`; the calibrated :data:`~.health.RULE` by default).
        args: the config whose remedies the warning names; ``None``: the trainer's, when the alarm is given one,
            else the ``args`` transformers hands the alarm's ``on_log``.
        safeguard_in_force: returns the safeguard the run trains with now; ``None``: the trainer's
            :attr:`~trl_diffusion_sdpo.DiffusionSDPOTrainer.safeguard` when the alarm is given one, else the
            config's alone.
    """

    #: the event the signal is read in
    event = "log"
    #: the key of its state among a checkpoint's alarms
    name = "training_logs"

    def __init__(
        self,
        rule: PathologyRule = RULE,
        args: Any | None = None,
        safeguard_in_force: Callable[[], Any] | None = None,
    ) -> None:
        self.rule, self.args, self.safeguard_in_force = rule, args, safeguard_in_force
        self.warned = False
        self.warned_at: int | None = None  # the step of the run's first warning
        self.named: list[str] = []  # the remedies it named

    def describe(self) -> str:
        return describe(self.rule)

    def bind(self, trainer: Any) -> None:
        """What was left unset, from the alarm's ``trainer``: its config and the safeguard it trains with."""
        if self.args is None:
            self.args = trainer.args
        if self.safeguard_in_force is None:
            self.safeguard_in_force = lambda: trainer.safeguard

    def lacks(self) -> str | None:
        """What it needs of a trainer and was not given (``None``: it works without one; the config's remedies are
        read from the ``args`` of the alarm's events)."""
        return None

    def remedies_now(self) -> list[str]:
        """The remedies the run does not use now (:func:`~.health.remedies` of the config with the safeguard in
        force)."""
        if self.args is None or self.safeguard_in_force is None:
            return remedies(self.args)
        return remedies(health.config_in_force(self.args, self.safeguard_in_force()))

    def state(self) -> dict[str, Any]:
        return {"warned_at": self.warned_at, "named": self.named}

    def restore(self, saved: Mapping[str, Any]) -> None:
        self.warned_at, self.named = saved.get("warned_at"), list(saved.get("named", []))

    def read(self, history: list[Mapping[str, float]], logs: Mapping[str, float], step: int) -> dict[str, float]:
        """The signal at the training log ``logs`` of step ``step``, ``history`` ending with it: ``{}`` where the log
        has no ``delta/winner``, else ``{PATHOLOGY_FLAG: 1.0 or 0.0}``."""
        if "delta/winner" not in logs:
            return {}
        flagged = health.winner_pathology(history, self.rule)  # the module's rule function, as configured
        if flagged and not self.warned:
            self.warned = True
            named = self.remedies_now()
            if self.warned_at is None:  # the run's first warning (a resumed run's may come again)
                self.warned_at, self.named = step, named
            logger.warning(
                "Step %d: %s: Diffusion-DPO's pathology, the pattern of the runs whose held-out reward fell "
                "(calibration: %s). Remedies not in use in this run: %s.",
                step,
                self.describe(),
                EVIDENCE,
                "; ".join(named),
            )
        return {PATHOLOGY_FLAG: float(flagged)}


def _training_log(logs: Mapping[str, float]) -> bool:
    """Whether ``logs`` is a training log: a step's (transformers writes its ``loss``) or the run's last
    (``train_loss``), not an evaluation's (whose keys carry its prefix)."""
    return "loss" in logs or "train_loss" in logs


class AlarmCallback(TrainerCallback, ExportableState):
    """An alarm: ``signal`` read in its event, ``action`` taken when it fires (module docstring).

    Every process reads the same signal (the training logs are reduced over processes before they are logged, the
    probe's sums before its figures are formed), so every process acts at the same step. What the signal and the
    action have done (the unhealthy probes in a row, the restore point, escalations, the safeguard's switch, the
    rewinds) is saved in every checkpoint's ``trainer_state.json`` (``stateful_callbacks``, under
    :attr:`state_key`) and read back when a resumed run begins; an action with a checkpoint part (the rewind's
    snapshot) writes it into every checkpoint before the checkpoint is marked complete.

    Args:
        signal: what the alarm reads (:class:`TrainingLogSignal`, :class:`~.probe_signal.ProbeSignal`).
        action: what a firing does (:class:`~.guards.PathologyAction`, :class:`~.rewind.RewindAction`; ``None``:
            ``PathologyAction("warn")``, the signal's own warning only).
        trainer: the :class:`~trl_diffusion_sdpo.DiffusionSDPOTrainer` it is added to (``trainer.add_callback``),
            from whose public surface the signal and the action take what they leave unset: its config (the
            remedies, the probe's rule), its :attr:`~trl_diffusion_sdpo.DiffusionSDPOTrainer.probe`, its safeguard's
            margin and :attr:`~trl_diffusion_sdpo.DiffusionSDPOTrainer.dormant_safeguard` (put in force by
            :meth:`~trl_diffusion_sdpo.DiffusionSDPOTrainer.set_safeguard`), a rewind's weights, optimizer and what
            moves with them; and its :meth:`~trl_diffusion_sdpo.DiffusionSDPOTrainer.log_next`, which puts the
            alarm's flags into the next training log. ``None``: a signal and an action that need nothing of a
            trainer; one that does is refused.
    """

    def __init__(
        self,
        signal: TrainingLogSignal | ProbeSignal | None = None,
        action: PathologyAction | Any | None = None,
        *,
        trainer: Any | None = None,
    ) -> None:
        self.signal = TrainingLogSignal() if signal is None else signal
        self.action = PathologyAction("warn") if action is None else action
        self.pending: dict[str, float] = {}  # the probe alarm's flags for the next training log
        #: puts them into that log before transformers records it (the trainer's ``log_next``); ``None``: this
        #: callback writes them in its ``on_log``
        self.publish: Callable[[Mapping[str, float]], None] | None = None
        self.firings: list[list[Any]] = []  # the probe alarm's: [step, restore point, its reading, what was done]
        if trainer is not None:
            self.signal.bind(trainer)
            self.action.bind(trainer)
            self.publish = trainer.log_next
            return
        lacking = [need for need in (self.signal.lacks(), self.action.lacks()) if need]
        if lacking:
            raise ValueError(
                f"{'; '.join(lacking)}: build the alarm once the trainer is, {type(self).__name__}(signal, action, "
                "trainer=trainer), and add it with trainer.add_callback(alarm)"
            )

    @property
    def state_key(self) -> str:
        """The key of :meth:`state` in ``trainer_state.json``'s ``stateful_callbacks``: transformers saves each
        callback's state under its class's name (a subclass's own), and a resumed run reads it back under this key."""
        return type(self).__name__

    # ------------------------------------------------------------------ events

    def on_step_end(self, args, state, control, **kwargs):
        if self.signal.event == "step_end":  # the probe's verdict, acted on (:meth:`~.probe_signal.ProbeSignal.act`)
            self.signal.act(self, state.global_step, control, kwargs.get("optimizer"), kwargs.get("lr_scheduler"))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not state.log_history:
            return
        entry = state.log_history[-1]  # this log, as transformers recorded it, with its step
        if "train_loss" in logs:  # the run's last log: the dict train() returns as its metrics
            self._flag_start_weights(logs, entry, state.global_step)
        if self.signal.event == "log":
            if self.signal.args is None:  # an alarm built without a trainer: the config of the run it is in
                self.signal.args = args
            flags = self.signal.read(state.log_history, entry, state.global_step)
            if not flags:
                return
            self.action(flags, control, state.global_step)
        elif not self.pending or not _training_log(logs):
            return
        elif self.publish is not None:  # the trainer's log carried them
            self.pending = {}
            return
        else:
            flags, self.pending = self.pending, {}
        logs.update(flags)  # the callbacks after this one (the console's) see the flags
        entry.update(flags)  # and state.log_history, which the model card and the run's summary read

    def _flag_start_weights(self, logs: dict[str, float], entry: dict[str, float], step: int) -> None:
        """Where the run ends on the weights it started from (a rewind's,
        :meth:`~.rewind.RewindAction.ended_at_start`), its last log, and so ``train()``'s metrics, carry
        :data:`ENDED_AT_START` 1.0, and a warning says so."""
        ended = getattr(self.action, "ended_at_start", None)
        if ended is None or not ended(step):
            return
        logs[ENDED_AT_START] = entry[ENDED_AT_START] = 1.0
        logger.warning("%s (%s 1.0).", start_weights_sentence(self.action.record().rewinds[-1][0]), ENDED_AT_START)

    def on_train_begin(self, args, state, control, **kwargs):
        configure = getattr(self.signal, "configure", None)  # the probe's rule, from the run's config if unset
        if configure is not None:
            configure(args)
        saved = self.saved_state(state)
        if saved:
            restore = getattr(self.signal, "restore", None)
            if restore is not None:
                restore(saved)
            self.firings = [list(firing) for firing in saved.get("firings", [])]
        begin = getattr(self.action, "begin", None)  # the rewind: its first snapshot, or the checkpoint's
        if begin is not None:
            begin(kwargs.get("optimizer"), saved)
        elif saved:
            self.action.restore(saved)  # a resumed run: what the action had done

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> dict[str, Any]:
        signal_state = getattr(self.signal, "state", dict)()
        done = {"firings": self.firings} if self.signal.event == "step_end" else {}
        return {"args": {}, "attributes": {"signal": self.signal.name, **signal_state, **self.action.state(), **done}}

    def saved_state(self, state: Any) -> dict[str, Any] | None:
        """What the checkpoint a run resumes from saved of :meth:`state` (``None`` in a new run, or where the
        checkpoint holds none). Where several alarms of one class saved theirs, transformers keeps a list, to which
        each save appends every one's state afresh: this alarm's is the last one of its signal."""
        saved = state.stateful_callbacks.get(self.state_key) if state.global_step else None
        for entry in reversed(saved) if isinstance(saved, list) else [saved] if saved else []:
            if entry["attributes"].get("signal") == self.signal.name:
                return entry["attributes"]
        return None

    def save_checkpoint_part(self, checkpoint: str, args: Any, state: Any) -> None:
        """The action's part of every checkpoint (the rewind's snapshot), written into the checkpoint being written,
        before it is marked complete."""
        save = getattr(self.action, "save", None)
        if save is not None:
            save(checkpoint, args, state)

    def load_checkpoint_part(self, checkpoint: str, args: Any, state: Any) -> None:
        """The checkpoint a run resumes from: the action's part (the rewind's snapshot) read when training begins."""
        load = getattr(self.action, "load", None)
        if load is not None:
            load(checkpoint)

    # ------------------------------------------------------------------ records

    def summary(self) -> str:
        """What the alarm reads and does, for the start summary."""
        if self.signal.event != "step_end":
            return f"the training logs' alarm ({self.signal.describe()}) acts as on_pathology={self.action.action!r}"
        if hasattr(self.action, "summary"):
            return f"on_pathology='rewind': {self.action.summary(self.signal.rule)}"
        return f"its alarm ({self.signal.describe()}) acts as on_pathology={self.action.action!r}"

    def lines(self, last_step: int) -> list[str]:
        """The probe alarm's record, one sentence per firing (``last_step``: the run's step now), or one saying that it
        never fired (:meth:`~.probe_signal.ProbeSignal.lines`); nothing for the training logs' alarm (its flags are in
        ``state.log_history``)."""
        if self.signal.event != "step_end":
            return []
        return self.signal.lines(self.action, self.firings, last_step)


class TrainingLogAlarm(AlarmCallback):
    """The alarm on the training logs that the trainer builds from ``on_pathology``: an :class:`AlarmCallback` of a
    :class:`TrainingLogSignal`, under a class of its own so that beside an alarm on the probe (an
    :class:`AlarmCallback` of a :class:`~.probe_signal.ProbeSignal`) transformers holds callbacks of two classes: it
    warns when a second callback of one class is registered, and keeps their saved states under one key."""

    def __init__(
        self,
        signal: TrainingLogSignal | None = None,
        action: PathologyAction | Any | None = None,
        *,
        trainer: Any | None = None,
    ) -> None:
        super().__init__(TrainingLogSignal() if signal is None else signal, action, trainer=trainer)
