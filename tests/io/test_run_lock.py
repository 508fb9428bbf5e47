"""Two runs, one folder: a live run's output_dir lock refuses a second run, naming the holder; a killed run leaves no
lock behind. The holder is a real second process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest
from checkpoint_kill_worker import build_trainer

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
