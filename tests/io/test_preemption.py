"""Preemption: a real signal sent to a real training subprocess run as the command line runs (the preemption
callback passed) ends the step, writes a checkpoint and exits with status 75; resuming from it ends with the same
weights, bit for bit, as a run never interrupted. A Python ``train()`` without the callback leaves the process's
signal handling alone, and no library code ends the process."""

from __future__ import annotations

import ast
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerCallback, TrainerControl

import trl_diffusion_sdpo
from tests.checkpoint_kill_worker import build_trainer
from tests.helpers import fresh_forks
from tests.helpers.common import worker_environment
from trl_diffusion_sdpo.callbacks.preemption import (
    INTERRUPTED_EXIT_CODE,
    PREEMPTED_EXIT_CODE,
    PREEMPTION_SYNC_EVERY,
    PreemptionCallback,
    TrainingInterrupted,
    TrainingPreempted,
    parse_signals,
)
from trl_diffusion_sdpo.cli.train import stopped_or
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
    command = [WORKER, out, "--tokenizer-dir", tok, "--pause-step", "3"]
    if signals is not None:
        command += ["--signals", *signals]
    # the worker's own process, `python WORKER` forked once the libraries are imported (tests.helpers.fresh_forks)
    proc = fresh_forks.start_piped(command)
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


def test_the_stops_are_exceptions_that_carry_the_command_lines_exit_status():
    """Library code ends no process: a preemption is an Exception, a second Ctrl-C a KeyboardInterrupt; the command
    line turns each into its exit status (stopped_or)."""
    preempted, interrupted = TrainingPreempted("out/checkpoint-3", "SIGTERM", 3), TrainingInterrupted(3)
    assert isinstance(preempted, Exception) and not isinstance(preempted, SystemExit)
    assert isinstance(interrupted, KeyboardInterrupt) and not isinstance(interrupted, SystemExit)
    assert preempted.exit_code == PREEMPTED_EXIT_CODE == 75
    assert TrainingPreempted("out/checkpoint-3", "SIGINT", 3).exit_code == interrupted.exit_code == 130

    def raising(error: BaseException):
        def run() -> int:
            raise error

        return run

    assert stopped_or(raising(preempted)) == 75 and stopped_or(raising(interrupted)) == 130
    assert stopped_or(lambda: 3) == 3
    with pytest.raises(KeyboardInterrupt):  # a Ctrl-C without the callback is the user's, as ever
        stopped_or(raising(KeyboardInterrupt()))


def _package_sources() -> list[Path]:
    return sorted(Path(trl_diffusion_sdpo.__file__).parent.rglob("*.py"))


def _ends_the_process(tree: ast.AST) -> list[str]:
    """Where a module's code ends the process: ``SystemExit`` named (raised, subclassed), ``sys.exit``/``os._exit``
    or the builtin ``exit``/``quit`` called."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in ("SystemExit",):
            found.append(f"line {node.lineno}: SystemExit")
        elif isinstance(node, ast.Attribute) and node.attr in ("exit", "_exit") and isinstance(node.value, ast.Name):
            if node.value.id in ("sys", "os"):
                found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("exit", "quit"):
            found.append(f"line {node.lineno}: {node.func.id}()")
    return found


def test_no_library_code_ends_the_process():
    """Only the command line (cli/) and the ``python -m`` entry points end the process; the trainer, the callbacks
    and everything else raise exceptions. The scan itself finds a planted ``raise SystemExit`` in a callback."""
    found = {}
    for path in _package_sources():
        relative = path.relative_to(Path(trl_diffusion_sdpo.__file__).parent)
        if relative.parts[0] == "cli" or path.name == "__main__.py":
            continue
        where = _ends_the_process(ast.parse(path.read_text()))
        if where:
            found[str(relative)] = where
    assert found == {}
    planted = "class Stop(TrainerCallback):\n    def on_save(self, *a, **k):\n        raise SystemExit(75)\n"
    assert _ends_the_process(ast.parse(planted)) == ["line 3: SystemExit"]


HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class SignalAtStep(TrainerCallback):
    """Sends this process ``sig`` as optimizer step ``step`` begins, and records the handlers in force then."""

    def __init__(self, sig: signal.Signals, step: int) -> None:
        self.sig, self.step, self.during = sig, step, None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            self.during = {s: signal.getsignal(s) for s in HANDLED}
            os.kill(os.getpid(), self.sig)


@pytest.fixture
def own_handlers():
    """The caller's own handlers for the signals the callback handles (a recorder, so a signal that reached no
    handler of the trainer's ends no test process), put back after the test."""
    received = []

    def record(signum, frame):
        received.append(signal.Signals(signum).name)

    previous = {s: signal.signal(s, record) for s in HANDLED}
    yield record, received
    for s, handler in previous.items():
        signal.signal(s, handler)


def test_a_python_train_leaves_the_callers_signal_handlers_alone(make_trainer, own_handlers):
    """Without a PreemptionCallback, train() installs no handler: the caller's stay in force throughout (a signal
    reaches them), and nothing is checkpointed or raised for it."""
    record, received = own_handlers
    at_step = SignalAtStep(signal.SIGUSR1, 2)
    trainer = make_trainer(max_steps=3, save_steps=1000, callbacks=[at_step])
    trainer.train()
    assert at_step.during == {s: record for s in HANDLED}
    assert received == ["SIGUSR1"] and trainer.state.global_step == 3
    assert {s: signal.getsignal(s) for s in HANDLED} == {s: record for s in HANDLED}


def test_with_the_callback_a_signal_checkpoints_and_raises_an_exception_and_the_handlers_come_back(
    make_trainer, own_handlers
):
    record, received = own_handlers
    callback, at_step = PreemptionCallback(signals=["SIGUSR1"]), SignalAtStep(signal.SIGUSR1, 2)
    trainer = make_trainer(max_steps=3, save_steps=1000, callbacks=[callback, at_step])
    with pytest.raises(TrainingPreempted) as stopped:
        trainer.train()
    assert at_step.during[signal.SIGUSR1] == callback.handle and at_step.during[signal.SIGTERM] is record
    assert received == []  # the trainer's handler took it
    checkpoint = os.path.join(trainer.args.output_dir, "checkpoint-2")
    assert stopped.value.checkpoint == checkpoint and stopped.value.exit_code == PREEMPTED_EXIT_CODE
    assert checkpoint_problem(checkpoint) == ""
    assert {s: signal.getsignal(s) for s in HANDLED} == {s: record for s in HANDLED}


class Agreements:
    """``torch.distributed`` as ``PreemptionCallback`` sees it under two processes, the other one's flag given: the
    steps at which the flag was agreed are recorded."""

    def __init__(self, other_flag: float = 0.0) -> None:
        self.other_flag, self.at = other_flag, []

    def all_reduce(self, tensor):
        self.at.append(self.step)
        tensor += self.other_flag


@pytest.mark.parametrize("received_at", [None, 3])
def test_under_several_processes_the_flag_is_agreed_at_logging_steps_and_every_sync_every_steps(
    monkeypatch, received_at
):
    """No device read per step for a flag: the all-reduce (which the host waits for) runs at the steps that log,
    where the host reads the metrics anyway, and every ``sync_every`` steps; a signal received at step 3 stops the
    run at the next of those (step 4 logs here), on every process alike."""
    agreements = Agreements()
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", agreements.all_reduce)
    callback = PreemptionCallback(sync_every=5)
    args = SimpleNamespace(world_size=2, device=torch.device("cpu"))
    state = SimpleNamespace(global_step=0)
    callback.on_train_begin(args, state, None)
    stopped_at = None
    for step in range(1, 13):
        state.global_step = agreements.step = step
        if step == received_at:
            callback.received = "SIGTERM"
        control = TrainerControl(should_log=step == 4)
        callback.on_step_end(args, state, control)
        if control.should_save:
            stopped_at = step
            break
    assert stopped_at == (None if received_at is None else 4)
    assert agreements.at == ([4, 5, 10] if received_at is None else [4])
    assert callback.sync_every == 5 and PreemptionCallback().sync_every == PREEMPTION_SYNC_EVERY


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
