"""SD 1.x / 2.x: one CLIP text encoder, ``encoder_hidden_states = last_hidden_state``, DDPM noising (epsilon or
v-prediction, from the scheduler's ``prediction_type``)."""

from __future__ import annotations

from typing import Any

import torch

from .base import ModelFamily, PromptEmbeddings, PromptTokenizer
from .noising import Noiser, unet_noiser
from .registry import register_family

__all__ = ["StableDiffusionFamily"]


@register_family("stable-diffusion", pipelines=("StableDiffusionPipeline",))
class StableDiffusionFamily(ModelFamily):
    """SD 1.x / 2.x: one CLIP text encoder, last hidden state as cross-attention context."""

    sampled_latents_are_denoiser_latents = True

    validation_guidance_scale = 8.5  # the SDPO authors' guidance (diffusers' convention) for SD 1.5 and SDXL
    # SmPO's inversion grid for SD1.5 (their train.py: a 5-step DDIM inverse schedule).
    default_inversion_steps = 5
    authors_safeguard_mu = {"dpo": 0.9, "dmpo": 0.9, "dspo": 0.2}
    safeguard_mu_source = (
        "Diffusion-SDPO's SD1.5 runs (Fu et al., arXiv 2511.03317): 0.9 with Diffusion-DPO and DMPO, 0.2 with DSPO"
    )

    @classmethod
    def matches(cls, pipeline: Any) -> bool:
        """A UNet and no second text encoder (which would make it SDXL)."""
        return getattr(pipeline, "unet", None) is not None and getattr(pipeline, "text_encoder_2", None) is None

    @classmethod
    def check_pipeline(cls, pipeline: Any) -> None:
        if getattr(pipeline, "text_encoder", None) is None or getattr(pipeline, "tokenizer", None) is None:
            raise ValueError(f"{type(pipeline).__name__} needs a `text_encoder` and a `tokenizer`")

    def noiser(self, args: Any) -> Noiser:
        """DDPM forward noising, or DDIM ReNoise inversion on top of it (``noising``, see :mod:`.inversion`)."""
        return unet_noiser(self, args)

    def prompt_tokenizer(self) -> PromptTokenizer:
        return PromptTokenizer({"input_ids": self.pipeline.tokenizer})

    @torch.no_grad()
    def encode_prompts(self, tokens: dict[str, torch.Tensor]) -> PromptEmbeddings:
        encoder = self.pipeline.text_encoder
        hidden = encoder(tokens["input_ids"].to(encoder.device), return_dict=True).last_hidden_state
        return PromptEmbeddings(hidden)
