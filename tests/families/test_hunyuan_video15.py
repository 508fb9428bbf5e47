"""HunyuanVideo 1.5 text-to-video: both prompt encodings as ``HunyuanVideo15Pipeline.encode_prompt`` builds them,
latents scaled as the pipeline decodes them, the transformer called with exactly what the pipeline's own call
passes, noise levels on the pipeline scheduler's static shift, the shared flow-family checks on video pairs, wrong
clip lengths and the image-to-video pipeline refused, and clips sampled with the pipeline's guider.

A tiny HunyuanVideo15Pipeline built from configs of the real classes (Qwen2.5-VL text model, ByT5 glyph encoder, 3D
VAE, 3D transformer); no encoder needs torchvision, so no stand-in is used. The test videos are test_wan's (PyAV).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset
from diffusers import HunyuanVideo15ImageToVideoPipeline, HunyuanVideo15Pipeline, HunyuanVideo15Transformer3DModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from tests.helpers.common import shift_sigmas
from tests.helpers.flow_family_checks import FlowFamilyTrainingChecks, check_bf16_lora_trains_float32_adapters
from tests.helpers.flow_family_checks import transformer_outputs as flow_transformer_outputs
from tests.helpers.hunyuan_video15 import CASE, SEQ, SHAPE, SIZE
from tests.helpers.video import FRAMES, video_rows
from trl_diffusion_sdpo import DiffusionSDPOTrainer
from trl_diffusion_sdpo.families import HunyuanVideo15Family, family_for_pipeline, scale_latents
from trl_diffusion_sdpo.testing import build_tiny_hunyuan_video15_pipeline

pytest.importorskip("av")

PROMPTS = ['a sign that reads "OPEN" in red', "a cat on “the” grass", ""]  # quoted, curly-quoted, empty


@pytest.fixture
def make_pipe(tmp_path):
    counter = iter(range(1_000))

    def make(seed: int = 0, **kwargs) -> HunyuanVideo15Pipeline:
        return build_tiny_hunyuan_video15_pipeline(
            seed=seed, tokenizer_dir=str(tmp_path / f"tok-{next(counter)}"), **kwargs
        )

    return make


@pytest.fixture(scope="module")
def shared_pipe(tmp_path_factory) -> HunyuanVideo15Pipeline:
    """One tiny pipeline for the tests that only read it (they call it and its encoders, never train or change it)."""
    return build_tiny_hunyuan_video15_pipeline(seed=0, tokenizer_dir=str(tmp_path_factory.mktemp("hv-tok")))


@pytest.fixture
def pairs() -> Dataset:
    return Dataset.from_list(video_rows(4))


def hv_config(make_config, **overrides):
    return CASE.config(make_config, **overrides)


def captured_transformer_call(pipe: HunyuanVideo15Pipeline, run) -> tuple[dict, torch.Tensor]:
    """The keyword arguments and output of the first transformer call ``run()`` makes."""
    calls = []
    handle = pipe.transformer.register_forward_hook(
        lambda module, args, kwargs, output: calls.append((kwargs, output[0])), with_kwargs=True
    )
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    return calls[0]


# --------------------------------------------------------------------------------------------- what the family does


def test_the_family_is_picked_with_its_defaults(shared_pipe) -> None:
    pipe = shared_pipe
    family = family_for_pipeline(pipe)
    assert isinstance(family, HunyuanVideo15Family) and family.video and family.denoiser is pipe.transformer
    assert set(family.frozen_modules()) == {"vae", "text_encoder", "text_encoder_2"}
    assert family.max_sequence_length == pipe.tokenizer_max_length == 1000
    assert family.latent_shape(SIZE, num_frames=FRAMES) == SHAPE[1:]
    assert family.default_beta == 100.0 and "musubi-tuner" in family.defaults_source
    with pytest.raises(ValueError, match="at most 1000"):
        HunyuanVideo15Family(pipe, max_sequence_length=1001)


def test_prompt_encoding_equals_the_pipelines_encode_prompt(shared_pipe) -> None:
    pipe = shared_pipe
    family = family_for_pipeline(pipe)  # the pipeline's 1000 tokens
    ours = family.encode_prompts(family.prompt_tokenizer()(PROMPTS))
    theirs, mask, glyph, glyph_mask = pipe.encode_prompt(PROMPTS, device="cpu", batch_size=len(PROMPTS))
    conditioning = family.denoiser_conditioning(ours, None)
    assert ours.pooled is None and ours.encoder_hidden_states.shape == (3, 1000 + 256, 24)  # ByT5 is the wider
    # Qwen2.5-VL: the prompt's tokens after the template, then its 5 closing tokens; the empty prompt is " "
    lengths = [len(pipe.tokenizer(prompt or " ", add_special_tokens=False).input_ids) + 5 for prompt in PROMPTS]
    assert mask.sum(1).tolist() == lengths
    torch.testing.assert_close(conditioning["encoder_attention_mask"], mask)
    torch.testing.assert_close(conditioning["encoder_hidden_states"], theirs * mask[..., None])
    # ByT5: 'Text "OPEN". ' and 'Text "the". ' in bytes plus EOS; nothing quoted in the empty prompt
    assert glyph_mask.sum(1).tolist() == [14, 13, 0]
    torch.testing.assert_close(conditioning["encoder_attention_mask_2"], glyph_mask)
    torch.testing.assert_close(conditioning["encoder_hidden_states_2"], glyph * glyph_mask[..., None])
    assert conditioning["encoder_hidden_states_2"][2].abs().sum() == 0
    # A shorter max_sequence_length keeps the same first rows
    short = family_for_pipeline(pipe, max_sequence_length=SEQ)
    cut = short.denoiser_conditioning(short.encode_prompts(short.prompt_tokenizer()(PROMPTS[1:])), None)
    torch.testing.assert_close(cut["encoder_hidden_states"], conditioning["encoder_hidden_states"][1:, :SEQ])
    torch.testing.assert_close(cut["encoder_hidden_states_2"], conditioning["encoder_hidden_states_2"][1:])


def test_the_template_prefix_is_dropped_as_the_pipeline_drops_it(shared_pipe) -> None:
    pipe = shared_pipe
    family = family_for_pipeline(pipe, max_sequence_length=SEQ)
    tokens = family.prompt_tokenizer()(["ab"])["input_ids"][0]
    assert len(tokens) == pipe.prompt_template_encode_start_idx + SEQ
    kept = tokens[pipe.prompt_template_encode_start_idx :]
    assert pipe.tokenizer.decode(kept[:2]) == "ab"  # the first kept tokens are the prompt's
    assert pipe.tokenizer.decode(tokens[: pipe.prompt_template_encode_start_idx]).endswith("<|im_start|>user\n")


def test_latents_are_scaled_as_the_pipeline_decodes_them(shared_pipe) -> None:
    pipe = shared_pipe
    family = family_for_pipeline(pipe, max_sequence_length=SEQ)
    pixels = torch.rand((2, 3, FRAMES, SIZE, SIZE), generator=torch.Generator().manual_seed(0)) * 2 - 1
    # The VAE clip by clip (diffusers 0.42's fails on a batch of two: huggingface/diffusers#13133), then one draw.
    moments = torch.cat([pipe.vae.encode(clip).latent_dist.parameters for clip in pixels.split(1)])
    sample = DiagonalGaussianDistribution(moments).sample(generator=torch.Generator().manual_seed(3))
    latents = scale_latents(sample, family.latents_config())  # what the noiser applies to mean + std * eps
    assert latents.shape == sample.shape == SHAPE
    assert pipe.vae.config.scaling_factor != 1.0
    # The pipeline decodes latents / scaling_factor: that must be the VAE's own sample.
    torch.testing.assert_close(latents / pipe.vae.config.scaling_factor, sample)
    prepared = pipe.prepare_latents(2, 4, SIZE, SIZE, FRAMES, torch.float32, "cpu")
    assert prepared.shape == latents.shape  # the layout the pipeline samples in


def test_the_call_passes_what_the_pipelines_own_call_passes(shared_pipe) -> None:
    pipe = shared_pipe
    family = family_for_pipeline(pipe)
    prompt = PROMPTS[0]
    theirs, their_out = captured_transformer_call(
        pipe,
        lambda: pipe(
            prompt=prompt, height=SIZE, width=SIZE, num_frames=FRAMES, num_inference_steps=1, output_type="latent"
        ),
    )
    channels = pipe.vae.config.latent_channels
    sample, timestep = theirs["hidden_states"][:, :channels], theirs["timestep"]
    embeds = family.encode_prompts(family.prompt_tokenizer()([prompt]))
    ours, our_out = captured_transformer_call(
        pipe,
        lambda: family.call_denoiser(pipe.transformer, sample, timestep, family.denoiser_conditioning(embeds, None)),
    )
    assert sorted(ours) == sorted(k for k, v in theirs.items() if v is not None)  # attention_kwargs=None aside
    for name in ("hidden_states", "image_embeds", "timestep", "encoder_attention_mask", "encoder_attention_mask_2"):
        assert ours[name].dtype == theirs[name].dtype, name
        torch.testing.assert_close(ours[name], theirs[name], msg=name)
    assert theirs["image_embeds"].shape == (1, 729, 8) and theirs["hidden_states"].shape[1] == 2 * channels + 1
    for text in ("", "_2"):  # the pipeline's rows where its mask is set, zero elsewhere
        name, mask = f"encoder_hidden_states{text}", f"encoder_attention_mask{text}"
        torch.testing.assert_close(ours[name], theirs[name] * theirs[mask][..., None], msg=name)
    torch.testing.assert_close(our_out, their_out)


def test_a_shorter_prompt_length_gives_the_same_prediction(shared_pipe) -> None:
    """The masked rows past a prompt never reach the latents: cutting them away (``max_sequence_length``) leaves the
    prediction of a prompt that fits as it was."""
    pipe = shared_pipe
    whole, short = family_for_pipeline(pipe), family_for_pipeline(pipe, max_sequence_length=SEQ)
    outputs = [flow_transformer_outputs(pipe.transformer, family, sample_shape=SHAPE) for family in (whole, short)]
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)


def test_noise_levels_use_the_static_shift_of_the_pipelines_scheduler(make_pipe, make_config) -> None:
    pipe = make_pipe()
    noiser = family_for_pipeline(pipe, max_sequence_length=SEQ).noiser(hv_config(make_config))
    assert noiser.sampling.shift == "scheduler" and noiser.sampling.weighting_scheme == "logit_normal"
    shift = pipe.scheduler.config.shift
    assert shift == 5.0
    t = torch.arange(1000, 0, -1, dtype=torch.float64) / 1000
    torch.testing.assert_close(noiser.sigma_table.double(), shift_sigmas(t, shift), atol=1e-6, rtol=0)
    # The pipeline samples on the same curve: set_timesteps(sigmas=linspace(1, 0, n + 1)[:-1]) shifts them so.
    unshifted = np.linspace(1.0, 0.0, 9)[:-1]
    pipe.scheduler.set_timesteps(sigmas=unshifted, device="cpu")
    expected = shift_sigmas(torch.from_numpy(unshifted), shift).float()
    torch.testing.assert_close(pipe.scheduler.sigmas[:-1], expected)


def test_wrong_clip_lengths_and_unsupported_pipelines_are_refused(make_pipe, make_config, pairs) -> None:
    with pytest.raises(ValueError, match="set num_frames"):
        DiffusionSDPOTrainer(make_pipe(), args=hv_config(make_config, num_frames=None), train_dataset=pairs)
    with pytest.raises(ValueError, match="4k \\+ 1"):
        DiffusionSDPOTrainer(make_pipe(), args=hv_config(make_config, num_frames=4), train_dataset=pairs)
    with pytest.raises(ValueError, match="multiple of 16"):
        DiffusionSDPOTrainer(make_pipe(), args=hv_config(make_config, resolution=24), train_dataset=pairs)
    pipe = make_pipe()
    image_to_video = HunyuanVideo15ImageToVideoPipeline(**pipe.components, image_encoder=None, feature_extractor=None)
    with pytest.raises(ValueError, match="HunyuanVideo15ImageToVideoPipeline is an image-to-video pipeline"):
        family_for_pipeline(image_to_video)
    narrow = HunyuanVideo15Transformer3DModel(**{**pipe.transformer.config, "in_channels": 4})
    pipe.register_modules(transformer=narrow)
    with pytest.raises(ValueError, match="2 x 4 \\+ 1"):
        family_for_pipeline(pipe)


# ----------------------------------------------------------------------------------------------------- training


class TestHunyuanVideo15Training(FlowFamilyTrainingChecks):
    case = CASE
    config_name = "hunyuan_video15_lora"
    family_name = "hunyuan-video-1.5"
    slow_repeats = {  # this family's frames reach its transformer in its LoRA run and cache check by default
        "test_full_tuning_keeps_a_frozen_reference_and_saves_a_loadable_pipeline": (
            "test_qwen_image.py's TestQwenImageTraining (the frozen copy, the pipeline saved and loaded)"
        ),
        "test_both_safeguard_spaces_train_and_log_lambda": (
            "test_wan.py's [parameter] case (the same safeguard code on a video transformer's adapters)"
        ),
    }

    @pytest.fixture
    def make_config(self, make_config):
        """The shared checks on one pair per step: the transformer's glyph projection is 2,048 wide whatever the
        config (diffusers fixes it), and a CPU multiplies matrices that size slowly, in bf16 most of all; what the
        checks read (the dtypes, the frozen weights and reference, the saved files, the safeguard's lambda, the cache's
        losses against the uncached run's) does not depend on the batch."""

        def one_pair(**overrides):
            return make_config(**{"per_device_train_batch_size": 1, **overrides})

        return one_pair

    def test_bf16_lora_trains_float32_adapters_on_a_bf16_transformer(self, make_pipe, make_config, pairs) -> None:
        """One bf16 step: each step multiplies the 2,048-wide glyph projection in bf16 twice (policy and reference),
        over a second on this CPU, and what the check reads (the adapters float32 and the base bf16 after an optimizer
        step, a finite bf16 loss) is there after the first."""
        check_bf16_lora_trains_float32_adapters(
            self.case, make_pipe(), lambda **overrides: make_config(**{**overrides, "max_steps": 1}), pairs
        )

    def test_validation_grids_sample_with_the_pipeline(self, make_pipe, make_config, pairs, tmp_path) -> None:
        """Image grids are refused for a video family, pointing to sample_videos (tested below)."""
        from trl_diffusion_sdpo.callbacks.validation import ValidationCallback

        trainer = DiffusionSDPOTrainer(make_pipe(), args=hv_config(make_config), train_dataset=pairs)
        with pytest.raises(ValueError, match="sample_videos"):
            ValidationCallback(["a cat"], trainer=trainer)


# ------------------------------------------------------------------------------------------------- evaluation


def test_clips_sample_with_the_pipelines_guider_or_a_given_scale(make_pipe) -> None:
    from trl_diffusion_sdpo.evaluation import sample_videos

    pipe = make_pipe()
    guider = pipe.guider

    def sample(scale):
        clips = sample_videos(
            pipe, ["a cat"], [0], num_frames=FRAMES, height=SIZE, width=SIZE, num_inference_steps=2,
            guidance_scale=scale,
        )  # fmt: skip
        return np.stack([np.asarray(frame) for frame in clips[0]])

    own, six, one = sample(None), sample(6.0), sample(1.0)
    assert own.shape == (FRAMES, SIZE, SIZE, 3) and pipe.guider is guider and guider.guidance_scale == 6.0
    assert np.array_equal(own, six) and not np.array_equal(own, one)
