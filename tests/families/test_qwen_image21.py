"""Qwen-Image 2.1: prompts encoded as QwenImage21Pipeline.encode_prompt does (left padding, the final norm skipped),
RGBA latents on its 16x VAE, the unpatched call with the pipeline's vision-slot mask, the resolution shift over latent
positions, and the shared flow-family checks (LoRA, full, safeguards, cache).

Tiny Qwen3-VL encoder, 2.1 VAE and transformer built from configs; the byte-level tokenizer is written offline by the
test. The pipeline's processor is a stand-in, ``TextOnlyQwen3VLProcessor``: transformers builds the real
``Qwen3VLProcessor`` only with torchvision (its video processor); the stand-in is that class without its image and
video processors, so its text path is the real one.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from datasets import Dataset
from diffusers import QwenImage21Pipeline
from PIL import Image

from tests.helpers.common import pickapic_rows, shift_sigmas
from tests.helpers.flow_family_checks import FlowFamilyTrainingChecks
from tests.helpers.qwen_image21 import CASE, SEQ
from trl_diffusion_sdpo.evaluation.generation import GenerationSettings, sample_images
from trl_diffusion_sdpo.families import QwenImage21Family, QwenImageFamily, family_for_pipeline, scale_latents
from trl_diffusion_sdpo.families.flow import resolution_shift
from trl_diffusion_sdpo.families.qwen_image21 import final_norm_skipped
from trl_diffusion_sdpo.testing import (
    TextOnlyQwen3VLProcessor,
    build_tiny_qwen_image21_pipeline,
    build_tiny_qwen_image_pipeline,
)

PROMPTS = ["a red square", "two blue circles on green grass"]


@pytest.fixture
def make_pipe(tmp_path):
    counter = iter(range(1_000))

    def make(seed: int = 0, **kwargs) -> QwenImage21Pipeline:
        return build_tiny_qwen_image21_pipeline(
            seed=seed, tokenizer_dir=str(tmp_path / f"tok-{next(counter)}"), **kwargs
        )

    return make


@pytest.fixture
def pairs() -> Dataset:
    return Dataset.from_list(pickapic_rows(4))


def pipeline_conditioning(pipe, prompts):
    """The pipeline's own text-to-image conditioning: ``encode_prompt``'s embeddings, mask and vision-slot mask."""
    with torch.no_grad():
        return pipe.encode_prompt(prompts, device="cpu")


def pipeline_prediction(pipe, latents: torch.Tensor, timestep: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """One transformer call as ``QwenImage21Pipeline.__call__`` makes it (its packing, ``img_shapes``, the vision-slot
    mask with the target's slots appended, the prediction's target tokens), unpacked with its ``_unpack_latents``."""
    n, channels, height, width = latents.shape
    embeds, mask, image_pad_mask = pipeline_conditioning(pipe, prompts)
    packed = pipe._pack_latents(latents, n, channels, height, width)
    img_mask = torch.cat([image_pad_mask, image_pad_mask.new_ones(n, packed.shape[1] // 4)], dim=1)
    with torch.no_grad():
        out = pipe.transformer(
            hidden_states=packed,
            timestep=timestep / 1000,
            encoder_hidden_states=embeds,
            encoder_hidden_states_mask=mask,
            img_shapes=[[(1, height, width)]] * n,
            img_mask=img_mask,
            return_dict=False,
        )[0]
    s = pipe.vae_scale_factor
    return pipe._unpack_latents(out[:, -packed.shape[1] :], height * s, width * s, s)[:, :, 0]


def family_prediction(family, model, latents, timestep, prompts) -> torch.Tensor:
    embeds = family.encode_prompts(family.prompt_tokenizer()(prompts))
    with torch.no_grad():
        return family.call_denoiser(model, latents, timestep, family.denoiser_conditioning(embeds, None))


# --------------------------------------------------------------------------------------------- what the family does


def test_the_family_is_picked_for_a_qwen_image21_pipeline_and_not_for_qwen_image(make_pipe, tmp_path) -> None:
    pipe = make_pipe()
    family = family_for_pipeline(pipe, max_sequence_length=SEQ)
    assert type(family) is QwenImage21Family and family.name == "qwen-image-2.1"
    assert family.denoiser is pipe.transformer and set(family.frozen_modules()) == {"vae", "text_encoder"}
    assert family.default_beta == 100.0 and family.default_learning_rate == 1e-4
    assert "SimpleTuner" in family.defaults_source and family.sampling_guidance_scale() is None
    assert isinstance(pipe.processor, TextOnlyQwen3VLProcessor)
    # The two Qwen-Image families never claim each other's pipelines, whatever the registration order.
    qwen_image = build_tiny_qwen_image_pipeline(seed=0, tokenizer_dir=str(tmp_path / "qwen-image"))
    assert not QwenImageFamily.matches(pipe) and not QwenImage21Family.matches(qwen_image)
    assert type(family_for_pipeline(qwen_image)) is QwenImageFamily
    with pytest.raises(ValueError, match="at most 8191"):
        QwenImage21Family(pipe, max_sequence_length=8192)
    pipe.processor = None
    with pytest.raises(ValueError, match="`processor`"):
        family_for_pipeline(pipe)


def test_prompt_encoding_equals_the_pipelines_encode_prompt(make_pipe) -> None:
    pipe = make_pipe()
    family = family_for_pipeline(pipe, max_sequence_length=SEQ)
    ours = family.encode_prompts(family.prompt_tokenizer()(PROMPTS))
    hidden, mask, image_pad_mask = pipeline_conditioning(pipe, PROMPTS)
    # The pipeline pads to the longest prompt; ours to SEQ, with zeros: the same rows where the mask is set.
    assert mask is not None and mask.sum(1).tolist() == [20, 39] and not image_pad_mask.any()
    length = hidden.shape[1]
    torch.testing.assert_close(ours.encoder_hidden_states[:, :length] * mask[..., None], hidden * mask[..., None])
    assert ours.encoder_hidden_states[0, 20:].abs().sum() == 0 and ours.encoder_hidden_states[:, length:].eq(0).all()
    # The call's conditioning is the pipeline's: cut to the longest prompt, with its mask.
    conditioning = family.denoiser_conditioning(ours, None)
    assert conditioning["encoder_hidden_states"].shape == hidden.shape
    assert torch.equal(conditioning["encoder_hidden_states_mask"], mask.bool())
    # One prompt: nothing padded, no mask (encode_prompt returns None); the empty prompt is read as a space.
    for prompt in ("a red square", ""):
        ours = family.encode_prompts(family.prompt_tokenizer()([prompt]))
        hidden, mask, _ = pipeline_conditioning(pipe, [prompt])
        conditioning = family.denoiser_conditioning(ours, None)
        assert mask is None and conditioning["encoder_hidden_states_mask"] is None
        torch.testing.assert_close(conditioning["encoder_hidden_states"], hidden)


def test_the_template_is_left_padded_and_its_system_turn_dropped(make_pipe) -> None:
    pipe = make_pipe()
    family = family_for_pipeline(pipe, max_sequence_length=SEQ)
    tokens = family.prompt_tokenizer()(["ab", ""])["input_ids"]
    tokenizer = pipe.processor.tokenizer
    assert tokens.shape == (2, pipe._drop_idx + SEQ)
    assert tokens[0, 0] == tokenizer.pad_token_id and tokens[0, -1] != tokenizer.pad_token_id  # left padding
    kept = [row[row.ne(tokenizer.pad_token_id)][pipe._drop_idx :] for row in tokens]
    assert tokenizer.decode(kept[0]) == "<|im_start|>user\nab<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(kept[1]) == "<|im_start|>user\n <|im_end|>\n<|im_start|>assistant\n"


def test_the_last_hidden_state_is_read_before_the_final_norm(make_pipe) -> None:
    """The pipeline's hook: the kept state is the last decoder layer's output, which the text model's final norm
    would change (so the test would see an encoding that forgot the hook)."""
    pipe = make_pipe()
    family = family_for_pipeline(pipe, max_sequence_length=SEQ)
    ids = family.prompt_tokenizer()(PROMPTS[:1])["input_ids"]
    mask = ids.ne(pipe.processor.tokenizer.pad_token_id).long()
    encoder = pipe.text_encoder
    with torch.no_grad():
        normed = encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        with final_norm_skipped(encoder):
            raw = encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(encoder.model.language_model.norm(raw), normed)
    assert not torch.allclose(raw, normed, atol=1e-3)
    assert len(encoder.model.language_model.norm._forward_hooks) == 0  # the hook is removed again
    ours = family.encode_prompts({"input_ids": ids}).encoder_hidden_states
    kept = raw[0][mask[0].bool()][pipe._drop_idx :]
    torch.testing.assert_close(ours[0, : kept.shape[0]], kept)


def test_latents_are_rgba_latents_normalised_as_the_pipeline_encodes_them(make_pipe) -> None:
    pipe = make_pipe()
    family = family_for_pipeline(pipe, max_sequence_length=SEQ)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1  # RGB in [-1, 1]
    mean, _ = family.encode_moments(pixels)
    assert mean.shape[1:] == (8, 4, 6) and family.latent_shape(64) == (8, 4, 4)
    # The pipeline: the image converted to RGBA, preprocessed, encoded at the posterior's mode and normalised.
    rgba = pipe.image_processor.preprocess(image.convert("RGBA"), height=64, width=96).unsqueeze(2)
    assert rgba.shape[1] == 4 and rgba[:, 3].eq(1).all()
    with torch.no_grad():
        expected = pipe._encode_vae_image(rgba, generator=None)[:, :, 0]
    torch.testing.assert_close(scale_latents(mean, family.latents_config()), expected)


def test_the_call_packs_latents_and_masks_slots_as_the_pipeline_does(make_pipe) -> None:
    pipe = make_pipe()
    family = family_for_pipeline(pipe, max_sequence_length=SEQ)
    latents = torch.randn((2, 8, 4, 6), generator=torch.Generator().manual_seed(0))  # not square: h, w stay apart
    timestep = torch.tensor([250.0, 800.0])
    ours = family_prediction(family, pipe.transformer, latents, timestep, PROMPTS)
    torch.testing.assert_close(ours, pipeline_prediction(pipe, latents, timestep, PROMPTS))
    with pytest.raises(ValueError, match="even height and width"):
        family_prediction(family, pipe.transformer, latents[:, :, :3], timestep, PROMPTS)


def test_a_call_pads_to_its_longest_prompt_as_the_pipelines_batched_call(make_pipe) -> None:
    """The image's RoPE frame index is the text's length, padding included. A pair (both rows share the prompt) is the
    pipeline's single-prompt call, not the call padded to ``max_sequence_length``; beside a longer prompt, a short
    prompt's image is padded as in the pipeline's batched call, and its prediction changes (docs/qwen_image21.md)."""
    pipe = make_pipe()
    family = family_for_pipeline(pipe, max_sequence_length=SEQ)
    latents = torch.randn((2, 8, 4, 4), generator=torch.Generator().manual_seed(1))
    timestep = torch.tensor([250.0, 800.0])
    pair = family_prediction(family, pipe.transformer, latents, timestep, PROMPTS[:1] * 2)
    torch.testing.assert_close(pair, pipeline_prediction(pipe, latents, timestep, PROMPTS[:1] * 2))
    hidden = family.encode_prompts(family.prompt_tokenizer()(PROMPTS[:1] * 2)).encoder_hidden_states
    not_cut = {"encoder_hidden_states": hidden, "encoder_hidden_states_mask": hidden.ne(0).any(-1)}
    with torch.no_grad():
        assert not torch.allclose(family.call_denoiser(pipe.transformer, latents, timestep, not_cut), pair, atol=1e-4)
    mixed = family_prediction(family, pipe.transformer, latents, timestep, PROMPTS)
    assert not torch.allclose(mixed[0], pair[0], atol=1e-4)


def test_noise_levels_take_the_pipelines_shift_over_latent_positions(make_pipe, make_config) -> None:
    from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import calculate_shift

    pipe = make_pipe()
    family = family_for_pipeline(pipe)
    noiser = family.noiser(CASE.config(make_config, resolution=64))
    assert noiser.sampling.shift == "resolution" and noiser.sampling.weighting_scheme == "logit_normal"
    # The pipeline's mu: calculate_shift of latents.shape[1], the h w latent positions, over its scheduler config.
    config = pipe.scheduler.config
    mu = calculate_shift(16 * 24, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, 0.9)
    assert resolution_shift(16, 24, config, family.token_patch_size) == pytest.approx(float(np.exp(mu)))
    levels = noiser.sample_sigmas(64, (8, 16, 24), torch.Generator().manual_seed(3), "cpu")
    unshifted = family.noiser(CASE.config(make_config, resolution=64, flow_shift="none"))
    expected = unshifted.sample_sigmas(64, (8, 16, 24), torch.Generator().manual_seed(3), "cpu")
    torch.testing.assert_close(levels, shift_sigmas(expected, float(np.exp(mu))))
    # A scheduler without dynamic shifting samples with its static table, and so does training by default.
    pipe.register_modules(scheduler=type(pipe.scheduler).from_config(config, use_dynamic_shifting=False, shift=3.0))
    assert family_for_pipeline(pipe).noiser(CASE.config(make_config)).sampling.shift == "scheduler"
    with pytest.raises(ValueError, match="multiple of 32"):
        family.noiser(CASE.config(make_config, resolution=48))


def test_validation_sampling_passes_no_guidance_scale_and_refuses_one_it_cannot_use(make_pipe) -> None:
    pipe = make_pipe()
    settings = GenerationSettings(num_inference_steps=2, guidance_scale=None, height=32, width=32)
    images = sample_images(pipe, ["a red square"], [0], settings)
    assert len(images) == 1 and images[0].size == (32, 32)
    with pytest.raises(ValueError, match="true_cfg_scale"):
        sample_images(pipe, ["a red square"], [0], GenerationSettings(num_inference_steps=2, guidance_scale=4.0))


def test_the_exact_safeguard_splits_padded_prompts_by_branch_and_by_pair(tmp_path) -> None:
    """tests/safeguard/test_one_pass_safeguard.py's checks (its prompts are equally long) on prompts of different
    lengths, so that the call pads: the one-pass stage's lambda and gradients equal the per-branch passes', and the
    per-pair scope's lambdas equal explicit per-pair autograd."""
    from tests.helpers.one_pass_problems import (
        _double,
        assert_equal_gradients,
        explicit_per_pair,
        float64_pair_lambdas,
        make_problem,
        run_stage,
    )

    problem = make_problem("qwen-image-2.1", True, tmp_path, pairs=3)
    family = problem.family
    with torch.no_grad():
        embeds = _double(family.encode_prompts(family.prompt_tokenizer()(["a red square", "a cat", "a red circle"])))
    assert embeds.encoder_hidden_states.ne(0).any(-1).sum(1).tolist() == [20, 13, 20]
    problem.batch = dataclasses.replace(problem.batch, prompt_embeds=embeds)
    one, lam_one, grads_one = run_stage(problem, passes="one")
    _, lam_two, grads_two = run_stage(problem, passes="two")
    assert one.one_pass is not None and one.two_pass_reason is None, one.two_pass_reason
    assert 0.0 < lam_two.item() <= 1.0 and lam_one.item() == pytest.approx(lam_two.item(), rel=1e-6)
    assert_equal_gradients(grads_one, grads_two)
    _, winners, losers = explicit_per_pair(problem)
    _, lam_pairs, _ = run_stage(problem, pair_scope=True)
    assert lam_pairs.tolist() == pytest.approx(float64_pair_lambdas(winners, losers, mu=0.5), rel=1e-6, abs=1e-12)


# ----------------------------------------------------------------------------------------------------- training


class TestQwenImage21Training(FlowFamilyTrainingChecks):
    """LoRA, full tuning, both safeguard spaces, the latent cache, the shipped config, bf16, resuming, exactness and
    validation grids (see tests/helpers/flow_family_checks.py)."""

    case = CASE
    config_name = "qwen_image21_lora"
    family_name = "qwen-image-2.1"
    slow_repeats = {  # this family's call of its transformer is trained by its LoRA run by default
        "test_full_tuning_keeps_a_frozen_reference_and_saves_a_loadable_pipeline": (
            "test_qwen_image.py's TestQwenImageTraining (the frozen copy, the pipeline saved and loaded)"
        ),
        "test_both_safeguard_spaces_train_and_log_lambda": (
            "test_the_exact_safeguard_splits_padded_prompts_by_branch_and_by_pair (this transformer under the "
            "parameter space, checked exactly) and TestQwenImageTraining's [parameter] case"
        ),
    }
