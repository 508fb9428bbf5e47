"""Two runs, one folder: a live run's output_dir lock refuses a second run, naming the holder; a killed run leaves no
lock behind (the holder is a real second process). A new run into a finished run's folder is refused unless resumed or
told to overwrite it."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys

import pytest
from checkpoint_kill_worker import build_trainer

from trl_diffusion_sdpo.io.checkpoints import EarlierRunError
from trl_diffusion_sdpo.io.run_lock import LOCK_NAME, RunLock, RunLockedError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The holder loads run_lock.py (standard library only) by its path: importing it through trl_diffusion_sdpo.io would
# import diffusers first, ~5 s of interpreter start-up per test for nothing the lock uses.
HOLDER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("run_lock", sys.argv[2])
run_lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_lock)
run_lock.RunLock(sys.argv[1]).acquire()
print("LOCKED", flush=True)
sys.stdin.readline()
"""
RUN_LOCK_FILE = os.path.join(ROOT, "trl_diffusion_sdpo", "io", "run_lock.py")


@pytest.fixture
def holder(tmp_path):
    """A second process holding the lock of ``tmp_path/out`` until it is killed."""
    out = str(tmp_path / "out")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, out, RUN_LOCK_FILE],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "LOCKED"
    yield out, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_a_second_run_in_a_locked_output_dir_is_refused_naming_the_other_process(holder, tmp_path):
    out, proc = holder
    os.makedirs(os.path.join(out, ".tmp-checkpoint-5"))  # the live run's save in progress: must not be touched
    trainer = build_trainer(out, str(tmp_path / "tok"))
    with pytest.raises(RunLockedError, match=f"pid {proc.pid} on host {socket.gethostname()}") as info:
        trainer.train()
    assert f"{out} is in use by another training run" in str(info.value)
    assert trainer.state.global_step == 0
    assert os.path.isdir(os.path.join(out, ".tmp-checkpoint-5"))  # recovery never ran


def test_a_killed_run_leaves_no_lock_and_a_finished_one_no_lock_file(holder):
    out, proc = holder
    with pytest.raises(RunLockedError):
        RunLock(out).acquire()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.exists(os.path.join(out, LOCK_NAME))  # the record is left, the lock is not
    with RunLock(out) as lock:
        with open(lock.path) as f:
            assert f'"pid": {os.getpid()}' in f.read()
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            RunLock(out).acquire()  # a second lock in this very process is refused too (flock is per open file)
    assert not os.path.exists(os.path.join(out, LOCK_NAME))
    with RunLock(out):  # free again
        pass


def _hashes(folder: str) -> dict[str, str]:
    """Every file under ``folder`` by relative path, with its SHA-256."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return found


@pytest.fixture
def finished_run(tmp_path):
    """``tmp_path/out`` after a finished 3-step run: checkpoints 2 and 3, the weights and ``training_config.json``."""
    out = str(tmp_path / "out")
    trainer = build_trainer(out, str(tmp_path / "tok-a"), max_steps=3)
    trainer.train()
    trainer.save_model(out)
    return out


def test_a_new_run_into_another_runs_folder_is_refused_and_touches_no_file(finished_run, tmp_path):
    before = _hashes(finished_run)
    assert {"pytorch_lora_weights.safetensors", "training_config.json"} <= set(before)
    assert any(name.startswith("checkpoint-3/") for name in before)
    second = build_trainer(finished_run, str(tmp_path / "tok-b"), max_steps=2, learning_rate=2e-3)
    with pytest.raises(EarlierRunError) as info:
        second.train()
    message = str(info.value)
    for named in ("--resume_from_checkpoint", "--overwrite_output_dir", "--output_dir", "checkpoint-3"):
        assert named in message
    assert second.state.global_step == 0
    assert _hashes(finished_run) == before  # no file added, removed or changed, the lock's included


def test_overwrite_output_dir_replaces_the_earlier_run_and_deletes_its_checkpoints(finished_run, tmp_path):
    second = build_trainer(finished_run, str(tmp_path / "tok-b"), max_steps=1, overwrite_output_dir=True)
    second.train()
    # checkpoint-3 of the earlier run would otherwise be the newest: resume would pick it, rotation would keep it
    assert sorted(n for n in os.listdir(finished_run) if n.startswith("checkpoint-")) == ["checkpoint-1"]


def test_the_commands_end_a_refused_run_in_one_line_naming_its_remedies():
    """``train`` and ``online`` (both through ``train_save_and_push``) turn the refusal into an error line, not a
    traceback."""
    from types import SimpleNamespace

    from trl_diffusion_sdpo.cli.train import train_save_and_push

    refusal = EarlierRunError("out holds another run's checkpoint-3: pass --resume_from_checkpoint or ...")

    def refuse(**kwargs):
        raise refusal

    trainer = SimpleNamespace(
        args=SimpleNamespace(push_to_hub=False, resume_from_checkpoint=None),
        add_callback=lambda callback: None,
        train=refuse,
    )
    with pytest.raises(SystemExit) as info:
        train_save_and_push(trainer, None)
    assert str(info.value) == f"trl-diffusion-sdpo: error: {refusal}"
