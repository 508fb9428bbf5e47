"""SDXL: two text encoders; ``encoder_hidden_states`` is the concatenation of both encoders' penultimate hidden
states, ``text_embeds`` the pooled (projected) output of the second, and ``time_ids`` the per-image
micro-conditioning ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``."""

from __future__ import annotations

from typing import Any

import torch

from .base import ModelFamily, PromptEmbeddings, PromptTokenizer
from .noising import Noiser, unet_noiser
from .registry import register_family

__all__ = ["StableDiffusionXLFamily"]


@register_family("stable-diffusion-xl", pipelines=("StableDiffusionXLPipeline",))
class StableDiffusionXLFamily(ModelFamily):
    """SDXL: two CLIP text encoders (penultimate hidden states concatenated), pooled ``text_embeds``,
    per-image ``time_ids`` micro-conditioning."""

    sampled_latents_are_denoiser_latents = True

    validation_guidance_scale = 8.5  # the SDPO authors' guidance (diffusers' convention) for SD 1.5 and SDXL

    frozen_components = ("vae", "text_encoder", "text_encoder_2")
    needs_time_ids = True
    # SmPO's inversion grid for SDXL (their train.py: a 10-step DDIM inverse schedule).
    default_inversion_steps = 10
    authors_safeguard_mu = {"*": 0.6}
    safeguard_mu_source = "Diffusion-SDPO's SDXL runs (Fu et al., arXiv 2511.03317), every objective"

    @classmethod
    def matches(cls, pipeline: Any) -> bool:
        """A UNet and a second text encoder."""
        return getattr(pipeline, "unet", None) is not None and getattr(pipeline, "text_encoder_2", None) is not None

    @classmethod
    def check_pipeline(cls, pipeline: Any) -> None:
        """Refuse the refiner: its UNet takes an aesthetic score instead of the base's size conditioning."""
        is_sdxl_base = getattr(pipeline, "text_encoder", None) is not None and (
            getattr(pipeline.unet.config, "addition_embed_type", None) == "text_time"
        )
        if not is_sdxl_base:
            raise ValueError(
                f"{type(pipeline).__name__} has a second text encoder but is not an SDXL base pipeline (it needs "
                "`text_encoder`, `text_encoder_2` and a UNet with `addition_embed_type='text_time'`); the SDXL "
                "refiner's aesthetic-score conditioning is not supported"
            )

    def noiser(self, args: Any) -> Noiser:
        """DDPM forward noising, or DDIM ReNoise inversion on top of it (``noising``, see :mod:`.inversion`)."""
        return unet_noiser(self, args)

    def prompt_tokenizer(self) -> PromptTokenizer:
        return PromptTokenizer({"input_ids": self.pipeline.tokenizer, "input_ids_2": self.pipeline.tokenizer_2})

    @torch.no_grad()
    def encode_prompts(self, tokens: dict[str, torch.Tensor]) -> PromptEmbeddings:
        encoder_1 = self.pipeline.text_encoder
        encoder_2 = self.pipeline.text_encoder_2
        out_1 = encoder_1(tokens["input_ids"].to(encoder_1.device), output_hidden_states=True, return_dict=True)
        out_2 = encoder_2(tokens["input_ids_2"].to(encoder_2.device), output_hidden_states=True, return_dict=True)
        hidden = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
        # CLIPTextModelWithProjection returns the projected pooled output as ``text_embeds``.
        pooled = out_2.text_embeds if hasattr(out_2, "text_embeds") else out_2.pooler_output
        return PromptEmbeddings(hidden, pooled)

    def denoiser_conditioning(
        self, prompt_embeds: PromptEmbeddings, time_ids: torch.Tensor | None
    ) -> dict[str, object]:
        if time_ids is None:
            raise ValueError("SDXL needs per-image time_ids (orig_h, orig_w, crop_top, crop_left, target_h, target_w)")
        hidden = prompt_embeds.encoder_hidden_states
        return {
            "encoder_hidden_states": hidden,
            "added_cond_kwargs": {
                "text_embeds": prompt_embeds.pooled.to(hidden.dtype),
                # float32, not the compute dtype: bfloat16 cannot hold sizes such as 1023 or 1366 exactly, and the
                # UNet embeds time ids in float32 anyway (sinusoidal projection) before casting the embedding.
                "time_ids": time_ids.to(device=hidden.device, dtype=torch.float32),
            },
        }
