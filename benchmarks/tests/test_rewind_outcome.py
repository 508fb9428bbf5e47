"""``benchmarks/studies/rewind_outcome.py``: the per-seed record, the analysis of a regime, the targets and the
``dpo_lower`` arm's rate, against synthetic runs worked out by hand.

Run with ``python -m pytest benchmarks/tests``; the package's suite renders the study's table on its own
(``tests/docs/test_rewind_outcome_table.py``).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks" / "studies"))

import rewind_outcome as study  # noqa: E402

CELL = study.Cell(lr=1e-2, tuning="lora", pairs=40, steps=60)


def _run(setting: str, seed: int, final: float, *, rewinds=(), probe=(), reward_at=None, digest="a", **extra):
    run = {
        "cell": asdict(CELL),
        "setting": setting,
        "seed": seed,
        "learning_rate": CELL.lr,
        "final_reward": final,
        "base_reward": 0.8,
        "max_steps": CELL.steps,
        "last_step": CELL.steps,
        "weights_sha256": digest,
        "loss": [1.0],
        "probe": [{"step": s, "winner_rise_z": z, "delta_winner": 0.0} for s, z in probe],
        "rewinds": [list(r) for r in rewinds],
        "lr_factor": None,
        "ended_at_start": False,
        **extra,
    }
    if setting == "dpo":
        run["reward_at"] = reward_at or {"20": final, "40": final, "60": final}
    return run


def test_a_quiet_rewind_is_compared_with_diffusion_dpo_bit_for_bit():
    dpo = _run("dpo", 0, 0.8)
    same = study.rewind_record(_run("rewind", 0, 0.8), dpo)
    assert same["equals_dpo"] == {"weights_sha256": True, "loss": True, "final_reward": True} and study.quiet(same)
    other = study.rewind_record(_run("rewind", 0, 0.8, digest="b"), dpo)
    assert other["equals_dpo"]["weights_sha256"] is False and not study.quiet(other)
    alarmed = study.rewind_record(_run("rewind", 0, 0.8, rewinds=[(20, 10)]), dpo)
    assert "equals_dpo" not in alarmed and not study.quiet(alarmed)


def test_a_restored_step_is_checked_on_its_own_probe_reading():
    dpo = _run("dpo", 0, 0.6, reward_at={"10": 0.7, "20": 0.6})
    rewind = _run("rewind", 0, 0.7, rewinds=[(20, 10)], probe=[(5, 0.4), (10, 4.3), (15, 14.0), (20, 20.0)])
    (restored,) = study.rewind_record(rewind, dpo)["restored"]
    assert restored["restored_z"] == 4.3 and restored["restore_point"] is False  # above the floor: not a restore point


def test_the_lower_arm_runs_at_the_rate_the_ladder_ended_on_or_is_the_dpo_run_itself(tmp_path):
    assert study.lower_rate(_run("rewind", 0, 0.7, rewinds=[(20, 10), (40, 10)], lr_factor=0.09)) == pytest.approx(
        CELL.lr * 0.09
    )
    assert study.lower_rate(_run("rewind", 0, 0.8)) is None
    for setting, run in (("dpo", _run("dpo", 0, 0.75)), ("rewind", _run("rewind", 0, 0.75))):
        (tmp_path / f"{study.run_key(CELL, setting, 0)}.json").write_text(json.dumps(run))
    lower = study.dpo_lower(tmp_path, CELL, 0)  # the rewind kept the rate: nothing is trained
    assert lower["reused_dpo"] is True and lower["setting"] == "dpo_lower"
    assert lower["final_reward"] == 0.75 and lower["learning_rate"] == CELL.lr


def _breaking_cell() -> dict:
    """Three seeds where Diffusion-DPO falls (0.55-0.6 against the base's 0.8) and the safeguard holds (0.78-0.8):
    the rewind fires in seeds 0 and 1 and ends seed 1 on its starting weights; the lower rate ends above the base in
    seeds 0 and 1, below it in seed 2."""
    runs = {s: {} for s in study.SETTINGS}
    table = ((0, 0.60, 0.78, 0.77, 0.82, True, False), (1, 0.55, 0.80, 0.80, 0.81, True, True),
             (2, 0.58, 0.79, 0.62, 0.70, False, False))  # fmt: skip
    for seed, dpo, safeguard, rewind, lower, alarmed, at_start in table:
        runs["dpo"][seed] = _run("dpo", seed, dpo, reward_at={"20": 0.7, "40": dpo, "60": dpo})
        runs["safeguard"][seed] = _run("safeguard", seed, safeguard)
        runs["rewind"][seed] = _run(
            "rewind", seed, rewind, rewinds=[(20, 0)] if alarmed else (), lr_factor=0.3 if alarmed else None,
            ended_at_start=at_start,
        )  # fmt: skip
        runs["dpo_lower"][seed] = _run("dpo_lower", seed, lower, learning_rate=CELL.lr * 0.3)
    return runs


def test_a_breaking_regime_reads_the_alarm_the_better_by_hand_and_the_start_weights():
    a = study.analyse_cell(_breaking_cell())
    assert a["dpo_breaks"] and a["healthy"] == {"runs": 0, "quiet": 0, "seeds": []}
    b = a["breaking"]
    # by hand: safeguard mean 0.79, dpo_lower mean 0.7767: the safeguard is the better; rewind mean 0.73
    assert b["by_hand"] == "safeguard"
    assert b["rewind_minus_by_hand"] == pytest.approx((0.77 + 0.80 + 0.62) / 3 - 0.79)
    assert b["outcome_met"] is False  # 0.06 below, beyond 0.02
    assert (b["runs"], b["fired"], b["lower_above_base"], b["ended_at_start"]) == (3, 2, 2, 1)


def test_the_targets_state_each_share_and_by_how_much_it_falls_short():
    entry = {**asdict(CELL), "held_out": CELL.held_out, "analysis": study.analyse_cell(_breaking_cell())}
    t = study.targets({CELL.name: entry})
    assert list(t) == ["calibration, LoRA"]
    t = t["calibration, LoRA"]
    assert t["firing"]["share"] == pytest.approx(2 / 3) and t["firing"]["short_by"] == pytest.approx(0.9 - 2 / 3)
    assert t["start_weights"]["share"] == pytest.approx(1 / 2) and t["start_weights"]["met"] is False
    assert t["start_weights"]["short_by"] == pytest.approx(0.5 - 0.1)
    assert t["outcome"]["met"] is False and t["outcome"]["short_by"] == pytest.approx(0.79 - 0.73 - 0.02)
    assert t["quiet"]["share"] is None and t["quiet"]["met"] is None  # no healthy run to read


def test_a_healthy_run_counts_quiet_only_when_it_is_diffusion_dpo_bit_for_bit():
    runs = {s: {} for s in study.SETTINGS}
    for seed, digest, alarmed in ((0, "a", False), (1, "b", False), (2, "a", True)):
        runs["dpo"][seed] = _run("dpo", seed, 0.8, digest="a")
        runs["safeguard"][seed] = _run("safeguard", seed, 0.8)
        runs["rewind"][seed] = _run("rewind", seed, 0.8, digest=digest, rewinds=[(20, 10)] if alarmed else ())
        runs["dpo_lower"][seed] = _run("dpo_lower", seed, 0.8, reused_dpo=True)
    a = study.analyse_cell(runs)
    assert not a["dpo_breaks"] and "breaking" not in a
    assert a["healthy"]["runs"] == 3 and a["healthy"]["quiet"] == 1  # seed 1 differs in weights, seed 2 alarmed


def test_a_run_that_stopped_early_without_a_rewind_is_refused_as_preempted(tmp_path):
    stopped = {**_run("rewind", 0, 0.8, rewinds=[(30, 0)]), "last_step": 30, "seconds": 1.0}
    study._write_run(tmp_path, CELL, "rewind", 0, stopped)  # stopped by its ladder's last rewind: kept
    assert (tmp_path / f"{study.run_key(CELL, 'rewind', 0)}.json").is_file()
    preempted = {**stopped, "rewinds": []}
    with pytest.raises(RuntimeError, match="stopped at step 30"):
        study._write_run(tmp_path, CELL, "dpo", 0, preempted)


def test_a_cut_down_cell_names_its_steps_and_evaluates_to_its_end():
    cut = study.Cell(lr=1e-4, steps=25)
    assert cut.name.endswith("-25steps") and study.cell_of(asdict(cut)) == cut
    assert cut.eval_steps == (10, 20, 25)
    assert study.Cell(lr=1e-4).eval_steps == (10, 20, 30, 40, 50)
    assert "folder40" in CELL.name and CELL.held_out == "calibration"
    assert study.Cell(model="wide").held_out == "held-out model" and study.Cell(data=1).held_out == "held-out dataset"
