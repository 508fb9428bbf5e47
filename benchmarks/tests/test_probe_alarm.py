"""``benchmarks/studies/probe_alarm.py``: the probe alarm's rule choice, confusion matrices and timeliness against
counts known from how synthetic runs were built; the written result file against a recomputation and the package's
rule; and the rewind's quiet runs against Diffusion-DPO's in the probe study's result file.

Run with ``python -m pytest benchmarks/tests``; the package's suite does not read the result files.
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

import probe_alarm as study  # noqa: E402

from trl_diffusion_sdpo.callbacks.rewind import PROBE_ALARM  # noqa: E402

STEPS = range(5, 55, 5)  # a probe every 5 steps of a 50-step run
EVALS = (10, 20, 30, 40, 50)


def _run(seed: int, method: str, delta_winner: float, final: float, lr: float = 2e-4, from_step: int = 5) -> dict:
    """A run whose probe reads ``delta_winner`` from ``from_step`` on (0 before) and whose held-out reward falls
    linearly to ``final`` at step 50."""
    probe = [
        {"step": s, "delta_winner": delta_winner if s >= from_step else 0.0, "delta_loser": 0.0,
         "mse_ref_winner": 0.1, "implicit_acc": 0.5}
        for s in STEPS
    ]  # fmt: skip
    return {
        "seed": seed,
        "learning_rate": lr,
        "beta": 5000.0,
        "method": method,
        "probe": probe,
        "reward_change": {str(s): final * s / 50 for s in EVALS},
        "alarm": {"fired_at": 50 if final < 0 else None},
    }


def _write(tmp_path: Path, runs: list[dict], other: list[dict] = ()) -> Path:
    """The runs as the probe study's result file holds them: ``runs`` in the offline regime, ``other`` in the small
    beta's."""
    report = {"regimes": {"offline": {"runs": {f"seed{r['seed']}-{r['method']}": r for r in runs}}}}
    report["regimes"]["small-beta"] = {"runs": {f"seed{r['seed']}-{r['method']}": r for r in other}}
    path = tmp_path / "probe-study.json"
    path.write_text(json.dumps(report))
    return path


def _synthetic() -> list[dict]:
    """Even seeds: the runs whose reward falls read 0.06, the others 0.015 (a threshold between them separates them).
    Odd seeds: 0.04 against 0.035 (no threshold of the grid separates them). Seeds 0-3: Diffusion-DPO's runs fall;
    seeds 4-7: the safeguard's hold."""
    runs = []
    for seed in range(8):
        fell_value, held_value = (0.06, 0.015) if seed % 2 == 0 else (0.04, 0.035)
        runs.append(_run(seed, "dpo", fell_value if seed < 4 else held_value, -0.1 if seed < 4 else 0.0))
        runs.append(_run(seed, "sdpo-output-mu0.5", held_value, 0.0))
    runs.append(_run(0, "rewind", 1.0, -0.5))  # acts on the alarm: never the alarm's evidence
    return runs


def test_the_rule_is_chosen_on_even_seeds_and_reported_on_odd_ones(tmp_path):
    result = study.analyse(_write(tmp_path, _synthetic()))
    rule = result["rules"]["calibrated"]
    # on the even seeds: 2 Diffusion-DPO runs fell (0.06) and 6 held (0.015); the first rule of the grid separating
    # them: delta_winner above 0.02 at the first probe
    assert rule == {"signal": "delta_winner", "above": True, "threshold": 0.02, "patience": 1}
    on_choose = result["confusion"]["calibrated"]["choose_runs"]
    assert [on_choose[k] for k in ("fired_fell", "fired_held", "quiet_fell", "quiet_held")] == [2, 0, 0, 6]
    # on the odd seeds (0.04 and 0.035, both above 0.02) it fires on all 8: 2 fell, 6 held
    held_out = result["confusion"]["calibrated"]["report_runs"]
    assert [held_out[k] for k in ("fired_fell", "fired_held", "quiet_fell", "quiet_held")] == [2, 6, 0, 0]
    assert held_out["precision"] == pytest.approx(2 / 8) and held_out["recall"] == 1.0
    assert result["confusion"]["calibrated"]["all_runs"]["runs"] == 16  # the rewind's run is left out


def test_the_other_regimes_runs_only_report_the_rule(tmp_path):
    # the small beta's even-seed runs would choose another rule (0.015 falls, 0.06 holds) were they chosen on
    other = [_run(0, "dpo", 0.015, -0.1, lr=2e-5), _run(2, "dpo", 0.06, 0.0, lr=2e-5)]
    result = study.analyse(_write(tmp_path, _synthetic(), other))
    assert result["rules"]["calibrated"]["threshold"] == 0.02
    assert result["confusion"]["calibrated"]["choose_runs"]["runs"] == 8
    held_out = result["confusion"]["calibrated"]["report_runs"]  # the 8 odd-seed runs as before, and these two
    assert [held_out[k] for k in ("fired_fell", "fired_held", "quiet_fell", "quiet_held")] == [2, 7, 1, 0]
    assert {r["split"] for r in result["runs"] if r["id"].startswith("small-beta/")} == {"report"}


def test_safeguard_on_and_off_and_per_cell_split_the_held_out_runs(tmp_path):
    result = study.analyse(_write(tmp_path, _synthetic()))
    off = result["confusion"]["calibrated"]["report_runs_safeguard_off"]
    on = result["confusion"]["calibrated"]["report_runs_safeguard_on"]
    # odd seeds 1, 3 fell (Diffusion-DPO), 5, 7 held (Diffusion-DPO); the safeguard's 4 odd runs held
    assert [off[k] for k in ("fired_fell", "fired_held", "runs")] == [2, 2, 4]
    assert [on[k] for k in ("fired_fell", "fired_held", "runs")] == [0, 4, 4]
    group = result["groups"]["offline, lr 0.0002, beta 5000, safeguard off"]
    assert group["calibrated"]["runs"] == 4 and group["training_log_alarm"]["fired_fell"] == 2


def test_a_label_is_the_reward_falling_beyond_the_tolerance(tmp_path):
    tolerance = study.TOLERANCE
    runs = [
        _run(0, "dpo", 0.06, -2 * tolerance),  # fell
        _run(2, "dpo", 0.06, -tolerance / 2),  # within the tolerance: held
        _run(4, "dpo", 0.0, -2 * tolerance),  # fell, the probe quiet
        _run(6, "dpo", 0.0, 0.05),  # rose: held
    ]
    result = study.analyse(_write(tmp_path, runs))
    assert [r["fell"] for r in result["runs"]] == [True, False, True, False]
    matrix = study.score(study.load_runs(_write(tmp_path, runs)), study.ProbeRule("delta_winner", True, 0.02, 1))
    assert [matrix[k] for k in ("fired_fell", "fired_held", "quiet_fell", "quiet_held")] == [1, 1, 1, 1]


def test_the_alarm_fires_at_the_patience_th_unhealthy_probe_in_a_row():
    readings = [0.0, 0.05, 0.0, 0.05, 0.05, 0.05, 0.0, 0.0, 0.0, 0.0]
    synthetic = {
        "probe": [{"step": s, "delta_winner": v, "delta_loser": 0.0, "mse_ref_winner": 0.1, "implicit_acc": 0.5}
                  for s, v in zip(STEPS, readings, strict=True)],
        "reward_change": {s: 0.0 for s in EVALS},
    }  # fmt: skip
    rule = study.ProbeRule("delta_winner", True, 0.02, 2)
    assert study.fires(synthetic, rule) == 25  # steps 20 and 25 (step 10's rise alone is not 2 in a row)
    assert study.fires(synthetic, study.ProbeRule("delta_winner", True, 0.02, 3)) == 30
    assert study.fires(synthetic, study.ProbeRule("delta_winner", True, 0.02, 4)) is None
    synthetic["reward_change"] = {10: 0.0, 20: 0.0}  # readings after the last evaluation are not the run's
    assert study.fires(synthetic, rule) is None


def test_timeliness_against_the_step_the_reward_had_fallen_by_half():
    run = {"reward_change": {10: -0.01, 20: -0.03, 30: -0.08, 40: -0.1}}  # half of 0.1 first reached at step 30
    assert study.half_fallen(run) == (20, 30)
    assert study.timely(run, 15) == {"strict": True, "lenient": True}
    assert study.timely(run, 20) == {"strict": True, "lenient": True}
    assert study.timely(run, 25) == {"strict": False, "lenient": True}
    assert study.timely(run, 30) == {"strict": False, "lenient": False}


def test_the_package_rule_reads_a_probe_as_the_study_rule_does():
    rule = study.ProbeRule("delta_winner", True, 0.03, 2)
    package = rule.package()
    for value in (-0.1, 0.0, 0.03, 0.031, 0.5):
        reading = {"delta_winner": value, "delta_loser": 0.0, "mse_ref_winner": 0.1, "implicit_acc": 0.5}
        metrics = {f"probe/{k}": v for k, v in reading.items()}
        assert package.unhealthy(metrics, 10) == rule.unhealthy(reading)
    assert package.patience == 2 and study.ProbeRule("implicit_acc", True, 0.5, 2).package() is None


# ------------------------------------------------------------------------------------------- the written files


@pytest.fixture(scope="module")
def written() -> dict:
    if not study.OUTPUT.exists():
        pytest.skip(f"{study.OUTPUT.name} not written")
    return json.loads(study.OUTPUT.read_text())


def test_the_package_rule_is_the_calibrated_one(written):
    assert written["package_rule_is_calibrated"]
    calibrated = study.ProbeRule(**written["rules"]["calibrated"]).package()
    assert calibrated is not None and asdict(calibrated) == asdict(PROBE_ALARM)


def test_the_written_calibration_recomputes_from_the_probe_study(written):
    recomputed = json.loads(json.dumps(study.analyse(study.SOURCE)))
    assert recomputed == written


def test_the_held_out_matrix_counts_the_runs_by_hand(written):
    rule = study.ProbeRule(**written["rules"]["calibrated"])
    counts = [0, 0, 0, 0]
    for run in study.load_runs(study.SOURCE):
        if study.side(run) == "choose":
            continue
        fired = study.fires(run, rule) is not None
        fell = run["reward_change"][max(run["reward_change"])] < -study.TOLERANCE
        counts[(0 if fell else 1) if fired else (2 if fell else 3)] += 1
    stored = written["confusion"]["calibrated"]["report_runs"]
    assert counts == [stored[k] for k in ("fired_fell", "fired_held", "quiet_fell", "quiet_held")]
