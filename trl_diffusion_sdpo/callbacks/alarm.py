"""One alarm callback: a signal it reads and an action it takes, each acting in transformers' callback events.

:class:`AlarmCallback` ``(signal, action)`` is a ``TrainerCallback``. Its signal says, at the event it reads, whether
the alarm fires; its action says what then happens:

* :class:`TrainingLogSignal` reads the training logs in ``on_log``: ``state.log_history`` (whose last entry is the
  log being written, reduced over processes by the trainer's ``log`` before transformers appends it) by a
  :class:`~.health.PathologyRule` (:func:`~.health.winner_pathology`; the calibrated :data:`~.health.RULE` by
  default), and warns once, naming the remedies the run does not use;
* an action is :class:`~.guards.PathologyAction` (``warn``, ``escalate``, ``stop``, ``safeguard``: the config's
  ``on_pathology``).

The flags an alarm writes (``health/winner_pathology``, ``health/safeguard_on``, ``health/escalations``,
``safeguard/mu``) go into the ``logs`` transformers hands to ``on_log`` (so the callbacks after it, the console's
printer among them, see them) and into ``state.log_history[-1]`` (the entry transformers appended before ``on_log``,
which the model card and the end-of-run summary read). A reporting integration (``report_to``: wandb, TensorBoard)
runs before every callback passed in ``callbacks=`` (transformers registers them first), so it does not see the flags
of the log in which they are written.

The trainer builds the alarm its config asks for and passes it to ``transformers.Trainer`` with the callbacks it is
given, after them. A Python user may build one and pass it in ``callbacks=``; the trainer binds every callback that
has ``bind_to_trainer`` (the safeguard's switch, the remedies of its config), and calls none of them itself.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from . import health
from .guards import PathologyAction
from .health import EVIDENCE, RULE, PathologyRule, describe, remedies

__all__ = ["AlarmCallback", "TrainingLogSignal"]

# the pathology's warning keeps the logger name of the rule's module, which users filter on
logger = logging.getLogger(health.__name__)

#: the flag a training log carries where the training-log signal reads it (1.0: the alarm fired at that log)
PATHOLOGY_FLAG = "health/winner_pathology"


class TrainingLogSignal:
    """Diffusion-DPO's pathology in the training logs: fires at a training log when ``rule`` holds on
    ``state.log_history`` up to it (:func:`~.health.winner_pathology`). A log without ``delta/winner`` (an evaluation
    log, a reference-free objective) is not read. Warns once, at the first firing, naming the remedies the run does
    not use (:func:`~.health.remedies` of its config).

    Args:
        rule: when it fires (:class:`~.health.PathologyRule`; the calibrated :data:`~.health.RULE` by default).
        args: the config whose remedies the warning names; ``None``: the trainer's, when it binds the alarm.
    """

    #: the event the signal is read in
    event = "log"

    def __init__(self, rule: PathologyRule = RULE, args: Any | None = None) -> None:
        self.rule, self.args = rule, args
        self.warned = False

    def describe(self) -> str:
        return describe(self.rule)

    def bind(self, trainer: Any) -> None:
        if self.args is None:
            self.args = trainer.args

    def read(self, history: list[Mapping[str, float]], logs: Mapping[str, float], step: int) -> dict[str, float]:
        """The signal at the training log ``logs`` of step ``step``, ``history`` ending with it: ``{}`` where the log
        has no ``delta/winner``, else ``{PATHOLOGY_FLAG: 1.0 or 0.0}``."""
        if "delta/winner" not in logs:
            return {}
        flagged = health.winner_pathology(history, self.rule)  # the module's rule function, as configured
        if flagged and not self.warned:
            self.warned = True
            logger.warning(
                "Step %d: %s: Diffusion-DPO's pathology, the pattern of the runs whose held-out reward fell "
                "(calibration: %s). Remedies not in use in this run: %s.",
                step,
                self.describe(),
                EVIDENCE,
                "; ".join(remedies(self.args)),
            )
        return {PATHOLOGY_FLAG: float(flagged)}


class AlarmCallback(TrainerCallback, ExportableState):
    """An alarm: ``signal`` read in its event, ``action`` taken when it fires (module docstring).

    Every process reads the same signal (the training logs are reduced over processes before they are logged), so
    every process acts at the same step. What the action has done (escalations, the safeguard's switch) is saved in
    every checkpoint's ``trainer_state.json`` (``stateful_callbacks``) and read back when a resumed run begins.

    Args:
        signal: what the alarm reads (:class:`TrainingLogSignal`).
        action: what a firing does (:class:`~.guards.PathologyAction`; ``None``: ``PathologyAction("warn")``, the
            signal's own warning only).
    """

    def __init__(self, signal: TrainingLogSignal | None = None, action: PathologyAction | None = None) -> None:
        self.signal = TrainingLogSignal() if signal is None else signal
        self.action = PathologyAction("warn") if action is None else action

    def bind_to_trainer(self, trainer: Any) -> None:
        """What the signal and the action leave unset, from ``trainer``'s public surface: its config (the remedies),
        its safeguard's margin and its :attr:`~trl_diffusion_sdpo.DiffusionSDPOTrainer.dormant_safeguard` (put in
        force by :meth:`~trl_diffusion_sdpo.DiffusionSDPOTrainer.set_safeguard`)."""
        self.signal.bind(trainer)
        self.action.bind(trainer)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not state.log_history:
            return
        entry = state.log_history[-1]  # this log, as transformers recorded it, with its step
        flags = self.signal.read(state.log_history, entry, state.global_step)
        if not flags:
            return
        self.action(flags, control, state.global_step)
        logs.update(flags)  # the callbacks after this one (the console's) see the flags
        entry.update(flags)  # and state.log_history, which the model card and the run's summary read

    def state(self) -> dict[str, Any]:
        return {"args": {}, "attributes": {"signal": self.signal.describe(), **self.action.state()}}

    def on_train_begin(self, args, state, control, **kwargs):
        saved = state.stateful_callbacks.get(type(self).__name__) if state.global_step else None
        # transformers keeps a list where several alarms saved their state: this alarm's is the one of its signal
        for entry in saved if isinstance(saved, list) else [saved] if saved else []:
            if entry["attributes"].get("signal") == self.signal.describe():
                self.action.restore(entry["attributes"])  # a resumed run: what the action had done
                return
