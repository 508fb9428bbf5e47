"""``benchmarks/studies/online_comparison.py``: the tiny run writes its result file's structure, and the paired
differences in it are the per-seed differences of the runs it records (a planted mispairing is caught)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "studies" / "online_comparison.py"


def _module():
    spec = importlib.util.spec_from_file_location("online_comparison", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # it puts the repository root on sys.path for benchmarks.studies
    return module


def check_paired(report: dict[str, Any], module) -> None:
    """Every ``minus_online_dpo`` of the analysis is recomputed from the runs' per-seed values at the last
    evaluation step: the differences seed by seed, their mean and the 95% paired t interval."""
    from trl_diffusion_sdpo.demo.stats import t_quantile_975

    base = report["base"]["measures"]
    final = str(report["eval_steps"][-1])
    for setting in report["analysis"].values():
        lr = setting["learning_rate"]
        for method, entry in setting["methods"].items():
            if method == module.REFERENCE:
                continue
            seeds = entry["paired_seeds"]
            runs = {r["method"]: {} for r in report["runs"].values()}
            for run in report["runs"].values():
                if run["learning_rate"] == lr:
                    runs[run["method"]][run["seed"]] = run
            for measure in module.MEASURES:
                expected = [
                    module.measures_at(runs[method][s], final, base)[measure]
                    - module.measures_at(runs[module.REFERENCE][s], final, base)[measure]
                    for s in seeds
                ]
                got = entry["minus_online_dpo"][measure]
                assert got["differences"] == pytest.approx(expected, abs=1e-12), (method, measure)
                mean, sd = float(np.mean(expected)), float(np.std(expected, ddof=1))
                half = t_quantile_975(len(seeds) - 1) * sd / math.sqrt(len(seeds))
                assert got["mean"] == pytest.approx(mean, abs=1e-12)
                assert got["ci95"] == pytest.approx([mean - half, mean + half], abs=1e-12)


def _synthetic_report(module, seeds: int = 4) -> dict[str, Any]:
    """Runs with made-up curves (no training): each seed's value differs, so a mispairing shows."""
    rng = np.random.default_rng(0)
    base = {m: 0.5 for m in module.MEASURES if m != "denoising_error_change"} | {"denoising_error": 0.04}
    runs = {}
    for seed in range(seeds):
        for method in module.METHODS:
            curve = {str(s): {k: float(v + rng.normal(0, 0.01) + 0.1 * seed) for k, v in base.items()} for s in (2, 4)}
            history = {"step": [1], "online/reward_mean": [0.8 + seed], "mse/ref_winner": [0.01 * (seed + 1)]}
            key = module.run_key(seed, 1e-4, method)
            runs[key] = {"seed": seed, "learning_rate": 1e-4, "method": method, "curve": curve, "history": history,
                         "seconds": 1.0}  # fmt: skip
    return {"config": {"max_steps": 4}, "base": {"measures": base}, "eval_steps": [2, 4], "runs": runs,
            "learning_rates": [1e-4]}  # fmt: skip


def test_paired_differences_are_the_per_seed_differences_and_a_mispairing_is_caught(monkeypatch):
    module = _module()
    report = _synthetic_report(module)
    report["analysis"] = module.analyse(report)
    check_paired(report, module)
    setting = report["analysis"]["lr0.0001"]
    assert setting["pairing"]["all"] and setting["pairing"]["seeds"] == [0, 1, 2, 3]
    assert set(setting["online_dpo_turn"]) == {"shape_iou", "shape_accuracy", "denoising_error_change"}

    # Planted bug: the analysis pairs each run with online Diffusion-DPO of another seed.
    real = module.paired_difference
    monkeypatch.setattr(module, "paired_difference", lambda values, reference: real(values, list(reference)[::-1]))
    report["analysis"] = module.analyse(report)
    with pytest.raises(AssertionError):
        check_paired(report, module)


def test_the_pairing_check_flags_a_first_step_that_differs():
    module = _module()
    report = _synthetic_report(module, seeds=2)
    report["runs"][module.run_key(1, 1e-4, "online-sdpo-output")]["history"]["online/reward_mean"] = [0.0]
    pairing = module.analyse(report)["lr0.0001"]["pairing"]
    assert pairing["first_step_identical"] == [True, False] and not pairing["all"]


def test_the_shape_scorer_tells_the_drawn_shape_from_the_two_others():
    """On fresh drawings of the demo: the caption's shape fits best every time, a wrong caption's never."""
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks.studies.online_measures import validate_shape_scorer
    finally:
        sys.path.remove(str(ROOT))
    check = validate_shape_scorer(per_caption=1)
    assert check["right_shape_accuracy"] == 1.0 and check["wrong_shape_accuracy"] == 0.0
    assert check["right_shape_iou_min"] > check["wrong_shape_iou_mean"]


@pytest.mark.slow
def test_the_tiny_run_writes_curves_paired_differences_and_its_invocation(tmp_path):
    output = tmp_path / "online.json"
    command = [sys.executable, str(SCRIPT), "--quick", "--workers", "1", "--methods", "online-dpo,offline-dpo"]
    subprocess.run(command + ["--json", str(output)], check=True, capture_output=True, text=True, timeout=600,
                   cwd=ROOT)  # fmt: skip
    report = json.loads(output.read_text())
    module = _module()
    assert report["eval_steps"] == [1, 2]
    assert set(report["runs"]) == {module.run_key(s, 2e-4, m) for s in (0, 1) for m in ("online-dpo", "offline-dpo")}
    for run in report["runs"].values():
        assert set(run["curve"]) == {"1", "2"}
        measured = {"shape_iou", "shape_accuracy", "diversity", "denoising_error", "colour_reward"}
        assert set(run["curve"]["2"]) == measured
        assert run["history"]["step"] == [1, 2] and run["machine"]["torch_threads"] == 1
    setting = report["analysis"]["lr0.0002"]
    offline = setting["methods"]["offline-dpo"]
    assert set(offline["minus_online_dpo"]) == set(module.MEASURES) and offline["paired_seeds"] == [0, 1]
    assert set(setting["methods"]["online-dpo"]["curves"]["shape_iou"]) == {"0", "1", "2"}
    check_paired(report, module)
    invocation = report["invocations"][-1]
    assert invocation["argv"][1:3] == ["--quick", "--workers"] and invocation["wall_seconds"] > 0
    assert len(invocation["machine_start"]["load_average"]) == 3
    assert report["scorer_validation"]["right_shape_accuracy"] == 1.0
