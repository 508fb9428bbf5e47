"""Model families: what differs between pipelines (text encoders, denoiser conditioning, VAE precision).

A family wraps a diffusers pipeline behind :class:`ModelFamily`; add a family by adding a module here and a branch
in :func:`family_for_pipeline`.
"""

from __future__ import annotations

from diffusers import DiffusionPipeline

from .base import ModelFamily, PromptEmbeddings, PromptTokenizer, scale_latents
from .sd import StableDiffusionFamily
from .sdxl import StableDiffusionXLFamily

__all__ = [
    "ModelFamily",
    "PromptEmbeddings",
    "PromptTokenizer",
    "StableDiffusionFamily",
    "StableDiffusionXLFamily",
    "family_for_pipeline",
    "scale_latents",
]


def family_for_pipeline(pipeline: DiffusionPipeline) -> ModelFamily:
    """Pick the family from the pipeline's components (not its class name, so subclasses work)."""
    if getattr(pipeline, "unet", None) is None:
        raise ValueError(
            f"{type(pipeline).__name__} has no `unet`; only UNet-based Stable Diffusion pipelines are supported"
        )
    if getattr(pipeline, "text_encoder_2", None) is not None:
        is_sdxl_base = getattr(pipeline, "text_encoder", None) is not None and (
            getattr(pipeline.unet.config, "addition_embed_type", None) == "text_time"
        )
        if not is_sdxl_base:
            raise ValueError(
                f"{type(pipeline).__name__} has a second text encoder but is not an SDXL base pipeline (it needs "
                "`text_encoder`, `text_encoder_2` and a UNet with `addition_embed_type='text_time'`); the SDXL "
                "refiner's aesthetic-score conditioning is not supported"
            )
        return StableDiffusionXLFamily(pipeline)
    if getattr(pipeline, "text_encoder", None) is None or getattr(pipeline, "tokenizer", None) is None:
        raise ValueError(f"{type(pipeline).__name__} needs a `text_encoder` and a `tokenizer`")
    return StableDiffusionFamily(pipeline)
