"""What a run's alarms and warnings did, one sentence each, for its model card (:mod:`.hub`) and its end-of-run
summary (:class:`~.run_summary.StartSummary`): the start summary's warnings, the training logs' pathology alarm,
every firing of the held-out probe's alarm with what ``on_pathology`` did there, each rewind of
``on_pathology="rewind"`` with the step it restored and how healthy that step's probe read, the switch of the
safeguard and the escalations of ``mu``. Each is read from where it is kept: the start summary's warnings from the
start summary (computed afresh when a resumed run starts), the training logs' alarm from ``state.log_history``, the
probe's alarm and the rewind from their states (:meth:`~trl_diffusion_sdpo.callbacks.alarm.AlarmCallback.lines`,
:meth:`~trl_diffusion_sdpo.callbacks.rewind.RewindAction.record`) and the switch from the pathology action's, all of
which a checkpoint saves and a resumed run reads back.
"""

from __future__ import annotations

import math
import re
from typing import Any

from ..callbacks.alarm import AlarmCallback
from ..config._lazy import import_target

__all__ = ["run_events"]

#: how an event's sentence names its step
_STEP = re.compile(r"Step (\d+):")

#: the training log's verdict of the training logs' pathology alarm (:class:`~..callbacks.alarm.TrainingLogSignal`)
_FLAG = "health/winner_pathology"


def run_events(trainer: Any) -> list[str]:
    """What the run's alarms and warnings have done up to its current step, one sentence each (module docstring), in
    the order they happened: the start summary's warnings, then each event by the step it names (``Step N: ...``;
    events of one step in the order below), then the sentences that name no step (an alarm that never fired, the
    escalations in all); a sentence saying that an alarm never fired where the run has one that acts (the probe's,
    the rewind, the switch); nothing where nothing was warned and no such alarm runs."""
    step = trainer.state.global_step
    start = [f"At the start: {warning}" for warning in _start_warnings(trainer)]
    lines = _training_log_alarm(trainer)
    for alarm in trainer.callbacks_of(AlarmCallback):  # the alarms on the probe, the config's or added
        if alarm.signal.event == "step_end":
            lines += alarm.lines(step)
    action = getattr(trainer.alarm, "action", None)  # the training logs' alarm's: on_pathology's, or the one added
    switches = action is not None and action.action == "safeguard" and action.switch is not None
    if switches or (action is not None and action.escalations):  # its acts' module: loaded once one has bound or acted
        lines += import_target("trl_diffusion_sdpo.callbacks.pathology_acts:records")(action, step)
    return start + sorted(lines, key=_step_named)  # a stable sort: one step's events keep their order


def _step_named(line: str) -> float:
    """The step an event's sentence opens with (``Step N: ...``); one naming none sorts after every step."""
    found = _STEP.match(line)
    return float(found.group(1)) if found else math.inf


def _start_warnings(trainer: Any) -> list[str]:
    """The warnings the start summary logged (:class:`~.run_summary.StartSummary`)."""
    summaries = trainer.callbacks_of("trl_diffusion_sdpo.io.run_summary:StartSummary")  # its module imports this one
    return [warning for summary in summaries for warning in summary.warnings]


def _training_log_alarm(trainer: Any) -> list[str]:
    """The training logs' pathology alarm (``health/winner_pathology``, which every training log with
    ``delta/winner`` carries): where it first fired and warned, and how often it fired in all."""
    flagged = [int(entry["step"]) for entry in trainer.state.log_history if entry.get(_FLAG) == 1.0]
    if not flagged:
        return []
    alarm = trainer.alarm  # the alarm on the training logs
    rule = f": {alarm.signal.describe()}" if alarm is not None else ""
    named = getattr(getattr(alarm, "signal", None), "named", None)  # read from the run as it was when it warned
    remedies = f" then: {'; '.join(named)}" if named else ""
    text = (
        f"Step {flagged[0]}: the training logs' pathology alarm fired ({_FLAG}{rule}) and a warning named the "
        f"remedies not in use{remedies}"
    )
    action = getattr(alarm, "action", None)
    if action is not None and action.action == "stop":
        text += "; on_pathology='stop' saved a checkpoint and stopped training there"
    if len(flagged) > 1:
        text += f"; it flagged {len(flagged)} training logs in all, the last at step {flagged[-1]}"
    return [text + "."]
