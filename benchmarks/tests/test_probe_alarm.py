"""``benchmarks/studies/probe_alarm.py``: the probe alarm's rule choice, confusion matrices and timeliness against
counts known from how synthetic runs were built; the written result file against a recomputation and the package's
rule; and the rewind's quiet runs against Diffusion-DPO's in the probe study's result file.

Run with ``python -m pytest benchmarks/tests``; the package's suite does not read the result files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks" / "studies"))

import probe_alarm as study  # noqa: E402

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
    rule = study.ProbeRule("winner_rise_z", True, 3.0, 2)
    package = rule.package()
    for value in (-1.0, 0.0, 3.0, 3.01, 50.0):
        reading = {"winner_rise_z": value, "delta_winner": 0.1, "mse_ref_winner": 0.1, "implicit_acc": 0.5}
        metrics = {f"probe/{k}": v for k, v in reading.items()}
        assert package.unhealthy(metrics, 10) == rule.unhealthy(reading)
    assert package.patience == 2 and study.ProbeRule("implicit_acc", True, 0.5, 2).package() is None


# ------------------------------------------------------------------------------------------------------ online

BASE_COLOUR = 0.86
ONLINE_STEPS = range(5, 65, 5)  # a probe every 5 steps of a 60-step online run, evaluated at 20, 40 and 60


def _online_run(seed: int, method: str, delta_winner: float, final: float) -> dict:
    """An online probe study run: its probe reads ``delta_winner`` at every probe, its held-out colour reward falls
    linearly to ``final`` from the base's at step 60."""
    probe = [
        {"step": s, "delta_winner": delta_winner, "delta_loser": 0.0, "mse_ref_winner": 0.08, "implicit_acc": 0.5}
        for s in ONLINE_STEPS
    ]
    curve = {str(s): {"colour_reward": BASE_COLOUR + final * s / 60} for s in (20, 40, 60)}
    return {"seed": seed, "learning_rate": 1e-3, "method": method, "probe": probe, "curve": curve,
            "alarm": {"fired_at": None}}  # fmt: skip


def _online_write(tmp_path: Path) -> Path:
    """Even seeds: the runs whose reward falls read 0.004, the others 0.001 (above 0.001 separates them). Odd seeds
    the other way round (0.0012 against 0.0045: below 0.002 in the margin separates them). Beside them a plain run
    and a rewinding one, neither of which is the alarm's evidence, and a healthy regime's two seeds."""
    stored = tmp_path / "stored.json"
    stored.write_text(json.dumps({"base": {"measures": {"colour_reward": BASE_COLOUR}}}))
    runs = []
    for seed in range(8):
        falls = seed % 4 < 2
        value = (0.004 if falls else 0.001) if seed % 2 == 0 else (0.0012 if falls else 0.0045)
        runs.append(_online_run(seed, "dpo-probe", value, -0.05 if falls else 0.0))
    runs += [_online_run(0, "dpo", 0.01, -0.05), _online_run(0, "dpo-rewind", 0.01, -0.05)]
    healthy = [_online_run(seed, "online-dpo-probe", 0.0, 0.003) for seed in (0, 1)]
    report = {"regimes": {}}
    for regime, mine, reference in (("online-hacking", runs, "dpo"), ("online-healthy", healthy, "online-dpo")):
        report["regimes"][regime] = {
            "stored_file": str(stored), "reference": reference, "config": {"max_steps": 60},
            "runs": {f"seed{r['seed']}-{r['method']}": r for r in mine},
        }  # fmt: skip
    path = tmp_path / "online-probe-study.json"
    path.write_text(json.dumps(report))
    return path


def test_the_online_rule_is_chosen_on_even_seeds_at_the_online_scale_and_reported_on_odd_ones(tmp_path):
    result = study.analyse_online(_online_write(tmp_path))
    # even seeds: 0 and 4 fell (0.004), 2 and 6 held (0.001), the healthy seed 0 held (0.0): the first rule of the
    # online grid separating them is delta_winner above 0.001 at the first probe
    rule = {"signal": "delta_winner", "above": True, "threshold": 0.001, "patience": 1}
    assert result["rules"]["calibrated"] == rule
    on_choose = result["confusion"]["calibrated"]["choose_runs"]
    assert [on_choose[k] for k in ("fired_fell", "fired_held", "quiet_fell", "quiet_held")] == [2, 0, 0, 3]
    # odd seeds 1, 5 fell (0.0012), 3, 7 held (0.0045), the healthy seed 1 held (0.0): it fires on the four hacking
    held_out = result["confusion"]["calibrated"]["report_runs"]
    assert [held_out[k] for k in ("fired_fell", "fired_held", "quiet_fell", "quiet_held")] == [2, 2, 0, 1]
    # the offline rule (delta_winner above 0.05) never fires at this scale
    offline = result["confusion"]["offline"]["all_runs"]
    assert offline["fired_fell"] + offline["fired_held"] == 0 and offline["runs"] == 10  # plain, rewind left out
    assert {r["id"].split("/")[1] for r in result["runs"]} == {f"seed{s}-dpo-probe" for s in range(8)} | {
        "seed0-online-dpo-probe", "seed1-online-dpo-probe"}  # fmt: skip
    assert result["choice_without_a_fallen_run"] is None


def test_the_online_runs_are_labelled_against_the_stored_base_and_reported_per_regime(tmp_path):
    result = study.analyse_online(_online_write(tmp_path))
    fell = {r["id"]: r["fell"] for r in result["runs"]}
    assert fell["online-hacking/seed0-dpo-probe"] and fell["online-hacking/seed5-dpo-probe"]
    assert not fell["online-hacking/seed2-dpo-probe"] and not fell["online-healthy/seed1-online-dpo-probe"]
    groups = result["groups"]
    healthy = groups["online-healthy, lr 0.001, 60 steps, safeguard off, held-out"]["calibrated"]
    assert [healthy[k] for k in ("runs", "fired_fell", "fired_held")] == [1, 0, 0]
    hacking = groups["online-hacking, lr 0.001, 60 steps, safeguard off, held-out"]["calibrated"]
    assert [hacking[k] for k in ("runs", "fired_fell", "fired_held")] == [4, 2, 2]


def test_a_searched_regimes_runs_enter_the_online_choice_and_its_search_runs_do_not(tmp_path):
    """The hacking regime's runs all hold with a flat probe; the searched regime (lr 1e-2) breaks on seeds 0 and 1
    (0.03) and holds on 2 and 3 (0.002); its search runs (seeds 10 and 11) fell with a flat probe."""
    stored = tmp_path / "stored.json"
    stored.write_text(json.dumps({"base": {"measures": {"colour_reward": BASE_COLOUR}}}))
    hacking = [_online_run(seed, "dpo-probe", 0.0, 0.0) for seed in range(4)]
    fast = [{**_online_run(seed, "dpo-probe", 0.03 if seed < 2 else 0.002, -0.05 if seed < 2 else 0.0),
             "learning_rate": 1e-2} for seed in range(4)]  # fmt: skip
    search = {f"seed{seed}-search": {**_online_run(seed, "dpo-probe", 0.0, -0.05), "learning_rate": 1e-2}
              for seed in (10, 11)}  # fmt: skip
    report = {"regimes": {}}
    for regime, mine in (("online-hacking", hacking), ("online-hacking-fast", fast)):
        report["regimes"][regime] = {
            "stored_file": str(stored), "reference": "dpo", "config": {"max_steps": 60},
            "runs": {f"seed{r['seed']}-{r['method']}": r for r in mine},
        }  # fmt: skip
    report["regimes"]["online-hacking-fast"]["search"] = {"runs": search, "chosen": 1e-2}
    path = tmp_path / "online-probe-study.json"
    path.write_text(json.dumps(report))
    result = study.analyse_online(path)
    # chosen on the searched regime's even seeds: above its held seed's 0.002, where the hacking regime alone (no
    # fallen run) would give the grid's first quiet rule, above 0.0
    assert result["rules"]["calibrated"] == {
        "signal": "delta_winner",
        "above": True,
        "threshold": 0.002,
        "patience": 1,
    }
    assert result["choice_without_a_fallen_run"] is None
    assert {r["id"] for r in result["runs"]} == {f"{g}/seed{s}-dpo-probe" for g in report["regimes"] for s in range(4)}
    fast_held_out = result["groups"]["online-hacking-fast, lr 0.01, 60 steps, safeguard off, held-out"]["calibrated"]
    assert [fast_held_out[k] for k in ("runs", "fired_fell", "fired_held", "quiet_fell")] == [2, 1, 0, 0]


# ------------------------------------------------------------------------------------------- the written files


@pytest.fixture(scope="module")
def written() -> dict:
    if not study.OUTPUT.exists():
        pytest.skip(f"{study.OUTPUT.name} not written")
    return json.loads(study.OUTPUT.read_text())


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_the_package_rule_is_the_calibrated_one(written, mode):
    part = written if mode == "offline" else written["online"]
    assert part["package_rule_is_calibrated"]
    calibrated = study.ProbeRule(**part["rules"]["calibrated"])
    assert (calibrated.threshold, calibrated.patience) == (study.DELTA_RULES[mode].threshold,
                                                           study.DELTA_RULES[mode].patience)  # fmt: skip


def test_the_written_calibration_recomputes_from_the_probe_studies(written):
    recomputed = json.loads(json.dumps(study.analyse(study.SOURCE)))
    assert recomputed == {k: v for k, v in written.items() if k != "online"}
    assert json.loads(json.dumps(study.analyse_online(study.ONLINE_SOURCE))) == written["online"]


def test_the_research_page_states_the_calibrated_rules(written):
    page = " ".join(study.PAGE.read_text().split())
    for part in (written, written["online"]):
        rule = part["rules"]["calibrated"]
        count = "at one probe" if rule["patience"] == 1 else f"at {rule['patience']} probes in a row"
        assert f"`probe/{rule['signal']}` above {rule['threshold']:g} {count}" in page


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


def test_the_online_held_out_matrix_counts_the_runs_by_hand(written):
    online = written["online"]
    rule = study.ProbeRule(**online["rules"]["calibrated"])
    report = json.loads(study.ONLINE_SOURCE.read_text())
    counts, seen = [0, 0, 0, 0], 0
    for entry in report["regimes"].values():
        base = json.loads((ROOT / entry["stored_file"]).read_text())["base"]["measures"]["colour_reward"]
        for run in entry["runs"].values():
            if run["method"] != f"{entry['reference']}-probe" or run["seed"] % 2 == 0:
                continue
            seen += 1
            last = max(run["curve"], key=int)
            fell = run["curve"][last]["colour_reward"] - base < -study.TOLERANCE
            in_a_row, fired = 0, False
            for reading in run["probe"]:
                if reading["step"] > int(last):
                    break
                in_a_row = in_a_row + 1 if reading["delta_winner"] > rule.threshold else 0
                fired = fired or in_a_row >= rule.patience
            counts[(0 if fell else 1) if fired else (2 if fell else 3)] += 1
    stored = online["confusion"]["calibrated"]["report_runs"]
    assert seen == stored["runs"]
    assert counts == [stored[k] for k in ("fired_fell", "fired_held", "quiet_fell", "quiet_held")]


# ------------------------------------------------------------------------------------------ the probe's own units


def _z_run(seed: int, lr: float, method: str, z: float, final: float) -> dict:
    """An offline run of the z study: its probe reads ``winner_rise_z = z`` at every probe, its held-out reward ends
    at ``final`` from the base's (measured at step 50 only)."""
    probe = [{"step": s, "winner_rise_z": z, "delta_winner": 0.01} for s in range(5, 55, 5)]
    return {"seed": seed, "learning_rate": lr, "method": method, "probe": probe, "reward_change": {"50": final}}


def _z_write(tmp_path: Path) -> Path:
    """Benchmark, even seeds: the fallen runs read z 12, the healthy 6 (above 6 up to 12 separates them); odd seeds
    likewise but a healthy run at 9. The wide model: every run reads z 40 (fell) or 2 (held): all held out."""
    offline = {}
    for seed in range(4):
        for lr, falls in ((1e-3, True), (2e-5, False)):
            z = 12.0 if falls else (9.0 if seed % 2 else 6.0)
            offline[f"seed{seed}-lr{lr:g}-beta5000-dpo"] = _z_run(seed, lr, "dpo", z, -0.2 if falls else 0.0)
    wide = {f"seed{s}-lr{lr:g}-beta5000-dpo": _z_run(s, lr, "dpo", 40.0 if lr > 1e-4 else 2.0,
                                                     -0.1 if lr > 1e-4 else 0.0)
            for s in range(2) for lr in (1e-3, 2e-5)}  # fmt: skip
    report = {"commands": [], "machine": {}, "load": "", "probe": {}, "wide_model": {},
              "parts": {"offline-a": {"runs": offline}, "wide": {"runs": wide}}}  # fmt: skip
    path = tmp_path / "z-runs.json"
    path.write_text(json.dumps(report))
    return path


def test_the_z_rule_is_chosen_on_the_benchmarks_even_seeds_and_the_second_model_only_reports_it(tmp_path):
    result = study.analyse_z(_z_write(tmp_path))
    chosen = result["rules"]["calibrated"]
    assert chosen["signal"] == "winner_rise_z" and 6.0 <= chosen["threshold"] < 12.0
    sides = {r["id"]: r["split"] for r in result["runs"]}
    assert all(side == "second_model" for key, side in sides.items() if key.startswith("wide/"))
    assert {sides[f"offline-a/seed{s}-lr0.001-beta5000-dpo"] for s in (0, 2)} == {"choose"}
    # The odd seeds' healthy runs read 9: a threshold of 9 or more keeps them quiet, of 6, 7 or 8 fires on them.
    held_out = result["confusion"]["report"]["calibrated"]
    assert held_out["runs"] == 4 and held_out["fired_fell"] == 2
    assert held_out["fired_held"] == (2 if chosen["threshold"] < 9.0 else 0)
    wide = result["confusion"]["second_model"]["calibrated"]
    assert [wide[k] for k in ("fired_fell", "fired_held", "quiet_fell", "quiet_held")] == [2, 0, 0, 2]


@pytest.fixture(scope="module")
def written_z() -> dict:
    if not study.Z_OUTPUT.exists():
        pytest.skip(f"{study.Z_OUTPUT.name} not written")
    return json.loads(study.Z_OUTPUT.read_text())


# The z rule's held-out confusion matrices stay in the research record's table (below); docs/safeguard.md states the
# package's rule since, the relative rise (tests/docs/test_probe_alarm_carry_table.py).
def test_the_package_z_rule_is_the_calibrated_one_and_the_page_carries_its_table(written_z):
    assert written_z["package_rule_is_calibrated"]
    assert study.ProbeRule(**written_z["rules"]["calibrated"]) == study.package_z_rule()
    block = study.PAGE.read_text().split(study.Z_START, 1)[1].split(study.Z_END, 1)[0]
    assert block.strip() == study.z_tables(written_z).strip()


def test_the_z_held_out_matrix_counts_the_runs_by_hand(written_z):
    source = json.loads(study.Z_SOURCE.read_text())
    assert written_z["source_commands"] == source["commands"]
    rule = study.package_z_rule()
    counts = [0, 0, 0, 0]
    for run in study.load_z_runs(study.Z_SOURCE):
        if run["model"] != "benchmark" or run["seed"] % 2 == 0:
            continue
        in_a_row, fired = 0, False
        for reading in run["probe"]:
            if reading["step"] > max(run["reward_change"]):
                break
            in_a_row = in_a_row + 1 if reading["winner_rise_z"] > rule.threshold else 0
            fired = fired or in_a_row >= rule.patience
        fell = run["reward_change"][max(run["reward_change"])] < -study.TOLERANCE
        counts[(0 if fell else 1) if fired else (2 if fell else 3)] += 1
    stored = written_z["confusion"]["report"]["package"]
    assert counts == [stored[k] for k in ("fired_fell", "fired_held", "quiet_fell", "quiet_held")]


def _series_run(z: list[float]) -> dict:
    return {"probe": [{"step": 5 * (t + 1), "winner_rise_z": v} for t, v in enumerate(z)], "reward_change": {50: 0.0}}


def _first(flags) -> int | None:
    return next((5 * (t + 1) for t, flag in enumerate(flags) if flag), None)


@pytest.mark.parametrize("seed", range(8))
def test_the_richer_rules_fire_where_their_formulas_say(seed):
    import numpy as np

    z = list(np.random.default_rng(seed).normal(8.0, 5.0, size=10))
    run = _series_run(z)
    # CUSUM: S_t = max(0, S_{t-1} + z_t - k) is the walk of z - k less its lowest point so far (0 included)
    walk = np.cumsum(np.array(z) - 9.0)
    cusum = walk - np.minimum(np.minimum.accumulate(walk), 0.0)
    assert study.SeriesRule("cusum", 9.0, 6.0).fires(run) == _first(cusum > 6.0)
    # the mean of the last 3 readings
    means = np.convolve(z, np.ones(3) / 3, mode="full")[: len(z)]
    assert study.SeriesRule("mean", 3, 9.0).fires(run) == _first([t >= 2 and m > 9.0 for t, m in enumerate(means)])
    # the rise since the lowest reading so far, twice in a row
    rise = np.array(z) - np.minimum.accumulate(z)
    above = rise > 4.0
    twice = [t >= 1 and above[t] and above[t - 1] for t in range(len(z))]
    assert study.SeriesRule("rise", 4.0, 2).fires(run) == _first(twice)
    # the package's rule, as the package replays it
    assert study.SeriesRule("in_a_row", 9.0, 2).fires(run) == _first(
        [t >= 1 and z[t] > 9 < z[t - 1] for t in range(10)]
    )


def test_the_richer_rules_read_only_the_probes_up_to_the_last_evaluation():
    run = _series_run([1.0, 1.0, 50.0])
    run["reward_change"] = {10: 0.0}
    assert all(study.SeriesRule(f, a, b).fires(run) is None for f, a, b in
               (("in_a_row", 10.0, 1), ("cusum", 10.0, 5.0), ("mean", 1, 10.0), ("rise", 5.0, 1)))  # fmt: skip
