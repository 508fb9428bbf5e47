"""``benchmarks/studies/probe_alarm_sequential.py``: the classes, the start of the fall and the rules against runs and
sums worked out by hand; the vectorised replay and the package's rule against the study's loop on every recorded run;
the choice on synthetic runs; the written result file against a recomputation, the package's defaults and the pages
that quote it.

Run with ``python -m pytest benchmarks/tests``; the package's suite does not read the result files.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks" / "studies"))

import probe_alarm_sequential as study  # noqa: E402

from trl_diffusion_sdpo.callbacks.rewind import ProbeAlarmRule, alarm_steps  # noqa: E402


def _run(
    changes: dict[int, float], zs: list[float], run_id: str = "r", model: str = "benchmark", cell: str = "lr 0.0002"
) -> dict:
    """A run with a probe every 5 steps reading ``zs`` and the held-out reward change ``changes`` per step."""
    return {"id": run_id, "model": model, "mode": "offline", "cell": f"{model}, offline, {cell}", "safeguard": False,
            "probe": [{"step": 5 * (i + 1), "winner_rise_z": z} for i, z in enumerate(zs)],
            "reward_change": changes}  # fmt: skip


def test_the_classes_and_the_start_of_the_fall():
    breaking = _run({5: -0.03, 10: 0.0, 15: -0.03, 20: -0.05}, [0.0] * 4)
    assert study.run_class(breaking) == "breaking"
    assert study.fall_start(breaking) == 15  # step 10 came back within the tolerance
    healthy = _run({5: -0.02, 10: 0.01}, [0.0] * 2)  # exactly at the tolerance: not beyond it
    assert study.run_class(healthy) == "healthy" and study.fall_start(healthy) is None
    dipped = _run({5: -0.1, 10: -0.01}, [0.0] * 2)
    assert study.run_class(dipped) == "dipped" and study.fall_start(dipped) is None


def test_the_cusum_and_the_in_a_row_rule_fire_where_worked_out_by_hand():
    series = list(enumerate([8.0, 8.0, 8.0, 8.0, 8.0, 0.0, 0.0, 20.0, 7.0], 1))
    # k 6.5: 1.5, 3, 4.5, 6, 7.5 fires (step 5, then 0); 0, 0; 13.5 fires (step 8, then 0); 0.5
    assert study.cusum_fires(series, 6.5, 6.0) == [5, 8]
    # without the floor at 0 the quiet probes would carry -13 and the reading of 20 would not fire
    assert study.cusum_fires(list(enumerate([0.0, 0.0, 10.0, 10.0], 1)), 6.5, 6.0) == [4]
    # above 7 four in a row: steps 1-4 fire at 4, then step 5 starts a new count broken at 6
    assert study.in_a_row_fires(series, 7.0, 4) == [4]


def test_the_vectorised_replay_and_the_packages_rule_fire_as_the_studys_loop_on_every_recorded_run():
    runs = study.load_z_runs(study.SOURCE)
    series = study.padded(runs)
    for rule in (study.Rule("cusum", 6.5, 6.0), study.Rule("cusum", 2.0, 20.0), study.Rule("in_a_row", 7.0, 4.0)):
        loop = [rule.fires(r) is not None for r in runs]
        assert study.fire_matrix(rule, series).tolist() == loop, rule
        package = (
            ProbeAlarmRule.cusum(rule.a, rule.b) if rule.family == "cusum" else ProbeAlarmRule(int(rule.b), rule.a)
        )
        for run in runs:
            readings = [(int(p["step"]), {ProbeAlarmRule.SIGNAL: p["winner_rise_z"]}) for p in run["probe"]
                        if p["step"] <= max(run["reward_change"])]  # fmt: skip
            fired = alarm_steps(package, readings)
            assert (fired[0] if fired else None) == rule.fires(run), (rule, run["id"])


def test_the_choice_bounds_the_false_alarm_rate_in_every_regime_not_only_pooled(monkeypatch):
    # 20 quiet healthy runs in one regime and one healthy run reading 12 in another: a rule firing on that run alarms
    # on 1 in 21 healthy runs pooled (within 5 %, and within the first rule's jittered rate: above 7 four in a row
    # fires on it too) but on every healthy run of its regime. k 5 fires on the breaking runs' 20 at once and on that
    # run; k 15 fires on the 20 and never on the 12, even jittered: the per-regime bound takes it.
    monkeypatch.setattr(study, "GRID", {"in_a_row": (("t", "p"), (7.0,), (4.0,)),
                                        "cusum": (("k", "h"), (5.0, 15.0), (1.0,))})  # fmt: skip
    monkeypatch.setattr(study, "DRAWS", 200)
    flat = {s: 0.0 for s in range(5, 55, 5)}
    falls = {s: (0.0 if s < 10 else -0.1) for s in range(5, 55, 5)}
    runs = [_run(falls, [0.0] + [20.0] * 9, f"b{i}", cell="full, lr 0.0001") for i in range(3)]
    runs += [_run(flat, [0.0] * 10, f"q{i}", cell="lora, lr 0.0001") for i in range(20)]
    runs += [_run(flat, [0.0] + [12.0] * 9, "loud", cell="full, lr 0.0001")]
    chosen, search = study.choose(runs)
    scored = search["scored"]
    sensitive = study.Rule("cusum", 5.0, 1.0)
    assert scored[sensitive]["false_alarm_rate"] == pytest.approx(1 / 21)  # within the pooled bound
    assert scored[sensitive]["worst_regime_false_alarm_rate"]["observed"] == 1.0
    assert chosen == study.Rule("cusum", 15.0, 1.0)
    rates = study.regime_rates(chosen, runs, draws=200)
    assert {name: rate["observed"] for name, rate in rates.items()} == {
        "benchmark, offline, full, lr 0.0001, Diffusion-DPO": 0.0,
        "benchmark, offline, lora, lr 0.0001, Diffusion-DPO": 0.0,
    }


def test_the_choice_takes_the_earliest_rule_within_the_false_alarm_bound(monkeypatch):
    # Breaking runs read 9 from their fall (step 10) on; healthy ones read 3 from step 35 on. The earlier rule (above
    # 7, 4 in a row) fires on the breaking runs at step 25, 3 probes late. The CUSUM with k 2, h 3 fires at step 10
    # but also on the healthy runs (1, 2, 3, 4 at step 50); the one with k 5, h 3 fires at step 10 (4) and on no
    # healthy run, even jittered; the one with k 8 at step 25 (1, 2, 3, 4).
    monkeypatch.setattr(study, "GRID", {"in_a_row": (("t", "p"), (7.0,), (4.0,)),
                                        "cusum": (("k", "h"), (2.0, 5.0, 8.0), (3.0,))})  # fmt: skip
    monkeypatch.setattr(study, "DRAWS", 200)
    changes = {s: (0.0 if s < 10 else -0.1) for s in range(5, 55, 5)}
    runs = [_run(changes, [0.0] + [9.0] * 9, f"b{i}") for i in range(3)]
    runs += [_run({s: 0.0 for s in range(5, 55, 5)}, [0.0] * 6 + [3.0] * 4, f"h{i}") for i in range(3)]
    chosen, search = study.choose(runs)
    assert chosen == study.Rule("cusum", 5.0, 3.0)
    scored = search["scored"]
    assert scored[chosen]["delay_probes"]["median"] == 0 and scored[chosen]["recall"] == 1.0
    assert scored[study.Rule("cusum", 2.0, 3.0)]["false_alarm_rate"] == 1.0
    assert scored[study.Rule("cusum", 8.0, 3.0)]["delay_probes"]["median"] == 3
    assert scored[study.Rule("in_a_row", 7.0, 4.0)]["delay_probes"]["median"] == 3


def test_the_jittered_rate_moves_each_reading_by_one_standard_error():
    # one healthy run reading exactly 8 once: a single probe above 8 fires on half of the re-draws
    healthy = np.array([[0.0, 8.0, -math.inf]])
    assert study.jittered_far(study.Rule("in_a_row", 8.0, 1.0), healthy, draws=20000) == pytest.approx(0.5, abs=0.02)


@pytest.fixture(scope="module")
def written() -> dict:
    return json.loads(study.OUTPUT.read_text())


def test_the_result_file_is_its_recomputation_and_its_choice_the_cusum_on_record(written):
    assert study.compute() == written
    # the package's rule since is the relative rise (probe_alarm_carry.py, tests/training/test_probe_alarm_rise.py)
    chosen = written["rules"]["chosen"]
    assert (chosen["family"], chosen["a"], chosen["b"]) == ("cusum", 13.0, 1.0)
    # within every bound of the choice on the calibration runs, in every regime
    calibration = written["per_regime"]["chosen"]["calibration"]
    assert calibration and all(r["observed"] <= study.FAR_TARGET for r in calibration.values())
    assert all(r["jittered"] <= study.FAR_TARGET for r in calibration.values())
    # the held-out runs chose nothing: none of them is a calibration run
    held = {r["id"] for r in written["runs"] if r["model"] != "benchmark"}
    assert held and not held & set(written["figures"]["chosen"]["calibration"]["fires_at"])


def test_the_research_record_quotes_the_result_file(written):
    # docs/safeguard.md states the package's rule now, the relative rise (tests/docs/test_probe_alarm_carry_table.py)
    alarm = (ROOT / "benchmarks" / "research" / "alarm.md").read_text()
    assert study.tables(written) in alarm
