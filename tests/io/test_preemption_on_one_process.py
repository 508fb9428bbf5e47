"""A preemption signal that reaches one process of a distributed run stops every process after the same optimizer
step, each writing its part of one checkpoint: a process that stopped alone would leave the others waiting in the
next step's gradient reduction, or training on without it."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from tests.helpers import fresh_forks
from tests.helpers.common import CHECKOUT
from tests.helpers.distributed import Run, _free_port, _launch_environment, _rank_environment
from trl_diffusion_sdpo.testing import build_tiny_sd_pipeline

WORKER = CHECKOUT / "tests" / "preemption_one_process_worker.py"
PREEMPTED = 75  # the exit status of a preempted run (docs/reliability.md)
# A worker gives up (ends itself) after GIVE_UP seconds; the test waits a little longer for both. A clean run takes
# well under a minute of each process's time.
GIVE_UP = 240


def run_two_processes(script: list[str], config: str, logs: Path, timeout: float) -> tuple[int | None, str, str]:
    """``script`` on two processes with the environment ``accelerate launch --config_file <config>`` gives them (as
    ``tests.helpers.distributed.run_as_launched``: accelerate's launch variables, torchrun's rank variables), each
    ``python script`` forked once the libraries are imported (``tests.helpers.fresh_forks``) rather than started as a
    fresh interpreter: the processes join one process group over the network, each with its own signal handlers,
    whichever way its interpreter started, so what the test checks (a signal to one of them, its agreement across the
    group, each one's exit and checkpoint part) is the same. As torchrun does, a failed process ends the other. The
    exit status (the first failure's, ``None`` past ``timeout`` seconds, else 0) and both processes' stdout and
    stderr, in rank order (kept under ``logs``)."""
    logs.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    env = {**fresh_forks.environment(), **_launch_environment(Run("", config, True), 2)}
    jobs = []
    try:
        for rank in range(2):
            with open(logs / f"rank-{rank}.out", "w") as out, open(logs / f"rank-{rank}.err", "w") as err:
                jobs.append(
                    fresh_forks.start(
                        script, env={**env, **_rank_environment(rank, 2, port)}, stdout=out.fileno(),
                        stderr=err.fileno(), start_new_session=True,
                    )
                )  # fmt: skip
        deadline, status = time.monotonic() + timeout, 0
        while status == 0 and any(job.poll() is None for job in jobs):
            failed = [job.returncode for job in jobs if job.returncode not in (None, 0)]
            status = failed[0] if failed else None if time.monotonic() > deadline else 0
            time.sleep(0.1)
        if status == 0:
            status = next((job.returncode for job in jobs if job.returncode != 0), 0)
    finally:
        for job in jobs:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)  # with anything it started
            job.wait()
    read = lambda suffix: "".join((logs / f"rank-{r}.{suffix}").read_text() for r in range(2))  # noqa: E731
    return status, read("out"), read("err")


def test_a_signal_to_one_of_two_processes_stops_both_after_the_step_it_came_in(tmp_path: Path) -> None:
    out, tok, results = tmp_path / "out", tmp_path / "tok", tmp_path / "results"
    results.mkdir()
    build_tiny_sd_pipeline(seed=0, tokenizer_dir=str(tok))  # written once, before two processes read it
    command = [
        str(WORKER), str(out), "--tokenizer-dir", str(tok), "--results", str(results),
        "--signal-step", "2", "--signal-rank", "1", "--max-steps", "4", "--give-up", str(GIVE_UP),
    ]  # fmt: skip
    # both processes as `accelerate launch --config_file multi_gpu.yaml` starts them (its environment, no launcher)
    status, stdout, stderr = run_two_processes(command, "multi_gpu.yaml", tmp_path / "logs", timeout=GIVE_UP + 120)
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
