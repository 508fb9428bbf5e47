"""``train --early_stopping_patience N``: through the real command on the shipped tiny base, the trainer gets
transformers' EarlyStoppingCallback and training stops early; the settings it needs are made for it; without an
evaluation split the command is refused in one line before any model loads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from transformers import EarlyStoppingCallback
from transformers.trainer_utils import IntervalStrategy, SaveStrategy

from trl_diffusion_sdpo import DiffusionSDPOConfig
from trl_diffusion_sdpo.callbacks.early_stopping import EARLY_STOPPING_METRIC, configure_early_stopping
from trl_diffusion_sdpo.cli.main import main
from trl_diffusion_sdpo.cli.train import DiffusionScriptArguments
from trl_diffusion_sdpo.cli.train import main as train_main

MAX_STEPS = 8


def pairs(root: Path, n: int) -> None:
    rng = np.random.default_rng(len(str(root)))
    for i in range(n):
        folder = root / f"p{i}"
        folder.mkdir(parents=True)
        for side in ("chosen", "rejected"):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{side}.png")
        (folder / "prompt.txt").write_text(f"a red circle {i}")


def argv_for(data: Path, out: Path) -> list[str]:
    return [
        "--model_name_or_path", "trl-diffusion-sdpo:tiny", "--dataset_name", str(data), "--output_dir", str(out),
        "--use_cpu", "--resolution", "32", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2",
        "--max_steps", str(MAX_STEPS), "--save_steps", "1", "--report_to", "none", "--use_peft", "--lora_r", "4",
        "--dataloader_num_workers", "0",
    ]  # fmt: skip


def test_the_command_passes_the_callback_on_and_training_stops_early(tmp_path):
    data = tmp_path / "pairs"
    pairs(data / "train", 4)
    pairs(data / "test", 2)
    # A zero learning rate: the LoRA stays zero, the held-out accuracy never improves after the first evaluation.
    argv = [*argv_for(data, tmp_path / "out"), "--learning_rate", "0", "--early_stopping_patience", "1"]
    trainer = train_main(argv)
    callbacks = [c for c in trainer.callback_handler.callbacks if isinstance(c, EarlyStoppingCallback)]
    assert len(callbacks) == 1 and callbacks[0].early_stopping_patience == 1
    args = trainer.args
    assert args.metric_for_best_model == EARLY_STOPPING_METRIC and args.greater_is_better is True
    assert args.load_best_model_at_end and args.eval_strategy == IntervalStrategy.STEPS and args.eval_steps == 1
    evaluations = [e for e in trainer.state.log_history if f"eval_{EARLY_STOPPING_METRIC}" in e]
    # the first evaluation sets the best, the second does not improve on it: patience 1 is spent
    assert len(evaluations) == 2 and trainer.state.global_step == 2 < MAX_STEPS


def test_without_an_evaluation_split_it_is_refused_before_the_model_loads(tmp_path, capsys):
    data = tmp_path / "pairs"
    pairs(data, 2)  # the train split only
    argv = argv_for(data, tmp_path / "out")
    argv[1] = str(tmp_path / "no-model")  # never loaded: the refusal comes first
    assert main(["train", *argv, "--early_stopping_patience", "2"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("trl-diffusion-sdpo train: error: --early_stopping_patience needs an evaluation split")
    assert "--dataset_test_split" in lines[-1] and "eval_dataset" in lines[-1]
    assert "Traceback" not in "\n".join(lines)


@pytest.mark.parametrize(
    "given,expected",
    [
        ({}, ("steps", "steps", 500, EARLY_STOPPING_METRIC, True)),
        ({"save_strategy": "epoch"}, ("epoch", "epoch", None, EARLY_STOPPING_METRIC, True)),
        ({"save_strategy": "no"}, ("steps", "steps", 500, EARLY_STOPPING_METRIC, True)),
        (
            {"save_steps": 10, "eval_strategy": "steps", "eval_steps": 5},
            ("steps", "steps", 5, EARLY_STOPPING_METRIC, True),
        ),
        ({"metric_for_best_model": "loss"}, ("steps", "steps", 500, "loss", False)),
        ({"metric_for_best_model": "margin", "greater_is_better": False}, ("steps", "steps", 500, "margin", False)),
    ],
)
def test_the_settings_early_stopping_needs(tmp_path, given, expected):
    args = DiffusionSDPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", **given)
    configure_early_stopping(args)
    evaluation, saving, eval_steps, metric, greater = expected
    assert args.eval_strategy == IntervalStrategy(evaluation) and args.save_strategy == SaveStrategy(saving)
    assert args.eval_steps == eval_steps and args.metric_for_best_model == metric
    assert args.greater_is_better is greater and args.load_best_model_at_end is True


def test_strategies_that_cannot_match_are_refused(tmp_path):
    args = DiffusionSDPOConfig(
        output_dir=str(tmp_path), use_cpu=True, report_to="none", save_strategy="epoch", eval_strategy="steps"
    )
    with pytest.raises(ValueError, match=r"save_strategy \(epoch\) equal to eval_strategy \(steps\)"):
        configure_early_stopping(args)


def test_the_help_names_the_default_metric():
    from dataclasses import fields

    (patience,) = [f for f in fields(DiffusionScriptArguments) if f.name == "early_stopping_patience"]
    assert f"default {EARLY_STOPPING_METRIC}" in patience.metadata["help"]
