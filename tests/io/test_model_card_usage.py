"""The model card's usage example runs as written: a tiny run's card, its repository id replaced by the output folder,
loads what the run saved and samples a prompt of the run's data at the run's resolution; an editing and a video
family's examples sample their pipelines at the run's size too."""

from __future__ import annotations

import ast
import re
from typing import Any

import numpy as np
import pytest

from tests.helpers.common import fast_config_values, lora_config
from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer
from trl_diffusion_sdpo.callbacks.validation import ValidationCallback
from trl_diffusion_sdpo.families import family_for_pipeline
from trl_diffusion_sdpo.io.hub import usage_call, usage_snippet
from trl_diffusion_sdpo.testing import (
    build_tiny_flux2_klein_pipeline,
    build_tiny_flux_kontext_pipeline,
    build_tiny_sd_pipeline,
    build_tiny_wan_pipeline,
)

PLACEHOLDER = '"<this repo>"'  # the card's repository id before the run has one


def usage_code(card: str) -> str:
    """The Python block under the card's ``## Usage``."""
    return re.search(r"## Usage\n\n```python\n(.*?)```", card, re.S).group(1)


def sampled_prompt(code: str) -> str:
    """The prompt the example's ``pipe(...)`` call samples, read by Python's parser."""
    calls = [n for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "pipe"]
    assert len(calls) == 1
    keywords = {k.arg: k.value for k in calls[0].keywords}
    return ast.literal_eval(keywords.get("prompt") or calls[0].args[0])


def run_example(code: str, repo: str) -> dict[str, Any]:
    """The example executed with the output folder ``repo`` as its repository."""
    assert code.count(PLACEHOLDER) == 1
    namespace: dict[str, Any] = {}
    exec(code.replace(PLACEHOLDER, repr(repo)), namespace)
    return namespace


@pytest.mark.parametrize("lora", [True, False])
def test_the_cards_example_samples_a_training_prompt_at_the_runs_resolution(tmp_path, pickapic_dataset, lora):
    """The base samples 64 px by default; the run trained at 32 px, which the example asks for."""
    base = str(tmp_path / "base")
    build_tiny_sd_pipeline(tokenizer_dir=str(tmp_path / "tok")).save_pretrained(base)
    out = str(tmp_path / "out")
    args = DiffusionSDPOConfig(**{**fast_config_values(out), "max_steps": 1})
    trainer = DiffusionSDPOTrainer(
        base, args=args, train_dataset=pickapic_dataset, peft_config=lora_config() if lora else None
    )
    trainer.train()
    trainer.save_model()
    trainer.create_model_card()
    with open(f"{out}/README.md") as f:
        code = usage_code(f.read())

    assert sampled_prompt(code) == pickapic_dataset[0]["caption"]
    image = run_example(code, out)["image"]
    assert image.size == (args.resolution, args.resolution) != (64, 64)


def test_the_cards_example_samples_the_validation_grids_prompt_before_a_training_prompt(tmp_path, pickapic_dataset):
    """A run with validation grids: the example samples their first prompt (the one the card's widget shows), not
    the first training caption."""
    out = str(tmp_path / "out")
    args = DiffusionSDPOConfig(**{**fast_config_values(out), "max_steps": 1})
    prompt = "a validation prompt of this run"
    assert prompt != pickapic_dataset[0]["caption"]
    trainer = DiffusionSDPOTrainer(build_tiny_sd_pipeline(), args=args, train_dataset=pickapic_dataset)
    trainer.add_callback(ValidationCallback(prompts=[prompt], num_inference_steps=1, every_n_steps=0, trainer=trainer))
    trainer.create_model_card()
    with open(f"{out}/README.md") as f:
        assert sampled_prompt(usage_code(f.read())) == prompt


@pytest.mark.parametrize(
    "build,resolution,num_frames",
    [
        (build_tiny_flux2_klein_pipeline, 64, None),  # FLUX.2 reads sources of 64 px and more
        # slow: 15 s, the source resized to Kontext's ~1024 px; the edits case above covers the source, this one adds
        # max_area (Kontext rescales to its own area without it)
        pytest.param(build_tiny_flux_kontext_pipeline, 32, None, marks=pytest.mark.slow),
        (build_tiny_wan_pipeline, 16, 5),
    ],
    ids=["edits", "edits-max-area", "video"],
)
def test_an_editing_and_a_video_familys_example_sample_at_the_runs_size(tmp_path, build, resolution, num_frames):
    pipeline = build(tokenizer_dir=str(tmp_path / "tok"))
    repo = str(tmp_path / "repo")
    pipeline.save_pretrained(repo)
    args = DiffusionSDPOConfig(**{**fast_config_values(str(tmp_path / "out")), "resolution": resolution})
    args.num_frames = num_frames
    call = usage_call(pipeline, family_for_pipeline(pipeline), args, "red square on white")
    code = usage_snippet("<this repo>", None, False, call=call)

    assert sampled_prompt(code) == "red square on white"
    sampled = run_example(code, repo)
    if num_frames is None:
        assert sampled["image"].size == (resolution, resolution)
    else:
        assert np.asarray(sampled["frames"]).shape[:3] == (num_frames, resolution, resolution)
