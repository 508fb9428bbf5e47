"""Launches of tests/probe_engines_worker.py (the held-out probe and the rewind under each engine), shared by the
probe's engine tests and the resumed rewind's."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from tests.helpers.common import CHECKOUT, worker_environment

WORKER = CHECKOUT / "tests" / "probe_engines_worker.py"
CONFIGS = CHECKOUT / "examples" / "accelerate_configs"
#: each engine's shipped accelerate config
ENGINES = {
    "ddp": "multi_gpu.yaml",
    "zero1": "deepspeed_zero1.yaml",
    "zero2": "deepspeed_zero2.yaml",
    "zero3": "deepspeed_zero3.yaml",
    "fsdp2": "fsdp2.yaml",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(out: Path, config: str | None, jobs: tuple[str, ...], processes: int = 2) -> dict[str, list[dict]]:
    """The worker's ``jobs`` on ``processes`` processes under ``config`` (a name in ``ENGINES``' values; ``None``: one
    plain process), writing into ``out``: each job's reports, by process."""
    out.mkdir(parents=True, exist_ok=True)
    if config is None:
        command = [sys.executable, str(WORKER), str(out), "-", *jobs]
        processes = 1
    else:
        path = str(CONFIGS / config)
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", path, "--num_processes",
            str(processes), "--mixed_precision", "no", "--main_process_port", str(_free_port()), str(WORKER),
            str(out), path, *jobs,
        ]  # fmt: skip
    proc = subprocess.run(command, cwd=CHECKOUT, env=worker_environment(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return {
        job: [json.loads((out / f"{job}-rank-{rank}.json").read_text()) for rank in range(processes)] for job in jobs
    }
