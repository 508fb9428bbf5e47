"""Model families: what differs between pipelines (text encoders, the denoiser and its call, the noising).

A family wraps a diffusers pipeline behind :class:`ModelFamily` (see :mod:`.base` for the interface); add a family
by adding a module here and a branch in :func:`family_for_pipeline`. UNet families: SD 1.x/2.x (:mod:`.sd`), SDXL
(:mod:`.sdxl`). Flow-matching transformer families: SD3/SD3.5 (:mod:`.sd3`), FLUX.1 (:mod:`.flux`).
"""

from __future__ import annotations

from diffusers import DiffusionPipeline

from .base import ModelFamily, PromptEmbeddings, PromptTokenizer, scale_latents
from .flux import FluxFamily
from .sd import StableDiffusionFamily
from .sd3 import StableDiffusion3Family
from .sdxl import StableDiffusionXLFamily

__all__ = [
    "FluxFamily",
    "ModelFamily",
    "PromptEmbeddings",
    "PromptTokenizer",
    "StableDiffusion3Family",
    "StableDiffusionFamily",
    "StableDiffusionXLFamily",
    "family_for_pipeline",
    "scale_latents",
]


def family_for_pipeline(
    pipeline: DiffusionPipeline, max_sequence_length: int | None = None, guidance_scale: float | None = None
) -> ModelFamily:
    """Pick the family from the pipeline's components (not its class name, so subclasses work).

    ``max_sequence_length`` (T5 tokens) and ``guidance_scale`` (FLUX.1-dev's guidance embedding) apply to the flow
    families only; ``None`` keeps each family's default.
    """
    transformer = getattr(pipeline, "transformer", None)
    if getattr(pipeline, "unet", None) is None and transformer is not None:
        from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

        if isinstance(transformer, SD3Transformer2DModel) and hasattr(pipeline, "text_encoder_3"):
            return StableDiffusion3Family(pipeline, max_sequence_length)
        if isinstance(transformer, FluxTransformer2DModel) and hasattr(pipeline, "text_encoder_2"):
            return FluxFamily(pipeline, max_sequence_length, guidance_scale)
        raise ValueError(
            f"{type(pipeline).__name__} with a {type(transformer).__name__} is not supported; supported transformer "
            "pipelines: StableDiffusion3Pipeline (SD3Transformer2DModel) and FluxPipeline (FluxTransformer2DModel)"
        )
    if getattr(pipeline, "unet", None) is None:
        raise ValueError(
            f"{type(pipeline).__name__} has no `unet` or `transformer`; supported: Stable Diffusion 1.x/2.x, SDXL, "
            "SD3/SD3.5 and FLUX.1 pipelines"
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
