"""``on_pathology="rewind"`` on two processes (gloo on CPU), offline and online: every process rewinds at the same
step, to the same healthy weights."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.common import CHECKOUT, worker_environment

WORKER = CHECKOUT / "tests" / "rewind_worker.py"
ONLINE_WORKER = CHECKOUT / "tests" / "online_rewind_worker.py"
CONFIG = CHECKOUT / "examples" / "accelerate_configs" / "multi_gpu.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(worker: Path, out: Path) -> list[dict]:
    """``worker`` launched on two CPU processes with the shipped multi-GPU config; each process's report."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG), "--num_processes", "2",
        "--mixed_precision", "no", "--main_process_port", str(_free_port()), str(worker), str(out),
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=CHECKOUT, env=worker_environment(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return [json.loads((out / f"rank-{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow  # by default: test_online_distributed.py's online run rewinds both processes alike
def test_every_process_rewinds_at_the_same_step_to_the_same_weights(tmp_path):
    reports = _two_processes(WORKER, tmp_path)
    # The alarm fires at step 1 (back to step 0, the safeguard on) and at step 2 (back to step 0, and stop).
    assert reports[0]["rewinds"] == reports[1]["rewinds"] == [[1, 0], [2, 0]]
    assert reports[0]["steps"] == reports[1]["steps"] == 2
    # Both processes end with the weights training started from, bit for bit.
    assert reports[0]["trained"] == reports[1]["trained"] == reports[0]["initial"] == reports[1]["initial"]


@pytest.mark.slow  # by default: test_online_distributed.py's test of the same name (this worker, in its launch)
def test_an_online_run_probes_every_processs_share_of_the_same_pairs_and_rewinds_alike(tmp_path):
    reports = _two_processes(ONLINE_WORKER, tmp_path)
    # Each process holds one of the two held-out pairs, and both read the figures reduced over the two.
    assert reports[0]["share"] != reports[1]["share"]
    assert reports[0]["readings"] == reports[1]["readings"] and len(reports[0]["readings"]) == 1
    # The alarm fires at step 1 on both, back to step 0, and the online run stops with the initial weights.
    assert reports[0]["rewinds"] == reports[1]["rewinds"] == [[1, 0]]
    assert reports[0]["steps"] == reports[1]["steps"] == 1
    assert reports[0]["trained"] == reports[1]["trained"] == reports[0]["initial"] == reports[1]["initial"]
