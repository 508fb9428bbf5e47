"""Z-Image: prompts encoded as ZImagePipeline.encode_prompt does (chat template, Qwen3's second-to-last layer, the
prompt's tokens only), the call with Z-Image's reversed time and negated prediction, the scheduler's shift, and the
shared flow-family checks (LoRA, full, safeguards, cache).

Tiny Qwen3 encoder, FLUX-style VAE and S3-DiT transformer built from configs; the byte-level tokenizer with its chat
template is written offline by the test.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from diffusers import ZImagePipeline

from tests.helpers.common import pickapic_rows, shift_sigmas
from tests.helpers.flow_family_checks import FlowFamilyTrainingChecks
from tests.helpers.z_image import CASE, SEQ
from trl_diffusion_sdpo.families import ZImageFamily, family_for_pipeline
from trl_diffusion_sdpo.testing import build_tiny_z_image_pipeline


@pytest.fixture
def make_pipe(tmp_path):
    counter = iter(range(1_000))

    def make(seed: int = 0) -> ZImagePipeline:
        return build_tiny_z_image_pipeline(seed=seed, tokenizer_dir=str(tmp_path / f"tok-{next(counter)}"))

    return make


@pytest.fixture
def pairs() -> Dataset:
    return Dataset.from_list(pickapic_rows(4))


# --------------------------------------------------------------------------------------------- what the family does


def test_the_family_is_picked_for_a_z_image_pipeline_with_its_defaults(make_pipe) -> None:
    pipe = make_pipe()
    family = family_for_pipeline(pipe, max_sequence_length=SEQ)
    assert isinstance(family, ZImageFamily) and family.denoiser is pipe.transformer
    assert set(family.frozen_modules()) == {"vae", "text_encoder"}
    assert family.default_beta == 100.0 and family.default_learning_rate == 1e-4
    assert "README_z_image" in family.defaults_source
    pipe.tokenizer.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        family_for_pipeline(pipe)


def test_prompt_encoding_equals_the_pipelines_encode_prompt(make_pipe) -> None:
    pipe = make_pipe()
    family = family_for_pipeline(pipe, max_sequence_length=SEQ)
    prompts = ["a red square", "two blue circles on a green lawn"]
    ours = family.encode_prompts(family.prompt_tokenizer()(prompts))
    # (a copy: the pipeline writes the templated prompts into the list it is given)
    theirs, _ = pipe.encode_prompt(
        list(prompts), device="cpu", do_classifier_free_guidance=False, max_sequence_length=SEQ
    )
    features = family.denoiser_conditioning(ours, None)["cap_feats"]
    # one token per character plus the chat turn's 8 (markers, "user", "assistant", newlines); the second is cut
    assert [f.shape[0] for f in features] == [t.shape[0] for t in theirs] == [len(prompts[0]) + 8, SEQ]
    for mine, reference in zip(features, theirs, strict=True):
        torch.testing.assert_close(mine, reference)


def test_the_call_reverses_time_and_negates_the_prediction_as_the_pipeline_does(make_pipe) -> None:
    pipe = make_pipe()
    family = family_for_pipeline(pipe, max_sequence_length=SEQ)
    latents = torch.randn((2, 4, 4, 6), generator=torch.Generator().manual_seed(0))
    embeds = family.encode_prompts(family.prompt_tokenizer()(["a", "a longer prompt"]))
    conditioning = family.denoiser_conditioning(embeds, None)
    timestep = torch.tensor([250.0, 800.0])
    ours = family.call_denoiser(pipe.transformer, latents, timestep, conditioning)
    with torch.no_grad():  # the pipeline's loop: t -> (1000 - t) / 1000, list of [C, 1, h, w], output negated
        out = pipe.transformer(
            list(latents.unsqueeze(2).unbind(0)),
            (1000 - timestep) / 1000,
            conditioning["cap_feats"],
            return_dict=False,
        )[0]
    torch.testing.assert_close(ours, -torch.stack([o.float() for o in out]).squeeze(2))


def test_noise_levels_take_the_schedulers_static_shift_or_the_resolution_shift(make_pipe, make_config) -> None:
    pipe = make_pipe()
    noiser = family_for_pipeline(pipe).noiser(CASE.config(make_config))
    assert noiser.sampling.shift == "scheduler" and pipe.scheduler.config.shift == 3.0
    unshifted = torch.linspace(1.0, 0.001, 1000)
    torch.testing.assert_close(noiser.sigma_table, shift_sigmas(unshifted, 3.0))
    pipe.scheduler.register_to_config(use_dynamic_shifting=True)
    assert family_for_pipeline(pipe).noiser(CASE.config(make_config)).sampling.shift == "resolution"


# ----------------------------------------------------------------------------------------------------- training


class TestZImageTraining(FlowFamilyTrainingChecks):
    """LoRA, full tuning, both safeguard spaces, the latent cache, the shipped config, bf16, resuming, exactness and
    validation grids (see tests/helpers/flow_family_checks.py)."""

    case = CASE
    config_name = "z_image_lora"
    family_name = "z-image"
    dpo_rises = False
    slow_repeats = {  # this family's call of its transformer is trained by its LoRA run by default
        "test_full_tuning_keeps_a_frozen_reference_and_saves_a_loadable_pipeline": (
            "test_qwen_image.py's TestQwenImageTraining (the frozen copy, the pipeline saved and loaded)"
        ),
    }
