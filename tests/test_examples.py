"""The example scripts parse their YAML configs and train end to end on local folders (no Hub access)."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset
from PIL import Image
from safetensors.torch import load_file

from trl_diffusion_sdpo import DiffusionSDPOConfig
from trl_diffusion_sdpo.tiny_models import build_tiny_sd_pipeline

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import train_sd15  # noqa: E402


def _png(color: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), color, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def local_pipeline_and_data(tmp_path: Path) -> tuple[str, str]:
    pipe_dir, data_dir = tmp_path / "pipe", tmp_path / "pairs"
    build_tiny_sd_pipeline(seed=0).save_pretrained(pipe_dir)
    rng = np.random.default_rng(0)
    rows = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": []}
    for i in range(6):
        rows["caption"].append(f"shape {i}")
        rows["jpg_0"].append(_png(tuple(int(c) for c in rng.integers(0, 255, 3)), (40, 36)))
        rows["jpg_1"].append(_png(tuple(int(c) for c in rng.integers(0, 255, 3)), (36, 48)))
        rows["label_0"].append(float(i % 2))
    Dataset.from_dict(rows).save_to_disk(str(data_dir))
    return str(pipe_dir), str(data_dir)


def test_sd15_yaml_config_parses_into_diffusion_sdpo_config() -> None:
    script_args, config = train_sd15.parse_args(
        ["--config", str(EXAMPLES / "configs" / "sd15_lora.yaml"), "--output_dir", "/tmp/unused", "--beta", "2500",
         "--use_cpu"]
    )
    assert isinstance(config, DiffusionSDPOConfig)
    assert config.beta == 2500  # command line overrides the YAML file
    assert config.safeguard and config.safeguard_mu == 0.9
    assert script_args.lora and script_args.lora_rank == 16
    assert script_args.model_name_or_path == "stable-diffusion-v1-5/stable-diffusion-v1-5"


@pytest.mark.parametrize("lora_flag", ["--lora", "--no_lora"])
def test_sd15_example_trains_and_saves_from_local_folders(local_pipeline_and_data, tmp_path: Path, lora_flag) -> None:
    pipe_dir, data_dir = local_pipeline_and_data
    out = tmp_path / "out"
    trainer = train_sd15.main(
        [
            "--model_name_or_path", pipe_dir, "--dataset_name", data_dir, lora_flag, "--lora_rank", "4",
            "--output_dir", str(out), "--resolution", "32", "--per_device_train_batch_size", "2",
            "--max_steps", "2", "--learning_rate", "1e-4", "--no_scale_lr", "--warmup_steps", "0",
            "--use_cpu", "--save_strategy", "no", "--logging_steps", "1",
        ]
    )
    assert trainer.state.global_step == 2
    if lora_flag == "--lora":
        weights = load_file(out / "pytorch_lora_weights.safetensors")
        assert weights and all(k.startswith("unet.") for k in weights)
    else:
        assert os.path.isfile(out / "unet" / "diffusion_pytorch_model.safetensors")


def test_quickstart_trains_saves_and_reloads(tmp_path: Path) -> None:
    import quickstart_tiny

    metrics = quickstart_tiny.main(["--output-dir", str(tmp_path / "qs"), "--steps", "4"])
    assert (tmp_path / "qs" / "pytorch_lora_weights.safetensors").is_file()
    for key in ("eval_loss", "eval_implicit_acc", "eval_delta/winner", "eval_delta/loser"):
        assert np.isfinite(metrics[key])
