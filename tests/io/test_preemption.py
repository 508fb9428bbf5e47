"""Preemption: a real signal sent to a real training subprocess ends the step, writes a checkpoint and exits with
status 75; resuming from it ends with the same weights, bit for bit, as a run never interrupted."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from tests.checkpoint_kill_worker import build_trainer
from tests.helpers.common import worker_environment
from trl_diffusion_sdpo.callbacks.interruptions import (
    INTERRUPTED_EXIT_CODE,
    PREEMPTED_EXIT_CODE,
    TrainingPreempted,
    parse_signals,
)
from trl_diffusion_sdpo.io.checkpoints import checkpoint_problem
from trl_diffusion_sdpo.testing import build_tiny_sd_pipeline

WORKER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "preemption_worker.py")
MULTI_GPU = os.path.join(os.path.dirname(os.path.dirname(WORKER)), "examples", "accelerate_configs", "multi_gpu.yaml")


def lora_state(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def run_and_signal(out: str, tok: str, sig: signal.Signals, signals: list[str] | None = None, twice: bool = False):
    """Start the worker, send ``sig`` while it is inside optimizer step 3, and wait for it to end. ``twice``: send it
    again once the worker has said it received the first (two signals sent at once may arrive as one), and never let
    the step go on."""
    command = [sys.executable, WORKER, out, "--tokenizer-dir", tok, "--pause-step", "3"]
    if signals is not None:
        command += ["--signals", *signals]
    env = worker_environment()
    proc = subprocess.Popen(
        command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        for line in proc.stdout:
            if line.strip() == "PAUSED":
                break
        else:
            raise AssertionError(f"the worker never paused:\n{proc.stderr.read()}")
        proc.send_signal(sig)
        first = ""
        if twice:
            for line in proc.stderr:
                first += line
                if f"{sig.name} received" in line:
                    break
            proc.send_signal(sig)
        else:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        stdout, stderr = proc.communicate(timeout=60 if twice else 300)  # twice: the step never goes on
        stderr = first + stderr
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, stdout, stderr


def test_sigterm_finishes_the_step_checkpoints_exits_75_and_resume_is_bit_exact(tmp_path, caplog):
    out, tok = str(tmp_path / "out"), str(tmp_path / "tok")
    code, stdout, stderr = run_and_signal(out, tok, signal.SIGTERM)
    assert code == PREEMPTED_EXIT_CODE, f"exit status {code}:\n{stdout}\n{stderr}"
    assert "finished" not in stdout
    checkpoint = os.path.join(out, "checkpoint-3")
    # The step under way when the signal came (step 3) was finished and saved; nothing later ran.
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == ["checkpoint-3"]
    assert checkpoint_problem(checkpoint) == ""
    assert f"Training preempted by SIGTERM after optimizer step 3; checkpoint written to {checkpoint}" in stderr

    trainer = build_trainer(out, tok)
    with caplog.at_level(logging.INFO, logger="trl_diffusion_sdpo.io.checkpoints"):
        trainer.train(resume_from_checkpoint=True)
    assert f"Resuming from {checkpoint}" in caplog.text
    assert trainer.state.global_step == 4
    resumed = lora_state(trainer)

    reference = build_trainer(str(tmp_path / "uninterrupted"), tok)
    reference.train()
    for key, value in lora_state(reference).items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0, msg=key)
    # The handlers were put back: this process's SIGTERM handler is the default again.
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


@pytest.mark.slow  # by default: the SIGTERM test above (the same handler, checkpoint, bit-exact resume)
def test_ctrl_c_finishes_the_step_checkpoints_and_says_how_to_resume_and_a_second_one_stops_at_once(tmp_path):
    out, tok = str(tmp_path / "out"), str(tmp_path / "tok")
    code, stdout, stderr = run_and_signal(out, tok, signal.SIGINT)
    assert code == INTERRUPTED_EXIT_CODE == 130, f"exit status {code}:\n{stdout}\n{stderr}"
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    checkpoint = os.path.join(out, "checkpoint-3")
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == ["checkpoint-3"]
    assert checkpoint_problem(checkpoint) == ""
    preempted = [line for line in stderr.splitlines() if "Training preempted by SIGINT" in line]
    assert len(preempted) == 1, stderr
    assert f"after optimizer step 3; checkpoint written to {checkpoint} (exit status 130)" in preempted[0]
    assert "--resume_from_checkpoint true" in preempted[0] and "resume_from_checkpoint=True" in preempted[0]

    again = str(tmp_path / "again")
    code, stdout, stderr = run_and_signal(again, tok, signal.SIGINT, twice=True)
    assert code == INTERRUPTED_EXIT_CODE, f"exit status {code}:\n{stdout}\n{stderr}"
    assert "Traceback" not in stderr and "finished" not in stdout
    assert "second SIGINT during optimizer step 3: stopped at once" in stderr
    assert not any(n.startswith("checkpoint") for n in os.listdir(again))  # the step never finished


@pytest.mark.slow  # the default suite keeps the signal tests with preemption on
def test_with_preemption_off_a_signal_keeps_its_default_action(tmp_path):
    out, tok = str(tmp_path / "out"), str(tmp_path / "tok")
    code, stdout, stderr = run_and_signal(out, tok, signal.SIGUSR1, signals=["none"])
    assert code == -signal.SIGUSR1, f"exit status {code}:\n{stdout}\n{stderr}"
    assert not any(n.startswith("checkpoint") for n in os.listdir(out))


def test_signal_names_are_parsed_and_uncatchable_or_unknown_ones_refused():
    assert parse_signals(["SIGTERM", "usr1", str(int(signal.SIGINT))]) == [
        signal.SIGTERM,
        signal.SIGUSR1,
        signal.SIGINT,
    ]
    assert parse_signals([]) == parse_signals(None) == parse_signals(["none"]) == []
    with pytest.raises(ValueError, match="SIGKILL cannot be caught"):
        parse_signals(["SIGKILL"])
    with pytest.raises(ValueError, match="'SIGNOPE' is not a signal"):
        parse_signals(["SIGNOPE"])


def test_training_preempted_is_a_system_exit_with_status_75():
    error = TrainingPreempted("out/checkpoint-3", "SIGTERM", 3)
    assert isinstance(error, SystemExit) and error.code == PREEMPTED_EXIT_CODE == 75


@pytest.mark.slow  # one process's preemption by default: test_sigterm_finishes_the_step_checkpoints_exits_75_...
def test_a_signal_to_one_of_two_processes_stops_both_after_the_same_step(tmp_path):
    out, tok, pause = str(tmp_path / "out"), str(tmp_path / "tok"), tmp_path / "pause"
    pause.mkdir()
    build_tiny_sd_pipeline(seed=0, tokenizer_dir=tok)  # written once, before two processes read it
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(MULTI_GPU), "--num_processes", "2",
        "--mixed_precision", "no", "--main_process_port", str(port),
        WORKER, out, "--tokenizer-dir", tok, "--pause-step", "3", "--pause-rank", "1", "--pause-dir", str(pause),
    ]  # fmt: skip
    env = worker_environment()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 400
        while not (pause / "paused").exists():
            assert proc.poll() is None and time.time() < deadline, f"no pause:\n{proc.stdout.read()}"
            time.sleep(0.2)
        os.kill(int((pause / "paused").read_text()), signal.SIGTERM)  # process 1 only
        (pause / "go").touch()
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    checkpoint = os.path.join(out, "checkpoint-3")
    # Process 1 got the signal; process 0 learned it from the all-reduce at the end of the same step.
    assert f"Training preempted by SIGTERM after optimizer step 3; checkpoint written to {checkpoint}" in output
    assert (
        "Training preempted by a preemption signal on another process after optimizer step 3; "
        f"checkpoint written to {checkpoint}"
    ) in output
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == ["checkpoint-3"]
    assert checkpoint_problem(checkpoint) == ""
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(os.listdir(checkpoint))  # both processes saved
