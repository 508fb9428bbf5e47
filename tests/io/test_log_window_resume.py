"""A run resumed from a checkpoint inside a logging window logs the same losses as the uninterrupted run: the first
log after the resume averages over the whole window, its steps before the checkpoint included (transformers' own
covers the resumed steps only), also where the resumed run writes a checkpoint before that log and a later run resumes
from it."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.checkpoint_kill_worker import build_trainer

# Logs at steps 3 and 6, a checkpoint every step: checkpoint-1 and checkpoint-2 split the first window.
SETTINGS = dict(max_steps=6, logging_steps=3, save_steps=1, save_total_limit=None)


def logged_losses(trainer) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


def resumed(checkpoint: str, output_dir: str, tokenizer_dir: str):
    """A run resumed from ``checkpoint`` alone, copied into ``output_dir``, trained to the end."""
    os.makedirs(output_dir)
    copy = shutil.copytree(checkpoint, os.path.join(output_dir, os.path.basename(checkpoint)))
    trainer = build_trainer(output_dir, tokenizer_dir, **SETTINGS)
    trainer.train(resume_from_checkpoint=copy)
    assert trainer.state.global_step == SETTINGS["max_steps"]
    return trainer


def test_a_resumed_run_logs_the_uninterrupted_runs_losses(tmp_path):
    tokenizer = str(tmp_path / "tok")
    whole = build_trainer(str(tmp_path / "whole"), tokenizer, **SETTINGS)
    whole.train()
    expected = logged_losses(whole)
    assert sorted(expected) == [3, 6]

    # Resumed at step 1: its first log (step 3) covers steps 1-3, its checkpoint-2 steps 1-2 of that window, and its
    # log at step 6 steps 4-6.
    first = resumed(str(tmp_path / "whole" / "checkpoint-1"), str(tmp_path / "first"), tokenizer)
    assert logged_losses(first) == pytest.approx(expected, rel=1e-6)
    # Resumed at the resumed run's step 2: a window begun before that run's own resume.
    again = resumed(str(tmp_path / "first" / "checkpoint-2"), str(tmp_path / "again"), tokenizer)
    assert logged_losses(again) == pytest.approx(expected, rel=1e-6)
