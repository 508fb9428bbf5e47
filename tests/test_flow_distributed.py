"""SD3 and FLUX under two processes on CPU over gloo: DDP and DeepSpeed ZeRO-2/3 with the shipped accelerate configs.

As ``tests/test_distributed.py`` does for the UNets: ``examples/train_flow.py`` runs under ``accelerate launch``
through ``tests/distributed_worker.py`` and is compared with one process, same global batch and seed.
Two-process launches take a minute each on two shared cores, so every case here is a slow test (``-m slow``).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import pickapic_rows
from datasets import Dataset
from test_distributed import STEPS, run

from trl_diffusion_sdpo.tiny_models import (
    build_tiny_flux_pipeline,
    build_tiny_qwen_image_pipeline,
    build_tiny_sd3_pipeline,
    build_tiny_z_image_pipeline,
)

pytest.importorskip("deepspeed")

FLOW_ARGS = ("--beta", "100", "--max_sequence_length", "16")


@pytest.fixture(scope="module")
def flow_assets(tmp_path_factory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("flow-distributed")
    Dataset.from_list(pickapic_rows(8)).save_to_disk(str(root / "data"))
    assets = {}
    # Widened (head dim 96): their feed-forward weights exceed ZeRO-3's persistence threshold and are partitioned.
    wide = {"sd3": {}, "flux": {"axes_dims_rope": (24, 36, 36)}}
    for kind, build in (("sd3", build_tiny_sd3_pipeline), ("flux", build_tiny_flux_pipeline)):
        pipe = build(
            seed=0, tokenizer_dir=str(root / f"tok-{kind}"), max_length=16, attention_head_dim=96, **wide[kind]
        )
        pipe.save_pretrained(root / kind)
        assets[kind] = {
            "root": root / f"runs-{kind}",
            "pipeline": root / kind,
            "data": root / "data",
            "example": "flow",
        }
        assets[kind]["root"].mkdir()
    for kind, build in (("qwen-image", build_tiny_qwen_image_pipeline), ("z-image", build_tiny_z_image_pipeline)):
        build(seed=0, tokenizer_dir=str(root / f"tok-{kind}")).save_pretrained(root / kind)
        assets[kind] = {
            "root": root / f"runs-{kind}",
            "pipeline": root / kind,
            "data": root / "data",
            "example": "flow",
        }
        assets[kind]["root"].mkdir()
    return assets


CASES = [
    ("flux", "multi_gpu.yaml", None, True),
    ("sd3", "multi_gpu.yaml", None, False),  # SD3's last block leaves add_q_proj unused: DDP must tolerate it
    ("sd3", "deepspeed_zero2.yaml", 2, False),
    ("flux", "deepspeed_zero2.yaml", 2, True),
    ("flux", "deepspeed_zero3.yaml", 3, False),
    ("sd3", "deepspeed_zero3.yaml", 3, True),
    ("qwen-image", "multi_gpu.yaml", None, True),
    ("qwen-image", "deepspeed_zero2.yaml", 2, False),
    ("z-image", "multi_gpu.yaml", None, True),
    ("z-image", "deepspeed_zero2.yaml", 2, False),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind,config,stage,lora",
    CASES,
    ids=[f"{k}-{c.removesuffix('.yaml')}-{'lora' if lo else 'full'}" for k, c, _, lo in CASES],
)
def test_flow_models_train_on_two_processes_like_on_one(flow_assets, kind, config, stage, lora) -> None:
    assets = flow_assets[kind]
    tuning = "lora" if lora else "full"
    single = run(assets, f"single-{tuning}-{config}", None, lora, *FLOW_ARGS)
    report = run(assets, f"{config.removesuffix('.yaml')}-{tuning}", config, lora, *FLOW_ARGS)
    assert report["num_processes"] == 2 and report["zero_stage"] == stage
    assert report["global_step"] == STEPS
    losses = report["losses"]
    assert all(math.isfinite(x) for x in losses) and losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses == pytest.approx(single["losses"], rel=1e-3)
    assert report["lambdas"] == pytest.approx(single["lambdas"], rel=1e-3)
    assert not any(report["frozen_partitioned"].values())
    assert report["reference_max_abs_change"] == 0.0
    assert report["original_vs_trained_max_abs_diff"] > 1e-4
    assert report["saved_vs_trained_max_abs_diff"] < 1e-5
    assert report["saved_files"] == single["saved_files"]
    if stage == 3:
        assert 0 < report["policy_partitioned"] < report["policy_parameters"]
    else:
        assert report["process_weight_spread"] < 1e-6


@pytest.mark.slow
def test_parameter_space_safeguard_under_ddp_on_a_flux_transformer(flow_assets) -> None:
    assets = flow_assets["flux"]
    extra = (*FLOW_ARGS, "--safeguard_space", "parameter")
    single = run(assets, "single-parameter", None, True, *extra)
    report = run(assets, "ddp-parameter", "multi_gpu.yaml", True, *extra)
    assert report["losses"] == pytest.approx(single["losses"], rel=1e-3)
    assert report["lambdas"] == pytest.approx(single["lambdas"], rel=1e-3)
    assert report["process_weight_spread"] < 1e-6
