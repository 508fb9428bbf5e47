"""What a run leaves in its folder is read by names (io/run_folder.py, which the command line asks before torch
loads): they are the names diffusers and transformers write, and a folder holding another run is found as the trainer
finds it."""

from __future__ import annotations

import subprocess
import sys

from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from trl_diffusion_sdpo.io import run_folder


def test_the_names_are_the_libraries():
    assert run_folder.LORA_WEIGHTS_NAME == LORA_WEIGHT_NAME_SAFE
    assert run_folder.CHECKPOINT_PREFIX == PREFIX_CHECKPOINT_DIR


def test_an_earlier_runs_files_are_found_and_others_are_not(tmp_path):
    for name in ("checkpoint-3", ".tmp-checkpoint-4", ".trash-checkpoint-1", "unet", "notes"):
        (tmp_path / name).mkdir()
    for name in ("training_config.json", "pytorch_lora_weights.safetensors", "transformer", "checkpoint-x"):
        (tmp_path / name).write_text("")
    assert run_folder.earlier_run_files(str(tmp_path)) == [
        ".tmp-checkpoint-4",
        ".trash-checkpoint-1",
        "checkpoint-3",
        "pytorch_lora_weights.safetensors",
        "training_config.json",
        "unet",
    ]  # a file named transformer is no weights folder; checkpoint-x no checkpoint


def test_the_module_imports_nothing_heavy():
    code = "import sys, trl_diffusion_sdpo.io.run_folder\n"
    code += "print([m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "[]", done.stderr[-2000:]
