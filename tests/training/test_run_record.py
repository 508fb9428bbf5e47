"""What the user reads of a run's warnings and alarms (docs/safeguard.md, "The held-out probe and the rewind"): the
model card and the end-of-run summary record the start summary's warnings, the training logs' alarm and every firing
of the held-out probe's alarm, in a plain Diffusion-DPO run as in a rewinding one; and ``health/probe_alarm`` is in
every training log that follows a probe, whatever ``on_pathology``."""

from __future__ import annotations

import logging

import pytest

from tests.helpers.rewind import ScriptedAlarm

ROWS, HELD = 8, 2
DPO = {"safeguard_space": "none"}


def _card_lines(output_dir) -> list[str]:
    readme = (output_dir / "README.md").read_text()
    section = readme.split("## Alarms, warnings and rewinds", 1)[1].split("\n## ", 1)[0]
    return [line[2:] for line in section.splitlines() if line.startswith("- ")]


def test_the_card_and_the_end_summary_record_every_warning_and_alarm(
    make_trainer, make_pickapic, tmp_path, monkeypatch, caplog
):
    from trl_diffusion_sdpo.callbacks import health

    # the training logs' alarm made to fire from the third log on (the tiny run does not show it in 6 steps)
    monkeypatch.setattr(
        health, "winner_pathology", lambda history, rule: sum("delta/winner" in h for h in history) >= 3
    )
    trainer = make_trainer(
        train_dataset=make_pickapic(ROWS), max_steps=6, warmup_steps=4, probe_steps=1, probe_pairs=HELD,
        output_dir=str(tmp_path), probe_noise_draws=2, **DPO,  # the figures unread: the alarm is scripted
    )  # fmt: skip
    assert trainer.args.on_pathology == "warn"
    # the probe's alarm: unhealthy at 4 and 6 (one probe enough: it fires at each), healthy for the alarm at 5 but
    # not a restore point
    trainer.probe_alarm.signal.rule = ScriptedAlarm(patience=1, unhealthy_steps={4, 6}, doubtful_steps=frozenset({5}))
    with caplog.at_level(logging.INFO, logger="trl_diffusion_sdpo"):
        trainer.train()
    trainer.create_model_card()
    lines = _card_lines(tmp_path)
    # the pairs the probe held back are pairs the run did not train on: the card says so beside the hyperparameters
    [probe_row] = [row for row in (tmp_path / "README.md").read_text().splitlines() if "`held_out_probe`" in row]
    assert f"on {HELD} pairs held back from the training data (drawn at random" in probe_row, probe_row
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    # every warning the start summary logged (here a warmup over half the run and a rate above the family's range)
    start = [r.getMessage() for r in warnings if r.name == "trl_diffusion_sdpo.io.run_summary"]
    assert len(start) == 2 and any(m.startswith("warmup_steps=4 covers more than half") for m in start)
    assert [line for line in lines if line.startswith("At the start: ")] == [f"At the start: {m}" for m in start]
    # the training logs' alarm, where it warned
    [flag] = [r.getMessage() for r in warnings if r.name == "trl_diffusion_sdpo.callbacks.health"]
    flagged = [line for line in lines if "the training logs' pathology alarm fired" in line]
    assert len(flagged) == 1 and flagged[0].startswith(f"{flag.split(':')[0]}: ")
    # each firing of the probe's alarm: at 4 it warned naming step 3; at 6, step 3 still the restore point (5 was
    # healthy for the alarm, not a restore point), no second warning, and the record says so
    probe_warnings = [r.getMessage() for r in warnings if "held-out probe's alarm fired" in r.getMessage()]
    assert [w.split(":")[0] for w in probe_warnings] == ["Step 4"]
    fired = [line for line in lines if "the held-out probe's alarm fired" in line]
    assert [line.split(":")[0] for line in fired] == ["Step 4", "Step 6"]
    assert "a warning named step 3's weights" in fired[0] and "no new warning" in fired[1]
    assert all("would have gone back to step 3's weights" in line for line in fired)
    assert len(lines) == len(start) + 1 + 2
    # the end-of-run summary says the same
    ended = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Training ended")]
    assert ended == ["Training ended at step 6. " + " ".join(lines)]


# the rewind's flags in every log by default: test_alarm_callback.py's test_the_probes_alarm_acts_once_per_step_...
@pytest.mark.parametrize("on_pathology", ["warn", pytest.param("rewind", marks=pytest.mark.slow), "stop"])
def test_health_probe_alarm_is_in_every_log_after_a_probe(make_trainer, make_pickapic, on_pathology):
    # logs every 2 steps, a probe every step: the alarm fires at step 3, between two logs, and is logged there
    trainer = make_trainer(
        train_dataset=make_pickapic(ROWS), max_steps=6, logging_steps=2, probe_steps=1, probe_pairs=HELD,
        on_pathology=on_pathology, probe_noise_draws=2, **DPO,  # the figures unread: the alarm is scripted
    )  # fmt: skip
    rule = ScriptedAlarm(patience=1, unhealthy_steps={3})
    trainer.probe_alarm.signal.rule = rule
    trainer.train()
    training_logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in training_logs if "probe/delta_winner" in e] == [e["step"] for e in training_logs]
    last = trainer.state.global_step  # "stop" stops at 3
    assert last == (3 if on_pathology == "stop" else 6)
    steps = sorted({3, *range(2, last + 1, 2)})
    assert [(e["step"], e["health/probe_alarm"]) for e in training_logs] == [(s, float(s == 3)) for s in steps]
