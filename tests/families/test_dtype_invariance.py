"""What holds in bf16 for every family and both tunings: at step 0 the reference is the policy (the first loss is
log 2, the implicit-reward deltas are exactly 0), the modules a model keeps in float32 stay float32 in the reference,
and after ``train()`` the tuned pipeline samples in place.

One optimizer step on two pairs with each family's tiny pipeline (``trl_diffusion_sdpo.testing``).
"""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from tests.helpers.common import pickapic_rows
from trl_diffusion_sdpo import DiffusionSDPOTrainer
from trl_diffusion_sdpo import testing as tiny
from trl_diffusion_sdpo.families.preparation import keeps_in_float32

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]

# family -> (build(tokenizer_dir), config fields); every family the package trains
FAMILIES = {
    "sd": (lambda d: tiny.build_tiny_sd_pipeline(tokenizer_dir=d), {}),
    "sdxl": (lambda d: tiny.build_tiny_sdxl_pipeline(tokenizer_dir=d), {}),
    "sd3": (lambda d: tiny.build_tiny_sd3_pipeline(tokenizer_dir=d, max_length=16), {"max_sequence_length": 16}),
    "flux": (lambda d: tiny.build_tiny_flux_pipeline(tokenizer_dir=d, max_length=16), {"max_sequence_length": 16}),
    "flux2-dev": (lambda d: tiny.build_tiny_flux2_pipeline(tokenizer_dir=d), {"max_sequence_length": 48}),
    "flux2-klein": (lambda d: tiny.build_tiny_flux2_klein_pipeline(tokenizer_dir=d), {"max_sequence_length": 48}),
    "qwen-image": (lambda d: tiny.build_tiny_qwen_image_pipeline(tokenizer_dir=d), {"max_sequence_length": 24}),
    "z-image": (lambda d: tiny.build_tiny_z_image_pipeline(tokenizer_dir=d), {"max_sequence_length": 32}),
    "wan": (
        lambda d: tiny.build_tiny_wan_pipeline(tokenizer_dir=d, max_length=16),
        {"max_sequence_length": 16, "resolution": 16, "num_frames": 5},
    ),
}


def pairs_for(family: str) -> Dataset:
    if family == "wan":
        pytest.importorskip("av")
        from tests.helpers.video import video_rows

        return Dataset.from_list(video_rows(2))
    return Dataset.from_list(pickapic_rows(2))


def bf16_trainer(family: str, lora: bool, make_config, tmp_path) -> DiffusionSDPOTrainer:
    build, fields = FAMILIES[family]
    args = make_config(bf16=True, max_steps=1, beta=100.0, learning_rate=1e-4, **fields)
    return DiffusionSDPOTrainer(
        build(str(tmp_path / "tok")),
        args=args,
        train_dataset=pairs_for(family),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS) if lora else None,
    )


# LoRA on every family; full tuning (a frozen copy as the reference) by default on sd and on wan, whose float32
# modules are the case the copy's dtypes matter for
DEFAULT_FULL = ("sd", "wan")
# LoRA in the slow tier where another family's default case runs the same denoiser class: sdxl's UNet by sd-lora,
# FLUX.2 klein's transformer by flux2-dev-lora
SLOW_LORA = ("sdxl", "flux2-klein")


def slow_case(family: str, tuning: str) -> bool:
    return family not in DEFAULT_FULL if tuning == "full" else family in SLOW_LORA


@pytest.mark.parametrize(
    ("family", "tuning"),
    [
        pytest.param(family, tuning, marks=pytest.mark.slow if slow_case(family, tuning) else ())
        for tuning in ("lora", "full")
        for family in FAMILIES
    ],
    ids=lambda value: value,
)
def test_bf16_first_step_starts_with_the_reference_equal_to_the_policy(family, tuning, make_config, tmp_path):
    trainer = bf16_trainer(family, tuning == "lora", make_config, tmp_path)
    reference = trainer.family.denoiser if trainer.reference.shares_policy_weights else trainer.reference.denoiser
    kept = [n for n, _ in reference.named_parameters() if keeps_in_float32(reference, n)]
    trainer.train()
    first = trainer.state.log_history[0]
    # u = beta * (delta_winner - delta_loser) with both deltas exactly 0: the sigmoid's log 2, whatever beta is.
    assert first["delta/winner"] == 0.0 and first["delta/loser"] == 0.0
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["mse/policy_winner"] == first["mse/ref_winner"]
    # The modules the model keeps in float32 (Wan: time embedder, norms, modulation tables) stay so in the reference.
    dtypes = dict(reference.named_parameters())
    assert all(dtypes[n].dtype == torch.float32 for n in kept), [n for n in kept if dtypes[n].dtype != torch.float32]
    if family == "wan":
        assert kept  # the check above is not vacuous where a family declares such modules


def test_the_frozen_reference_takes_the_policys_dtypes_parameter_by_parameter(make_config, tmp_path):
    """Full tuning: the trainable weights are float32, and so is the reference that must compute as they do (twice
    the parameter bytes of a bf16 copy, see docs/reliability.md); the reference itself is never trained."""
    trainer = bf16_trainer("wan", lora=False, make_config=make_config, tmp_path=tmp_path)
    policy = dict(trainer.family.denoiser.named_parameters())
    reference = dict(trainer.reference.denoiser.named_parameters())
    assert reference.keys() == policy.keys()
    assert {n: p.dtype for n, p in reference.items()} == {n: p.dtype for n, p in policy.items()}
    assert not any(p.requires_grad for p in reference.values())


@pytest.mark.parametrize("tuning", ["lora", "full"])
def test_after_bf16_training_the_pipeline_samples_in_place_with_a_vae_that_does_not_upcast(
    tuning, make_config, tmp_path
):
    """accelerate's float32 outputs stay on the denoiser only while the trainer runs it: a bf16 VAE that does not
    upcast (``force_upcast=False``, as the fp16-fix SDXL VAE) decodes the tuned denoiser's latents, after ``train()``
    and after an ``evaluate()`` that follows it, and training or evaluating again still works."""
    pipe = tiny.build_tiny_sd_pipeline(tokenizer_dir=str(tmp_path / "tok"))
    pipe.vae.register_to_config(force_upcast=False)
    pairs = Dataset.from_list(pickapic_rows(2))
    trainer = DiffusionSDPOTrainer(
        pipe,
        args=make_config(bf16=True, max_steps=1),
        train_dataset=pairs,
        eval_dataset=pairs,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS) if tuning == "lora" else None,
    )
    trainer.train()
    assert pipe.vae.dtype == torch.bfloat16  # the trainer put it in the compute dtype: it does not upcast

    def sample() -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        return pipe("a fox", num_inference_steps=2, height=32, width=32, output_type="pt", generator=generator).images

    images = sample()
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images.float()).all()
    assert math.isfinite(trainer.evaluate()["eval_loss"])
    torch.testing.assert_close(sample(), images)  # the same weights, the same sampling after evaluate()


def test_validation_grids_sample_with_each_familys_own_guidance_unless_set(make_config, tmp_path):
    """FLUX.1-dev conditions on guidance 3.5 in training: its grid samples at 3.5, not SD's 8.5; a set value wins."""
    from trl_diffusion_sdpo.callbacks.validation import ValidationCallback

    def grid_guidance(family: str, **fields) -> float | None:
        build, family_fields = FAMILIES[family]
        args = make_config(**family_fields)
        trainer = DiffusionSDPOTrainer(
            build(str(tmp_path / f"tok-{family}-{len(fields)}")), args=args, train_dataset=pairs_for(family)
        )
        trainer.add_callback(ValidationCallback(["a fox"], every_n_steps=1, trainer=trainer, **fields))
        (callback,) = trainer.callbacks_of(ValidationCallback)
        return callback.settings.guidance_scale

    assert grid_guidance("flux") == 3.5
    assert grid_guidance("sd") == 8.5  # the SDPO authors' guidance for the UNet families
    assert grid_guidance("sd3") == 7.0  # StableDiffusion3Pipeline's own default
    assert grid_guidance("flux", guidance_scale=2.0) == 2.0
