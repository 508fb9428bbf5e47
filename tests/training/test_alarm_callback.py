"""The alarm on the training logs acts through transformers' callback events only: transformers' handler calls its
``on_log`` once per log, with the very ``logs`` the callbacks after it receive, and it acts at the step of the log
that fired; its flags reach ``state.log_history`` and the callbacks after it (the console's printer)."""

from __future__ import annotations

import os

from transformers import TrainerCallback

from trl_diffusion_sdpo.callbacks import AlarmCallback, PathologyAction, PathologyRule, TrainingLogSignal

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


def test_an_alarm_in_callbacks_acts_once_per_log_through_the_handler(make_trainer, make_pickapic):
    alarm = SpyAlarm(TrainingLogSignal(rule=ALWAYS), PathologyAction("safeguard"))
    after = After()
    trainer = make_trainer(
        train_dataset=make_pickapic(ROWS),
        callbacks=[alarm, after],
        max_steps=3,
        logging_steps=1,
        safeguard_space="none",
    )
    assert trainer.alarm is None  # the one given reads the training logs: the config builds none beside it
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
    assert trainer.alarm in trainer.callback_handler.callbacks
    trainer.alarm.signal.rule = ALWAYS
    trainer.train()
    assert trainer.state.global_step == 1
    assert trainer.state.log_history[0]["health/winner_pathology"] == 1.0
    assert any(c.startswith("checkpoint-1") for c in os.listdir(trainer.args.output_dir))
