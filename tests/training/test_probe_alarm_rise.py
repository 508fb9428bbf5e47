"""The held-out probe's alarm on the relative rise (``probe_alarm_rise``, with ``probe_alarm_z`` its significance
floor): the statistic against the probe's own figures, the config's rule reading it in the reference's units (not in
``z``'s), and the defaults as the choice returns them on the calibration records alone
(``benchmarks/results/probe/cpu-probe-alarm-carry.json``, ``tests.helpers.alarm_choice``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.helpers import alarm_choice
from trl_diffusion_sdpo import DiffusionSDPOConfig
from trl_diffusion_sdpo.callbacks.rewind import ProbeAlarmRule, alarm_steps, probe_alarm, relative_winner_rise

RESULT = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "probe" / "cpu-probe-alarm-carry.json"


def reading(delta: float, reference: float, z: float) -> dict[str, float]:
    return {"probe/delta_winner": delta, "probe/mse_ref_winner": reference, "probe/winner_rise_z": z}


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return json.loads(RESULT.read_text())["analysis"]["records"]


def test_the_relative_rise_is_the_winner_errors_rise_over_the_references_error():
    assert relative_winner_rise(reading(0.055, 0.043, 7.4)) == pytest.approx(0.055 / 0.043, rel=1e-12)
    assert relative_winner_rise(reading(-0.01, 0.2, -3.0)) == pytest.approx(-0.05, rel=1e-12)
    assert math.isnan(relative_winner_rise(reading(0.01, 0.0, 2.0)))  # no reference error to measure it by
    assert math.isnan(relative_winner_rise({"probe/winner_rise_z": 2.0}))  # a record with z only


def test_the_configs_rule_reads_the_rise_in_the_references_units_not_in_z():
    config = DiffusionSDPOConfig(output_dir="unused", use_cpu=True)
    rule = probe_alarm(config)
    rise, floor = config.probe_alarm_rise, config.probe_alarm_z
    assert rule == ProbeAlarmRule.relative(rise, floor, rule.patience)
    # a precise probe of a model whose errors barely moved: z far above any floor, the rise a tenth of the threshold
    # (the held-out model's healthy full tuning read z 19.5 for a rise of about a third of its reference's error)
    quiet = reading(0.1 * rise * 0.2, 0.2, 19.5)
    # a few held-back pairs on a run that breaks: z modest, the rise well above the threshold
    loud = reading(4 * rise * 0.043, 0.043, floor + 3.0)
    assert alarm_steps(rule, [(5 * (i + 1), quiet) for i in range(6)]) == []
    fired = alarm_steps(rule, [(5 * (i + 1), loud) for i in range(2 * rule.patience)])
    assert fired == [5 * rule.patience, 10 * rule.patience]
    # the significance floor: the same rise the probe cannot tell from zero is no alarm
    faint = reading(4 * rise * 0.043, 0.043, floor - 0.5)
    assert alarm_steps(rule, [(5 * (i + 1), faint) for i in range(6)]) == []


def test_the_defaults_are_what_the_choice_returns_on_the_calibration_records_alone(records):
    calibration = alarm_choice.calibration_records(records)
    held_out = [r for r in records if r["held_out"] != alarm_choice.CALIBRATION]
    assert held_out and calibration  # both sides are on record
    assert {r["held_out"] for r in held_out} >= {"held-out dataset", "held-out model"}
    assert {r["id"] for r in calibration}.isdisjoint(r["id"] for r in held_out)
    assert all(r["held_out"] == alarm_choice.CALIBRATION for r in calibration)
    chosen = alarm_choice.choose(calibration)
    fields = DiffusionSDPOConfig.__dataclass_fields__
    assert fields["probe_alarm_rise"].default == chosen["rise"]
    assert fields["probe_alarm_z"].default == chosen["z_floor"]
    assert probe_alarm(DiffusionSDPOConfig(output_dir="unused", use_cpu=True)).patience == chosen["patience"]
    with pytest.raises(ValueError, match="calibration records only"):
        alarm_choice.choose(records)  # the held-out ones are refused, never read


def test_the_result_files_choice_is_the_one_on_record(records):
    analysis = json.loads(RESULT.read_text())["analysis"]
    assert analysis["chosen"] == alarm_choice.choose(alarm_choice.calibration_records(records))
