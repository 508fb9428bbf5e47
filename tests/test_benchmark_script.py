"""The benchmark script runs end to end (its numbers are never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_time.py"


@pytest.mark.slow
def test_step_time_script_writes_every_requested_row(tmp_path):
    output = tmp_path / "result.json"
    command = [sys.executable, str(SCRIPT), "--runs", "floor-lora,cached-lora", "--steps", "1", "--warmup", "1",
               "--resolution", "64", "--batch-size", "1", "--dataset-batches", "2", "--output", str(output)]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    report = json.loads(output.read_text())
    assert set(report["rows"]) == {"floor-lora", "dpo-cached-lora", "sdpo-cached-lora"}
    assert "ratio_to_floor_wall" in report["rows"]["dpo-cached-lora"]
    assert "safeguard overhead <= 2%" in report["targets"]


@pytest.mark.slow
def test_soak_script_records_every_step_and_keeps_the_last_two_checkpoints(tmp_path):
    output = tmp_path / "soak.json"
    script = SCRIPT.parent / "soak.py"
    command = [sys.executable, str(script), "--steps", "6", "--save-steps", "2", "--window", "3",
               "--logging-steps", "2", "--output", str(output)]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    report = json.loads(output.read_text())
    assert [w["steps"] for w in report["windows"]] == [[1, 3], [4, 6]]
    assert report["checkpoints_left"] == ["checkpoint-4", "checkpoint-6"]
    assert all(w["rss_end_mib"] > 0 and w["median_step_cpu_s"] > 0 for w in report["windows"])
