"""The alarm on the training logs acts through transformers' callback events only: transformers' handler calls its
``on_log`` once per log, with the very ``logs`` the callbacks after it receive, and it acts at the step of the log
that fired; its flags reach ``state.log_history`` and the callbacks after it (the console's printer)."""

from __future__ import annotations

import os

from transformers import TrainerCallback

from tests.helpers.rewind import ScriptedAlarm, equal, trained_weights
from trl_diffusion_sdpo.callbacks import (
    AlarmCallback,
    PathologyAction,
    PathologyRule,
    ProbeCallback,
    ProbeSignal,
    RewindAction,
    TrainingLogSignal,
    hold_back_rows,
)

ROWS = 8
# fires at every training log that has delta/winner: the action is tested apart from the calibrated rule
ALWAYS = PathologyRule(windows=1, window_steps=None, min_delta_winner=-1e9, max_implicit_acc=None)


class SpyAlarm(AlarmCallback):
    """An alarm that records each ``on_log`` call: the step and the ``logs`` object it was handed."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[int, dict]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.calls.append((state.global_step, logs))
        return super().on_log(args, state, control, logs=logs, **kwargs)


class After(TrainerCallback):
    """A callback registered after the alarm (as the console's printer is): what each log holds when it arrives."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, dict, dict]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append((state.global_step, logs, dict(logs)))


def test_an_added_alarm_acts_once_per_log_through_the_handler(make_trainer, make_pickapic):
    trainer = make_trainer(train_dataset=make_pickapic(ROWS), max_steps=3, logging_steps=1, safeguard_space="none")
    alarm = SpyAlarm(TrainingLogSignal(rule=ALWAYS), PathologyAction("safeguard"), trainer=trainer)
    after = After()
    trainer.add_callback(alarm)
    trainer.add_callback(after)
    assert trainer.alarm is alarm  # it reads the training logs: the config's alarm gave way to it
    assert trainer.safeguard is None
    trainer.train()
    # One call per log, from transformers' handler: the same logs object the next callback receives, in its order
    assert [(step, id(logs)) for step, logs in alarm.calls] == [(step, id(logs)) for step, logs, _ in after.seen]
    assert len(alarm.calls) == len(trainer.state.log_history)
    training = [e for e in trainer.state.log_history if "delta/winner" in e]
    assert [e["step"] for e in training] == [1, 2, 3]
    # It fired at step 1's log and switched the safeguard on there; the steps after it trained with it
    assert training[0]["health/winner_pathology"] == 1.0 and training[0]["health/safeguard_on"] == 1.0
    assert "safeguard/lambda_mean" not in training[0]
    assert all("safeguard/lambda_mean" in e for e in training[1:])
    assert alarm.action.switched_at == 1 and trainer.safeguard.name == "output"
    # The callback after it saw the flags in the log itself (the console prints them)
    first = next(copy for step, _, copy in after.seen if step == 1)
    assert first["health/winner_pathology"] == 1.0 and first["health/safeguard_on"] == 1.0


def test_the_configs_alarm_stops_at_the_log_that_fired(make_trainer, make_pickapic):
    """``on_pathology="stop"``: the config's alarm (a callback like any other) saves and stops at the log where its
    rule first holds, through transformers' ``control``."""
    trainer = make_trainer(
        train_dataset=make_pickapic(ROWS), max_steps=4, logging_steps=1, on_pathology="stop", safeguard_space="none"
    )
    assert trainer.callbacks_of(AlarmCallback) == [trainer.alarm]
    trainer.alarm.signal.rule = ALWAYS
    trainer.train()
    assert trainer.state.global_step == 1
    assert trainer.state.log_history[0]["health/winner_pathology"] == 1.0
    assert any(c.startswith("checkpoint-1") for c in os.listdir(trainer.args.output_dir))


class StepSpyAlarm(AlarmCallback):
    """An alarm on the probe that records each ``on_step_end`` call: the step, whether transformers' handler made it
    (the handler hands every callback the optimizer and the scheduler) and the probe's reading it found published."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[int, bool, int | None]] = []

    def on_step_end(self, args, state, control, **kwargs):
        reading = self.signal.probe.last_reading
        handler = "optimizer" in kwargs and "lr_scheduler" in kwargs
        self.calls.append((state.global_step, handler, None if reading is None else reading[0]))
        return super().on_step_end(args, state, control, **kwargs)


def test_the_probes_alarm_acts_once_per_step_through_the_handler_after_the_probe(make_trainer, make_pickapic):
    """The probe measures and publishes in ``on_step_end``; its alarm, after it, reads that step's reading in the same
    event, once per optimizer step, called by transformers' handler only; the figures and the flags reach the training
    logs through their own ``on_log``. A trainer that also drove the alarm from its step or its log would call it more
    often, or without the handler's arguments."""
    train, held = hold_back_rows(make_pickapic(ROWS), 2)
    trainer = make_trainer(
        train_dataset=train, max_steps=6, logging_steps=3, on_pathology="safeguard", safeguard_space="none"
    )
    probe = ProbeCallback.held_out(every=2, pairs=held, trainer=trainer)
    rule = ScriptedAlarm(patience=1, unhealthy_steps={4})
    alarm = StepSpyAlarm(ProbeSignal(probe, rule), RewindAction(), trainer=trainer)
    after = After()
    for callback in (probe, alarm, after):
        trainer.add_callback(callback)
    # Where a report_to integration stands: before every callback given (transformers registers them first)
    integration = After()
    trainer.callback_handler.callbacks.insert(0, integration)
    start = trained_weights(trainer)
    trainer.train()
    # Every step once, from the handler; at steps 2, 4 and 6 the probe had published that step's reading before
    assert [(step, handler) for step, handler, _ in alarm.calls] == [(s, True) for s in range(1, 7)]
    assert [published for step, _, published in alarm.calls if step % 2 == 0] == [2, 4, 6]
    assert [step for step, _ in probe.readings] == [2, 4, 6]
    # The alarm fired at step 4 and rewound to step 2 (step 2's reading is a restore point), then trained on with the
    # safeguard; the rewound step was logged as it fired, outside the logging interval
    assert alarm.action.rewinds == [(4, 2)] and trainer.safeguard is not None
    assert not equal(trained_weights(trainer), start)
    logs = {e["step"]: e for e in trainer.state.log_history if "loss" in e}
    assert sorted(logs) == [3, 4, 6]
    assert [logs[s].get("health/probe_alarm") for s in (3, 4, 6)] == [0.0, 1.0, 0.0]
    assert logs[4]["health/rewind_to"] == 2.0 and "health/rewind_to" not in logs[6]
    readings = [metrics["probe/winner_rise_z"] for _, metrics in probe.readings]
    assert [logs[s]["probe/winner_rise_z"] for s in (3, 4, 6)] == readings
    # The callback after them saw the figures and the flags in the logs of the same call (the console prints them)
    seen = {step: copy for step, _, copy in after.seen if "loss" in copy}
    assert seen[4]["health/probe_alarm"] == 1.0 and "probe/winner_rise_z" in seen[4]
    # and so did the integration before them: the trainer's log carried what the probe and its alarm handed it
    reported = {step: copy for step, _, copy in integration.seen if "loss" in copy}
    assert [reported[s]["probe/winner_rise_z"] for s in (3, 4, 6)] == readings
    assert [reported[s]["health/probe_alarm"] for s in (3, 4, 6)] == [0.0, 1.0, 0.0]


def test_the_configs_alarms_register_without_transformers_duplicate_warning(make_trainer, make_pickapic):
    """A run with the probe builds an alarm on the training logs and one on the probe: transformers warns when a
    second callback of one class is registered (its list of callbacks printed into the run's log), so the two are of
    two classes, and each keeps its state under its own key."""
    from transformers.utils import logging as transformers_logging

    records: list[str] = []

    class Keep(transformers_logging.logging.Handler):
        def emit(self, record) -> None:
            records.append(record.getMessage())

    handler = Keep()
    transformers_logging.add_handler(handler)
    try:
        trainer = make_trainer(
            train_dataset=make_pickapic(ROWS), max_steps=1, probe_steps=1, probe_pairs=2, safeguard_space="none"
        )
    finally:
        transformers_logging.remove_handler(handler)
    assert trainer.alarm is not None and trainer.probe_alarm is not None
    assert type(trainer.alarm) is not type(trainer.probe_alarm)
    assert trainer.alarm.state_key != trainer.probe_alarm.state_key
    assert not [message for message in records if "there is already one" in message]
