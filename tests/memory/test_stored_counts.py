"""The known pipelines' stored denoiser counts are what the estimator counts on the model built on the meta device
(regenerated and compared), and an estimate from them is the estimate from the model."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from trl_diffusion_sdpo.engines.memory import KNOWN_MODELS, RunShape, estimate_memory
from trl_diffusion_sdpo.engines.memory.estimate import known_model_sizes
from trl_diffusion_sdpo.engines.memory.stored import STORED_FILE, count_model, stored_model_sizes

SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
FLUX = "black-forest-labs/FLUX.1-dev"
STORED = json.loads(STORED_FILE.read_text())["models"]


def test_every_known_pipeline_is_stored():
    assert sorted(STORED) == sorted(KNOWN_MODELS)


@pytest.mark.parametrize("name", [SD15, FLUX])
def test_stored_counts_are_the_estimators(name):
    """The entry regenerated from the model built on the meta device (a UNet's activations at two of its stored
    shapes: 512 px in bf16, with and without checkpointing) equals the stored one."""
    keys = [(64, 77, 2, False), (64, 77, 2, True)]
    fresh = count_model(name, activation_keys=keys)
    stored = dict(STORED[name])
    if "unet_activations" in stored:
        stored["unet_activations"] = {
            k: v for k, v in stored["unet_activations"].items() if k in fresh["unet_activations"]
        }
        assert len(stored["unet_activations"]) == len(keys)
    assert fresh == stored


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(KNOWN_MODELS))
def test_every_stored_entry_is_the_estimators(name):
    assert count_model(name) == STORED[name]


SHAPES = [
    RunShape(pairs=2, resolution=512, lora_rank=8),
    RunShape(pairs=1, resolution=512, lora_rank=32, base_quantization="quanto-int4", activation_checkpointing=True),
    RunShape(pairs=3, resolution=256, dtype_bytes=4, optim="adafactor", safeguard="one_pass"),
    RunShape(
        pairs=1, resolution=1024, optim="adamw_torch_8bit", engine="zero3", num_processes=4, safeguard="two_pass"
    ),
    RunShape(pairs=1, resolution=512, safeguard="one_pass", update_space=True, weight_decay=True),
    RunShape(
        pairs=1, resolution=512, lora_rank=16, engine="fsdp2", num_processes=2, safeguard="two_pass", update_space=True
    ),
]


@pytest.mark.parametrize("name", [SD15, FLUX])
def test_estimate_from_stored_counts_is_the_models(name):
    """Every term, parameter count and method line of the estimate, from the stored counts and from the model."""
    stored, built = stored_model_sizes(name), known_model_sizes(name)
    assert stored.denoiser is None and built.denoiser is not None
    # The model's estimates share their activation counts as the advice's do (a UNet's meta forward once per
    # resolution, prompt length, dtype and checkpointing: four for the six shapes), each counted on the model.
    built_activations: dict = {}
    for shape in SHAPES:
        shape = replace(shape, lora_targets=stored.counts.family_lora_targets)  # the targets stored: the family's
        from_built = estimate_memory(built, shape, built_activations).as_dict()
        assert estimate_memory(stored, shape).as_dict() == from_built, shape
