"""What a resumed run logs is transformers' own: the logged figures average the steps since the last log or the resume,
and ``train_loss`` the steps this ``train()`` call ran. A run resumed from a checkpoint on a logging boundary
(``save_steps`` a multiple of ``logging_steps``) therefore logs the uninterrupted run's figures; one resumed inside a
logging window logs, at that window's end, the mean over the steps since the resume (checked here against each step's
own log), and the uninterrupted run's figures from the next window on."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.checkpoint_kill_worker import build_trainer

# Logs at steps 2 and 4, a checkpoint every step: checkpoint-2 ends the first window, checkpoint-1 splits it.
SETTINGS = dict(max_steps=4, logging_steps=2, save_steps=1, save_total_limit=None)
# What a log carries that is no average of the steps: the clock's and the position's.
NOT_AVERAGES = {"epoch", "step", "train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos"}


def training_logs(trainer, after: int = 0) -> dict[int, dict[str, float]]:
    """The training logs after step ``after`` by step (a resumed run's history holds its checkpoint's logs before),
    without the figures that are not averages."""
    return {
        entry["step"]: {k: v for k, v in entry.items() if k not in NOT_AVERAGES}
        for entry in trainer.state.log_history
        if "loss" in entry and entry["step"] > after
    }


def resumed(checkpoint: str, output_dir: str, tokenizer_dir: str, **settings):
    """A run resumed from ``checkpoint`` alone, copied into ``output_dir``, trained to the end."""
    os.makedirs(output_dir)
    copy = shutil.copytree(checkpoint, os.path.join(output_dir, os.path.basename(checkpoint)))
    trainer = build_trainer(output_dir, tokenizer_dir, **(SETTINGS | settings))
    output = trainer.train(resume_from_checkpoint=copy)
    assert trainer.state.global_step == SETTINGS["max_steps"]
    return trainer, output


def test_a_resumed_run_logs_what_transformers_gives_and_matches_on_a_logging_boundary(tmp_path):
    tokenizer = str(tmp_path / "tok")
    whole = build_trainer(str(tmp_path / "whole"), tokenizer, **SETTINGS)
    whole.train()
    expected = training_logs(whole)
    assert sorted(expected) == [2, 4]

    # Resumed at step 2, a logging boundary: the log at step 4 is the uninterrupted run's, every figure of it, and
    # train_loss (transformers': this call's steps, 3 and 4) is that log's loss.
    boundary, output = resumed(str(tmp_path / "whole" / "checkpoint-2"), str(tmp_path / "boundary"), tokenizer)
    assert training_logs(boundary, after=2) == {4: pytest.approx(expected[4], rel=1e-6)}
    assert output.training_loss == pytest.approx(expected[4]["loss"], rel=1e-6)
    assert output.metrics["train_loss"] == output.training_loss

    # Resumed at step 1, inside the first window: transformers' log at step 2 covers step 2 alone (the step's own
    # loss, as a run logging every step logs it), not the uninterrupted run's mean of steps 1 and 2; from the next
    # window on, the logs are the uninterrupted run's.
    each_step = build_trainer(str(tmp_path / "each"), tokenizer, **(SETTINGS | {"max_steps": 2, "logging_steps": 1}))
    each_step.train()
    per_step = training_logs(each_step)
    assert expected[2]["loss"] == pytest.approx((per_step[1]["loss"] + per_step[2]["loss"]) / 2, rel=1e-6)
    inside, _ = resumed(str(tmp_path / "whole" / "checkpoint-1"), str(tmp_path / "inside"), tokenizer)
    logs = training_logs(inside, after=1)
    assert sorted(logs) == [2, 4]
    assert logs[2]["loss"] == pytest.approx(per_step[2]["loss"], rel=1e-6)
    assert logs[2]["loss"] != pytest.approx(expected[2]["loss"], rel=1e-6)
    assert logs[4] == pytest.approx(expected[4], rel=1e-6)
