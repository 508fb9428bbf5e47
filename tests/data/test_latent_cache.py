"""The latent cache: encoded once, reused, and training from it is training without it."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import PIL
import pytest
import torch
from datasets import Dataset
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from tests.helpers.latent_cache import _rows
from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer
from trl_diffusion_sdpo.data.latent_cache import (
    CachedPreferenceCollator,
    build_latent_cache,
    cached_moments,
    cached_prompt_embeds,
    cached_time_ids,
)
from trl_diffusion_sdpo.data.preparation import prepare_preference_dataset
from trl_diffusion_sdpo.data.transforms import PairTransform, mirrored_time_ids
from trl_diffusion_sdpo.families import family_for_pipeline, scale_latents
from trl_diffusion_sdpo.testing import build_tiny_sd_pipeline, build_tiny_sdxl_pipeline

RESOLUTION = 32


def _config(tmp_path, **overrides) -> DiffusionSDPOConfig:
    settings = dict(
        output_dir=str(tmp_path / "out"),
        resolution=RESOLUTION,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=2,
        max_steps=2,
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        seed=0,
        latent_cache_dir=str(tmp_path / "cache"),
        cache_latents=True,
    )
    settings.update(overrides)
    return DiffusionSDPOConfig(**settings)


def _image(value: bytes) -> Image.Image:
    return Image.open(io.BytesIO(value)).convert("RGB")


def _winner_loser(row: dict) -> tuple[Image.Image, Image.Image]:
    """The decoded (winner, loser) images of a Pick-a-Pic row."""
    first, second = _image(row["jpg_0"]), _image(row["jpg_1"])
    return (first, second) if row["label_0"] == 1.0 else (second, first)


def _cache(pipeline, dataset, tmp_path, random_flip=True):
    args = _config(tmp_path, random_flip=random_flip)
    prepared, columns, _ = prepare_preference_dataset(dataset, args)
    return build_latent_cache(
        prepared,
        columns,
        family_for_pipeline(pipeline),
        resolution=RESOLUTION,
        random_flip=random_flip,
        cache_dir=args.latent_cache_dir,
    )


@torch.no_grad()
def _posterior(vae, pixels: torch.Tensor):
    distribution = vae.encode(pixels).latent_dist
    return distribution.mean, distribution.std


def test_cached_posterior_is_the_vae_posterior_of_the_winner_and_loser(tmp_path):
    pipeline = build_tiny_sd_pipeline()
    rows = _rows()
    cache = _cache(pipeline, Dataset.from_list(rows), tmp_path, random_flip=False)
    transform = PairTransform(RESOLUTION, random_crop=False)
    for row, cached in zip(rows, cache.dataset):
        winner, loser = _winner_loser(row)
        pixels, time_ids = transform.center_crop_pair(winner, loser, flip=False)
        mean, std = _posterior(pipeline.vae, pixels)
        torch.testing.assert_close(cached["latent_mean"], mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cached["latent_std"], std, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(cached["time_ids"], time_ids)
    assert "latent_mean_flipped" not in cache.dataset.column_names


def test_sampling_from_the_cache_matches_sampling_from_the_vae(tmp_path):
    pipeline = build_tiny_sd_pipeline()
    rows = _rows(2)
    cache = _cache(pipeline, Dataset.from_list(rows), tmp_path, random_flip=False)
    batch = CachedPreferenceCollator()([cache.dataset[0], cache.dataset[1]])
    # What the trainer does with a cached batch: mean + std * eps, scaled (eps drawn as latent_dist.sample() does).
    mean, std = cached_moments(batch)
    eps = randn_tensor(mean.shape, generator=torch.Generator().manual_seed(3), dtype=mean.dtype)
    latents = scale_latents(mean + std * eps, pipeline.vae.config)
    transform = PairTransform(RESOLUTION, random_crop=False)
    pairs = [transform.center_crop_pair(*_winner_loser(row), flip=False)[0] for row in rows]
    pixels = torch.stack(pairs).transpose(0, 1).flatten(0, 1)  # winners, then losers: the trainer's layout
    sample = pipeline.vae.encode(pixels).latent_dist.sample(generator=torch.Generator().manual_seed(3))
    expected = scale_latents(sample, pipeline.vae.config)
    torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-5)


def test_flipped_latents_are_the_encoding_of_the_mirrored_crop(tmp_path):
    pipeline = build_tiny_sd_pipeline()
    rows = _rows()
    cache = _cache(pipeline, Dataset.from_list(rows), tmp_path, random_flip=True)
    transform = PairTransform(RESOLUTION, random_crop=False)
    for row, cached in zip(rows, cache.dataset):
        winner, loser = _winner_loser(row)
        pixels, time_ids = transform.center_crop_pair(winner, loser, flip=False)
        mean, std = _posterior(pipeline.vae, pixels.flip(-1))
        torch.testing.assert_close(cached["latent_mean_flipped"], mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cached["latent_std_flipped"], std, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(cached["time_ids_flipped"], mirrored_time_ids(time_ids))
        assert not torch.allclose(cached["latent_mean_flipped"], cached["latent_mean"], atol=1e-3)


def _capture_hidden_states(trainer) -> list[torch.Tensor]:
    """Record the ``encoder_hidden_states`` of every policy UNet call."""
    calls: list[torch.Tensor] = []
    trainer.model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["encoder_hidden_states"].detach().clone()), with_kwargs=True
    )
    return calls


@pytest.mark.parametrize("proportion", [1.0, 0.0])
def test_prompt_dropout_substitutes_the_cached_empty_prompt_embedding(tmp_path, proportion):
    pipeline = build_tiny_sd_pipeline()
    dataset = Dataset.from_list(_rows(4))
    family = family_for_pipeline(pipeline)
    expected_empty = family.encode_prompts(family.prompt_tokenizer()([""])).encoder_hidden_states
    args = _config(
        tmp_path,
        proportion_empty_prompts=proportion,
        random_flip=False,
        max_steps=1,
        per_device_train_batch_size=4,
        dataloader_drop_last=False,
    )
    trainer = DiffusionSDPOTrainer(pipeline, args=args, train_dataset=dataset)
    torch.testing.assert_close(trainer.stages.empty_prompt.encoder_hidden_states, expected_empty)
    calls = _capture_hidden_states(trainer)
    trainer.train()
    hidden = calls[0]
    assert hidden.shape[0] == 8  # winners and losers of 4 pairs
    captions = family.encode_prompts(family.prompt_tokenizer()([row["caption"] for row in _rows(4)]))
    for i in range(8):
        if proportion == 1.0:
            torch.testing.assert_close(hidden[i], expected_empty[0])
        else:  # the row's own prompt, whichever pair it is
            assert any(torch.allclose(hidden[i], c, atol=1e-5) for c in captions.encoder_hidden_states)
            assert not torch.allclose(hidden[i], expected_empty[0])


# the cached flips by default: test_training_and_evaluation_losses_with_the_cache_equal_the_uncached_ones trains and
# evaluates with random_flip on the cache to the uncached run's losses, whose flips this test's [uncached] reads
@pytest.mark.parametrize("cached", [pytest.param(True, marks=pytest.mark.slow), False], ids=["cached", "uncached"])
def test_training_flips_about_half_the_pairs_both_images_and_evaluation_never(tmp_path, cached):
    pipeline = build_tiny_sd_pipeline()
    dataset = Dataset.from_list(_rows(1) * 8)
    args = _config(
        tmp_path,
        cache_latents=cached,
        random_flip=True,
        proportion_empty_prompts=0.0,
        max_steps=6,
        per_device_train_batch_size=8,
    )
    trainer = DiffusionSDPOTrainer(pipeline, args=args, train_dataset=dataset, eval_dataset=dataset)
    moments: list[torch.Tensor] = []
    real_noise = trainer.stages.noise

    def record(generator, mode, encoded):
        moments.append((mode, encoded.mean.detach().clone()))
        return real_noise(generator, mode, encoded)

    trainer.stages.noise = record
    trainer.train()
    trainer.evaluate()
    transform = PairTransform(RESOLUTION, random_crop=False)
    row = _rows(1)[0]
    pixels, _ = transform.center_crop_pair(*_winner_loser(row), flip=False)
    plain, _ = _posterior(pipeline.vae, pixels)  # [2 (winner, loser), C, h, w]
    mirrored, _ = _posterior(pipeline.vae, pixels.flip(-1))
    flips = []
    for mode, mean in moments:
        batch = mean.shape[0] // 2
        for i in range(batch):
            winner, loser = mean[i], mean[batch + i]
            winner_flipped = torch.allclose(winner, mirrored[0], atol=1e-4)
            loser_flipped = torch.allclose(loser, mirrored[1], atol=1e-4)
            assert winner_flipped == loser_flipped  # one decision for the pair
            assert winner_flipped or torch.allclose(winner, plain[0], atol=1e-4)
            assert loser_flipped or torch.allclose(loser, plain[1], atol=1e-4)
            if mode == "eval":
                assert not winner_flipped
            else:
                flips.append(winner_flipped)
    assert len(flips) == 48 and 12 < sum(flips) < 36


def test_training_and_evaluation_losses_with_the_cache_equal_the_uncached_ones(tmp_path):
    # Same seed, flips and prompt dropout drawn in the same order: the same pairs, noise and timesteps either way.
    dataset = Dataset.from_list(_rows())
    losses, eval_losses = {}, {}
    for cached in (False, True):
        args = _config(
            tmp_path,
            cache_latents=cached,
            random_flip=True,
            proportion_empty_prompts=0.5,
            scale_lr=False,
            learning_rate=1e-3,
            safeguard_mu=0.9,  # the authors' SD1.5 margin
        )
        trainer = DiffusionSDPOTrainer(
            build_tiny_sd_pipeline(), args=args, train_dataset=dataset, eval_dataset=dataset
        )
        trainer.train()
        losses[cached] = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        eval_losses[cached] = trainer.evaluate()["eval_loss"]
    assert len(losses[True]) == 2
    # The cache encodes 8 pairs a VAE batch, the uncached step 2: the convolutions' float sums differ with the batch
    # and the CPU's kernels (AVX2 or AVX-512), and beta amplifies them. Measured on one CPU: step 2's loss 1.1e-4
    # apart under AVX-512 and 3.7e-5 under AVX2, the eval loss 1.4e-5 and 2.3e-5; a cache that ignores the flips,
    # halves the std or mixes winners with losers moves step 2's loss by 0.35 to 0.64 and the eval loss by 0.03 to 0.6.
    np.testing.assert_allclose(losses[True], losses[False], rtol=2e-3)
    np.testing.assert_allclose(eval_losses[True], eval_losses[False], rtol=2e-3)


def test_sdxl_cache_carries_pooled_embeddings_and_time_ids(tmp_path):
    pipeline = build_tiny_sdxl_pipeline()
    rows = _rows()
    cache = _cache(pipeline, Dataset.from_list(rows), tmp_path)
    family = family_for_pipeline(pipeline)
    expected = family.encode_prompts(family.prompt_tokenizer()([row["caption"] for row in rows]))
    assert cache.empty_prompt.pooled is not None
    transform = PairTransform(RESOLUTION, random_crop=False)
    for i, (row, cached) in enumerate(zip(rows, cache.dataset)):
        torch.testing.assert_close(cached["pooled_prompt_embeds"], expected.pooled[i], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cached["prompt_embeds"], expected.encoder_hidden_states[i], rtol=1e-4, atol=1e-5)
        winner, loser = _winner_loser(row)
        torch.testing.assert_close(cached["time_ids"], transform.center_crop_pair(winner, loser, flip=False)[1])
        # Original sizes differ between winner and loser: the time ids are per image.
        assert cached["time_ids"][0, :2].tolist() == [winner.height, winner.width]
        assert cached["time_ids"][1, :2].tolist() == [loser.height, loser.width]

    batch = CachedPreferenceCollator(with_flipped=True)([cache.dataset[0]])
    assert batch["time_ids_flipped"].shape == (1, 2, 6)
    prompt_embeds, time_ids = cached_prompt_embeds(batch, torch.float32).repeat(2), cached_time_ids(batch)
    assert prompt_embeds.pooled.shape[0] == 2 and time_ids.shape == (2, 6)


def test_sdxl_evaluation_loss_with_the_cache_equals_the_uncached_one(tmp_path):
    dataset = Dataset.from_list(_rows())
    eval_losses = {}
    for cached in (False, True):
        trainer = DiffusionSDPOTrainer(
            build_tiny_sdxl_pipeline(),
            args=_config(tmp_path, cache_latents=cached),
            train_dataset=dataset,
            eval_dataset=dataset,
        )
        eval_losses[cached] = trainer.evaluate()["eval_loss"]
    np.testing.assert_allclose(eval_losses[True], eval_losses[False], rtol=1e-4)


def test_a_second_trainer_reuses_the_cache_without_encoding(tmp_path):
    pipeline = build_tiny_sd_pipeline()
    first = DiffusionSDPOTrainer(pipeline, args=_config(tmp_path), train_dataset=Dataset.from_list(_rows()))
    calls = []
    encode = pipeline.vae.encode
    pipeline.vae.encode = lambda *a, **k: calls.append(1) or encode(*a, **k)
    # A dataset rebuilt from the same rows has the same fingerprint.
    second = DiffusionSDPOTrainer(pipeline, args=_config(tmp_path), train_dataset=Dataset.from_list(_rows()))
    assert calls == []
    assert second.train_dataset.cache_files == first.train_dataset.cache_files
    # Different data, or different VAE weights, make a new cache.
    other_data = DiffusionSDPOTrainer(pipeline, args=_config(tmp_path), train_dataset=Dataset.from_list(_rows(seed=1)))
    assert other_data.train_dataset.cache_files != first.train_dataset.cache_files
    assert calls
    with torch.no_grad():
        pipeline.vae.encoder.conv_in.weight.mul_(1.01)
    other_vae = DiffusionSDPOTrainer(pipeline, args=_config(tmp_path), train_dataset=Dataset.from_list(_rows()))
    assert other_vae.train_dataset.cache_files != first.train_dataset.cache_files


def test_training_from_the_cache_never_touches_the_vae_or_text_encoder(tmp_path):
    pipeline = build_tiny_sd_pipeline()
    dataset = Dataset.from_list(_rows())
    trainer = DiffusionSDPOTrainer(pipeline, args=_config(tmp_path), train_dataset=dataset, eval_dataset=dataset)
    for module in (pipeline.vae, pipeline.text_encoder):
        assert next(module.parameters()).device.type == "cpu"

    def unavailable(*args, **kwargs):
        raise AssertionError("a frozen encoder ran during training from the cache")

    pipeline.vae.encode = unavailable
    pipeline.text_encoder.forward = unavailable
    trainer.train()
    assert np.isfinite(trainer.evaluate()["eval_loss"])


def test_random_crop_cannot_be_cached(tmp_path):
    with pytest.raises(ValueError, match="random_crop"):
        _config(tmp_path, random_crop=True)
    pipeline = build_tiny_sd_pipeline()
    args = _config(tmp_path)
    prepared, columns, _ = prepare_preference_dataset(Dataset.from_list(_rows()), args)
    with pytest.raises(ValueError, match="center crop"):
        build_latent_cache(
            prepared,
            columns,
            family_for_pipeline(pipeline),
            resolution=RESOLUTION,
            random_flip=True,
            random_crop=True,
            cache_dir=args.latent_cache_dir,
        )


def test_a_streamed_dataset_cannot_be_cached(tmp_path):
    streamed = Dataset.from_list(_rows()).to_iterable_dataset()
    with pytest.raises(ValueError, match="map-style"):
        DiffusionSDPOTrainer(build_tiny_sd_pipeline(), args=_config(tmp_path), train_dataset=streamed)


def test_a_change_of_the_image_conversion_rules_makes_a_new_cache(tmp_path, monkeypatch):
    from trl_diffusion_sdpo.data import latent_cache
    from trl_diffusion_sdpo.data import transforms as images

    with open(images.__file__, "rb") as f:  # the rules' source and the decoder's version, hashed independently
        expected = hashlib.sha256(f.read() + PIL.__version__.encode()).hexdigest()
    assert images.image_conversion_digest() == expected
    pipeline = build_tiny_sd_pipeline()
    first = DiffusionSDPOTrainer(pipeline, args=_config(tmp_path), train_dataset=Dataset.from_list(_rows()))
    monkeypatch.setattr(latent_cache, "image_conversion_digest", lambda: "rules after an edit of data/transforms.py")
    calls = []
    encode = pipeline.vae.encode
    pipeline.vae.encode = lambda *a, **k: calls.append(1) or encode(*a, **k)
    second = DiffusionSDPOTrainer(pipeline, args=_config(tmp_path), train_dataset=Dataset.from_list(_rows()))
    assert second.train_dataset.cache_files != first.train_dataset.cache_files
    assert calls  # encoded again, not reused
