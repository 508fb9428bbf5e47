"""The update-space safeguard under FSDP2 on two CPU processes (gloo) against one process with the same global batch.

Each branch's gradient is reduce-scattered (by the one pass's taps with AdamW, by FSDP2's backward in the per-branch
passes with SGD), so each process holds its shards of the averaged ``g_w`` and ``h_l``,
of the weights and of the optimizer's state; ``OptimizerUpdate`` adds up every sum it forms over the processes (the
clip coefficient's, AdamW's weight decay, SGD's four, ``D(lambda)`` at each evaluation), so every process searches
the same ``D`` and finds the ``lambda`` of the global micro-batch. Launched as ``test_distributed.py`` launches its
trainings (the worker lifts accelerate's FSDP gate on CPU processes): the four one-process references in one launch,
the four FSDP2 trainings in one two-process launch (about a minute together on two cores).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_distributed import _REPORTS, FSDP2, STEPS, Run, _launch, _weights, tiny_assets

UPDATE = ("--safeguard_space", "update")  # with the config's weight decay 0.01 and clipping at 1.0, both binding
OPTIMIZERS = {
    "adamw": (),  # the default: torch's AdamW at lr 1e-3
    # in per-branch passes (the one pass is the default, as for AdamW): both stores on shards stay covered
    "sgd": ("--optim", "sgd", "--learning_rate", "1e-2", "--optim_args", "momentum=0.9", "--safeguard_passes", "two"),
}
TUNINGS = ("lora", "full")


def _trainings(config: str | None) -> dict[str, Run]:
    return {
        f"{optimizer}-{tuning}": Run("sd15", config, tuning == "lora", (*UPDATE, *extra))
        for optimizer, extra in OPTIMIZERS.items()
        for tuning in TUNINGS
    }


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """``test_distributed.py``'s tiny pipeline and dataset (uneven and empty shards:
    ``tests/safeguard/test_update_space_sharded.py``)."""
    return tiny_assets(tmp_path_factory.mktemp("fsdp2-update"))


@pytest.fixture(scope="module")
def trainings(assets) -> dict[str, tuple[dict, dict]]:
    """``"<optimizer>-<tuning>"`` -> (the one-process report, the FSDP2 report)."""
    single, sharded = _trainings(None), _trainings(FSDP2)
    _launch([(assets, f"update-single-{name}", run) for name, run in single.items()])
    _launch([(assets, f"update-fsdp2-{name}", run) for name, run in sharded.items()])
    return {name: (_REPORTS[single[name].key(assets)], _REPORTS[sharded[name].key(assets)]) for name in single}


def _assert_sharded_like_one_process(single: dict, report: dict, passes: str) -> None:
    assert report["distributed_type"].endswith("FSDP") and report["num_processes"] == 2
    assert (report["two_pass_reason"] is None) == (passes == "one")
    assert report["global_step"] == STEPS == len(single["lambdas"]) == len(report["lambdas"])
    assert report["policy_sharded"] == report["policy_parameters"]  # every trained weight is a shard
    # every process entered the same collectives: the same search (its passes, each one all-reduce) on each
    assert report["collectives_match"], report["first_collective_mismatch"]
    assert any(lam < 1.0 for lam in single["lambdas"])  # the margin binds: a wrong D would move lambda
    assert report["saved_vs_trained_max_abs_diff"] < 1e-5


def _moved(model_dir: str, lora: bool, start: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The trained weights and how far they moved: LoRA's B matrices (zero at the start), or the whole UNet's."""
    trained = _weights(Path(model_dir), lora)
    if lora:
        trained = {k: v for k, v in trained.items() if ".lora.up." in k}
        return trained, trained
    original = _weights(start, False)
    return trained, {k: v - original[k] for k, v in trained.items()}


@pytest.mark.parametrize("tuning", TUNINGS)
def test_fsdp2_update_space_under_adamw_chooses_one_processs_lambdas(trainings, assets, tuning):
    """AdamW on shards: the lambdas of one process, and weights that follow them.

    Tolerances. lambda lies within max_lambda / 2048 (4.9e-4) below a crossing of D with its target; AdamW's first
    steps move each weight by about lr * sign(G_i), so D is nearly a step function of lambda and the float rounding
    between one process's gradient and two averaged ones moves the crossing by up to a step (measured 2.1e-5 LoRA,
    1.8e-4 full; tolerance 1e-3). Losses: LoRA 8.9e-5 measured (1e-3); full tuning at beta 5000 runs them up to 34
    and 42, where those lambda differences move them by 9.6e-4 (5e-3). Weights: not element-wise (AdamW turns
    rounding in near-zero gradient entries into +-lr moves: up to 2e-3 = 2 lr here), but the difference's norm
    against how far the weights moved: 5.7e-4 LoRA, 6.5e-3 full measured (2e-2)."""
    single, report = trainings[f"adamw-{tuning}"]
    _assert_sharded_like_one_process(single, report, "one")
    assert report["lambdas"] == pytest.approx(single["lambdas"], abs=1e-3)
    assert report["losses"] == pytest.approx(single["losses"], rel=1e-3 if tuning == "lora" else 5e-3)
    lora = tuning == "lora"
    expected, moved = _moved(single["model_dir"], lora, assets["pipeline"])
    trained, _ = _moved(report["model_dir"], lora, assets["pipeline"])
    difference = torch.cat([(trained[k] - expected[k]).reshape(-1) for k in expected]).norm()
    assert difference < 2e-2 * torch.cat([v.reshape(-1) for v in moved.values()]).norm()


@pytest.mark.parametrize("tuning", TUNINGS)
def test_fsdp2_update_space_under_sgd_trains_one_processs_weights(trainings, tuning):
    """SGD with momentum on shards (its D from four sums added up over processes): the lambdas and the weights of one
    process. SGD's update is linear in the gradient, so rounding stays rounding: the weights agree element-wise to
    1.5e-7 measured (float32 weights of size ~1; tolerance 1e-6), where a lambda wrong by d on one process's shards
    would move them by lr * d * |h_l|; D is smooth in lambda (the clip coefficient its only nonlinearity), lambdas
    agree to 1.6e-5 measured (tolerance 2e-4) and losses to 5.8e-4 (1e-3)."""
    single, report = trainings[f"sgd-{tuning}"]
    _assert_sharded_like_one_process(single, report, "two")
    assert report["lambdas"] == pytest.approx(single["lambdas"], abs=2e-4)
    assert report["losses"] == pytest.approx(single["losses"], rel=1e-3)
    expected = _weights(Path(single["model_dir"]), tuning == "lora")
    trained = _weights(Path(report["model_dir"]), tuning == "lora")
    assert trained.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(trained[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
