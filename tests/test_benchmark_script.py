"""The benchmark script runs end to end (its numbers are never asserted)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_time.py"


@pytest.mark.slow
def test_step_time_script_writes_every_requested_row(tmp_path):
    output = tmp_path / "result.json"
    command = [
        sys.executable,
        str(SCRIPT),
        "--runs",
        "floor-lora,cached-lora",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--resolution",
        "64",
        "--batch-size",
        "1",
        "--dataset-batches",
        "2",
        "--output",
        str(output),
    ]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    report = json.loads(output.read_text())
    # a trainer run alternates the default --losses: dpo, sdpo (output space), sdpo_param (parameter space)
    assert set(report["rows"]) == {"floor-lora", "dpo-cached-lora", "sdpo-cached-lora", "sdpo_param-cached-lora"}
    assert "ratio_to_floor_wall" in report["rows"]["dpo-cached-lora"]
    assert "safeguard overhead <= 2%" in report["targets"]


@pytest.mark.slow
def test_soak_script_records_every_step_and_keeps_the_last_two_checkpoints(tmp_path):
    output = tmp_path / "soak.json"
    script = SCRIPT.parent / "soak.py"
    command = [
        sys.executable,
        str(script),
        "--steps",
        "6",
        "--save-steps",
        "2",
        "--window",
        "3",
        "--logging-steps",
        "2",
        "--output",
        str(output),
    ]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    report = json.loads(output.read_text())
    assert [w["steps"] for w in report["windows"]] == [[1, 3], [4, 6]]
    assert report["checkpoints_left"] == ["checkpoint-4", "checkpoint-6"]
    assert all(w["rss_end_mib"] > 0 and w["median_step_cpu_s"] > 0 for w in report["windows"])


def test_latent_cache_scale_script_measures_and_computes(tmp_path):
    output = tmp_path / "cache.json"
    script = SCRIPT.parent / "latent_cache_scale.py"
    command = [
        sys.executable,
        str(script),
        "--pairs",
        "4",
        "--repeats",
        "1",
        "--chunk-size",
        "2",
        "--out",
        str(output),
    ]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    report = json.loads(output.read_text())
    assert set(report["measured"]["encode_median_pairs_per_s"]) == {"map", "sharded", "sharded_one_chunk"}
    # The arithmetic follows from the shapes: 4 VAE encodes and one prompt per pair, float32 latents with flips.
    sd15 = report["real_size_arithmetic"]["sd15"]
    assert sd15["bytes_latents"] == 2 * 2 * (2 * 4 * 64 * 64) * 4
    assert (
        sd15["flops_per_pair_with_flips"]
        == 4 * sd15["vae_encoder_flops_per_image"] + sd15["text_encoder_flops_per_prompt"]
    )


@pytest.mark.slow
def test_fsdp_reference_script_runs_on_two_processes(tmp_path):
    output = tmp_path / "fsdp.json"
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        port,
        str(SCRIPT.parent / "fsdp_reference.py"),
        "--steps",
        "1",
        "--out",
        str(output),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=300, env=env)
    report = json.loads(output.read_text())
    first = report["per_process"][0]
    assert first["bytes_held"]["sharded"] * 2 == first["bytes_held"]["replicated"]
    assert first["max_abs_difference"] == 0.0  # the sharded copy computes what the whole one does
