"""FLUX.2 [dev] and [klein]: prompts encoded as the pipelines' ``encode_prompt`` do (chat turns, three stacked
hidden-state layers), latents patchified and normalised by the VAE's batch-norm statistics as the pipeline does,
the call with 4-axis positions and (for [dev]) the guidance value, and the shared flow-family checks (LoRA, full,
safeguards, cache, the shipped YAMLs).

Tiny Mistral-3 and Qwen3 encoders, FLUX.2 VAE and transformer built from configs; the tokenizers (a byte-level one
with Mistral's control tokens and chat template, Qwen's with its chat template) are written offline by the test.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from diffusers import Flux2Pipeline

from tests.helpers.common import pickapic_rows
from tests.helpers.flow_family_checks import (
    check_cached_run_gives_the_uncached_losses,
    check_exact_safeguard_keeps_the_winner_term_from_rising,
    check_full_tuning_keeps_a_frozen_reference_and_saves_a_pipeline,
    check_lora_reloads_with_load_lora_weights,
    check_lora_training_moves_only_the_adapters_and_starts_at_log_2,
    check_safeguard_space,
    check_the_shipped_config_trains_from_local_folders,
)
from tests.helpers.flux2 import CASES, SEQ, TARGETS
from trl_diffusion_sdpo.families import Flux2Family, Flux2KleinFamily, family_for_pipeline, scale_latents

FAMILIES = {"dev": Flux2Family, "klein": Flux2KleinFamily}
YAMLS = {"dev": "flux2_lora", "klein": "flux2_klein_lora"}


def variants(*fast: str) -> pytest.MarkDecorator:
    """Run the test on both variants; those not named in ``fast`` are marked slow (the default suite's budget)."""
    params = [pytest.param(v, marks=() if v in fast else pytest.mark.slow) for v in ("dev", "klein")]
    return pytest.mark.parametrize("variant", params)


@pytest.fixture(params=["dev", "klein"])
def variant(request) -> str:
    return request.param


@pytest.fixture
def make_pipe(tmp_path, variant):
    counter = iter(range(1_000))

    def make(seed: int = 0):
        return CASES[variant].build(seed=seed, tokenizer_dir=str(tmp_path / f"tok-{next(counter)}"))

    return make


@pytest.fixture
def pairs() -> Dataset:
    return Dataset.from_list(pickapic_rows(4))


# --------------------------------------------------------------------------------------------- what the family does


def test_the_family_is_picked_for_each_flux2_pipeline_with_its_defaults(make_pipe, variant) -> None:
    pipe = make_pipe()
    family = family_for_pipeline(pipe, max_sequence_length=SEQ)
    assert type(family) is FAMILIES[variant] and family.denoiser is pipe.transformer
    assert set(family.frozen_modules()) == {"vae", "text_encoder"}
    assert family.text_encoder_out_layers == ((10, 20, 30) if variant == "dev" else (9, 18, 27))
    assert family.lora_target_modules == TARGETS
    assert family.default_beta == 100.0 and family.default_learning_rate == 1e-4
    assert "train_dreambooth_lora_flux2" in family.defaults_source
    assert family.latent_shape(32) == (16, 4, 4)  # 4 latent channels in 2x2 patches of an 8x8 latent (4x VAE)
    pipe.tokenizer.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        family_for_pipeline(pipe)


def test_prompt_encoding_equals_the_pipelines_encode_prompt(make_pipe) -> None:
    pipe = make_pipe()
    family = family_for_pipeline(pipe, max_sequence_length=SEQ)
    prompts = ["a red square", "two blue circles on a green lawn beside a tall yellow tower at dusk"]  # one cut
    ours = family.encode_prompts(family.prompt_tokenizer()(prompts))
    theirs, text_ids = pipe.encode_prompt(list(prompts), device="cpu", max_sequence_length=SEQ)
    assert ours.encoder_hidden_states.shape == (2, SEQ, 3 * 16) and ours.pooled is None
    torch.testing.assert_close(ours.encoder_hidden_states, theirs, rtol=0, atol=0)
    assert text_ids.shape == (2, SEQ, 4)


def test_latents_are_the_pipelines_patchified_batch_norm_normalised_latents(make_pipe) -> None:
    pipe = make_pipe()
    family = family_for_pipeline(pipe, max_sequence_length=SEQ)
    pixels = torch.rand((2, 3, 32, 32), generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, std = family.encode_moments(pixels)
    assert mean.shape == std.shape == (2, 16, 4, 4)
    # at the posterior's mode, the latents are the pipeline's own _encode_vae_image (patchify, then batch norm)
    with torch.no_grad():
        theirs = pipe._encode_vae_image(pixels, generator=None)
    torch.testing.assert_close(scale_latents(mean, family.latents_config()), theirs)
    # the spread is the VAE's, folded into the same patches
    with torch.no_grad():
        posterior = pipe.vae.encode(pixels).latent_dist
    torch.testing.assert_close(std, Flux2Pipeline._patchify_latents(posterior.std))
    # and the pipeline's inverse before decoding recovers the VAE's latents
    bn_mean = pipe.vae.bn.running_mean.view(1, -1, 1, 1)
    bn_std = torch.sqrt(pipe.vae.bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
    torch.testing.assert_close(Flux2Pipeline._unpatchify_latents(theirs * bn_std + bn_mean), posterior.mean)


def test_the_call_packs_positions_and_guidance_as_the_pipeline_does(make_pipe, variant) -> None:
    pipe = make_pipe()
    family = family_for_pipeline(pipe, max_sequence_length=SEQ, guidance_scale=2.5)
    latents = torch.randn((2, 16, 2, 4), generator=torch.Generator().manual_seed(0))
    embeds = family.encode_prompts(family.prompt_tokenizer()(["a", "a longer prompt"]))
    timestep = torch.tensor([250.0, 800.0])
    ours = family.call_denoiser(pipe.transformer, latents, timestep, family.denoiser_conditioning(embeds, None))
    prompt_embeds, text_ids = pipe.encode_prompt(["a", "a longer prompt"], device="cpu", max_sequence_length=SEQ)
    latent_ids = Flux2Pipeline._prepare_latent_ids(latents)
    # the pipeline's loop: guidance for [dev] only (the value it is called with), timestep / 1000
    guidance = torch.full([2], 2.5) if variant == "dev" else None
    with torch.no_grad():
        out = pipe.transformer(
            hidden_states=Flux2Pipeline._pack_latents(latents),
            timestep=timestep / 1000,
            guidance=guidance,
            encoder_hidden_states=prompt_embeds,
            txt_ids=text_ids,
            img_ids=latent_ids,
            return_dict=False,
        )[0]
    torch.testing.assert_close(ours, Flux2Pipeline._unpack_latents_with_ids(out, latent_ids))
    if variant == "dev":  # the guidance value reaches the transformer
        other = family_for_pipeline(pipe, max_sequence_length=SEQ, guidance_scale=5.0)
        assert not torch.allclose(
            other.call_denoiser(pipe.transformer, latents, timestep, family.denoiser_conditioning(embeds, None)), ours
        )


@variants("klein")
def test_noise_levels_come_from_the_schedulers_unshifted_table(make_pipe, make_config, variant, caplog) -> None:
    pipe = make_pipe()
    family = family_for_pipeline(pipe)
    noiser = family.noiser(CASES["klein"].config(make_config))
    assert noiser.sampling.shift == "scheduler" and noiser.sampling.weighting_scheme == "logit_normal"
    torch.testing.assert_close(noiser.sigma_table, torch.linspace(1.0, 0.001, 1000))  # dynamic shifting: unshifted
    with pytest.raises(ValueError, match="compute_empirical_mu"):
        family.noiser(CASES["klein"].config(make_config, flow_shift="resolution"))
    with caplog.at_level("WARNING", logger="trl_diffusion_sdpo.families.flow"):
        family.noiser(CASES["klein"].config(make_config, beta=5000.0))
    assert "beta=5000" in caplog.text and "train_dreambooth_lora_flux2" in caplog.text


# ----------------------------------------------------------------------------------------------------- training


@variants("klein")
def test_lora_training_moves_only_the_adapters_and_starts_at_log_2(make_pipe, make_config, pairs, variant) -> None:
    check_lora_training_moves_only_the_adapters_and_starts_at_log_2(CASES[variant], make_pipe(), make_config, pairs)


@variants("dev")
def test_lora_saved_by_the_trainer_reloads_with_load_lora_weights(
    make_pipe, make_config, pairs, tmp_path, variant
) -> None:
    make_pipe().save_pretrained(tmp_path / "tiny")
    check_lora_reloads_with_load_lora_weights(
        CASES[variant], tmp_path / "tiny", make_config, pairs, tmp_path / "lora-out"
    )


# both slow; by default: test_flux2_references.py's test_full_tuning_on_references_saves_a_pipeline_that_reloads_...
# [klein-2ref] (the same check on the same transformer, trained on references)
@variants()
def test_full_tuning_keeps_a_frozen_reference_and_saves_a_loadable_pipeline(
    make_pipe, make_config, pairs, tmp_path, variant
) -> None:
    make_pipe().save_pretrained(tmp_path / "tiny")
    check_full_tuning_keeps_a_frozen_reference_and_saves_a_pipeline(
        CASES[variant], tmp_path / "tiny", make_config, pairs, tmp_path / "full-out"
    )


# both slow; by default: test_flux2_references.py's test_both_safeguard_spaces_train_on_references
# [parameter-klein-2ref] (the same check on the same transformer, trained on references)
@variants()
@pytest.mark.parametrize("space", ["parameter", pytest.param("output", marks=pytest.mark.slow)])
def test_both_safeguard_spaces_train_and_log_lambda(make_pipe, make_config, pairs, space, variant) -> None:
    check_safeguard_space(CASES[variant], make_pipe(), make_config, pairs, space)


@variants()
def test_cached_latents_and_prompt_embeddings_give_the_uncached_losses(
    make_pipe, make_config, pairs, tmp_path, variant
) -> None:
    check_cached_run_gives_the_uncached_losses(CASES[variant], make_pipe, make_config, pairs, tmp_path / "cache")


@variants()
def test_the_shipped_config_trains_from_local_folders(make_pipe, pairs, tmp_path, variant) -> None:
    check_the_shipped_config_trains_from_local_folders(CASES[variant], YAMLS[variant], make_pipe(), pairs, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["flux2", "flux2-klein"])
def test_exact_safeguard_keeps_the_winner_term_from_rising(model) -> None:
    check_exact_safeguard_keeps_the_winner_term_from_rising(model, dpo_rises=True)  # about half the batches: DPO rises
