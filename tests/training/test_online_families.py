"""Online training of the editing and video families: each prompt's sources reach the family's own pipeline, the
reward functions and the pairs' conditioning; a clip's reward is the mean over the frames it scores. Checked against
the pipelines' own sampling and encoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from PIL import Image

from tests.helpers.common import fast_config_values
from trl_diffusion_sdpo import testing
from trl_diffusion_sdpo.data.transforms import PairTransform
from trl_diffusion_sdpo.online import OnlineDiffusionSDPOConfig, OnlineDiffusionSDPOTrainer
from trl_diffusion_sdpo.online.generation import frame_indices, image_seed
from trl_diffusion_sdpo.rewards.scorers import EditScorer, register_scorer

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
# Sources that are not squares of the training size: the stage must crop them as the offline data does.
SOURCES = [
    Image.new("RGB", (40, 32), (200, 30, 30)),
    Image.fromarray(np.tile(np.linspace(0, 255, 48, dtype=np.uint8)[None, :, None], (36, 1, 3))),
]


def redness(prompts, images, **columns) -> list[float]:
    """Mean red minus mean blue of each image, in [-1, 1]."""
    return [
        float((np.asarray(im, np.float64)[..., 0] - np.asarray(im, np.float64)[..., 2]).mean() / 255) for im in images
    ]


def lora_weights(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer._policy().named_parameters() if p.requires_grad}


def online_trainer(tmp_path, pipe, data, reward=redness, targets=ATTENTION, **overrides):
    values = fast_config_values(str(tmp_path / "out"))
    values.update(
        per_device_train_batch_size=2,
        max_steps=1,
        num_generations=2,
        sample_steps=2,
        beta=100.0,
        safeguard_space="parameter",
    )
    values.update(overrides)
    return OnlineDiffusionSDPOTrainer(
        pipe,
        None,
        OnlineDiffusionSDPOConfig(**values),
        data,
        reward_funcs=[reward],
        peft_config=LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=list(targets)),
    )


def center_square(image: Image.Image, side: int) -> Image.Image:
    """The training crop of a source, written out: the shorter side resized to ``side``, the center kept."""
    width, height = image.size
    scale = side / min(width, height)
    resized = image.resize(
        (max(side, round(width * scale)), max(side, round(height * scale))), Image.Resampling.BILINEAR
    )
    left, top = round((resized.width - side) / 2), round((resized.height - side) / 2)
    return resized.crop((left, top, left + side, top + side))


# ---------------------------------------------------------------------------------------------------- editing


def test_an_edit_is_sampled_scored_and_trained_with_its_own_source(tmp_path):
    """FLUX.1 Kontext: each prompt's K edits are the pipeline's own samples of the row's source (cropped as the
    offline data crops it) with the stage's seeds; the reward functions get each image's source; the pairs carry the
    source latents the pipeline's own encoder makes; one step trains."""
    from diffusers import FluxKontextPipeline

    pipe = testing.build_tiny_flux_kontext_pipeline(seed=0, tokenizer_dir=str(tmp_path / "tok"))
    seen: list[list[Image.Image]] = []

    def red_and_sources(prompts, images, **columns):
        seen.extend(columns["source_images"])
        return redness(prompts, images)

    data = Dataset.from_dict({"prompt": ["make it blue", "make it blue"], "source_image": SOURCES})
    trainer = online_trainer(tmp_path, pipe, data, reward=red_and_sources, max_sequence_length=16)
    stage, resolution = trainer.generation, trainer.args.resolution
    rows = {"prompt": list(data["prompt"]), "source_image": list(data["source_image"])}
    generated = stage(rows, generation=0, first_row=0)

    # the samples: the pipeline's own edits of each cropped source, seeded as the stage seeds them
    settings, k = stage.settings, stage.settings.num_generations
    trainer._policy().eval()
    for row, source in enumerate(SOURCES):
        own = pipe(
            image=center_square(source, resolution),
            prompt=rows["prompt"][row],
            num_images_per_prompt=k,
            generator=[torch.Generator().manual_seed(image_seed(settings.seed, 0, row, j)) for j in range(k)],
            height=resolution,
            width=resolution,
            max_area=resolution**2,
            _auto_resize=False,
            num_inference_steps=settings.sample_steps,
            guidance_scale=settings.sample_guidance_scale,
        ).images
        for mine, theirs in zip(generated.images[row], own):
            assert np.abs(np.asarray(mine, np.int16) - np.asarray(theirs, np.int16)).max() <= 1
    # the same instruction and seeds with the other source: other edits (without the source they would be equal)
    again, _ = stage.sample(rows["prompt"][:1], 0, 0, [[SOURCES[1]]])
    assert np.abs(np.asarray(again[0][0], float) - np.asarray(generated.images[0][0], float)).max() >= 1

    # the rewards saw each image's decoded source (K images per row)
    assert len(seen) == 2 * k
    for index, sources in enumerate(seen):
        assert len(sources) == 1 and np.array_equal(np.asarray(sources[0]), np.asarray(SOURCES[index // k]))

    # the pairs' source latents are what the pipeline's own VAE encoding makes of the cropped source
    batch, pairs = generated.batch, generated.pairs
    assert batch["source_latents"].shape[:2] == (len(pairs), 1)
    for index, (row, _, _) in enumerate(pairs):
        pixels = PairTransform(resolution).source(SOURCES[row])[None]
        expected = FluxKontextPipeline._encode_vae_image(pipe, pixels, torch.Generator().manual_seed(0))
        torch.testing.assert_close(batch["source_latents"][index, 0], expected[0], rtol=1e-4, atol=1e-5)

    before = lora_weights(trainer)
    trainer.train()
    assert trainer.state.log_history[0]["online/pairs"] > 0
    assert any(not torch.equal(value, before[name]) for name, value in lora_weights(trainer).items())


class SourceCloseness(EditScorer):
    """A registered editing scorer made for the test: minus the mean absolute difference of an edit to its source
    (resized to the edit's size), over 255."""

    name = "closeness"
    scale = "-mean|edit - source| / 255"

    def score(self, images, prompts, sources) -> torch.Tensor:
        return torch.tensor([closeness(image, group[0]) for image, group in zip(images, sources)])


def closeness(edit: Image.Image, source: Image.Image) -> float:
    resized = np.asarray(source.convert("RGB").resize(edit.size), np.float64)
    return -float(np.abs(np.asarray(edit, np.float64) - resized).mean() / 255)


register_scorer("test-online-closeness", SourceCloseness, overwrite=True)


def test_a_registered_editing_scorer_rewards_each_edit_against_its_own_source(tmp_path):
    pipe = testing.build_tiny_flux_kontext_pipeline(seed=0, tokenizer_dir=str(tmp_path / "tok"))
    data = Dataset.from_dict({"prompt": ["make it blue", "make it blue"], "source_image": SOURCES})
    trainer = online_trainer(tmp_path, pipe, data, reward="test-online-closeness", max_sequence_length=16)
    rows = {"prompt": list(data["prompt"]), "source_image": list(data["source_image"])}
    generated = trainer.generation(rows, generation=0, first_row=0)
    for row, edits in enumerate(generated.images):
        for j, edit in enumerate(edits):
            assert float(generated.rewards[row, j]) == pytest.approx(closeness(edit, SOURCES[row]), abs=1e-6)
    # against the other row's source the scores differ: each edit was scored with its own
    assert abs(float(generated.rewards[0, 0]) - closeness(generated.images[0][0], SOURCES[1])) > 1e-3


def test_editing_prompts_without_sources_and_sources_for_a_text_to_image_family_are_refused(tmp_path):
    kontext = testing.build_tiny_flux_kontext_pipeline(seed=0, tokenizer_dir=str(tmp_path / "tok"))
    with pytest.raises(ValueError, match="FluxKontextFamily edits source images.*'source_image'.*\\['prompt'\\]"):
        online_trainer(tmp_path, kontext, Dataset.from_dict({"prompt": ["a"]}), max_sequence_length=16)
    flux = testing.build_tiny_flux_pipeline(seed=0, tokenizer_dir=str(tmp_path / "tok2"))
    with pytest.raises(ValueError, match="'source_image' column, but FluxFamily generates from prompts alone"):
        online_trainer(
            tmp_path, flux, Dataset.from_dict({"prompt": ["a"], "source_image": SOURCES[:1]}), max_sequence_length=16
        )


# ------------------------------------------------------------------------------------------------------ video


def test_frame_indices_are_spaced_uniformly_from_the_first_to_the_last_frame():
    assert frame_indices(5, 4) == [0, 1, 3, 4]
    assert frame_indices(81, 4) == [0, 27, 53, 80]
    assert frame_indices(81, 1) == [0]
    assert frame_indices(5, None) == frame_indices(5, 9) == [0, 1, 2, 3, 4]


def test_a_video_family_samples_clips_rewards_the_mean_of_their_scored_frames_and_trains(tmp_path):
    """Wan: each sample is a clip of num_frames frames, the pipeline's own; a clip's reward is the mean of the
    function's scores of the frames frame_indices picks (computed here from the clips); one step trains."""
    pipe = testing.build_tiny_wan_pipeline(seed=0, tokenizer_dir=str(tmp_path / "tok"))
    data = Dataset.from_dict({"prompt": ["a red ball", "a blue sky"]})
    trainer = online_trainer(
        tmp_path, pipe, data, max_sequence_length=16, num_frames=5, resolution=16, video_reward_frames=3
    )
    stage = trainer.generation
    generated = stage({"prompt": list(data["prompt"])}, generation=0, first_row=0)
    settings, k = stage.settings, stage.settings.num_generations
    for row, clips in enumerate(generated.images):
        for j, clip in enumerate(clips):
            assert len(clip) == 5 and clip[0].size == (16, 16)
            expected = np.mean([redness(None, [clip[i]])[0] for i in (0, 2, 4)])
            assert float(generated.rewards[row, j]) == pytest.approx(expected, abs=1e-12)
    # the clips are the pipeline's own, seeded as the stage seeds them
    trainer._policy().eval()
    own = pipe(
        prompt=[data["prompt"][0]] * k,
        generator=[torch.Generator().manual_seed(image_seed(settings.seed, 0, 0, j)) for j in range(k)],
        height=16,
        width=16,
        num_frames=5,
        num_inference_steps=settings.sample_steps,
        guidance_scale=settings.sample_guidance_scale,
        output_type="pil",
    ).frames
    for mine, theirs in zip(generated.images[0], own):
        assert max(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() for a, b in zip(mine, theirs)) <= 1
    # the pair's latents are the VAE encoding of the clips: [P, 2, C, F', h, w]
    assert tuple(generated.batch["latent_mean"].shape[2:]) == trainer.family.latent_shape(16, 5)

    before = lora_weights(trainer)
    trainer.train()
    assert trainer.state.log_history[0]["online/pairs"] > 0
    assert any(not torch.equal(value, before[name]) for name, value in lora_weights(trainer).items())


# --------------------------------------------------------------------------------------------- every family


def _edit_rows(sources: int) -> Dataset:
    if sources == 1:
        return Dataset.from_dict({"prompt": ["make it blue", "make it red"], "source_image": SOURCES})
    return Dataset.from_dict({"prompt": ["make it blue", "make it red"], "source_images": [SOURCES, SOURCES[::-1]]})


@pytest.mark.slow
@pytest.mark.parametrize(
    "builder, tokens, sources, overrides",
    [
        ("build_tiny_qwen_image_edit_pipeline", 32, 1, {"proportion_empty_prompts": 0.0}),  # ~2 min: 1024^2 sources
        ("build_tiny_qwen_image_edit_plus_pipeline", 64, 2, {"proportion_empty_prompts": 0.0}),
        ("build_tiny_flux2_pipeline", 48, 2, {"resolution": 64}),  # FLUX.2 takes references of 64 px and more
        ("build_tiny_flux2_klein_pipeline", 48, 1, {"resolution": 64}),
        ("build_tiny_hunyuan_video15_pipeline", 24, 0, {"resolution": 32, "num_frames": 5}),
    ],
)
def test_every_editing_and_video_family_trains_online_on_its_own_samples(
    tmp_path, builder, tokens, sources, overrides
):
    pipe = getattr(testing, builder)(seed=0, tokenizer_dir=str(tmp_path / "tok"), max_length=tokens)
    data = _edit_rows(sources) if sources else Dataset.from_dict({"prompt": ["a red ball", "a blue sky"]})
    trainer = online_trainer(tmp_path, pipe, data, max_sequence_length=tokens, **overrides)
    before = lora_weights(trainer)
    trainer.train()
    log = trainer.state.log_history[0]
    assert log["online/pairs"] > 0 and "safeguard/lambda_mean" in log
    assert any(not torch.equal(value, before[name]) for name, value in lora_weights(trainer).items())
    if sources:
        assert trainer.generation.blank_batch()["time_ids"].shape[0] == 1  # the placeholder pair of an edit
