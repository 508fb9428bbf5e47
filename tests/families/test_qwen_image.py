"""Qwen-Image: prompts encoded as QwenImagePipeline.encode_prompt does, per-channel latent normalisation on its 3D
VAE, the packed call as the pipeline makes it, and the shared flow-family checks (LoRA, full, safeguards, cache).

Tiny Qwen2.5-VL encoder, Qwen-Image VAE and transformer built from configs; the byte-level tokenizer is written
offline by the test.
"""

from __future__ import annotations

import logging

import pytest
import torch
from datasets import Dataset
from diffusers import QwenImagePipeline

from tests.helpers.common import pickapic_rows
from tests.helpers.flow_family_checks import FlowFamilyTrainingChecks
from tests.helpers.qwen_image import CASE, SEQ
from trl_diffusion_sdpo.families import QwenImageFamily, family_for_pipeline, scale_latents
from trl_diffusion_sdpo.families.flow import resolution_shift
from trl_diffusion_sdpo.testing import build_tiny_qwen_image_pipeline


@pytest.fixture
def make_pipe(tmp_path):
    counter = iter(range(1_000))

    def make(seed: int = 0, **kwargs) -> QwenImagePipeline:
        return build_tiny_qwen_image_pipeline(
            seed=seed, tokenizer_dir=str(tmp_path / f"tok-{next(counter)}"), **kwargs
        )

    return make


@pytest.fixture
def pairs() -> Dataset:
    return Dataset.from_list(pickapic_rows(4))


# --------------------------------------------------------------------------------------------- what the family does


def test_the_family_is_picked_for_a_qwen_image_pipeline_with_its_defaults(make_pipe) -> None:
    pipe = make_pipe()
    family = family_for_pipeline(pipe, max_sequence_length=SEQ)
    assert isinstance(family, QwenImageFamily) and family.denoiser is pipe.transformer
    assert set(family.frozen_modules()) == {"vae", "text_encoder"}
    assert family.default_beta == 100.0 and "README_qwen" in family.defaults_source
    with pytest.raises(ValueError, match="at most 1024"):
        QwenImageFamily(pipe, max_sequence_length=2048)


def test_prompt_encoding_equals_the_pipelines_encode_prompt(make_pipe) -> None:
    pipe = make_pipe()
    family = family_for_pipeline(pipe, max_sequence_length=SEQ)
    prompts = ["a red square", "two blue circles on green grass"]
    ours = family.encode_prompts(family.prompt_tokenizer()(prompts))
    hidden, mask = pipe.encode_prompt(prompts, device="cpu", max_sequence_length=SEQ)
    # The pipeline pads to the longest prompt; ours to SEQ, with zeros: the same rows where the mask is set.
    assert mask is not None and mask.sum(1).tolist() == [17, 24]  # 12 prompt characters + 5 closing tokens, cut
    length = hidden.shape[1]
    torch.testing.assert_close(ours.encoder_hidden_states[:, :length] * mask[..., None], hidden * mask[..., None])
    assert ours.encoder_hidden_states[0, 17:].abs().sum() == 0
    conditioning = family.denoiser_conditioning(ours, None)
    assert torch.equal(conditioning["encoder_hidden_states_mask"][:, :length], mask.bool())


def test_the_template_prefix_is_dropped_as_the_pipeline_drops_it(make_pipe) -> None:
    pipe = make_pipe()
    family = family_for_pipeline(pipe, max_sequence_length=SEQ)
    tokens = family.prompt_tokenizer()(["ab"])["input_ids"][0]
    kept = tokens[pipe.prompt_template_encode_start_idx :]
    assert pipe.tokenizer.decode(kept[:2]) == "ab"  # the first kept tokens are the prompt's
    assert len(tokens) == pipe.prompt_template_encode_start_idx + SEQ


def test_latents_are_normalised_per_channel_from_the_vae_config(make_pipe) -> None:
    pipe = make_pipe()
    family = family_for_pipeline(pipe, max_sequence_length=SEQ)
    pixels = torch.rand((2, 3, 32, 32), generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, std = family.encode_moments(pixels)
    direct = pipe.vae.encode(pixels.unsqueeze(2)).latent_dist  # the VAE's own frame axis
    torch.testing.assert_close(mean, direct.mean[:, :, 0])
    torch.testing.assert_close(std, direct.std[:, :, 0])
    assert mean.shape[1:] == family.latent_shape(32)
    config = pipe.vae.config
    expected = (mean - torch.tensor(config.latents_mean).view(1, -1, 1, 1)) / torch.tensor(config.latents_std).view(
        1, -1, 1, 1
    )
    torch.testing.assert_close(scale_latents(mean, config), expected)
    # The pipeline's decode-side inverse, latents / (1 / std) + mean, takes them back.
    restored = expected * torch.tensor(config.latents_std).view(1, -1, 1, 1) + torch.tensor(config.latents_mean).view(
        1, -1, 1, 1
    )
    torch.testing.assert_close(restored, mean)


def test_the_call_packs_latents_and_passes_img_shapes_as_the_pipeline_does(make_pipe) -> None:
    pipe = make_pipe(guidance_embeds=False)
    family = family_for_pipeline(pipe, max_sequence_length=SEQ)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn((2, 4, 6, 4), generator=gen)
    embeds = family.encode_prompts(family.prompt_tokenizer()(["a", "a longer prompt here"]))
    timestep = torch.tensor([250.0, 800.0])
    ours = family.call_denoiser(pipe.transformer, latents, timestep, family.denoiser_conditioning(embeds, None))
    hidden = embeds.encoder_hidden_states
    with torch.no_grad():
        out = pipe.transformer(
            hidden_states=QwenImagePipeline._pack_latents(latents, 2, 4, 6, 4),
            timestep=timestep / 1000,
            encoder_hidden_states=hidden,
            encoder_hidden_states_mask=hidden.ne(0).any(-1),
            img_shapes=[[(1, 3, 2)]] * 2,
            return_dict=False,
        )[0]
    s = pipe.vae_scale_factor
    torch.testing.assert_close(ours, QwenImagePipeline._unpack_latents(out, 6 * s, 4 * s, s)[:, :, 0])


def test_noise_levels_take_the_pipelines_resolution_shift(make_pipe, make_config) -> None:
    pipe = make_pipe()
    noiser = family_for_pipeline(pipe).noiser(CASE.config(make_config))
    assert noiser.sampling.shift == "resolution" and noiser.sampling.weighting_scheme == "logit_normal"
    # Qwen-Image's calculate_shift over its scheduler config (max_shift 0.9 at 8192 tokens).
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    mu = calculate_shift(32 * 32, 256, 8192, 0.5, 0.9)
    assert resolution_shift(64, 64, pipe.scheduler.config) == pytest.approx(float(torch.tensor(mu).exp()))


def test_a_unet_scale_beta_warns_with_the_familys_default_and_source(make_pipe, make_config, caplog) -> None:
    family = family_for_pipeline(make_pipe())
    with caplog.at_level(logging.WARNING, logger="trl_diffusion_sdpo.families.flow"):
        family.noiser(CASE.config(make_config, beta=2500.0))
    assert "beta=2500" in caplog.text and "default is beta=100" in caplog.text and "README_qwen" in caplog.text


# ----------------------------------------------------------------------------------------------------- training


class TestQwenImageTraining(FlowFamilyTrainingChecks):
    """LoRA, full tuning, both safeguard spaces, the latent cache, the shipped config, bf16, resuming, exactness and
    validation grids (see tests/helpers/flow_family_checks.py)."""

    case = CASE
    config_name = "qwen_image_lora"
    family_name = "qwen-image"
