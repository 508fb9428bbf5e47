"""DeepSpeed's "Setting accelerator to CPU" notice, which accelerate's import of DeepSpeed prints in every training
run on a machine where torch sees no GPU: the command line drops it from its own output, while the package imported
and a trainer built from Python leave DeepSpeed's logger as DeepSpeed made it (the notice still printed there)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import fresh_forks
from tests.helpers.common import worker_environment

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[2]
NOTICE = "Setting accelerator to CPU"


def no_gpu_environment() -> dict[str, str]:
    """The subprocess sees no GPU, as a CPU machine's does (where DeepSpeed prints the notice), and chooses no
    accelerator of its own."""
    env = worker_environment()
    env.update(CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    env.pop("DS_ACCELERATOR", None)
    return env


# From Python: the package imported, a tiny trainer built (accelerate imports DeepSpeed then), and DeepSpeed's logger
# read: its filters, and whether its notice was printed (DeepSpeed's handler writes to stdout).
FROM_PYTHON = """
import json, logging, sys, tempfile
import trl_diffusion_sdpo
from tests.helpers.host_settings import tiny_trainer
with tempfile.TemporaryDirectory() as folder:
    tiny_trainer(folder, steps=1)
import deepspeed  # noqa: F401  (imported above by accelerate where it is installed)
logger = logging.getLogger("DeepSpeed")
sys.stderr.write(json.dumps({"filters": [repr(f) for f in logger.filters]}) + "\\n")
"""


@pytest.mark.slow  # by default: test_host_settings.py's check that no setting of another library changes
def test_from_python_the_notice_and_deepspeeds_logger_are_left_alone():
    done = subprocess.run(
        [sys.executable, "-c", FROM_PYTHON],
        cwd=ROOT,
        env=no_gpu_environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert NOTICE in done.stdout + done.stderr  # DeepSpeed says it, as in any script of the user's
    assert done.stderr.strip().splitlines()[-1] == '{"filters": []}'


def test_a_training_command_prints_no_accelerator_notice(tmp_path):
    pairs = tmp_path / "pairs"
    for i in range(4):
        folder = pairs / f"p{i}"
        folder.mkdir(parents=True)
        Image.new("RGB", (32, 32), "red").save(folder / "chosen.png")
        Image.new("RGB", (32, 32), "blue").save(folder / "rejected.png")
        (folder / "prompt.txt").write_text("red square on white")
    command = ["-m", "trl_diffusion_sdpo", "train", "--config", "examples/configs/tiny_cpu.yaml"]
    command += ["--dataset_name", str(pairs), "--output_dir", str(tmp_path / "out"), "--max_steps", "1"]
    # a child of an interpreter that imported the libraries but not DeepSpeed (it checks so), with no GPU visible
    done = fresh_forks.run(command, env=fresh_forks.environment(DS_ACCELERATOR=None), timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "'train_runtime'" in output  # the trainer ran (DeepSpeed was imported with it)
    assert NOTICE not in output, output[-3000:]
