"""A tiny pipeline saved as a base folder beside a LoRA the trainer's own save function wrote, for every family: what
the export tests and the refusals' tests read."""

from __future__ import annotations

import torch
from peft import LoraConfig

from trl_diffusion_sdpo.families import family_for_pipeline
from trl_diffusion_sdpo.io.saving import save_lora_adapters
from trl_diffusion_sdpo.testing import (
    build_tiny_flux2_klein_pipeline,
    build_tiny_flux2_pipeline,
    build_tiny_flux_kontext_pipeline,
    build_tiny_flux_pipeline,
    build_tiny_hunyuan_video15_pipeline,
    build_tiny_qwen_image21_pipeline,
    build_tiny_qwen_image_edit_pipeline,
    build_tiny_qwen_image_pipeline,
    build_tiny_sd3_pipeline,
    build_tiny_sd_pipeline,
    build_tiny_sdxl_pipeline,
    build_tiny_wan_pipeline,
    build_tiny_z_image_pipeline,
)

RANK, ALPHA = 4, 8  # alpha != rank: a scale lost or written wrong shows in the outputs
BUILDERS = {
    "sd": build_tiny_sd_pipeline,
    "sdxl": build_tiny_sdxl_pipeline,
    "flux": build_tiny_flux_pipeline,
    "flux-kontext": build_tiny_flux_kontext_pipeline,
    "sd3": build_tiny_sd3_pipeline,
    "qwen-image": build_tiny_qwen_image_pipeline,
    "z-image": build_tiny_z_image_pipeline,
    "wan": build_tiny_wan_pipeline,
    "flux2": build_tiny_flux2_pipeline,
    "flux2-klein": build_tiny_flux2_klein_pipeline,
    "hunyuan-video-1.5": build_tiny_hunyuan_video15_pipeline,
    "qwen-image-2.1": build_tiny_qwen_image21_pipeline,
    "qwen-image-edit": build_tiny_qwen_image_edit_pipeline,
}


def write_base_and_lora(name: str, folder, targets=None) -> tuple[str, str]:
    """A tiny pipeline saved as a local base folder, and a random LoRA on ``targets`` (default: the family's
    default targets; every ``lora_B`` nonzero, so the adapter changes the prediction) written by the trainer's own
    save function."""
    pipe = BUILDERS[name](seed=0, tokenizer_dir=str(folder / "tokenizers"))
    base = str(folder / "base")
    pipe.save_pretrained(base)
    family = family_for_pipeline(pipe)
    denoiser = family.denoiser
    targets = list(targets or family.lora_target_modules)
    denoiser.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=targets))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param_name, param in denoiser.named_parameters():
            if "lora_B" in param_name:
                param.copy_(0.2 * torch.randn(param.shape, generator=gen))
    lora = str(folder / "lora")
    save_lora_adapters(denoiser, lora, type(pipe), prefix=family.denoiser_name)
    return base, lora
