"""Wan text-to-video: encoding as ``WanPipeline`` encodes, latents normalised per channel, noise levels on the
scheduler's static shift, training that moves the right weights, files that load back in diffusers, both safeguards,
the latent cache, and video preference data read from files and frame arrays with bad rows named.

A tiny WanPipeline (UMT5, 3D VAE, 3D transformer) built from configs; the test videos are written here with PyAV.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from datasets import Dataset
from diffusers import UniPCMultistepScheduler, WanPipeline
from peft import LoraConfig
from PIL import Image

from tests.helpers.flow_family_checks import (
    check_full_tuning_keeps_a_frozen_reference_and_saves_a_pipeline,
    check_lora_reloads_with_load_lora_weights,
)
from tests.helpers.flow_family_checks import transformer_outputs as flow_transformer_outputs
from tests.helpers.video import CASE, FRAMES, SEQ, SIZE, video_frames, video_rows, write_video
from trl_diffusion_sdpo import DiffusionSDPOTrainer
from trl_diffusion_sdpo.data import PreferenceCollator, prepare_preference_dataset
from trl_diffusion_sdpo.data.video import VideoClip, VideoPairTransform, read_video
from trl_diffusion_sdpo.families import WanFamily, family_for_pipeline, scale_latents
from trl_diffusion_sdpo.testing import build_tiny_wan_pipeline


@pytest.fixture(scope="module")
def video_pairs() -> Dataset:
    return Dataset.from_list(video_rows(4))


@pytest.fixture
def make_wan(tmp_path):
    counter = iter(range(1_000))

    def make(seed: int = 0) -> WanPipeline:
        return build_tiny_wan_pipeline(seed=seed, tokenizer_dir=str(tmp_path / f"tok-{next(counter)}"), max_length=SEQ)

    return make


def wan_config(make_config, **overrides):
    return CASE.config(make_config, **overrides)


def lora() -> LoraConfig:
    return CASE.lora()


def transformer_outputs(transformer: torch.nn.Module, family: WanFamily, seed: int = 1) -> torch.Tensor:
    """The transformer's prediction on fixed random video latents ``[2, 16, 2, 2, 2]``, through the family's call."""
    return flow_transformer_outputs(transformer, family, seed, CASE.sample_shape)


# ------------------------------------------------------------------------------------------------- the family


def test_prompt_encoding_equals_the_pipelines_encode_prompt(make_wan) -> None:
    pipe = make_wan()
    family = family_for_pipeline(pipe, max_sequence_length=SEQ)
    assert isinstance(family, WanFamily) and family.video and family.denoiser is pipe.transformer
    prompts = ["a red  square &amp; more", "two blue circles"]  # the pipeline cleans whitespace and HTML entities
    ours = family.encode_prompts(family.prompt_tokenizer()(prompts))
    theirs, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=SEQ, device="cpu")
    torch.testing.assert_close(ours.encoder_hidden_states, theirs)
    assert ours.pooled is None
    length = len(pipe.tokenizer("two blue circles").input_ids)
    assert ours.encoder_hidden_states[1, length:].abs().sum() == 0 < ours.encoder_hidden_states[1, :length].abs().sum()


def test_latents_are_normalised_per_channel_as_the_pipeline_decodes(make_wan) -> None:
    pipe = make_wan()
    family = family_for_pipeline(pipe, max_sequence_length=SEQ)
    pixels = torch.rand((2, 3, FRAMES, 16, 16), generator=torch.Generator().manual_seed(0)) * 2 - 1
    sample = pipe.vae.encode(pixels).latent_dist.sample(generator=torch.Generator().manual_seed(3))
    latents = scale_latents(sample, family.latents_config())  # what the noiser applies to mean + std * eps
    assert latents.shape == sample.shape == (2, 16, 2, 2, 2)
    # The pipeline's decode input: latents / (1 / std) + mean, channel by channel, must give the VAE sample back.
    config = pipe.vae.config
    mean = torch.tensor(config.latents_mean).view(1, 16, 1, 1, 1)
    inverse_std = 1.0 / torch.tensor(config.latents_std).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(latents / inverse_std + mean, sample)


def test_noise_levels_use_the_static_shift_of_the_shipped_unipc_scheduler(make_wan, make_config) -> None:
    pipe = make_wan()
    pipe.scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    family = family_for_pipeline(pipe, max_sequence_length=SEQ)
    noiser = family.noiser(wan_config(make_config))
    t = torch.arange(1000, 0, -1, dtype=torch.float64) / 1000
    torch.testing.assert_close(noiser.sigma_table.double(), 5 * t / (1 + 4 * t), atol=1e-6, rtol=0)


def test_expanded_timesteps_give_the_scalar_timesteps_prediction(make_wan) -> None:
    """Wan 2.2 TI2V passes one timestep per latent token; with all tokens at ``t`` it is the scalar ``t`` call."""
    pipe = make_wan()
    family = family_for_pipeline(pipe, max_sequence_length=SEQ)
    scalar = transformer_outputs(pipe.transformer, family)
    pipe.register_to_config(expand_timesteps=True)
    torch.testing.assert_close(transformer_outputs(pipe.transformer, family), scalar, atol=1e-5, rtol=1e-5)


def test_wrong_clip_lengths_and_two_expert_pipelines_are_refused(make_wan, make_config, video_pairs) -> None:
    with pytest.raises(ValueError, match="set num_frames"):
        DiffusionSDPOTrainer(make_wan(), args=wan_config(make_config, num_frames=None), train_dataset=video_pairs)
    with pytest.raises(ValueError, match="4k \\+ 1"):
        DiffusionSDPOTrainer(make_wan(), args=wan_config(make_config, num_frames=4), train_dataset=video_pairs)
    from trl_diffusion_sdpo.callbacks.validation import ValidationCallback

    wan = DiffusionSDPOTrainer(make_wan(), args=wan_config(make_config), train_dataset=video_pairs)
    with pytest.raises(ValueError, match="sample_videos"):
        ValidationCallback(["a cat"], trainer=wan)
    pipe = make_wan()
    pipe.register_modules(transformer_2=make_wan(seed=1).transformer)
    with pytest.raises(ValueError, match="two experts"):
        family_for_pipeline(pipe)


# ------------------------------------------------------------------------------------------------------ training


def test_lora_training_moves_only_the_adapters_and_starts_at_log_2(make_wan, make_config, video_pairs) -> None:
    pipe = make_wan()
    frozen = {n: p.detach().clone() for n, p in pipe.transformer.named_parameters()}
    encoder = {n: p.detach().clone() for n, p in pipe.text_encoder.named_parameters()}
    trainer = DiffusionSDPOTrainer(pipe, args=wan_config(make_config), train_dataset=video_pairs, peft_config=lora())
    trainer.train()
    first = trainer.state.log_history[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # adapters start at the base: the reference
    assert first["mse/policy_winner"] == first["mse/ref_winner"]
    state = dict(pipe.transformer.named_parameters())
    moved = [n for n, p in state.items() if "lora_B" in n and p.requires_grad]
    assert moved and any(not torch.equal(state[n], torch.zeros_like(state[n])) for n in moved)
    for name, before in frozen.items():  # base weights keep their names under PEFT's base_layer
        after = state.get(
            name, state.get(name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias"))
        )
        assert torch.equal(after, before), name
    assert all(torch.equal(p, encoder[n]) for n, p in pipe.text_encoder.named_parameters())


# the output space by default: the parameter case computes the output rule's lambda on the family's predictions too
# (log_output_lambda), and test_step_reference.py's unet-epsilon-output-full checks the output space's step
@pytest.mark.parametrize("space", [pytest.param("output", marks=pytest.mark.slow), "parameter"])
def test_both_safeguard_spaces_train_and_log_lambda(make_wan, make_config, video_pairs, space) -> None:
    trainer = DiffusionSDPOTrainer(
        make_wan(),
        args=wan_config(
            make_config,
            safeguard_mu=0.5,
            safeguard_space=space,
        ),
        train_dataset=video_pairs,
        peft_config=lora(),
    )
    if space == "parameter":
        trainer.safeguard.log_output_lambda(trainer.args)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "safeguard/lambda_mean" in h]
    assert len(logs) == 2
    assert all(0.0 <= h["safeguard/lambda_min"] <= h["safeguard/lambda_max"] <= 1.0 for h in logs)
    assert all(math.isfinite(h["loss"]) for h in logs)
    if space == "parameter":
        assert all("safeguard/output_lambda_mean" in h for h in logs)


def test_lora_saved_by_the_trainer_reloads_with_load_lora_weights(
    make_wan, make_config, video_pairs, tmp_path
) -> None:
    make_wan().save_pretrained(tmp_path / "tiny-wan")
    check_lora_reloads_with_load_lora_weights(CASE, tmp_path / "tiny-wan", make_config, video_pairs, tmp_path / "out")


@pytest.mark.slow
def test_full_tuning_keeps_a_frozen_reference_and_saves_a_loadable_pipeline(
    make_wan, make_config, video_pairs, tmp_path
) -> None:
    make_wan().save_pretrained(tmp_path / "tiny-wan")
    check_full_tuning_keeps_a_frozen_reference_and_saves_a_pipeline(
        CASE, tmp_path / "tiny-wan", make_config, video_pairs, tmp_path / "full-out"
    )


def test_cached_video_latents_give_the_uncached_losses(make_wan, make_config, video_pairs, tmp_path) -> None:
    losses = []
    for cache in (False, True):
        trainer = DiffusionSDPOTrainer(
            make_wan(),
            args=wan_config(
                make_config, cache_latents=cache, latent_cache_dir=str(tmp_path / "cache"), random_flip=False
            ),
            train_dataset=video_pairs,
            peft_config=lora(),
        )
        trainer.train()
        losses.append([h["mse/policy_winner"] for h in trainer.state.log_history if "mse/policy_winner" in h])
        if cache:
            assert trainer.train_dataset.features["latent_mean"].shape == (2, 16, 2, 2, 2)
    assert len(losses[0]) == 2 and losses[0] == pytest.approx(losses[1], rel=1e-5)


# ------------------------------------------------------------------------------------------------- video data


def test_a_clip_is_read_alike_from_a_file_its_bytes_an_array_and_a_frame_list(tmp_path) -> None:
    clip = VideoClip(num_frames=3, frame_stride=2)  # frames 0, 2, 4
    frames = video_frames((200, 30, 30))
    path = tmp_path / "clip.mp4"
    path.write_bytes(write_video((200, 30, 30)))
    from_file = read_video(str(path), clip)
    from_bytes = read_video(path.read_bytes(), clip)
    from_array = read_video(frames, clip)
    from_list = read_video([Image.fromarray(f) for f in frames], clip)
    from_nested_lists = read_video(frames.tolist(), clip)
    expected = frames[[0, 2, 4]]
    for read in (from_array, from_list, from_nested_lists):
        assert len(read) == 3 and all(np.array_equal(np.asarray(f), e) for f, e in zip(read, expected))
    for read in (from_file, from_bytes):  # lossy codec: close, and the growing bar is where it should be
        assert len(read) == 3 and read[0].size == SIZE
        decoded = np.stack([np.asarray(f) for f in read]).astype(float)
        assert np.abs(decoded - expected).mean() < 12
        assert [int((d[:, :, 1] > 128).any(axis=0).sum()) for d in decoded] == [2, 4, 6]
    with pytest.raises(ValueError, match="video has 6 frames; num_frames=3 at frame_stride=3 needs 7"):
        read_video(frames, VideoClip(3, 3))


def test_both_videos_of_a_pair_are_resized_and_centre_cropped_the_same_way() -> None:
    transform = VideoPairTransform(16, VideoClip(num_frames=2))
    winner = [Image.fromarray(f) for f in video_frames((200, 0, 0), 2)]
    loser = [Image.fromarray(f) for f in video_frames((0, 0, 200), 2, size=(20, 28))]
    pixels, time_ids = transform(winner, loser)
    assert pixels.shape == (2, 3, 2, 16, 16)
    for index, video in enumerate((winner, loser)):
        for f, frame in enumerate(video):
            # independent: shorter side to 16 (bilinear), centre crop 16x16
            w, h = frame.size
            scale = 16 / min(w, h)
            new = (max(16, round(w * scale)), max(16, round(h * scale)))
            resized = frame.resize(new, Image.Resampling.BILINEAR)
            left, top = round((new[0] - 16) / 2), round((new[1] - 16) / 2)
            crop = np.asarray(resized.crop((left, top, left + 16, top + 16)), dtype=np.float32) / 127.5 - 1
            torch.testing.assert_close(pixels[index, :, f], torch.from_numpy(crop).permute(2, 0, 1))
    assert time_ids[:, :2].tolist() == [[20.0, 24.0], [28.0, 20.0]]  # each video's own size


def test_a_random_crop_moves_every_frame_of_a_clip_and_both_clips_alike(make_wan, make_config, video_pairs) -> None:
    from trl_diffusion_sdpo.data.random_crop import crop_pairs

    transform = VideoPairTransform(16, VideoClip(num_frames=2), random_crop=True)
    pairs = [
        (
            [Image.fromarray(f) for f in video_frames((200, 0, 0), 2)],
            [Image.fromarray(f) for f in video_frames((0, 0, 200), 2, size=(20, 28))],
        ),
        ([Image.fromarray(f) for f in video_frames((0, 90, 0), 2, size=(32, 16))],) * 2,
    ]
    resized = [transform.resized_pair(w, lo) for w, lo in pairs]
    columns = prepare_preference_dataset(video_pairs, wan_config(make_config))[1]
    collator = PreferenceCollator(columns, lambda p: {}, transform)
    rows = [{"prompt": "p", "chosen": f"w{i}", "rejected": f"l{i}"} for i in range(2)]
    clips = {f"w{i}": w for i, (w, _) in enumerate(pairs)} | {f"l{i}": lo for i, (_, lo) in enumerate(pairs)}
    transform.load = clips.__getitem__  # the rows name their clips
    batch = collator(rows)
    assert batch["pixel_values"].shape == (2, 2, 3, 2, 22, 32) and batch["crop_sizes"].tolist() == [
        [[16, 19], [22, 16]],
        [[16, 32], [16, 32]],
    ]
    fractions = torch.tensor([[0.9, 0.6], [0.2, 0.99]])
    cropped = crop_pairs(batch, fractions, 16)["pixel_values"]
    assert cropped.shape == (2, 2, 3, 2, 16, 16)
    for b, (videos, _) in enumerate(resized):
        for k, clip in enumerate(videos):  # independent: offset = min(floor(f * (size - 16 + 1)), size - 16)
            h, w = clip.shape[-2:]
            top = min(int(fractions[b, 0] * (h - 15)), h - 16)
            left = min(int(fractions[b, 1] * (w - 15)), w - 16)
            torch.testing.assert_close(cropped[b, k], clip[:, :, top : top + 16, left : left + 16])
    trainer = DiffusionSDPOTrainer(
        make_wan(), args=wan_config(make_config, random_crop=True), train_dataset=video_pairs, peft_config=lora()
    )
    trainer.train()
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


def test_a_streamed_video_dataset_skips_and_counts_a_bad_row(make_wan, make_config) -> None:
    rows = video_rows(4)
    rows[2]["chosen"] = b"not a video"
    streamed = Dataset.from_list(rows).to_iterable_dataset()
    trainer = DiffusionSDPOTrainer(
        make_wan(), args=wan_config(make_config, max_steps=2), train_dataset=streamed, peft_config=lora()
    )
    trainer.train()
    skipped = sum(h.get("data/skipped_rows", 0) for h in trainer.state.log_history if "loss" in h)
    assert skipped == 1 and all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


def test_a_video_pair_batch_names_bad_rows_by_row_and_column(make_wan, make_config) -> None:
    rows = video_rows(3)
    rows[1]["rejected"] = b"not a video"
    args = wan_config(make_config)
    with pytest.raises(ValueError, match="row 1, column 'rejected': cannot read video"):
        prepare_preference_dataset(Dataset.from_list(rows), args)
    kept, columns, report = prepare_preference_dataset(
        Dataset.from_list(rows), wan_config(make_config, skip_invalid_rows=True)
    )
    assert report.invalid_skipped == 1 and report.num_kept == 2 and columns.clip == VideoClip(FRAMES)
    # Frame arrays (stored by datasets as nested lists): a clip too short for num_frames is named.
    arrays = [
        {"prompt": "p", "chosen": video_frames((9, 9, 9), frames=5), "rejected": video_frames((0, 0, 9), frames=5)},
        {"prompt": "q", "chosen": video_frames((9, 9, 9), frames=3), "rejected": video_frames((0, 0, 9), frames=6)},
    ]
    with pytest.raises(ValueError, match="row 1, column 'chosen': cannot read video: video has 3 frames"):
        prepare_preference_dataset(Dataset.from_list(arrays), args)

    family = family_for_pipeline(make_wan(), max_sequence_length=SEQ)
    collator = PreferenceCollator(columns, family.prompt_tokenizer(), VideoPairTransform(16, columns.clip))
    batch = collator([kept[0], kept[1], {"prompt": "bad", "chosen": b"junk", "rejected": b"junk"}])
    assert batch["pixel_values"].shape == (2, 2, 3, FRAMES, 16, 16) and batch["num_skipped"] == 1
    assert batch["input_ids"].shape == (2, SEQ)
    empty = collator([{"prompt": "bad", "chosen": None, "rejected": None}])
    assert empty["pixel_values"].shape == (0, 2, 3, FRAMES, 16, 16)


def test_an_image_family_refuses_video_settings(make_config) -> None:
    from tests.helpers.common import pickapic_rows
    from trl_diffusion_sdpo.testing import build_tiny_sd_pipeline

    with pytest.raises(ValueError, match="leave num_frames unset"):
        DiffusionSDPOTrainer(
            build_tiny_sd_pipeline(), args=make_config(num_frames=5), train_dataset=Dataset.from_list(pickapic_rows(2))
        )


# ------------------------------------------------------------------------------------------------- evaluation


def test_sampled_clips_are_scored_as_the_mean_over_their_frames(make_wan) -> None:
    from trl_diffusion_sdpo.evaluation import Scorer, sample_videos, score_videos

    class Brightness(Scorer):
        name = "brightness"

        def score(self, images, prompts):
            return torch.tensor([float(np.asarray(image).mean()) + len(p) for image, p in zip(images, prompts)])

    pipe = make_wan()
    videos = sample_videos(
        pipe,
        ["a cat", "a dog", "a cat"],
        [0, 0, 0],
        num_frames=FRAMES,
        height=16,
        width=16,
        num_inference_steps=2,
        max_sequence_length=SEQ,
    )
    assert [len(v) for v in videos] == [FRAMES] * 3 and videos[0][0].size == (16, 16)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(videos[0], videos[2]))  # same seed
    scores = score_videos(Brightness(), videos, ["a cat", "a dog", "a cat"])
    expected = [
        np.mean([np.asarray(f).mean() for f in v]) + len(p) for v, p in zip(videos, ["a cat", "a dog", "a cat"])
    ]
    torch.testing.assert_close(scores, torch.tensor(expected, dtype=torch.float32))


@pytest.mark.slow
def test_the_train_command_trains_wan_lora_yaml_from_local_folders(make_wan, video_pairs, tmp_path) -> None:
    from pathlib import Path

    from safetensors.torch import load_file

    from trl_diffusion_sdpo.cli.train import main as train_main

    config = Path(__file__).resolve().parents[2] / "examples" / "configs" / "wan_lora.yaml"
    pipe_dir, data_dir, out = tmp_path / "wan", tmp_path / "pairs", tmp_path / "out"
    make_wan().save_pretrained(pipe_dir)
    video_pairs.save_to_disk(str(data_dir))
    train_main(
        ["--config", str(config), "--model_name_or_path", str(pipe_dir), "--dataset_name", str(data_dir),
         "--output_dir", str(out), "--dtype", "float32", "--bf16", "false", "--use_cpu", "--resolution", "16",
         "--num_frames", str(FRAMES), "--frame_stride", "1", "--max_sequence_length", str(SEQ), "--max_steps", "1",
         "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--lora_r", "4",
         "--report_to", "none", "--save_strategy", "no", "--dataloader_num_workers", "0", "--disable_tqdm", "true"]
    )  # fmt: skip
    keys = load_file(out / "pytorch_lora_weights.safetensors").keys()
    assert keys and all(k.startswith("transformer.") for k in keys)
    assert any("attn2.to_k" in k for k in keys) and any("attn1.to_q" in k for k in keys)  # self- and cross-attention


# by default: test_flow_families.py's test_exact_safeguard_keeps_the_winner_term_from_rising_on_a_flux_transformer
# (the same check of tests/helpers/winner_term_check.py on a flow transformer)
@pytest.mark.slow
def test_exact_safeguard_keeps_the_winner_term_from_rising_on_a_wan_transformer() -> None:
    """The first-order check of ``tests/helpers/winner_term_check.py`` on video latents ``[16, 2, 4, 4]`` through
    the Wan family's call: after a small step along the parameter-space rule's gradient the winner term never rises
    beyond the second-order tolerance."""
    from tests.helpers.winner_term_check import Setting, run

    report = run(
        Setting(batches=20, pairs=2, beta=100.0, drift_steps=5),
        progress=False,
        starts=("drifted",),
        model="wan",
        rules=("parameter",),  # the rule read below
    )
    rules = report["starts"]["drifted"]
    assert rules["parameter"]["batches"] == 20 and rules["parameter"]["rose_beyond_tolerance"] == 0
    assert 0.0 <= rules["parameter"]["lambda_min"] <= rules["parameter"]["lambda_max"] <= 1.0


def test_bf16_lora_trains_float32_adapters_on_a_bf16_wan_transformer(make_wan, make_config, video_pairs) -> None:
    pipe = make_wan()
    trainer = DiffusionSDPOTrainer(
        pipe, args=wan_config(make_config, bf16=True), train_dataset=video_pairs, peft_config=lora()
    )
    trainer.train()
    dtypes = {n: p.dtype for n, p in pipe.transformer.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    keep = set(pipe.transformer._keep_in_fp32_modules)  # as WanTransformer3DModel.from_pretrained leaves them
    kept = {n for n in dtypes if "lora_" not in n and keep & set(n.split("."))}
    assert kept and {dtypes[n] for n in kept} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n and n not in kept} == {torch.bfloat16}
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)
