"""SDXL and the other Stable Diffusion UNet families: what the UNet receives (text conditioning from both encoders,
per-image micro-conditioning), the prediction targets, the precision of each component, and the saved weights as
diffusers loads them. Each behaviour is checked against an independent computation: the diffusers pipeline's own
prompt encoding, crop offsets worked out by hand, the scheduler's formulas, or a fresh pipeline loading the result.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from diffusers import DDPMScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from peft import LoraConfig
from PIL import Image

from tests.helpers.common import fast_config_values
from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer
from trl_diffusion_sdpo.cli import train as train_command  # the train command's parse_args and main
from trl_diffusion_sdpo.data.transforms import PairTransform
from trl_diffusion_sdpo.families import PromptEmbeddings, StableDiffusionXLFamily, family_for_pipeline
from trl_diffusion_sdpo.families.noising import SUPPORTED_PREDICTION_TYPES, prediction_target, training_scheduler
from trl_diffusion_sdpo.testing import build_tiny_sdxl_pipeline

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
RES = 32
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]

# Original sizes (w, h), all different so an image is recognised by its size; one is smaller than RES (upscaled).
# Resized by hand: the shorter side becomes 32, the longer one round(long * 32 / short).
RESIZED = {(48, 40): (38, 32), (40, 60): (32, 48), (24, 30): (32, 40), (72, 36): (64, 32)}
PROMPTS = ["a red fox in the snow", "two blue cubes"]
PAIRS = [((48, 40), (40, 60)), ((24, 30), (72, 36))]  # (chosen size, rejected size) per row
# time_ids (orig_h, orig_w, crop_top, crop_left, target_h, target_w) for a center crop of each original size:
# (48, 40) -> 38x32, left (38 - 32) / 2 = 3; (40, 60) -> 32x48, top 8; (24, 30) -> 32x40, top 4; (72, 36) -> 64x32,
# left 16.
CENTER_TIME_IDS = {
    (48, 40): [40, 48, 0, 3, 32, 32],
    (40, 60): [60, 40, 8, 0, 32, 32],
    (24, 30): [30, 24, 4, 0, 32, 32],
    (72, 36): [36, 72, 0, 16, 32, 32],
}


def noise_image(size: tuple[int, int], seed: int) -> Image.Image:
    """Random pixels: a crop position or a flip changes the tensor, so the pixels reveal what was applied."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


IMAGES = {size: noise_image(size, seed) for seed, size in enumerate(RESIZED)}


def lora_config() -> LoraConfig:
    # alpha != r: a scale lost on the way to diffusers would show.
    return LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, init_lora_weights=True)


def sdxl_pair_dataset() -> Dataset:
    """TRL-form pairs (PIL images, stored losslessly as PNG by ``datasets``)."""
    return Dataset.from_dict(
        {
            "prompt": PROMPTS,
            "chosen": [IMAGES[chosen] for chosen, _ in PAIRS],
            "rejected": [IMAGES[rejected] for _, rejected in PAIRS],
        }
    )


@pytest.fixture
def sdxl_pairs() -> Dataset:
    return sdxl_pair_dataset()


@pytest.fixture
def make_sdxl(tmp_path):
    """``make_sdxl(prediction_type="epsilon")``: a fresh tiny SDXL pipeline, the same weights every time."""
    counter = iter(range(1_000))

    def make(prediction_type: str = "epsilon") -> StableDiffusionXLPipeline:
        return build_tiny_sdxl_pipeline(
            seed=0, prediction_type=prediction_type, tokenizer_dir=str(tmp_path / f"tokenizers-{next(counter)}")
        )

    return make


@pytest.fixture(scope="module")
def saved_sdxl(tmp_path_factory) -> Path:
    """The tiny SDXL pipeline (``make_sdxl()``'s weights) saved once per module: the folder the tests that train from
    a local folder load (none writes into it)."""
    folder = tmp_path_factory.mktemp("saved-sdxl")
    build_tiny_sdxl_pipeline(seed=0, tokenizer_dir=str(folder / "tokenizers")).save_pretrained(folder / "tiny-sdxl")
    return folder / "tiny-sdxl"


class Capture:
    """Records what the UNet and the VAE encoder receive (forward pre-hooks), in call order."""

    def __init__(self, pipe: StableDiffusionXLPipeline) -> None:
        self.unet_calls: list[dict] = []
        self.vae_inputs: list[torch.Tensor] = []
        self._handles = [
            pipe.unet.register_forward_pre_hook(self._unet, with_kwargs=True),
            pipe.vae.encoder.register_forward_pre_hook(self._vae),
        ]

    def _unet(self, module, args, kwargs):
        cond = kwargs["added_cond_kwargs"]
        self.unet_calls.append(
            {
                "sample": args[0].detach().clone(),
                "timestep": args[1].detach().clone(),
                "encoder_hidden_states": kwargs["encoder_hidden_states"].detach().clone(),
                "text_embeds": cond["text_embeds"].detach().clone(),
                "time_ids": cond["time_ids"].detach().clone(),
            }
        )

    def _vae(self, module, args):
        self.vae_inputs.append(args[0].detach().clone())

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def train_and_capture(trainer: DiffusionSDPOTrainer) -> Capture:
    capture = Capture(trainer.pipeline)
    try:
        trainer.train()
    finally:
        capture.remove()
    return capture


def diffusers_prompt_encoding(pipe: StableDiffusionXLPipeline, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prompt_embeds [1, L, D1 + D2], pooled [1, P])`` as the diffusers SDXL pipeline itself encodes ``prompt``."""
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt, device=torch.device("cpu"), num_images_per_prompt=1, do_classifier_free_guidance=False
        )
    return embeds, pooled


def as_pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def find_view(pixels: torch.Tensor, time_ids: torch.Tensor) -> tuple[tuple[int, int], bool]:
    """The original image and flip that give ``pixels`` when cropped where ``time_ids`` says.

    Identifies the image by the original size in ``time_ids``, resizes it to the hand-computed size, and checks
    that cutting ``RES x RES`` at ``(crop_top, crop_left)`` of the resized (possibly mirrored) image reproduces the
    tensor the VAE received. Exactly one of (not flipped, flipped) must match.
    """
    orig_h, orig_w, top, left, target_h, target_w = (int(v) for v in time_ids.tolist())
    assert (target_h, target_w) == (RES, RES)
    size = (orig_w, orig_h)
    assert size in IMAGES, f"time_ids carry original size {size}, not the size of any image in the data"
    resized = IMAGES[size].resize(RESIZED[size], resample=Image.Resampling.BILINEAR)
    matches = []
    for flip in (False, True):
        view = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else resized
        if torch.allclose(as_pixels(view.crop((left, top, left + RES, top + RES))), pixels, atol=1e-6):
            matches.append(flip)
    assert len(matches) == 1, f"pixels of the {size} image do not match a crop at top={top}, left={left}"
    return size, matches[0]


# ----------------------------------------------------------------------------------------------- the tiny pipeline


def test_tiny_sdxl_pipeline_has_two_text_encoders_and_text_time_conditioning(make_sdxl) -> None:
    pipe = make_sdxl()
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert pipe.text_encoder is not None and pipe.text_encoder_2 is not None
    assert pipe.tokenizer is not None and pipe.tokenizer_2 is not None
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.vae.config.force_upcast  # as the SDXL base VAE
    assert isinstance(family_for_pipeline(pipe), StableDiffusionXLFamily)


def test_pipeline_with_second_encoder_but_no_first_is_rejected_clearly(make_sdxl) -> None:
    pipe = make_sdxl()
    pipe.text_encoder = None  # like the SDXL refiner
    with pytest.raises(ValueError, match="not an SDXL base pipeline"):
        family_for_pipeline(pipe)


# ------------------------------------------------------------------------- what the UNet receives, center crop


@pytest.fixture(scope="module")
def center_crop_run(tmp_path_factory):
    """One LoRA step with center crops, no flips, no prompt dropout; the UNet's and VAE's inputs recorded. Trained
    once per module: the tests below only read the run."""
    tmp_path = tmp_path_factory.mktemp("center-crop")
    pipe = build_tiny_sdxl_pipeline(seed=0, tokenizer_dir=str(tmp_path / "tokenizers"))
    values = fast_config_values(str(tmp_path / "out"))
    args = DiffusionSDPOConfig(
        **{**values, "max_steps": 1, "random_crop": False, "random_flip": False, "proportion_empty_prompts": 0.0}
    )
    trainer = DiffusionSDPOTrainer(pipe, args=args, train_dataset=sdxl_pair_dataset(), peft_config=lora_config())
    return trainer, train_and_capture(trainer)


def test_unet_gets_both_encoders_penultimate_states_and_pooled_embeds_as_diffusers_encodes_them(
    center_crop_run,
) -> None:
    trainer, capture = center_crop_run
    pipe = trainer.pipeline
    policy = capture.unet_calls[0]  # then the adapter-disabled reference, with the same conditioning
    assert policy["encoder_hidden_states"].shape == (4, pipe.tokenizer.model_max_length, 32)
    for call in capture.unet_calls:
        torch.testing.assert_close(call["encoder_hidden_states"], policy["encoder_hidden_states"])
        torch.testing.assert_close(call["text_embeds"], policy["text_embeds"])
    batch = 2
    for i in range(batch):
        size = (int(policy["time_ids"][i, 1]), int(policy["time_ids"][i, 0]))
        row = [chosen for chosen, _ in PAIRS].index(size)
        embeds, pooled = diffusers_prompt_encoding(pipe, PROMPTS[row])
        for j in (i, i + batch):  # the winner and the loser share the prompt
            torch.testing.assert_close(policy["encoder_hidden_states"][j], embeds[0], atol=1e-6, rtol=0)
            torch.testing.assert_close(policy["text_embeds"][j], pooled[0], atol=1e-6, rtol=0)


def test_time_ids_are_each_images_original_size_and_center_crop(center_crop_run) -> None:
    _, capture = center_crop_run
    time_ids = capture.unet_calls[0]["time_ids"]
    pixels = capture.vae_inputs[0]
    assert time_ids.shape == (4, 6) and pixels.shape == (4, 3, RES, RES)
    batch = 2
    chosen = [size for size, _ in PAIRS]
    for i in range(batch):
        winner_size = (int(time_ids[i, 1]), int(time_ids[i, 0]))
        loser_size = PAIRS[chosen.index(winner_size)][1]
        # winners first, then the losers in the same order; each gets its own size and offset
        assert time_ids[i].tolist() == CENTER_TIME_IDS[winner_size]
        assert time_ids[i + batch].tolist() == CENTER_TIME_IDS[loser_size]
        # and the crop those numbers describe is the one the VAE encoded
        assert find_view(pixels[i], time_ids[i]) == (winner_size, False)
        assert find_view(pixels[i + batch], time_ids[i + batch]) == (loser_size, False)


def test_loss_at_lora_initialisation_is_log_2(center_crop_run) -> None:
    trainer, _ = center_crop_run
    first = trainer.state.log_history[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["implicit_acc"] == pytest.approx(0.5)
    assert first["delta/winner"] == pytest.approx(0.0, abs=1e-7)


# ------------------------------------------------------------------------ random crops and flips, prompt dropout


def test_time_ids_follow_the_random_crop_and_flip_actually_applied(make_sdxl, make_config, sdxl_pairs) -> None:
    pipe = make_sdxl()
    args = make_config(max_steps=3, random_crop=True, random_flip=True, proportion_empty_prompts=0.0)
    trainer = DiffusionSDPOTrainer(pipe, args=args, train_dataset=sdxl_pairs, peft_config=lora_config())
    capture = train_and_capture(trainer)
    policy_calls = capture.unet_calls[::2]  # policy, reference, policy, reference, ...
    assert len(policy_calls) == len(capture.vae_inputs) == 3
    offsets, flips = set(), []
    for call, pixels in zip(policy_calls, capture.vae_inputs):
        time_ids = call["time_ids"]
        for i in range(2):
            winner, winner_flip = find_view(pixels[i], time_ids[i])
            loser, loser_flip = find_view(pixels[i + 2], time_ids[i + 2])
            assert (winner, loser) in PAIRS  # the pair stays together, winner first
            assert winner_flip == loser_flip  # one flip decision for the pair
            flips.append(winner_flip)
            offsets.update({tuple(time_ids[i, 2:4].tolist()), tuple(time_ids[i + 2, 2:4].tolist())})
    # random crops, not the center crop every time
    assert offsets - {tuple(ids[2:4]) for ids in CENTER_TIME_IDS.values()}
    assert len(set(flips)) == 2


def test_random_crop_offsets_cover_every_valid_position() -> None:
    transform = PairTransform(RES, random_crop=True)
    winner, loser = IMAGES[(72, 36)], IMAGES[(40, 60)]  # resized 64x32 (33 left offsets), 32x48 (17 top offsets)
    torch.manual_seed(0)
    lefts, tops = set(), set()
    for _ in range(400):
        _, time_ids = transform(winner, loser)
        assert time_ids[0, :2].tolist() == [36, 72] and time_ids[1, :2].tolist() == [60, 40]
        lefts.add(int(time_ids[0, 3]))
        tops.add(int(time_ids[1, 2]))
    assert lefts == set(range(33)) and tops == set(range(17))


def test_prompt_dropout_empties_the_prompt_for_both_text_encoders(make_sdxl, make_config, sdxl_pairs) -> None:
    pipe = make_sdxl()
    args = make_config(max_steps=1, proportion_empty_prompts=1.0)
    trainer = DiffusionSDPOTrainer(pipe, args=args, train_dataset=sdxl_pairs, peft_config=lora_config())
    capture = train_and_capture(trainer)
    embeds, pooled = diffusers_prompt_encoding(pipe, "")
    policy = capture.unet_calls[0]
    torch.testing.assert_close(policy["encoder_hidden_states"], embeds.expand(4, -1, -1), atol=1e-6, rtol=0)
    torch.testing.assert_close(policy["text_embeds"], pooled.expand(4, -1), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------- targets and schedulers


@pytest.mark.parametrize("prediction_type", SUPPORTED_PREDICTION_TYPES)
def test_prediction_target_matches_the_scheduler_formula(prediction_type: str) -> None:
    scheduler = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type
    )
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, 4, 4, generator=generator)
    noise = torch.randn(3, 4, 4, 4, generator=generator)
    timesteps = torch.tensor([0, 499, 999])
    target = prediction_target(scheduler, latents, noise, timesteps)
    abar = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    expected = {
        "epsilon": noise,
        "v_prediction": abar.sqrt() * noise - (1 - abar).sqrt() * latents,
        "sample": latents,
    }[prediction_type]
    torch.testing.assert_close(target, expected)
    if prediction_type == "v_prediction":
        torch.testing.assert_close(target, scheduler.get_velocity(latents, noise, timesteps))


def test_trainer_regresses_on_the_velocity_for_v_prediction_models(make_sdxl, make_config, sdxl_pairs) -> None:
    pipe = make_sdxl(prediction_type="v_prediction")
    trainer = DiffusionSDPOTrainer(
        pipe, args=make_config(max_steps=1), train_dataset=sdxl_pairs, peft_config=lora_config()
    )
    assert trainer.noiser.scheduler.config.prediction_type == "v_prediction"
    latents, predictions = [], []
    noise = trainer.stages.noise

    def recording_noise(*args, **kwargs):
        noised = noise(*args, **kwargs)
        latents.append(noised.latents)
        return noised

    trainer.stages.noise = recording_noise
    handle = pipe.unet.register_forward_hook(lambda module, args, output: predictions.append(output[0].detach()))
    capture = train_and_capture(trainer)
    handle.remove()
    # x_t = sqrt(abar) z + sqrt(1 - abar) eps: recover eps from what the UNet received, then the velocity by hand.
    z, x_t = latents[0].float(), capture.unet_calls[0]["sample"]
    abar = trainer.noiser.scheduler.alphas_cumprod[capture.unet_calls[0]["timestep"]].view(-1, 1, 1, 1)
    eps = (x_t - abar.sqrt() * z) / (1 - abar).sqrt()
    torch.testing.assert_close(eps[:2], eps[2:], atol=1e-3, rtol=1e-3)  # one noise per pair
    velocity = abar.sqrt() * eps - (1 - abar).sqrt() * z
    winner_error = ((predictions[0][:2] - velocity[:2]) ** 2).mean()
    loser_error = ((predictions[0][2:] - velocity[2:]) ** 2).mean()
    logged = trainer.state.log_history[0]
    assert logged["mse/policy_winner"] == pytest.approx(winner_error.item(), rel=1e-4)
    assert logged["mse/policy_loser"] == pytest.approx(loser_error.item(), rel=1e-4)
    epsilon_error = ((predictions[0][:2] - eps[:2]) ** 2).mean()
    assert logged["mse/policy_winner"] != pytest.approx(epsilon_error.item(), rel=1e-2)


def test_zero_terminal_snr_schedule_is_kept_for_training(make_sdxl, make_config, sdxl_pairs) -> None:
    pipe = make_sdxl(prediction_type="v_prediction")
    # An SD 2.x-style inference scheduler of another class with a zero-terminal-SNR schedule.
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, rescale_betas_zero_snr=True)
    assert training_scheduler(pipe.scheduler).alphas_cumprod[-1] < 1e-6
    # Only the last timestep, where the signal is gone: the velocity target is -z and the loss stays finite.
    args = make_config(max_steps=1, min_timestep=999)
    trainer = DiffusionSDPOTrainer(pipe, args=args, train_dataset=sdxl_pairs, peft_config=lora_config())
    assert trainer.noiser.scheduler.config.rescale_betas_zero_snr
    assert trainer.noiser.scheduler.config.prediction_type == "v_prediction"
    assert trainer.noiser.scheduler.alphas_cumprod[-1] < 1e-6
    trainer.train()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_unsupported_prediction_type_raises_naming_the_supported_ones(make_sdxl, make_config, sdxl_pairs) -> None:
    pipe = make_sdxl()
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="flow_prediction") as error:
        DiffusionSDPOTrainer(pipe, args=make_config(), train_dataset=sdxl_pairs, peft_config=lora_config())
    assert all(name in str(error.value) for name in SUPPORTED_PREDICTION_TYPES)
    latents = torch.zeros(1, 4, 4, 4)
    with pytest.raises(ValueError, match="v_prediction"):
        prediction_target(pipe.scheduler, latents, latents, torch.tensor([10]))


# ------------------------------------------------------------------------------------------------------ precision


def test_bf16_full_tuning_keeps_the_vae_fp32_and_trains_fp32_weights(make_sdxl, make_config, sdxl_pairs) -> None:
    pipe = make_sdxl()
    trainer = DiffusionSDPOTrainer(pipe, args=make_config(max_steps=1, bf16=True), train_dataset=sdxl_pairs)
    assert pipe.vae.dtype == torch.float32  # force_upcast: the SDXL VAE overflows in half precision
    assert pipe.text_encoder.dtype == pipe.text_encoder_2.dtype == torch.bfloat16
    # the frozen copy keeps the policy's weight dtypes and runs under its autocast: equal to the policy at step 0
    assert trainer.reference.denoiser.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in pipe.unet.parameters())  # trainable weights stay fp32
    capture = train_and_capture(trainer)
    assert capture.vae_inputs[0].dtype == torch.float32
    assert capture.unet_calls[0]["encoder_hidden_states"].dtype == torch.bfloat16
    assert capture.unet_calls[0]["time_ids"].dtype == torch.float32
    assert math.isfinite(trainer.state.log_history[0]["loss"])


def test_bf16_lora_on_a_bf16_pipeline_trains_fp32_adapters(make_sdxl, make_config, sdxl_pairs) -> None:
    pipe = make_sdxl().to(torch.bfloat16)
    trainer = DiffusionSDPOTrainer(
        pipe, args=make_config(max_steps=2, bf16=True), train_dataset=sdxl_pairs, peft_config=lora_config()
    )
    lora = {n: p for n, p in pipe.unet.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n and p.dtype == torch.float32 for n, p in lora.items())
    frozen = [p for p in pipe.unet.parameters() if not p.requires_grad]
    assert all(p.dtype == torch.bfloat16 for p in frozen)  # base weights (the reference) in the compute dtype
    assert pipe.vae.dtype == torch.float32 and pipe.text_encoder_2.dtype == torch.bfloat16
    before = {n: p.detach().clone() for n, p in lora.items()}
    trainer.train()
    assert all(math.isfinite(log["loss"]) for log in trainer.state.log_history if "loss" in log)
    assert all(p.dtype == torch.float32 for p in lora.values())
    assert any(not torch.equal(before[n], p) for n, p in lora.items())


def test_a_user_supplied_fp16_safe_vae_runs_in_the_compute_dtype(make_sdxl, make_config, sdxl_pairs) -> None:
    pipe = make_sdxl()
    pipe.vae.register_to_config(force_upcast=False)  # as an fp16-fixed SDXL VAE declares
    DiffusionSDPOTrainer(pipe, args=make_config(bf16=True), train_dataset=sdxl_pairs, peft_config=lora_config())
    assert pipe.vae.dtype == torch.bfloat16


def test_fp32_vae_encodes_in_fp32_inside_an_autocast_region(make_sdxl) -> None:
    family = family_for_pipeline(make_sdxl())
    pixels = torch.rand(2, 3, RES, RES) * 2 - 1
    expected = family.encode_moments(pixels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        moments = family.encode_moments(pixels)
    torch.testing.assert_close(moments, expected)  # to float32's tolerance: no bfloat16 rounding inside


def test_time_ids_reach_the_unet_exactly_even_with_bf16_embeddings() -> None:
    embeds = PromptEmbeddings(torch.zeros(2, 4, 8, dtype=torch.bfloat16), torch.zeros(2, 8, dtype=torch.bfloat16))
    time_ids = torch.tensor([[1023.0, 1366.0, 7.0, 171.0, 1024.0, 1024.0]] * 2)  # not representable in bf16
    conditioning = StableDiffusionXLFamily.denoiser_conditioning(None, embeds, time_ids)
    assert torch.equal(conditioning["added_cond_kwargs"]["time_ids"], time_ids)
    assert conditioning["added_cond_kwargs"]["text_embeds"].dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------- saving and loading


def unet_outputs(unet: torch.nn.Module, pipe: StableDiffusionXLPipeline) -> torch.Tensor:
    """The UNet's prediction for a fixed input, conditioned as the diffusers pipeline conditions it."""
    embeds, pooled = diffusers_prompt_encoding(pipe, PROMPTS[0])
    sample = torch.randn(1, 4, RES // 8, RES // 8, generator=torch.Generator().manual_seed(0))
    time_ids = torch.tensor([CENTER_TIME_IDS[(48, 40)]], dtype=torch.float32)
    with torch.no_grad():
        return unet(
            sample,
            torch.tensor([500]),
            encoder_hidden_states=embeds,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        ).sample


def test_lora_from_a_local_folder_round_trips_through_load_lora_weights(
    saved_sdxl, make_config, sdxl_pairs, tmp_path
) -> None:
    local = saved_sdxl
    out = tmp_path / "lora-out"
    trainer = DiffusionSDPOTrainer(
        str(local),
        args=make_config(output_dir=str(out), max_steps=2),
        train_dataset=sdxl_pairs,
        peft_config=lora_config(),
    )
    assert isinstance(trainer.pipeline, StableDiffusionXLPipeline)
    assert isinstance(trainer.family, StableDiffusionXLFamily)
    trainer.train()
    trainer.save_model()
    trained = trainer.accelerator.unwrap_model(trainer.model).eval()

    fresh = StableDiffusionXLPipeline.from_pretrained(local)
    base = unet_outputs(fresh.unet, fresh)
    fresh.load_lora_weights(out)
    expected = unet_outputs(trained, fresh)
    assert not torch.allclose(base, expected, atol=1e-4)  # training moved the adapters
    torch.testing.assert_close(unet_outputs(fresh.unet, fresh), expected, atol=1e-5, rtol=1e-5)


def test_full_unet_saved_with_save_pretrained_loads_into_an_sdxl_pipeline(
    saved_sdxl, make_config, sdxl_pairs, tmp_path
) -> None:
    local = saved_sdxl
    out = tmp_path / "full-out"
    trainer = DiffusionSDPOTrainer(
        str(local), args=make_config(output_dir=str(out), max_steps=1, learning_rate=1e-4), train_dataset=sdxl_pairs
    )
    trainer.train()
    trainer.save_model()
    trained = trainer.accelerator.unwrap_model(trainer.model).eval()

    unet = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    fresh = StableDiffusionXLPipeline.from_pretrained(local, unet=unet)
    original = StableDiffusionXLPipeline.from_pretrained(local)
    expected = unet_outputs(trained, fresh)
    assert not torch.allclose(unet_outputs(original.unet, original), expected, atol=1e-4)
    torch.testing.assert_close(unet_outputs(fresh.unet, fresh), expected, atol=1e-6, rtol=1e-6)


# ------------------------------------------- the train command on the shipped SDXL configs


def test_sdxl_yaml_configs_parse_into_the_authors_sdxl_settings() -> None:
    _, config, model_args, _ = train_command.parse_args(
        ["--config", str(EXAMPLES / "configs" / "sdxl_full.yaml"), "--use_cpu", "--output_dir", "/tmp/unused"]
    )
    assert isinstance(config, DiffusionSDPOConfig)
    assert not model_args.use_peft
    assert (config.beta, config.safeguarded, config.safeguard_mu) == (5000, True, 0.6)
    assert config.optim == "adafactor" and config.gradient_checkpointing
    assert config.learning_rate == 1e-9 and config.scale_lr  # the authors' SDXL rate
    assert (config.per_device_train_batch_size, config.gradient_accumulation_steps) == (8, 32)  # lambda over 8 pairs
    assert config.per_device_train_batch_size * config.gradient_accumulation_steps * 8 == 2048
    assert config.resolution == 1024 and config.bf16 and config.max_steps == 2000

    _, config, model_args, _ = train_command.parse_args(
        ["--config", str(EXAMPLES / "configs" / "sdxl_lora.yaml"), "--use_cpu", "--safeguard_mu", "0.5"]
    )
    assert model_args.use_peft and model_args.lora_r == model_args.lora_alpha == 16
    assert config.safeguard_mu == 0.5  # the command line overrides the YAML file
    assert config.beta == 5000 and config.gradient_checkpointing


def test_sdxl_example_trains_full_unet_with_adafactor_and_checkpointing_from_local_folders(
    saved_sdxl, sdxl_pairs, tmp_path
) -> None:
    local, data, out = saved_sdxl, tmp_path / "pairs", tmp_path / "out"
    sdxl_pairs.save_to_disk(str(data))
    trainer = train_command.main(
        [
            "--config",
            str(EXAMPLES / "configs" / "sdxl_full.yaml"),
            "--model_name_or_path",
            str(local),
            "--dataset_name",
            str(data),
            "--dataset_columns",
            "trl",  # the config reads Pick-a-Pic's columns; these pairs have TRL's
            "--dataset_streaming",
            "false",
            "--output_dir",
            str(out),
            "--resolution",
            str(RES),
            "--per_device_train_batch_size",
            "2",
            "--gradient_accumulation_steps",
            "1",
            "--max_steps",
            "1",
            "--learning_rate",
            "1e-4",
            "--warmup_steps",
            "0",
            "--use_cpu",
            "--save_strategy",
            "no",
            "--logging_steps",
            "1",
            "--dataloader_num_workers",
            "0",
            "--report_to",
            "none",
        ]
    )
    assert trainer.state.global_step == 1
    assert type(trainer.optimizer.optimizer).__name__ == "Adafactor"
    assert trainer.pipeline.unet.is_gradient_checkpointing
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
