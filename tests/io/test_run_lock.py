"""Two runs, one folder: a live run's output_dir lock refuses a second run, naming the holder; a killed run leaves no
lock behind (the holder is a real second process). A new run into a finished run's folder is refused unless resumed."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys

import pytest

from tests.checkpoint_kill_worker import build_trainer
from trl_diffusion_sdpo.io.checkpoints import EarlierRunError
from trl_diffusion_sdpo.io.run_lock import LOCK_NAME, RECORD_NAME, RunLock, RunLockedError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The holder loads run_lock.py (standard library and filelock only) by its path: importing it through
# trl_diffusion_sdpo.io would import diffusers first, ~5 s of interpreter start-up per test for nothing the lock uses.
HOLDER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("run_lock", sys.argv[2])
run_lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_lock)
lock = run_lock.RunLock(sys.argv[1])  # held while referenced
lock.acquire()
print("LOCKED", flush=True)
sys.stdin.readline()
"""
RUN_LOCK_FILE = os.path.join(ROOT, "trl_diffusion_sdpo", "io", "run_lock.py")
# Takes and releases the lock of argv[1] for a while; while holding it, leaves a marker in argv[3] and counts the other
# process's markers seen. Prints how often it held the lock and how many overlaps it saw.
RACER = """
import importlib.util, os, sys, time
spec = importlib.util.spec_from_file_location("run_lock", sys.argv[2])
run_lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_lock)
out, shared, me = sys.argv[1], sys.argv[3], sys.argv[4]
held = overlaps = 0
end = time.monotonic() + 1.0
while time.monotonic() < end or held == 0:
    try:
        lock = run_lock.RunLock(out)
        lock.acquire()
    except run_lock.RunLockedError:
        time.sleep(0.001)
        continue
    marker = os.path.join(shared, me)
    open(marker, "w").close()
    time.sleep(0.005)
    overlaps += len(os.listdir(shared)) - 1
    os.remove(marker)
    lock.release()
    held += 1
print(held, overlaps)
"""


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
    assert os.path.exists(os.path.join(out, RECORD_NAME))  # the record is left, the lock is not
    with RunLock(out) as lock:
        with open(lock.record_path) as f:
            assert f'"pid": {os.getpid()}' in f.read()
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            RunLock(out).acquire()  # a second lock in this very process is refused too
    assert not {LOCK_NAME, RECORD_NAME} & set(os.listdir(out))
    with RunLock(out):  # free again
        pass


def test_two_processes_racing_for_the_lock_never_both_hold_it(tmp_path):
    """Two processes take and release the lock in a loop; each writes a marker while it holds it and checks that no
    other marker is there: a lock that does not lock lets them overlap."""
    out, shared = str(tmp_path / "out"), str(tmp_path / "holding")
    os.makedirs(shared)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, out, RUN_LOCK_FILE, shared, str(i)], stdout=subprocess.PIPE, text=True
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0].split() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    held = [int(o[0]) for o in outputs]
    overlaps = [int(o[1]) for o in outputs]
    assert all(h > 0 for h in held), held  # each process held the lock at some point
    assert overlaps == [0, 0]


@pytest.mark.slow  # a fresh interpreter; the lock itself is tested above by default
def test_importing_the_trainer_needs_no_fcntl():
    """Windows has no fcntl: the trainer imports without it (filelock picks the platform's lock)."""
    code = "import sys; sys.modules['fcntl'] = None; import trl_diffusion_sdpo.trainer; print('IMPORTED')"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "IMPORTED", result.stderr[-2000:]
    blocked = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['fcntl'] = None; import fcntl"], capture_output=True, text=True
    )
    assert blocked.returncode != 0 and "fcntl" in blocked.stderr  # the block itself works


def _hashes(folder: str) -> dict[str, str]:
    """Every file under ``folder`` by relative path, with its SHA-256."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return found


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A folder after a finished 3-step run: checkpoints 2 and 3, the weights and ``training_config.json``. Made once
    per module: the tests that use it are refused before writing into it, and each checks it is untouched."""
    tmp_path = tmp_path_factory.mktemp("finished")
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
    message = str(info.value)  # from Python: the keyword arguments, not the flags
    for named in ("resume_from_checkpoint=True", "train(overwrite=True)", "output_dir", "checkpoint-3"):
        assert named in message
    assert "--" not in message
    assert second.state.global_step == 0
    assert _hashes(finished_run) == before  # no file added, removed or changed, the lock's included


def test_the_commands_end_a_refused_run_in_one_line_naming_the_flags(finished_run, tmp_path, capsys):
    """``train`` (and ``online``, the same path) turn the refusal into one error line naming the flags, exit 2."""
    from trl_diffusion_sdpo.cli.console import run_command

    second = build_trainer(finished_run, str(tmp_path / "tok-b"), max_steps=2)
    before = _hashes(finished_run)
    assert run_command("trl-diffusion-sdpo train", second.train) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"trl-diffusion-sdpo train: error: {finished_run} holds another")
    for named in ("--resume_from_checkpoint true", "--overwrite", "--output_dir"):
        assert named in lines[0]
    assert _hashes(finished_run) == before


def test_a_base_pipeline_folder_given_as_output_dir_is_refused(tmp_path):
    """A folder holding a pipeline's weights (unet/) but no training_config.json is another run's (or a base
    model's) files all the same: refused, untouched."""
    from trl_diffusion_sdpo.testing import build_tiny_sd_pipeline

    base = tmp_path / "base"
    build_tiny_sd_pipeline(seed=0, tokenizer_dir=str(tmp_path / "tok-a")).save_pretrained(base)
    assert not (base / "training_config.json").exists() and (base / "unet").is_dir()
    before = _hashes(str(base))
    trainer = build_trainer(str(base), str(tmp_path / "tok-a"), max_steps=1)
    with pytest.raises(EarlierRunError, match=r"holds another run's files \(.*unet"):
        trainer.train()
    assert trainer.state.global_step == 0 and _hashes(str(base)) == before
