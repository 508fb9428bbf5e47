"""The trainer's saving and training extend transformers.Trainer's through ``super()``: a class between the trainer and
``Trainer`` (TRL's ``_BaseTrainer``, a user's mixin) runs inside them, and its files are part of the checkpoint.
A checkpoint is trusted only once its manifest, written last, marks it complete: a save killed before the mark leaves
a folder the resume does not take, and, with ``save_total_limit=1``, the previous complete checkpoint that
transformers' rotation deleted inside the save comes back from the hard links set aside for it. Files callbacks write
in ``on_save``, before or after the trainer's own callbacks, are in the manifest; transformers pushes each checkpoint
itself, with the trainer's weights in the output folder it uploads.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
from datasets import Dataset
from transformers import Trainer

from tests.helpers.common import lora_config, pickapic_rows
from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer
from trl_diffusion_sdpo.io import checkpoint_writing
from trl_diffusion_sdpo.io.checkpoints import (
    MANIFEST_DRAFT_NAME,
    MANIFEST_NAME,
    CheckpointError,
    CheckpointSaveError,
    checkpoint_problem,
    recover_interrupted_saves,
    resolve_resume_checkpoint,
)
from trl_diffusion_sdpo.io.run_folder import earlier_run_files
from trl_diffusion_sdpo.testing import build_tiny_sd_pipeline

MIXIN_FILE = "mixin_state.json"


class RecordingMixin(Trainer):
    """A class between the trainer and ``Trainer``: records its ``train`` and ``_save_checkpoint`` calls and, after
    transformers' save, writes a file of its own into the checkpoint folder, as a mixin's state would be."""

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        self.mixin_calls.append(("train", resume_from_checkpoint))
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        folder = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
        # what the folder held when transformers' save returned: its files, not yet the completion mark
        self.mixin_calls.append(("save", sorted(os.listdir(folder))))
        with open(os.path.join(folder, MIXIN_FILE), "w") as f:
            json.dump({"step": self.state.global_step}, f)


class Mixed(DiffusionSDPOTrainer, RecordingMixin):
    pass


def build(cls: type, output_dir: str, tokenizer_dir: str, **overrides) -> DiffusionSDPOTrainer:
    settings = dict(
        output_dir=output_dir,
        resolution=32,
        per_device_train_batch_size=2,
        max_steps=2,
        learning_rate=1e-4,
        warmup_steps=0,
        logging_steps=1,
        use_cpu=True,
        report_to="none",
        save_strategy="steps",
        save_steps=1,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    trainer = cls(
        build_tiny_sd_pipeline(seed=0, tokenizer_dir=tokenizer_dir),
        args=DiffusionSDPOConfig(**(settings | overrides)),
        train_dataset=Dataset.from_list(pickapic_rows(4)),
        peft_config=lora_config(),
    )
    trainer.mixin_calls = []
    return trainer


def test_a_mixin_between_the_trainer_and_transformers_runs_in_its_saves_and_train(tmp_path):
    mro = Mixed.__mro__
    assert mro.index(DiffusionSDPOTrainer) < mro.index(RecordingMixin) < mro.index(Trainer)
    out, tok = str(tmp_path / "out"), str(tmp_path / "tok")
    trainer = build(Mixed, out, tok)
    trainer.train()
    saves = [files for kind, files in trainer.mixin_calls if kind == "save"]
    assert [kind for kind, _ in trainer.mixin_calls] == ["train", "save", "save"]
    for files in saves:  # inside the trainer's save: transformers' files are written, the mark is not yet
        assert "trainer_state.json" in files and "pytorch_lora_weights.safetensors" in files
        assert MANIFEST_NAME not in files
    for step in (1, 2):
        folder = os.path.join(out, f"checkpoint-{step}")
        assert checkpoint_problem(folder) == ""
        with open(os.path.join(folder, MANIFEST_NAME)) as f:
            assert MIXIN_FILE in json.load(f)["files"]  # the mixin's file is part of the complete checkpoint

    resumed = build(Mixed, out, tok, max_steps=3)
    resumed.train(resume_from_checkpoint=True)
    # the mixin's train is handed the checkpoint the trainer resolved and checked, not True
    assert resumed.mixin_calls[0] == ("train", os.path.join(out, "checkpoint-2"))
    assert resumed.state.global_step == 3


class Killed(BaseException):
    """A kill, as the save sees it: nothing after the raise runs, nothing is cleaned up."""


def test_a_save_killed_before_its_mark_is_not_trusted_and_the_previous_checkpoint_survives(
    tmp_path, monkeypatch, caplog
):
    out, tok = str(tmp_path / "out"), str(tmp_path / "tok")
    trainer = build(DiffusionSDPOTrainer, out, tok, save_total_limit=1)
    assert trainer.args.save_total_limit == 1  # transformers' own, which rotates inside its save
    original = checkpoint_writing.mark_complete

    def mark_complete(folder: str) -> None:
        if trainer.state.global_step == 2:  # transformers' files and ours written, the manifest not yet
            raise Killed
        original(folder)

    monkeypatch.setattr(checkpoint_writing, "mark_complete", mark_complete)
    with pytest.raises(Killed):
        trainer.train()
    monkeypatch.undo()
    first, second = os.path.join(out, "checkpoint-1"), os.path.join(out, "checkpoint-2")
    kept = os.path.join(out, ".replaced-checkpoint-1")
    assert not os.path.exists(first)  # transformers' rotation deleted it inside the save, before the mark...
    assert checkpoint_problem(kept) == ""  # ...but its hard links, set aside before the save, are whole
    assert os.path.isfile(os.path.join(second, "trainer_state.json")) and not os.path.exists(
        os.path.join(second, MANIFEST_NAME)
    )
    with pytest.raises(CheckpointError, match="marked complete"):
        resolve_resume_checkpoint(second, out)

    resumed = build(DiffusionSDPOTrainer, out, tok, save_total_limit=1)
    with caplog.at_level(logging.INFO, logger="trl_diffusion_sdpo.io.checkpoints"):
        resumed.train(resume_from_checkpoint=True)
    assert f"Removing {second}: its save was interrupted" in caplog.text
    assert f"Restoring {kept} as {first}" in caplog.text
    assert f"Resuming from {first}" in caplog.text
    assert resumed.state.global_step == 2
    assert sorted(os.listdir(out)) == ["checkpoint-2"]  # rotated to one by transformers; the hard links dropped
    assert checkpoint_problem(second) == ""


@pytest.fixture(scope="module")
def complete_run(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("complete")
    build(DiffusionSDPOTrainer, str(root / "out"), str(root / "tok")).train()
    return str(root / "out")


def test_a_manifest_killed_before_its_rename_is_finished_when_it_checks_out_and_removed_otherwise(
    complete_run, tmp_path
):
    run = str(tmp_path / "out")
    shutil.copytree(complete_run, run)
    first, second = os.path.join(run, "checkpoint-1"), os.path.join(run, "checkpoint-2")
    for folder in (first, second):  # the draft written and flushed, not renamed
        os.rename(os.path.join(folder, MANIFEST_NAME), os.path.join(folder, MANIFEST_DRAFT_NAME))
    with open(os.path.join(second, "optimizer.pt"), "r+b") as f:  # ...and, in checkpoint-2, bytes changed since
        f.write(b"\x07" * 16)
    with pytest.raises(ValueError, match="No complete checkpoint"):  # a draft is no mark
        resolve_resume_checkpoint(True, run)
    recover_interrupted_saves(run)
    assert checkpoint_problem(first) == ""  # finished: the draft checked out against every file
    assert not os.path.exists(second)  # begun by this package (run_identity.json), never validly marked
    assert resolve_resume_checkpoint(True, run) == first


def test_a_damaged_checkpoint_with_a_manifest_never_wins_over_the_complete_one_set_aside_for_it(
    complete_run, tmp_path
):
    """A complete checkpoint set aside (``.replaced-checkpoint-N``) while its step was written again, and a
    ``checkpoint-N`` holding a manifest whose bytes no longer match it: the recovery checks the checksums before
    deleting the only copy of that step, and puts the complete one back."""
    run = str(tmp_path / "out")
    shutil.copytree(complete_run, run)
    second, aside = os.path.join(run, "checkpoint-2"), os.path.join(run, ".replaced-checkpoint-2")
    shutil.copytree(second, aside)
    weights = os.path.join(second, "pytorch_lora_weights.safetensors")
    with open(weights, "r+b") as f:  # same size, header intact: only the checksum tells
        f.seek(os.path.getsize(weights) - 16)
        f.write(b"\x07" * 16)
    assert checkpoint_problem(second, verify_checksums=False) == "" and "SHA-256" in checkpoint_problem(second)
    kept = _manifest(aside)
    recover_interrupted_saves(run)
    assert sorted(os.listdir(run)) == ["checkpoint-1", "checkpoint-2"]
    assert checkpoint_problem(second) == "" and _manifest(second) == kept
    # an intact checkpoint-N keeps its place, and the copy set aside goes
    shutil.copytree(second, aside)
    recover_interrupted_saves(run)
    assert sorted(os.listdir(run)) == ["checkpoint-1", "checkpoint-2"] and checkpoint_problem(second) == ""


def test_a_plain_checkpoint_without_a_manifest_or_run_identity_is_still_resumed_from(complete_run, tmp_path):
    """A checkpoint written before manifests existed (or by plain transformers with this package's weight files):
    accepted on its trainer_state.json and weights, and left alone by the recovery."""
    run = str(tmp_path / "out")
    shutil.copytree(complete_run, run)
    second = os.path.join(run, "checkpoint-2")
    os.remove(os.path.join(second, MANIFEST_NAME))
    os.remove(os.path.join(second, "run_identity.json"))
    recover_interrupted_saves(run)
    assert os.path.isdir(second)
    assert resolve_resume_checkpoint(True, run) == second


def test_transformers_pushes_each_checkpoint_with_the_trainers_weights_and_card_in_the_output_folder(
    tmp_path, monkeypatch
):
    """The checkpoint push is transformers' own (its ``hub_strategy``, inside its save): the trainer's
    ``on_push_begin`` puts the checkpoint's LoRA weights and a model card into the output folder it uploads."""
    import transformers.trainer

    import trl_diffusion_sdpo.io.hub as hub
    from tests.helpers.hub import FakeHfApi

    FakeHfApi.instances.clear()
    monkeypatch.setattr(hub, "HfApi", FakeHfApi)  # the repo the trainer creates
    monkeypatch.setattr(transformers.trainer, "hf_api", FakeHfApi)  # transformers' uploads
    out = str(tmp_path / "out")
    trainer = build(
        DiffusionSDPOTrainer,
        out,
        str(tmp_path / "tok"),
        push_to_hub=True,
        hub_strategy="all_checkpoints",
        hub_model_id="someone/tiny",
        hub_always_push=True,
    )
    trainer.train()
    uploads = [
        (kw.get("path_in_repo"), kw) for api in FakeHfApi.instances for n, kw in api.calls if n == "upload_folder"
    ]
    assert [where for where, _ in uploads] == [None, "checkpoint-1", None, "checkpoint-2"]
    uploaded = {name: data for api in FakeHfApi.instances for name, data in api.uploaded.items()}
    with open(os.path.join(out, "checkpoint-2", "pytorch_lora_weights.safetensors"), "rb") as f:
        assert uploaded["pytorch_lora_weights.safetensors"] == f.read()  # the last push's: step 2's weights
    assert "README.md" in uploaded and "checkpoint-2/trainer_state.json" in uploaded


def _manifest(folder: str) -> str:
    with open(os.path.join(folder, MANIFEST_NAME)) as f:
        return f.read()


def test_a_same_step_save_killed_before_its_mark_leaves_the_complete_checkpoint_it_was_replacing(
    tmp_path, monkeypatch, caplog
):
    """The last good step saved again (as ``on_nonfinite_loss="raise"`` does right after a scheduled save), killed
    before its mark, with ``save_total_limit=1``: the complete checkpoint of that step, the run's only one, was set
    aside rather than deleted, and the resume puts it back and resumes from it."""
    out, tok = str(tmp_path / "out"), str(tmp_path / "tok")
    trainer = build(DiffusionSDPOTrainer, out, tok, save_total_limit=1)
    trainer.train()
    second = os.path.join(out, "checkpoint-2")
    assert sorted(os.listdir(out)) == ["checkpoint-2"] and checkpoint_problem(second) == ""

    def killed(folder: str) -> None:
        raise Killed

    monkeypatch.setattr(checkpoint_writing, "mark_complete", killed)
    with pytest.raises(Killed):
        trainer._save_checkpoint(trainer.model_wrapped, None)  # step 2 again, written in place
    monkeypatch.undo()
    assert not os.path.exists(os.path.join(second, MANIFEST_NAME))  # the new save, unfinished
    assert ".replaced-checkpoint-2" in earlier_run_files(out)  # a new run into this folder is refused
    assert checkpoint_problem(os.path.join(out, ".replaced-checkpoint-2")) == ""

    resumed = build(DiffusionSDPOTrainer, out, tok, save_total_limit=1, max_steps=3)
    with caplog.at_level(logging.INFO, logger="trl_diffusion_sdpo.io.checkpoints"):
        resumed.train(resume_from_checkpoint=True)
    assert "the save that was to replace or rotate it away was interrupted" in caplog.text
    assert f"Resuming from {second}" in caplog.text
    assert resumed.state.global_step == 3
    assert sorted(os.listdir(out)) == ["checkpoint-3"]


def test_a_same_step_save_that_fails_puts_back_the_complete_checkpoint_and_one_that_succeeds_replaces_it(
    tmp_path, monkeypatch
):
    out, tok = str(tmp_path / "out"), str(tmp_path / "tok")
    trainer = build(DiffusionSDPOTrainer, out, tok, save_total_limit=1)
    trainer.train()
    second = os.path.join(out, "checkpoint-2")
    before = _manifest(second)

    def full_disk(folder: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_writing, "mark_complete", full_disk)
    with pytest.raises(CheckpointSaveError, match="checkpoint-2"):
        trainer._save_checkpoint(trainer.model_wrapped, None)
    monkeypatch.undo()
    assert sorted(os.listdir(out)) == ["checkpoint-2"]  # put back, the very checkpoint it was
    assert checkpoint_problem(second) == "" and _manifest(second) == before
    assert resolve_resume_checkpoint(True, out) == second

    trainer._save_checkpoint(trainer.model_wrapped, None)  # the same step saved again, completing this time
    assert sorted(os.listdir(out)) == ["checkpoint-2"]  # the one it replaced, deleted once it was complete
    assert checkpoint_problem(second) == ""
