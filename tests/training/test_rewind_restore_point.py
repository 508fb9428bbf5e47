"""Where a rewind goes back to (docs/safeguard.md, "The held-out probe and the rewind"): the last probe whose winner
error's rise the probe cannot tell from zero (``probe/winner_rise_z`` at most ``RESTORE_Z``), not merely one below the
alarm's threshold, else the start; the records say how healthy the restored step was. An ``AlarmCallback`` subclass
keeps the rewind's state across a resume."""

from __future__ import annotations

import json
import logging

import torch

from tests.helpers.rewind import CopyOutputAt, HandDriven, Recorder, ScriptedAlarm, equal, trained_weights
from trl_diffusion_sdpo.callbacks import AlarmCallback, ProbeCallback, ProbeSignal, RewindAction, hold_back_rows
from trl_diffusion_sdpo.callbacks.rewind import RESTORE_Z, MemorySnapshot, ProbeAlarmRule, RewindRecord
from trl_diffusion_sdpo.engines.base import trainable_parameters

ROWS, HELD = 8, 2
DPO = {"safeguard_space": "none"}
#: the readings of a run that heals only sometimes: z = 4.3 at step 3 is below the alarm's threshold (7) and is no
#: point to go back to; the alarm fires at step 7 (4 unhealthy probes in a row)
READINGS = [0.5, 1.0, 4.3, 8.0, 8.0, 8.0, 8.0]
#: a run's readings under the config's rule at probe_alarm_z=7: the first above it is the seventh
RUN_READINGS = [0.5, 1.0, 4.3, 6.0, 6.0, 6.0, 8.0]
RULE = ProbeAlarmRule(patience=4, threshold=7.0)


def _rewind_on(
    readings: list[float], rule: ProbeAlarmRule = RULE
) -> tuple[RewindAction, list[torch.Tensor], torch.Tensor]:
    """A rewind reading ``readings`` (one probe a step from step 1) over a weight that counts the steps: the weights
    at the end of each step and the weight the run ends with."""
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    rewind = HandDriven(rule, RewindAction(MemorySnapshot([weight])))
    rewind.begin(optimizer)
    control = type("Control", (), {"should_training_stop": False})()
    at_end = [weight.detach().clone()]  # step 0
    for step, z in enumerate(readings, start=1):
        with torch.no_grad():
            weight.fill_(float(step))
        at_end.append(weight.detach().clone())
        rewind.read({ProbeAlarmRule.SIGNAL: z}, step, optimizer, control)
    return rewind.action, at_end, weight.detach().clone()


def test_the_rewind_restores_the_last_step_the_probe_cannot_tell_from_zero_not_the_last_below_the_alarm():
    rewind, at_end, weight = _rewind_on(READINGS)
    assert rewind.rewinds == [(7, 2)] and rewind.restored_z == [1.0]
    assert torch.equal(weight, at_end[2])  # step 2's weights (z = 1.0), not step 3's (z = 4.3)
    assert READINGS[1] <= RESTORE_Z < READINGS[2] < RULE.threshold
    [line] = rewind.record().lines(7)
    assert "went back to step 2's (probe/winner_rise_z 1.00 there, a rise the probe cannot tell from zero)" in line


def test_without_a_restore_point_the_rewind_goes_back_to_the_start_and_says_so():
    rewind, at_end, weight = _rewind_on([3.0, 2.0, 8.0, 8.0, 8.0, 8.0])
    assert rewind.rewinds == [(6, 0)] and torch.equal(weight, at_end[0])
    [line] = rewind.record().lines(6)
    assert "back to step 0's (the start of training: no probe before had probe/winner_rise_z at most 1.645" in line
    # a restored point the criterion calls unhealthy (a checkpoint's, say) is named so
    [line] = RewindRecord(((9, 3),), restored_z=(4.3,), rule=RULE).lines(9)
    assert "back to step 3's (an unhealthy point: its probe/winner_rise_z 4.30 is above" in line


class _ScriptedReadings:
    """The probe's real figures with ``probe/winner_rise_z`` read from a script, one reading per probe."""

    def __init__(self, probe, readings: list[float]) -> None:
        self.measure, self.readings, self.calls = probe.measure, list(readings), 0

    def __call__(self, model, device) -> dict[str, float]:
        metrics = self.measure(model, device)
        metrics[ProbeAlarmRule.SIGNAL] = self.readings[self.calls]
        self.calls += 1
        return metrics


def test_a_runs_rewind_and_warning_name_the_step_the_probe_called_healthy(make_trainer, make_pickapic, caplog):
    settings = dict(
        max_steps=7,
        probe_steps=1,
        probe_pairs=HELD,
        probe_alarm_z=7.0,
        probe_alarm_rise=-100.0,  # every rise counts: the scripted z alone decides
        probe_noise_draws=2,  # the figures that decide are scripted
        **DPO,
    )
    recorder = Recorder()
    rewound = make_trainer(train_dataset=make_pickapic(ROWS), callbacks=[recorder], on_pathology="rewind", **settings)
    recorder.parameters = list(trainable_parameters(rewound.family.denoiser))
    rewound.probe.probe.measure = _ScriptedReadings(rewound.probe.probe, RUN_READINGS)
    rewound.train()
    assert rewound.probe_alarm.action.rewinds == [(7, 2)]
    assert equal(trained_weights(rewound), recorder.at_end[2][0]) and not equal(
        recorder.at_end[2][0], recorder.at_end[3][0]
    )
    # on_pathology="warn" names the same step as the one a rewind would restore
    warned = make_trainer(train_dataset=make_pickapic(ROWS), **settings)
    warned.probe.probe.measure = _ScriptedReadings(warned.probe.probe, RUN_READINGS)
    caplog.clear()  # the warned run's records only: the rewound run's end summary names the alarm too
    with caplog.at_level(logging.WARNING, logger="trl_diffusion_sdpo"):
        warned.train()
    [warning] = [r.getMessage() for r in caplog.records if "held-out probe's alarm fired" in r.getMessage()]
    assert warning.startswith("Step 7:") and "would restore step 2's weights" in warning


def test_an_alarm_subclass_keeps_the_rewinds_state_across_a_resume(make_trainer, make_pickapic, tmp_path):
    class MyAlarm(AlarmCallback):
        pass

    train, held = hold_back_rows(make_pickapic(ROWS), HELD)

    def run(output_dir, callbacks=(), resume=None):
        trainer = make_trainer(
            train_dataset=train, max_steps=5, on_pathology="safeguard", save_strategy="steps", save_steps=3,
            output_dir=str(output_dir), probe_noise_draws=2, **DPO,  # the figures unread: the alarm is scripted
        )  # fmt: skip
        probe = ProbeCallback.held_out(every=1, pairs=held, trainer=trainer)
        rule = ScriptedAlarm(patience=1, unhealthy_steps={2})  # rewinds at step 2, to 1
        rewind = MyAlarm(ProbeSignal(probe, rule), RewindAction(), trainer=trainer)
        for callback in (probe, rewind, *callbacks):
            trainer.add_callback(callback)
        trainer.train(resume_from_checkpoint=resume)
        return trainer, rewind

    # The run interrupted after step 3 is the uninterrupted one up to there: its output folder right after that save.
    straight, straight_rewind = run(tmp_path / "straight", callbacks=[CopyOutputAt(3, tmp_path / "resumed")])
    checkpoint = tmp_path / "resumed" / "checkpoint-3"
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]
    assert saved["MyAlarm"]["attributes"]["rewinds"] == [[2, 1]]  # transformers' key: the subclass's name
    resumed, resumed_rewind = run(tmp_path / "resumed", resume=str(checkpoint))
    assert resumed_rewind.action.rewinds == straight_rewind.action.rewinds == [(2, 1)]
    assert resumed_rewind.action.safeguard_on and resumed.safeguard is not None
    assert equal(trained_weights(resumed), trained_weights(straight))


def test_the_docs_state_the_restore_criterion_and_how_held_back_pairs_are_drawn():
    from pathlib import Path

    from datasets import Dataset

    page = " ".join((Path(__file__).resolve().parents[2] / "docs" / "safeguard.md").read_text().split())
    assert f"is at most {RESTORE_Z:g} (`callbacks.rewind.RESTORE_Z`" in page
    # the start summary's words for 16 pairs of 4 prompts, as the page quotes them
    data = Dataset.from_dict({"prompt": [f"prompt {i % 4}" for i in range(64)]})
    _, held = hold_back_rows(data, 16, seed=0)
    assert f"`16 pairs {held.info.description}`" in page
