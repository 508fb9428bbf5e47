"""Checkpoints appear whole or not at all; resume takes only complete ones and says which; damage is named.

The kill tests run training in a child process forked from this one (``checkpoint_kill_worker.py``'s run, without
a second interpreter's imports) that SIGKILLs itself at a named stage of the save at step 3, resume in this process
with ``resume_from_checkpoint=True``, and compare the final weights with an uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import signal
import struct
import subprocess
import sys

import pytest
import torch
from transformers import TrainerCallback

from tests.checkpoint_kill_worker import STAGES, build_rewind_trainer, build_trainer, train_until_killed
from tests.helpers.forking import run_forked
from trl_diffusion_sdpo.io import saving as saving_module
from trl_diffusion_sdpo.io.checkpoints import (
    MANIFEST_NAME,
    CheckpointError,
    CheckpointSaveError,
    checkpoint_problem,
    recover_interrupted_saves,
    resolve_resume_checkpoint,
)

WEIGHTS = "pytorch_lora_weights.safetensors"


def lora_state(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    root = tmp_path_factory.mktemp("uninterrupted")
    trainer = build_trainer(str(root / "out"), str(root / "tok"))
    trainer.train()
    return lora_state(trainer)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> str:
    """An output folder after 3 steps with a checkpoint per step (save_total_limit=2 keeps checkpoints 2 and 3)."""
    root = tmp_path_factory.mktemp("run")
    build_trainer(str(root / "out"), str(root / "tok"), max_steps=3).train()
    return str(root / "out")


def copy_run(source: str, tmp_path) -> str:
    import shutil

    target = str(tmp_path / "out")
    shutil.copytree(source, target)
    return target


# ----------------------------------------------------------------------------------------------- the files


def test_a_save_leaves_only_complete_checkpoints_with_a_manifest_and_no_staging_folders(trained_run):
    assert sorted(os.listdir(trained_run)) == ["checkpoint-2", "checkpoint-3"]  # and no lock file once train() ends
    for name in ("checkpoint-2", "checkpoint-3"):
        folder = os.path.join(trained_run, name)
        assert checkpoint_problem(folder) == ""
        with open(os.path.join(folder, MANIFEST_NAME)) as f:
            files = json.load(f)["files"]
        assert {WEIGHTS, "trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth"} <= set(files)
        assert all(os.path.getsize(os.path.join(folder, k)) == v for k, v in files.items())


@pytest.mark.parametrize(
    "damage,file,message",
    [
        ("truncate", WEIGHTS, "bytes"),
        ("garbage", WEIGHTS, "damaged"),
        ("garbage", "trainer_state.json", "cannot be read"),
        ("truncate", "optimizer.pt", "bytes"),
        ("delete", "rng_state.pth", "is missing"),
    ],
)
def test_a_damaged_file_in_a_named_checkpoint_is_named_with_the_previous_good_checkpoint(
    trained_run, tmp_path, damage, file, message
):
    run = copy_run(trained_run, tmp_path)
    path = os.path.join(run, "checkpoint-3", file)
    size = os.path.getsize(path)
    if damage == "truncate":
        with open(path, "r+b") as f:
            f.truncate(size // 2)
    elif damage == "garbage":  # same size, so only the content check can tell
        with open(path, "r+b") as f:
            f.write(b"\x07" * min(size, 64))
    else:
        os.remove(path)
    with pytest.raises(CheckpointError, match=message) as info:
        resolve_resume_checkpoint(os.path.join(run, "checkpoint-3"), run)
    assert file in str(info.value)
    assert os.path.join(run, "checkpoint-2") in str(info.value)


def test_resume_true_takes_the_newest_complete_checkpoint_and_logs_which(trained_run, tmp_path, caplog):
    run = copy_run(trained_run, tmp_path)
    # A partial checkpoint-4 as an older, non-atomic save leaves it: weights but no trainer_state.json.
    os.makedirs(os.path.join(run, "checkpoint-4"))
    with open(os.path.join(run, "checkpoint-4", WEIGHTS), "wb") as f:
        f.write(b"partial")
    with caplog.at_level(logging.INFO, logger="trl_diffusion_sdpo.io.checkpoints"):
        chosen = resolve_resume_checkpoint(True, run)
    assert chosen == os.path.join(run, "checkpoint-3")
    resuming = next(r for r in caplog.records if r.getMessage().startswith(f"Resuming from {chosen}"))
    assert resuming.levelno == logging.INFO  # what a resume is asked to do, not a warning
    skipped = next(r for r in caplog.records if "checkpoint-4: trainer_state.json is missing" in r.getMessage())
    assert skipped.levelno == logging.WARNING


def test_leftovers_of_a_kill_are_published_when_complete_and_removed_otherwise(trained_run, tmp_path):
    run = copy_run(trained_run, tmp_path)
    os.rename(os.path.join(run, "checkpoint-3"), os.path.join(run, ".tmp-checkpoint-3"))  # complete, not renamed
    os.makedirs(os.path.join(run, ".tmp-checkpoint-4"))  # partial
    os.makedirs(os.path.join(run, ".trash-checkpoint-1"))  # rotation killed midway
    recover_interrupted_saves(run)
    assert sorted(os.listdir(run)) == ["checkpoint-2", "checkpoint-3"]
    assert checkpoint_problem(os.path.join(run, "checkpoint-3")) == ""


def test_a_complete_checkpoint_left_in_its_staging_run_folder_is_published_under_its_own_name(trained_run, tmp_path):
    """The layout a save writes (``.tmp-checkpoint-N/checkpoint-N``, transformers' save pointed at the staging run
    folder), killed after the manifest and before the rename: the inner folder becomes ``checkpoint-N``, which resume
    then takes, and the staging run folder is gone."""
    run = copy_run(trained_run, tmp_path)
    staging_run = os.path.join(run, ".tmp-checkpoint-3")
    os.makedirs(staging_run)
    os.rename(os.path.join(run, "checkpoint-3"), os.path.join(staging_run, "checkpoint-3"))
    recover_interrupted_saves(run)
    assert sorted(os.listdir(run)) == ["checkpoint-2", "checkpoint-3"]
    published = os.path.join(run, "checkpoint-3")
    assert checkpoint_problem(published) == ""
    assert os.path.isfile(os.path.join(published, WEIGHTS))  # the checkpoint's own files, not a folder holding them
    assert resolve_resume_checkpoint(True, run) == published


# ----------------------------------------------------------------------------------------------- kills


def _train_in_a_fork_until_killed(out: str, tok: str, stage: str, limit: int, timeout: float = 300) -> int:
    """The worker's run, killed at ``stage`` of its save at step 3, in a child forked from this process (its own
    process, so the kill ends it as abruptly as any; this process's imports and settings, one intra-op thread among
    them); returns the child's wait status."""
    return run_forked(lambda: train_until_killed(out, tok, 3, stage, save_total_limit=limit), timeout=timeout)


class _CheckpointsAtTrainBegin(TrainerCallback):
    """Each ``checkpoint-N`` in the output folder when training begins, with what is wrong with it ("" if nothing)."""

    def __init__(self, out: str) -> None:
        self.out, self.problems = out, {}

    def on_train_begin(self, args, state, control, **kwargs):
        names = [n for n in os.listdir(self.out) if n.startswith("checkpoint-")]
        self.problems = {n: checkpoint_problem(os.path.join(self.out, n)) for n in names}


def _kill_then_resume(
    stage: str, tmp_path, uninterrupted, expected_resume_step: int, caplog, build=build_trainer, limit: int = 2
):
    """Kill the worker's run at ``stage`` of the save at step 3, resume it here (``build``: the worker's run, with
    ``save_total_limit=limit``) and compare its final weights with ``uninterrupted``'s; returns the resumed trainer."""
    out, tok = str(tmp_path / "out"), str(tmp_path / "tok")
    status = _train_in_a_fork_until_killed(out, tok, stage, limit)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"the run was not killed ({status})"
    assert not os.path.isdir(os.path.join(out, "checkpoint-4"))
    trainer = build(out, tok) if build is not build_trainer else build(out, tok, save_total_limit=limit)
    at_start = _CheckpointsAtTrainBegin(out)
    trainer.add_callback(at_start)
    with caplog.at_level(logging.INFO, logger="trl_diffusion_sdpo.io.checkpoints"):
        trainer.train(resume_from_checkpoint=True)
    assert f"Resuming from {os.path.join(out, f'checkpoint-{expected_resume_step}')}" in caplog.text
    # before the resumed run saves again, the interrupted save is finished or gone: no unfinished checkpoint-N left
    assert at_start.problems and all(problem == "" for problem in at_start.problems.values()), at_start.problems
    assert trainer.state.global_step == 4
    resumed = lora_state(trainer)
    for key, value in uninterrupted.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0, msg=key)
    names = sorted(os.listdir(out))
    assert names == ["checkpoint-3", "checkpoint-4"][-limit:], names  # leftovers cleaned, transformers' rotation done
    assert all(checkpoint_problem(os.path.join(out, n)) == "" for n in names)
    return trainer


# Killed before the manifest is written, the save at step 3 is lost and resuming starts from checkpoint-2 (with
# save_total_limit=1 killed inside transformers' rotation of it: put back from its hard links); killed with the
# manifest written, checkpoint-3 is complete and used.
_RESUMES_FROM = {stage: 2 for stage in STAGES} | {"before_rename": 3, "after_rename": 3}
_LIMIT = {"rotation": 1}
_FAST = {"weights_partial"}


@pytest.mark.parametrize(
    "stage",
    [s if s in _FAST else pytest.param(s, marks=pytest.mark.slow) for s in STAGES if s != "rewind_snapshot"],
)
def test_a_run_killed_during_a_save_resumes_from_a_complete_checkpoint_bit_exactly(
    stage, tmp_path, uninterrupted, caplog
):
    _kill_then_resume(stage, tmp_path, uninterrupted, _RESUMES_FROM[stage], caplog, limit=_LIMIT.get(stage, 2))


@pytest.mark.slow
def test_a_run_killed_between_the_weights_and_the_rewinds_snapshot_resumes_and_rewinds_as_the_uninterrupted_one(
    tmp_path, caplog
):
    """The save at step 3 holds transformers' files but not yet the snapshot: it is lost whole, the resume starts
    from checkpoint-2 (its snapshot step 2's), and the alarm at step 4 restores what the uninterrupted run's does."""
    straight = build_rewind_trainer(str(tmp_path / "straight" / "out"), str(tmp_path / "straight" / "tok"))
    straight.train()
    assert straight.probe_alarm.action.rewinds == [(4, 2)]
    resumed = _kill_then_resume(
        "rewind_snapshot", tmp_path, lora_state(straight), 2, caplog, build=build_rewind_trainer
    )
    assert resumed.probe_alarm.action.rewinds == [(4, 2)]


# ----------------------------------------------------------------------------------------------- damaged bytes


def _flip_tensor_bytes(path: str) -> None:
    """Flip 4 bytes inside the tensor data of a safetensors file (after its header): same size, header intact."""
    with open(path, "r+b") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        data_start = 8 + header_len
        offset = data_start + (os.path.getsize(path) - data_start) // 2
        f.seek(offset)
        original = f.read(4)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in original))


def test_the_manifest_records_the_sha256_of_every_file(trained_run):
    folder = os.path.join(trained_run, "checkpoint-3")
    with open(os.path.join(folder, MANIFEST_NAME)) as f:
        manifest = json.load(f)
    assert set(manifest["sha256"]) == set(manifest["files"])
    for relative, digest in manifest["sha256"].items():
        with open(os.path.join(folder, relative), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == digest, relative


def test_flipped_bytes_inside_tensor_data_are_named_and_resume_falls_back_to_the_previous_checkpoint(
    trained_run, tmp_path, caplog
):
    run = copy_run(trained_run, tmp_path)
    damaged = os.path.join(run, "checkpoint-3")
    _flip_tensor_bytes(os.path.join(damaged, WEIGHTS))
    # The structural checks alone (all there was before checksums) find nothing wrong.
    assert checkpoint_problem(damaged, verify_checksums=False) == ""
    assert checkpoint_problem(damaged).startswith(f"{WEIGHTS} is damaged: its SHA-256 differs")
    with caplog.at_level(logging.WARNING, logger="trl_diffusion_sdpo.io.checkpoints"):
        chosen = resolve_resume_checkpoint(True, run)
    assert chosen == os.path.join(run, "checkpoint-2")
    assert f"{damaged}: {WEIGHTS} is damaged" in caplog.text
    with pytest.raises(CheckpointError, match="SHA-256") as info:
        resolve_resume_checkpoint(damaged, run)
    assert WEIGHTS in str(info.value) and os.path.join(run, "checkpoint-2") in str(info.value)


# ----------------------------------------------------------------------------------------------- full disk


@contextlib.contextmanager
def small_disk(folder: str, size: str):
    """A tmpfs of ``size`` mounted on ``folder`` (root only); yields False where none can be mounted."""
    os.makedirs(folder)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", folder], capture_output=True)
    try:
        yield mounted.returncode == 0
    finally:
        if mounted.returncode == 0:
            subprocess.run(["umount", "-l", folder], check=False)


def _raise_enospc_after_writing(trainer) -> None:
    """Where no small filesystem can be mounted: the save writes part of the optimizer's file, then fails as a full
    disk does."""

    def fail(output_dir, *args, **kwargs):
        if trainer.state.global_step == 3:
            with open(os.path.join(output_dir, "optimizer.pt"), "wb") as f:
                f.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(output_dir, *args, **kwargs)

    original = trainer._save_optimizer_and_scheduler  # transformers' step of its save, wrapped on this trainer
    trainer._save_optimizer_and_scheduler = fail


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoints_and_names_folder_and_bytes(tmp_path):
    disk = str(tmp_path / "disk")
    with small_disk(disk, "600k") as mounted:  # two checkpoints of ~230 kB fit, a third does not
        out = os.path.join(disk, "out")
        trainer = build_trainer(out, str(tmp_path / "tok"))
        if not mounted:
            _raise_enospc_after_writing(trainer)
        with pytest.raises(CheckpointSaveError, match="the disk is full") as info:
            trainer.train()
        message = str(info.value)
        assert info.value.errno == errno.ENOSPC
        assert f"Saving {os.path.join(out, 'checkpoint-3')} failed" in message
        size = sum(os.path.getsize(os.path.join(out, "checkpoint-2", n)) for n in os.listdir(out + "/checkpoint-2"))
        assert f"A save needs about {size} bytes (the size of {os.path.join(out, 'checkpoint-2')})" in message
        assert "bytes were free there" in message
        # The partial checkpoint-3 is gone; rotation never ran, so checkpoint-1 and -2 are both intact; the lock went.
        assert sorted(os.listdir(out)) == ["checkpoint-1", "checkpoint-2"]
        assert all(checkpoint_problem(os.path.join(out, n)) == "" for n in os.listdir(out))
        assert resolve_resume_checkpoint(True, out) == os.path.join(out, "checkpoint-2")


def test_a_final_save_failing_with_oserror_names_the_folder_and_the_bytes_needed(trained_run, tmp_path, monkeypatch):
    run = copy_run(trained_run, tmp_path)
    trainer = build_trainer(run, str(tmp_path / "tok"))

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(saving_module, "save_lora_adapters", full_disk)
    final = os.path.join(run, "final")
    with pytest.raises(CheckpointSaveError, match="the disk is full") as info:
        trainer.save_model(final)
    assert f"Saving {final} failed" in str(info.value)
    assert f"(the size of {os.path.join(run, 'checkpoint-3')})" in str(info.value)


def test_a_checkpoint_holds_the_random_states_and_optimizer_files_transformers_resumes_from(tmp_path):
    """Every checkpoint carries, in the files transformers' train() reads back when it resumes, the global random
    states as they were when it was written (read back here as transformers reads them), and the optimizer's and
    scheduler's states equal to the trainer's."""
    import random

    import numpy as np
    from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME

    seen: dict[int, tuple] = {}

    class RecordStates(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):  # right after the checkpoint was written
            seen[state.global_step] = (torch.random.get_rng_state(), np.random.get_state()[1].copy(), random.random())

    trainer = build_trainer(str(tmp_path / "out"), str(tmp_path / "tok"), max_steps=2)
    trainer.add_callback(RecordStates())
    trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    saved = torch.load(checkpoint / "rng_state.pth", weights_only=False)
    cpu, numpy_keys, python_draw = seen[2]
    assert torch.equal(saved["cpu"], cpu)
    assert np.array_equal(saved["numpy"][1], numpy_keys)
    random.setstate(saved["python"])
    assert random.random() == python_draw
    optimizer = torch.load(checkpoint / OPTIMIZER_NAME, weights_only=True)
    assert optimizer["param_groups"][0]["lr"] == trainer.optimizer.param_groups[0]["lr"]
    for index, values in trainer.optimizer.state_dict()["state"].items():
        torch.testing.assert_close(optimizer["state"][index]["exp_avg"], values["exp_avg"], rtol=0, atol=0)
    assert torch.load(checkpoint / SCHEDULER_NAME, weights_only=True) == trainer.lr_scheduler.state_dict()


@pytest.mark.parametrize("resume", [None, False])
def test_a_run_told_not_to_resume_trains_from_step_0_without_loading_the_checkpoint_checks(
    make_trainer, monkeypatch, resume
):
    """``resume_from_checkpoint`` None or False (transformers' "no resume"): a new run, whose empty folder holds no
    checkpoint to recover or resume, so the checkpoints' checks are never loaded."""
    monkeypatch.delitem(sys.modules, "trl_diffusion_sdpo.io.checkpoints")  # as in a run that has not loaded them
    trainer = make_trainer(max_steps=1, save_strategy="no")
    trainer.train(resume_from_checkpoint=resume)
    assert trainer.state.global_step == 1
    assert "trl_diffusion_sdpo.io.checkpoints" not in sys.modules
