"""A preemption signal that reaches one process of a distributed run stops every process after the same optimizer
step, each writing its part of one checkpoint: a process that stopped alone would leave the others waiting in the
next step's gradient reduction, or training on without it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO

from tests.helpers import fresh_forks
from tests.helpers.common import CHECKOUT
from tests.helpers.distributed import run_as_launched
from trl_diffusion_sdpo.testing import build_tiny_sd_pipeline

WORKER = CHECKOUT / "tests" / "preemption_one_process_worker.py"
PREEMPTED = 75  # the exit status of a preempted run (docs/reliability.md)
# A worker gives up (ends itself) after GIVE_UP seconds; the test waits a little longer for both. A clean run takes
# well under a minute of each process's time.
GIVE_UP = 240


def forked(script: list[str], env: dict[str, str], stdout: IO[str], stderr: IO[str]) -> fresh_forks.Job:
    """``python script`` forked once the libraries are imported (``tests.helpers.fresh_forks``) rather than started as
    a fresh interpreter: the two processes join one process group over the network, each with its own signal
    handlers, whichever way its interpreter started, so what the test checks (a signal to one of them, its agreement
    across the group, each one's exit and checkpoint part) is the same."""
    return fresh_forks.start(script, env=env, stdout=stdout.fileno(), stderr=stderr.fileno(), start_new_session=True)


def test_a_signal_to_one_of_two_processes_stops_both_after_the_step_it_came_in(tmp_path: Path) -> None:
    out, tok, results = tmp_path / "out", tmp_path / "tok", tmp_path / "results"
    results.mkdir()
    build_tiny_sd_pipeline(seed=0, tokenizer_dir=str(tok))  # written once, before two processes read it
    command = [
        str(WORKER), str(out), "--tokenizer-dir", str(tok), "--results", str(results),
        "--signal-step", "2", "--signal-rank", "1", "--max-steps", "4", "--give-up", str(GIVE_UP),
    ]  # fmt: skip
    # both processes as `accelerate launch --config_file multi_gpu.yaml` starts them (its environment, no launcher)
    status, stdout, stderr = run_as_launched(
        command,
        "multi_gpu.yaml",
        tmp_path / "logs",
        GIVE_UP + 120,
        start=forked,
        environment=fresh_forks.environment(),
    )
    output = stdout[-3000:] + stderr[-5000:]
    assert status == 0, output
    reports = {int(p.stem): json.loads(p.read_text()) for p in results.glob("*.json")}
    # process 1 received SIGTERM in step 2; process 0 learned it at the end of that step, and neither trained on
    assert reports == {rank: {"exit_code": PREEMPTED, "global_step": 2} for rank in (0, 1)}, output
    checkpoints = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint"))
    assert checkpoints == ["checkpoint-2"], checkpoints
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(os.listdir(out / "checkpoint-2"))  # both processes saved
    said = [line for line in stderr.splitlines() if "Training preempted by" in line]
    assert len(said) == 2 and all("after optimizer step 2" in line for line in said), said  # once per process
