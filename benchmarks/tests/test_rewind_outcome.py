"""``benchmarks/studies/rewind_outcome.py``: the per-seed record, the analysis of a regime and the run check against
synthetic runs worked out by hand, offline and online (a record of either kind, the online one without weights).

Run with ``python -m pytest benchmarks/tests``; the package's suite renders the study's table on its own
(``tests/docs/test_rewind_outcome_table.py``).
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks" / "studies"))

import rewind_outcome as study  # noqa: E402

ONLINE = study.OnlineCell("online-hacking", 1e-3)
OFFLINE = study.Cell(lr=1e-4)


def _run(
    cell, setting: str, seed: int, final: float, *, rewinds=(), probe=(), reward_at=None, digest="a", loss=(1.0,)
):
    online = isinstance(cell, study.OnlineCell)
    max_steps = 60 if online else cell.steps
    last = rewinds[-1][0] if rewinds and online else max_steps
    run = {
        "cell": asdict(cell),
        "setting": setting,
        "seed": seed,
        "final_reward": final,
        "base_reward": 0.8,
        "max_steps": max_steps,
        "last_step": last,
        ("measures_sha256" if online else "weights_sha256"): digest,
        "loss": list(loss),
        "probe": [{"step": s, "winner_rise_z": z, "delta_winner": 0.0} for s, z in probe],
        "rewinds": [list(r) for r in rewinds],
    }
    if setting == "dpo":
        run["reward_at"] = reward_at or {"20": final, "40": final, "60": final}
    return run


def test_an_online_quiet_run_is_compared_on_its_measures_digest():
    dpo = _run(ONLINE, "dpo", 2, 0.8)
    same = study.rewind_record(_run(ONLINE, "rewind", 2, 0.8), dpo)
    assert same["equals_dpo"] == {"measures_sha256": True, "loss": True, "final_reward": True}
    other = study.rewind_record(_run(ONLINE, "rewind", 2, 0.8, digest="b"), dpo)
    assert other["equals_dpo"]["measures_sha256"] is False
    assert "weights_sha256" not in other["equals_dpo"]


def test_an_online_rewind_stops_at_its_alarm_and_the_delay_counts_from_the_fall():
    dpo = _run(ONLINE, "dpo", 3, 0.6, reward_at={"20": 0.79, "40": 0.7, "60": 0.6})  # falls from step 40
    rewind = _run(ONLINE, "rewind", 3, 0.8, rewinds=[(30, 0)], probe=[(5, 0.5), (30, 20.0)])
    record = study.rewind_record(rewind, dpo)
    assert record["stopped_at"] == 30 and record["fall_start"] == 40 and record["delay_steps"] == -10
    assert record["restored"] == [{"fired_at": 30, "restored": 0, "restored_z": None, "restore_point": True}]
    assert record["dpo_class"] == "breaking" and "equals_dpo" not in record


def test_a_restored_step_is_checked_on_its_own_probe_reading():
    dpo = _run(OFFLINE, "dpo", 0, 0.6, reward_at={"10": 0.7, "20": 0.6})
    rewind = _run(OFFLINE, "rewind", 0, 0.7, rewinds=[(20, 10)], probe=[(5, 0.4), (10, 4.3), (15, 14.0), (20, 20.0)])
    (restored,) = study.rewind_record(rewind, dpo)["restored"]
    assert restored["restored_z"] == 4.3 and restored["restore_point"] is False  # below the alarm, not a restore point


def test_a_false_alarm_costs_the_rewind_minus_diffusion_dpo_on_healthy_runs_only():
    runs = {"dpo": {}, "rewind": {}, "safeguard": {}}
    # seed 0 healthy and quiet; seed 1 healthy, the rewind alarmed and ended 0.03 lower; seed 2 fell, alarmed
    for seed, dpo, rewind, alarmed, fell in ((0, 0.80, 0.80, False, False), (1, 0.81, 0.78, True, False),
                                             (2, 0.60, 0.75, True, True)):  # fmt: skip
        reward_at = {"10": 0.8, "20": dpo if fell else 0.8}
        runs["dpo"][seed] = _run(OFFLINE, "dpo", seed, dpo, reward_at=reward_at)
        runs["rewind"][seed] = _run(OFFLINE, "rewind", seed, rewind, rewinds=[(20, 0)] if alarmed else ())
        runs["safeguard"][seed] = _run(OFFLINE, "safeguard", seed, 0.7)
    analysis = study.analyse_cell(runs)
    assert analysis["healthy"]["runs"] == 2 and analysis["healthy"]["quiet"] == 1
    assert analysis["healthy"]["false_alarm_cost"] == pytest.approx([-0.03])


def test_a_run_that_stopped_early_without_a_rewind_is_refused_as_preempted(tmp_path):
    stopped = _run(ONLINE, "rewind", 2, 0.8, rewinds=[(10, 0)])
    stopped["seconds"] = 1.0
    study._write_run(tmp_path, ONLINE, "rewind", 2, stopped)  # stopped by its rewind: kept
    assert (tmp_path / f"{study.run_key(ONLINE, 'rewind', 2)}.json").is_file()
    preempted = {**stopped, "rewinds": [], "last_step": 10}
    with pytest.raises(RuntimeError, match="stopped at step 10"):
        study._write_run(tmp_path, ONLINE, "dpo", 2, preempted)


def test_a_longer_cell_names_its_steps_and_evaluates_every_10_steps_to_its_end():
    longer = study.Cell(lr=1e-4, steps=100)
    assert longer.name.endswith("-100steps") and study.Cell(lr=1e-4).name == OFFLINE.name
    assert longer.eval_steps == tuple(range(10, 101, 10))
    assert study.cell_of(asdict(longer)) == longer and study.cell_of(asdict(ONLINE)) == ONLINE


def test_a_longer_run_stopped_by_its_second_alarm_is_stopped_at_that_step():
    longer = study.Cell(lr=1e-4, steps=100)
    dpo = _run(longer, "dpo", 0, 0.6, reward_at={"60": 0.7, "70": 0.6})
    stopped = {**_run(longer, "rewind", 0, 0.8, rewinds=[(60, 0), (70, 0)]), "last_step": 70}
    assert study.rewind_record(stopped, dpo)["stopped_at"] == 70
    assert study.rewind_record(_run(longer, "rewind", 0, 0.8, rewinds=[(60, 0)]), dpo)["stopped_at"] is None
