"""After ``trainer.train()`` the tuned pipeline samples in place, for every family, in bf16 and fp16, LoRA and full,
with the VAE configured as each family's released model configures it.

The AutoencoderKL VAEs (SD, SDXL, SD3, FLUX.1, FLUX.1 Kontext, Z-Image) have ``force_upcast=True``: SDXL's config
sets it, and the others' configs either set it or leave it at AutoencoderKL's default, ``True``. The trainer then
keeps the VAE in float32 beside half-precision text encoders, and the pipelines of SD, SDXL, SD3 and FLUX.1 hand
their VAE latents (and Kontext its source image) in the text encoders' dtype. The other families' VAE classes have
no such switch. The tiny builders leave ``force_upcast`` off, so each case sets it as the released model has it.

One optimizer step on two pairs, then two inference steps at the training resolution. fp16 needs an accelerator:
accelerate runs fp16 mixed precision (its autocast and gradient scaler) on GPUs and similar devices only, so on a
CPU-only machine the fp16 cells are skipped, naming that reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig
from PIL import Image

from tests.helpers.common import edit_rows, pickapic_rows
from trl_diffusion_sdpo import DiffusionSDPOTrainer
from trl_diffusion_sdpo import testing as tiny

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
EDITING = {"random_flip": False, "proportion_empty_prompts": 0.0}  # what a prompt that reads its sources needs


@dataclass
class Case:
    build: Callable[[str], Any]  # build(tokenizer_dir) -> pipeline
    fields: dict[str, Any] = field(default_factory=dict)  # config fields
    force_upcast: bool | None = None  # the released VAE's force_upcast; None: its VAE class has no such switch
    data: str = "images"  # "images", "edits" (a source column) or "videos"
    call: dict[str, Any] = field(default_factory=dict)  # more pipeline call arguments
    slow: bool = False
    tunings: tuple[str, ...] = ("lora", "full")  # those sampled by default (the others: slow)


def source_image() -> Image.Image:
    return Image.new("RGB", (32, 32), (200, 40, 40))


CASES: dict[str, Case] = {
    "sd": Case(lambda d: tiny.build_tiny_sd_pipeline(tokenizer_dir=d), force_upcast=True),
    "sdxl": Case(lambda d: tiny.build_tiny_sdxl_pipeline(tokenizer_dir=d), force_upcast=True, tunings=("lora",)),
    "sd3": Case(
        lambda d: tiny.build_tiny_sd3_pipeline(tokenizer_dir=d, max_length=16),
        {"max_sequence_length": 16},
        force_upcast=True,
        call={"max_sequence_length": 16},
        tunings=("full",),
    ),
    "flux": Case(
        lambda d: tiny.build_tiny_flux_pipeline(tokenizer_dir=d, max_length=16),
        {"max_sequence_length": 16},
        force_upcast=True,
        call={"max_sequence_length": 16},
        tunings=("lora",),
    ),
    "flux-kontext": Case(
        lambda d: tiny.build_tiny_flux_kontext_pipeline(tokenizer_dir=d, max_length=16),
        {"max_sequence_length": 16},
        force_upcast=True,
        data="edits",
        # the source and the output at the training size (the pipeline's defaults resize both to about 1024^2)
        call={"max_sequence_length": 16, "_auto_resize": False, "max_area": 32 * 32},
        tunings=("full",),
    ),
    "flux2-dev": Case(
        lambda d: tiny.build_tiny_flux2_pipeline(tokenizer_dir=d),
        {"max_sequence_length": 48},
        call={"max_sequence_length": 48},
        slow=True,
    ),
    "flux2-klein": Case(
        lambda d: tiny.build_tiny_flux2_klein_pipeline(tokenizer_dir=d),
        {"max_sequence_length": 48},
        call={"max_sequence_length": 48},
        slow=True,
    ),
    "qwen-image": Case(
        lambda d: tiny.build_tiny_qwen_image_pipeline(tokenizer_dir=d),
        {"max_sequence_length": 24},
        call={"max_sequence_length": 24},
        slow=True,
    ),
    "qwen-image-edit": Case(
        lambda d: tiny.build_tiny_qwen_image_edit_pipeline(tokenizer_dir=d),
        {"max_sequence_length": 32, **EDITING},
        data="edits",
        call={"max_sequence_length": 32},
        slow=True,
    ),
    "qwen-image21": Case(
        lambda d: tiny.build_tiny_qwen_image21_pipeline(tokenizer_dir=d),
        {"max_sequence_length": 48},
        slow=True,
    ),
    "z-image": Case(
        lambda d: tiny.build_tiny_z_image_pipeline(tokenizer_dir=d),
        {"max_sequence_length": 32},
        force_upcast=True,
        call={"max_sequence_length": 32},
        slow=True,
    ),
    "wan": Case(
        lambda d: tiny.build_tiny_wan_pipeline(tokenizer_dir=d, max_length=16),
        {"max_sequence_length": 16, "resolution": 16, "num_frames": 5},
        data="videos",
        call={"max_sequence_length": 16, "num_frames": 5},
        slow=True,
    ),
    "hunyuan-video15": Case(
        lambda d: tiny.build_tiny_hunyuan_video15_pipeline(tokenizer_dir=d),
        {"max_sequence_length": 24, "num_frames": 5},
        data="videos",
        call={"num_frames": 5},
        slow=True,
    ),
}


def pairs(case: Case) -> Dataset:
    if case.data == "videos":
        pytest.importorskip("av")
        from tests.helpers.video import video_rows

        return Dataset.from_list(video_rows(2))
    return Dataset.from_list(edit_rows(2) if case.data == "edits" else pickapic_rows(2))


def fp16_device() -> str | None:
    """The device fp16 mixed precision runs on here, or None."""
    return "cuda" if torch.cuda.is_available() else None


def trained_pipeline(name: str, precision: str, lora: bool, make_config, tmp_path):
    """The family's tiny pipeline, its VAE as released, after one optimizer step in ``precision``."""
    case = CASES[name]
    pipe = case.build(str(tmp_path / "tok"))
    if case.force_upcast is not None:
        pipe.vae.register_to_config(force_upcast=case.force_upcast)
    device = None if precision == "bf16" else fp16_device()
    overrides = {"use_cpu": False} if device is not None else {}
    args = make_config(max_steps=1, learning_rate=1e-4, **{precision: True}, **case.fields, **overrides)
    targets = pipe.transformer if hasattr(pipe, "transformer") else pipe.unet
    lora_targets = sorted({n.rsplit(".", 1)[-1] for n, _ in targets.named_modules()} & {"to_q", "to_k", "to_v"})
    trainer = DiffusionSDPOTrainer(
        pipe,
        args=args,
        train_dataset=pairs(case),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=lora_targets or ATTENTION) if lora else None,
    )
    trainer.train()
    return trainer, pipe


def sample(pipe, case: Case, resolution: int) -> torch.Tensor:
    """Two inference steps of the pipeline itself, at the training resolution, as a float tensor."""
    call = {"height": resolution, "width": resolution, "num_inference_steps": 2, **case.call}
    if case.data == "edits":
        call["image"] = source_image()
    generator = torch.Generator(device=pipe.device).manual_seed(0)
    out = pipe(prompt="a red fox", generator=generator, output_type="pt", **call)
    images = out.frames if hasattr(out, "frames") else out.images
    return images if isinstance(images, torch.Tensor) else torch.as_tensor(images)


def cells() -> list:
    """Every family, precision and tuning; by default each fast family's pipeline samples once per precision, with
    ``case.tunings``."""
    params = []
    for name, case in CASES.items():
        for precision in ("bf16", "fp16"):
            for tuning in ("lora", "full"):
                # slow: the slow families, and a fast family's other tuning (by default: that family's pipeline with
                # one tuning, and sd-{precision}-lora and sd-{precision}-full sample after each tuning's training)
                marks = [pytest.mark.slow] if case.slow or tuning not in case.tunings else []
                if precision == "fp16" and fp16_device() is None:
                    marks.append(
                        pytest.mark.skip(
                            reason="accelerate runs fp16 mixed precision on an accelerator only (no autocast or "
                            "gradient scaler on CPU), so the trainer's fp16 step cannot run here"
                        )
                    )
                params.append(pytest.param(name, precision, tuning, marks=marks, id=f"{name}-{precision}-{tuning}"))
    return params


@pytest.mark.parametrize(("name", "precision", "tuning"), cells())
def test_the_tuned_pipeline_samples_in_place(name, precision, tuning, make_config, tmp_path) -> None:
    case = CASES[name]
    trainer, pipe = trained_pipeline(name, precision, tuning == "lora", make_config, tmp_path)
    if case.force_upcast:  # the case is the one that broke: a float32 VAE beside half-precision text encoders
        assert pipe.vae.dtype == torch.float32
    resolution = trainer.args.resolution
    images = sample(pipe, case, resolution)
    assert images.shape[-2:] == (resolution, resolution)
    assert torch.isfinite(images.float()).all()


def test_a_float32_vae_takes_half_precision_inputs_and_computes_in_float32(make_config, tmp_path) -> None:
    """The VAE kept in float32 decodes bf16 latents as it decodes the same latents given in float32 (its computation
    stays float32: the cast is of the input only), also under a bf16 autocast (a validation grid's), and it encodes
    a bf16 image as the float32 image."""
    trainer, pipe = trained_pipeline("sdxl", "bf16", True, make_config, tmp_path)
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    decoded = pipe.vae.decode(latents).sample
    assert decoded.dtype == torch.float32
    torch.testing.assert_close(decoded, pipe.vae.decode(latents.float()).sample, rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = pipe.vae.decode(latents).sample
        assert torch.is_autocast_enabled("cpu")  # on again after the VAE
    torch.testing.assert_close(under_autocast, decoded, rtol=0, atol=0)
    image = (torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1).to(torch.bfloat16)
    mode = pipe.vae.encode(image).latent_dist.mode()
    torch.testing.assert_close(mode, pipe.vae.encode(image.float()).latent_dist.mode(), rtol=0, atol=0)
    # placing the modules again (a second trainer on the same pipeline) adds no second cast
    DiffusionSDPOTrainer(pipe, args=trainer.args_as_given, train_dataset=pairs(CASES["sdxl"]))
    assert all(len(child._forward_pre_hooks) == len(child._forward_hooks) == 1 for child in pipe.vae.children())
