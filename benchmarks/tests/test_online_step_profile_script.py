"""``benchmarks/speed/online_step_profile.py``: its summary's arithmetic on synthetic runs, and a tiny run end to end
whose stages add up to the step and whose two codes (the same commit) sample the same rewards."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "speed" / "online_step_profile.py"


def _module():
    spec = importlib.util.spec_from_file_location("online_step_profile", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(steps: list[dict[str, float]], guided: float, unguided: float) -> dict:
    return {
        "steps": steps,
        "guidance": {"guided_sampling_s": guided, "unguided_sampling_s": unguided},
        "load_average_before": [1.0, 1.0, 1.0],
        "load_average_after": [2.0, 2.0, 2.0],
    }


def test_the_summary_takes_medians_over_every_step_of_every_process():
    module = _module()

    def step(seconds: float, denoiser: float, share: float) -> dict[str, float]:
        return {"step": seconds, "denoiser": denoiser, "generation_time_share": share}

    runs = [
        _run([step(10.0, 6.0, 0.8), step(12.0, 9.0, 0.9)], guided=4.0, unguided=3.0),
        _run([step(20.0, 7.0, 0.7)], guided=8.0, unguided=5.0),
    ]
    summary = module.summary(runs)
    assert summary["steps_measured"] == 3
    assert summary["median_s"]["step"] == 12.0 and summary["median_s"]["denoiser"] == 7.0
    assert summary["share_of_median_step"]["denoiser"] == pytest.approx(7.0 / 12.0)
    assert summary["generation_time_share_median"] == 0.8
    # guidance: the medians over processes of the guided and unguided sampling calls, and their difference
    assert summary["guidance"]["guided_sampling_s"] == 6.0 and summary["guidance"]["unguided_sampling_s"] == 4.0
    assert summary["guidance"]["guidance_s"] == 2.0
    assert summary["guidance"]["guidance_share_of_sampling"] == pytest.approx(2.0 / 6.0)


@pytest.mark.slow
def test_a_tiny_run_splits_the_step_into_stages_that_add_up(tmp_path):
    module = _module()
    report = module.main(
        ["--sizes", "demo-tiny", "--before", "HEAD", "--repeats", "1", "--steps", "1", "--warmup", "0",
         "--guidance-repeats", "1", "--output", str(tmp_path / "profile.json")]
    )  # fmt: skip
    entry = report["sizes"]["demo-tiny"]
    assert entry["first_generation_rewards_max_abs_difference"] == 0.0  # one commit: the same samples
    for label in ("before", "after"):
        seconds = entry[label]["median_s"]
        assert all(seconds[name] >= 0 for name in module.STAGES), seconds
        assert sum(seconds[name] for name in module.STAGES) == pytest.approx(seconds["step"], rel=1e-6)
        assert 0 < entry[label]["generation_time_share_median"] < 1
