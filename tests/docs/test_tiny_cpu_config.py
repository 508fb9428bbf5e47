"""Trying the package offline on a CPU: ``trl-diffusion-sdpo:tiny`` names the tiny base shipped inside the package,
and ``examples/configs/tiny_cpu.yaml`` trains a LoRA on it from a user's pair folder through the command line, its
output written to a file free of third-party noise and progress-bar redraws."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from trl_diffusion_sdpo import load_pipeline
from trl_diffusion_sdpo.families.loading import SHIPPED_MODELS, resolve_model_name

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "examples" / "configs" / "tiny_cpu.yaml"
# What the run's log must not hold: diffusers' torch_dtype deprecation, transformers' torchvision fallback, diffusers'
# float32-modules warning for a model that keeps none, and tqdm's redraws (carriage return, cursor up).
NOISE = (
    "`torch_dtype` is deprecated",
    "requires torchvision",
    "should be kept in float32: []",
    "\r",
    "\x1b[A",
)


def make_pair_folder(root: Path, n: int = 8) -> Path:
    """chosen/ and rejected/ with one caption file per chosen image, as docs/data.md lays a pair folder out."""
    rng = np.random.default_rng(0)
    for side in ("chosen", "rejected"):
        (root / side).mkdir(parents=True)
    for i in range(n):
        for side in ("chosen", "rejected"):
            pixels = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / side / f"{i}.png")
        (root / "chosen" / f"{i}.txt").write_text(f"a red circle on a blue background {i}")
    return root


def test_the_short_name_resolves_to_the_shipped_base_and_loads():
    assert resolve_model_name("trl-diffusion-sdpo:tiny") == str(SHIPPED_MODELS["trl-diffusion-sdpo:tiny"])
    assert resolve_model_name("some/hub-id") == "some/hub-id"
    pipe = load_pipeline("trl-diffusion-sdpo:tiny")
    assert isinstance(pipe, StableDiffusionPipeline)
    shipped = load_file(SHIPPED_MODELS["trl-diffusion-sdpo:tiny"] / "unet" / "diffusion_pytorch_model.safetensors")
    name = next(iter(shipped))
    assert torch.equal(pipe.unet.state_dict()[name], shipped[name])


@pytest.mark.slow  # the README test trains this config from a pair folder; test_log_files checks a clean log
def test_tiny_cpu_yaml_trains_a_lora_from_a_pair_folder_with_a_clean_log(tmp_path):
    pairs = make_pair_folder(tmp_path / "pairs")
    out = tmp_path / "out"
    log = tmp_path / "train.log"
    command = [sys.executable, "-m", "trl_diffusion_sdpo", "train", "--config", str(CONFIG)]
    command += ["--dataset_name", str(pairs), "--output_dir", str(out)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("PYTHONWARNINGS", None)
    with open(log, "w") as f:
        proc = subprocess.run(command, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=600)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    found = [noise for noise in NOISE if noise in text]
    assert not found, (found, text[-3000:])
    assert "peak learning rate 0.0001 (as given; scale_lr=False)" in text  # the start summary reaches the console
    assert "schedule constant, no warmup" in text
    assert "WARNING trl_diffusion_sdpo" not in text  # no trap in the shipped settings (warmup, learning rate)
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    # LoRA's B matrices start at zero: trained ones are not.
    ups = [v for k, v in weights.items() if "lora_B" in k or "lora.up" in k]
    assert ups and all(torch.count_nonzero(v) > 0 for v in ups)
