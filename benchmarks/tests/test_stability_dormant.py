"""``benchmarks/studies/stability_guards.py``'s dormant safeguard: the goal on every held-out measure and the rule's
verdict against intervals computed by hand on synthetic runs; the best fixed setting's pairing; the reuse of stored
regimes; and, on the written result file, that each dormant run trained as Diffusion-DPO until its switch.

Run with ``python -m pytest benchmarks/tests``; the package's suite does not read the result files.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks" / "studies"))

import stability_dormant as dormant  # noqa: E402
import stability_guards as study  # noqa: E402

REPRODUCED = 50  # the steps over which a rerun stays within float noise of the stored run (the offline grid's)
BASE = {"reward": 0.8, "shape_iou": 0.7, "diversity": 0.15, "denoising_error": 0.04}
SEEDS = range(6)


def _run(method: str, seed: int, change: dict[str, float], lr: float = 2e-4) -> dict:
    last = {m: BASE[m] + change.get(m, 0.0) for m in BASE}
    return {"seed": seed, "learning_rate": lr, "beta": 5000.0, "method": method, "measures": {"0": BASE, "50": last}}


def _regimes(settings: dict[str, callable], lr: float = 2e-4) -> dict:
    """One cell; ``settings[method](seed)`` is the run's change from the base per measure."""
    runs = {f"seed{s}-{m}": _run(m, s, change(s), lr) for m, change in settings.items() for s in SEEDS}
    return {"offline": {"runs": runs}}


def _t(values: list[float]) -> tuple[float, float]:
    """The 95% t interval, by scipy (not the study's statistics module)."""
    values = np.asarray(values)
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return values.mean() - half, values.mean() + half


def _noise(seed: int, scale: float = 0.01) -> float:
    return scale * ((seed * 7919) % 11 - 5) / 5


def breaking() -> dict:
    """Diffusion-DPO's reward and shape fall and its denoising error rises; the dormant one keeps the reward near
    the base, loses some shape and keeps the error up a little; a fixed safeguard keeps everything."""
    return _regimes(
        {
            "dpo": lambda s: {"reward": -0.1 + _noise(s), "shape_iou": -0.07 + _noise(s), "denoising_error": 0.2},
            study.DORMANT: lambda s: {
                "reward": _noise(s),
                "shape_iou": -0.04 + _noise(s, 0.005),
                "denoising_error": 0.03 + _noise(s, 0.002),
            },
            "sdpo-output-mu0.5": lambda s: {"reward": 0.01 + _noise(s), "shape_iou": _noise(s)},
        }
    )


def test_holding_half_judged_on_each_measure_diffusion_dpo_loses() -> None:
    regimes = breaking()
    verdicts = dormant.goal_all_measures(study.analyse(regimes))
    cell = verdicts["offline/lr0.0002-beta5000"]
    assert cell["diffusion_dpo_breaks"]
    assert set(cell["dpo_falls_on"]) == {"reward", "shape_iou", "denoising_error"}
    mine = cell["settings"][study.DORMANT]
    shape = [-0.04 + _noise(s, 0.005) for s in SEEDS]
    error = [0.03 + _noise(s, 0.002) for s in SEEDS]
    assert mine["measures"]["reward"]["met"] and mine["measures"]["reward"]["miss"] == 0.0
    # misses by how far the interval's nearer end lies on the worse side: the top for the shape, the bottom for
    # the error (lower is better)
    assert mine["measures"]["shape_iou"]["miss"] == pytest.approx(-_t(shape)[1])
    assert mine["measures"]["denoising_error"]["miss"] == pytest.approx(_t(error)[0])
    assert not mine["met"]
    assert cell["settings"]["sdpo-output-mu0.5"]["met"]  # the clean path: a setting at the base holds


def test_free_half_judged_against_diffusion_dpo_on_every_measure() -> None:
    regimes = _regimes(
        {
            "dpo": lambda s: {"reward": 0.01 + _noise(s), "shape_iou": 0.01, "denoising_error": 0.01},
            study.DORMANT: lambda s: {"reward": 0.01 + _noise(s), "shape_iou": 0.01, "denoising_error": 0.01},
            "guard-auto-mu": lambda s: {"reward": _noise(s), "shape_iou": 0.01, "denoising_error": 0.01 - 0.004},
        },
        lr=2e-5,
    )
    cell = dormant.goal_all_measures(study.analyse(regimes))["offline/lr2e-05-beta5000"]
    assert not cell["diffusion_dpo_breaks"]
    assert cell["settings"][study.DORMANT]["met"]  # Diffusion-DPO's own runs cost nothing
    auto = cell["settings"]["guard-auto-mu"]["measures"]
    assert auto["reward"]["against"] == "vs_dpo" and auto["reward"]["miss"] == pytest.approx(0.01)
    assert auto["denoising_error"]["met"]  # a lower error is no cost


def test_best_fixed_setting_is_the_highest_reward_and_paired_seed_by_seed() -> None:
    regimes = breaking()
    regimes["offline"]["runs"].update(
        {f"seed{s}-guard-sft": _run("guard-sft", s, {"reward": -0.05 + _noise(s)}) for s in SEEDS}
    )
    entry = study.analyse(regimes)["offline"]["lr0.0002-beta5000"]
    assert entry[study.DORMANT]["best_fixed"] == "sdpo-output-mu0.5"
    paired = entry[study.DORMANT]["steps"]["50"]["shape_iou"]["vs_best_fixed"]
    differences = [(-0.04 + _noise(s, 0.005)) - _noise(s) for s in SEEDS]
    assert paired["mean"] == pytest.approx(np.mean(differences))
    assert paired["ci95"] == pytest.approx(list(_t(differences)))


def test_verdict_needs_both_halves_and_no_fixed_setting_meeting_them() -> None:
    def halves(dormant_healthy: bool, fixed_both: bool) -> dict:
        return {
            study.DORMANT: {"breaks": {"b": True}, "healthy": {"h": dormant_healthy}, "meets_both": dormant_healthy},
            "fixed": {"breaks": {"b": fixed_both}, "healthy": {"h": True}, "meets_both": fixed_both},
        }

    cells = {
        "b": {"settings": {study.DORMANT: {"measures": {"reward": {"met": True, "miss": 0.0}}}}},
        "h": {"settings": {study.DORMANT: {"measures": {"shape_iou": {"met": False, "miss": 0.0123}}}}},
    }
    assert dormant.verdict(halves(True, False), cells)["becomes_default"]
    assert not dormant.verdict(halves(True, True), cells)["becomes_default"]
    missed = dormant.verdict(halves(False, False), cells)
    assert not missed["becomes_default"] and missed["meets"] == {"breaks": True, "healthy": False}
    assert missed["missed_by"] == {"h": {"shape_iou": 0.0123}}
    halves = dormant.both_halves(dormant.goal_all_measures(study.analyse(breaking())))
    assert halves[study.DORMANT]["meets_both"] is False


def test_reuse_fills_only_the_missing_parts(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"regimes": {"offline": {"runs": {"a": 1}}, "long": {"runs": {"b": 2}}}}))
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "long.json").write_text(json.dumps({"runs": {"mine": 3}}))
    assert study.reuse(results, parts) == [parts / "offline.json"]
    assert json.loads((parts / "offline.json").read_text()) == {"runs": {"a": 1}}
    assert json.loads((parts / "long.json").read_text()) == {"runs": {"mine": 3}}


def test_an_online_study_is_judged_on_its_held_out_colour_reward_under_this_studys_names() -> None:
    """An online study's runs (curves per evaluation step, the base's measures apart, settings under its own names,
    the trained brightness beside the colour reward): the dormant setting's paired difference from Diffusion-DPO on
    the goal's reward is the colour reward's, seed by seed, by hand; runs at another learning rate are left out."""
    base = {"colour_reward": 0.87, "brightness": 0.5, "shape_iou": 0.78, "diversity": 0.15, "denoising_error": 0.04}

    def run(method: str, seed: int, colour: float, lr: float = 1e-3) -> dict:
        point = {**base, "colour_reward": base["colour_reward"] + colour, "brightness": 0.9}
        return {"seed": seed, "learning_rate": lr, "method": method, "curve": {"60": point}}

    runs = {f"seed{s}-dpo": run("online-dpo", s, -0.01 * (s + 1)) for s in SEEDS}
    runs |= {f"seed{s}-dormant": run("online-dormant-safeguard", s, -0.005 * s) for s in SEEDS}
    runs |= {f"seed{s}-dpo-search": run("online-dpo", s, 0.5, lr=1e-2) for s in SEEDS}
    report = {"base": {"measures": base}, "config": {"beta": 5000.0}, "grid_learning_rate": 1e-3, "runs": runs}
    converted = dormant.from_online(report)
    assert {r["method"] for r in converted["runs"].values()} == {"dpo", study.DORMANT}
    entry = study.analyse({"online-hacking": converted})["online-hacking"]["lr0.001-beta5000"]
    differences = [-0.005 * s + 0.01 * (s + 1) for s in SEEDS]
    paired = entry[study.DORMANT]["steps"]["60"]["reward"]["vs_dpo"]
    assert paired["mean"] == pytest.approx(np.mean(differences))
    assert paired["ci95"] == pytest.approx(list(_t(differences)))
    assert entry["dpo"]["steps"]["60"]["reward"]["vs_base"]["mean"] == pytest.approx(
        -0.01 * np.mean([s + 1 for s in SEEDS])
    )


def test_alarm_steps_are_the_first_logs_with_each_flag() -> None:
    evaluator = study.HeldOutMeasures.__new__(study.HeldOutMeasures)  # no model: on_log reads the logs alone
    evaluator.alarm = {"fired_at": None, "switched_at": None}
    history = []
    for step, (fired, on) in enumerate([(0, 0), (1, 1), (0, 1), (1, 1)], start=1):
        state = type("State", (), {"global_step": step})()
        logs = {"health/winner_pathology": float(fired), "health/safeguard_on": on}
        evaluator.on_log(None, state, None, logs=logs)
        history.append({**logs, "step": step})
    assert evaluator.alarm == {"fired_at": 2, "switched_at": 2}
    assert study.alarm_steps(history) == evaluator.alarm  # a finished run's log history reads the same
    late = [{"health/winner_pathology": 1.0, "step": 10}, {"health/safeguard_on": 1.0, "step": 20}]
    assert study.alarm_steps(late) == {"fired_at": 10, "switched_at": 20}


@pytest.fixture(scope="module")
def written() -> dict:
    return json.loads((ROOT / dormant.DORMANT_OUTPUT).read_text())


def test_dormant_runs_train_as_diffusion_dpo_until_the_switch(written: dict) -> None:
    """Each dormant run's per-step winner error (``delta/winner``) is the stored Diffusion-DPO run's at its seed up to
    the step it switched at (to the float noise of a rerun, which grows along a run: within 1e-3 over the first
    :data:`REPRODUCED` steps) and departs after it; a 50-step run that never switched ends with Diffusion-DPO's
    held-out measures (a rerun's noise there: 3e-6)."""
    stored = json.loads((ROOT / written["paired_with"]).read_text())["regimes"]
    checked = 0
    for name, regime in written["regimes"].items():
        for key, run in regime["runs"].items():
            dpo = stored[name]["runs"][key.replace(study.DORMANT, "dpo")]
            mine, theirs = np.array(run["history"]["delta/winner"]), np.array(dpo["history"]["delta/winner"])
            switched = run["alarm"]["switched_at"]
            assert switched is None or run["alarm"]["fired_at"] == switched
            until = min(REPRODUCED, len(mine) if switched is None else switched)  # history index i is step i + 1
            np.testing.assert_allclose(mine[:until], theirs[:until], rtol=0, atol=1e-3)
            last = max(dpo["measures"], key=int)
            if switched is None and int(last) <= REPRODUCED:
                for measure in study.MEASURES:
                    assert run["measures"][last][measure] == pytest.approx(dpo["measures"][last][measure], abs=1e-4)
            elif switched is not None and switched + 1 < len(mine):  # it acts on the gradient of step switched + 1
                after = np.abs(mine[switched + 1 :] - theirs[switched + 1 :]) / (np.abs(theirs[switched + 1 :]) + 1e-3)
                assert np.median(after) > 0.05
            checked += 1
    assert checked >= 30


def test_online_dormant_runs_the_alarm_left_alone_are_diffusion_dpos(written: dict) -> None:
    """Online, each dormant run's alarm never switched it (the online config's reason to refuse the setting), and its
    winner error along the run is its seed's Diffusion-DPO run's: the stored one on the online hacking regime, the
    one trained beside it on the healthy regime (the first :data:`REPRODUCED` steps, within a rerun's float noise);
    the healthy regime's, trained in one process pool with it, end with the same held-out measures."""
    checked = 0
    for name, regime in written["online_regimes"].items():
        stored = dormant.ONLINE_REGIMES[name]
        pairs = json.loads((ROOT / stored).read_text())["runs"] if stored is not None else regime["runs"]
        for key, run in regime["runs"].items():
            if dormant.ONLINE_NAMES.get(run["method"], run["method"]) != study.DORMANT:
                continue
            assert run["alarm"] == {"fired_at": None, "switched_at": None}, key
            dpo = pairs[key.replace(run["method"], "online-dpo" if stored is None else "dpo")]
            mine, theirs = np.array(run["history"]["delta/winner"]), np.array(dpo["history"]["delta/winner"])
            np.testing.assert_allclose(mine[:REPRODUCED], theirs[:REPRODUCED], rtol=0, atol=1e-3)
            if stored is None:
                assert run["curve"] == dpo["curve"], key
            checked += 1
    assert checked >= 20


def test_the_research_page_quotes_the_result_file() -> None:
    """benchmarks/research/stability.md's dormant block is :func:`dormant_tables` of the written result file."""
    page = (ROOT / "benchmarks" / "research" / "stability.md").read_text()
    block = page.split(dormant.DORMANT_START, 1)[1].split(dormant.DORMANT_END, 1)[0]
    assert block.strip() == dormant.dormant_tables(ROOT / dormant.DORMANT_OUTPUT).strip()
