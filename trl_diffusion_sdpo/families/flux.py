"""FLUX.1 (dev and schnell): a double/single-stream transformer conditioned on T5 and CLIP-L, trained by rectified
flow, with a guidance embedding on dev.

Conditioning, as ``FluxPipeline.encode_prompt`` builds it: T5's last hidden state (``max_sequence_length`` tokens,
512 in the pipeline) as the sequence, CLIP-L's ``pooler_output`` as the pooled projection, ``txt_ids`` zeros
``[L, 3]``. The latents ``[N, C, h, w]`` are packed into ``(h/2)(w/2)`` tokens of ``4C`` features with positional
``img_ids``, and the prediction is unpacked again, so the rest of the step sees the latent layout. The transformer
takes the timestep as ``s = t / 1000`` and, with ``guidance_embeds`` (FLUX.1-dev), a guidance value: the same
``guidance_scale`` for the policy and the reference (diffusers' FLUX script trains with 3.5).
"""

from __future__ import annotations

import torch

from .base import PromptEmbeddings, PromptTokenizer
from .flow import FlowMatchingFamily
from .registry import pipeline_is, register_family

__all__ = ["FluxFamily"]


@register_family("flux", pipelines=("FluxPipeline",))
class FluxFamily(FlowMatchingFamily):
    """FLUX.1 (``FluxPipeline`` with a ``FluxTransformer2DModel``)."""

    transformer_class = "FluxTransformer2DModel"
    required_components = ("text_encoder_2",)
    frozen_components = ("vae", "text_encoder", "text_encoder_2")
    # The flow base's logit-normal(0, 1) levels with the resolution-dependent shift FLUX samples with (SimpleTuner's
    # flow defaults with auto-shift); diffusers' FLUX LoRA script draws uniform levels without shift
    # (flow_weighting_scheme="none", flow_shift="none").
    default_flow_shift = "resolution"
    default_guidance_scale = 3.5
    default_learning_rate = 1e-4
    learning_rate_source = "diffusers' FLUX LoRA script (train_dreambooth_lora_flux.py)"

    @classmethod
    def matches(cls, pipeline: object) -> bool:
        """A FLUX transformer with both text encoders, in a text-to-image pipeline: FLUX.1 Kontext's pipeline has
        the same components and is :class:`~.flux_kontext.FluxKontextFamily`'s."""
        return super().matches(pipeline) and not pipeline_is(pipeline, "FluxKontextPipeline")

    def prompt_tokenizer(self) -> PromptTokenizer:
        return PromptTokenizer(
            {"input_ids": self.pipeline.tokenizer, "input_ids_2": self.pipeline.tokenizer_2},
            {"input_ids_2": self.max_sequence_length},
        )

    @torch.no_grad()
    def encode_prompts(self, tokens: dict[str, torch.Tensor]) -> PromptEmbeddings:
        clip, t5 = self.pipeline.text_encoder, self.pipeline.text_encoder_2
        pooled = clip(tokens["input_ids"].to(clip.device), return_dict=True).pooler_output
        hidden = t5(tokens["input_ids_2"].to(t5.device), return_dict=True).last_hidden_state
        return PromptEmbeddings(hidden, pooled)

    def denoiser_conditioning(
        self, prompt_embeds: PromptEmbeddings, time_ids: torch.Tensor | None
    ) -> dict[str, object]:
        """The flow base's sequence and pooled projection, and ``txt_ids`` zeros ``[L, 3]`` (text positions)."""
        conditioning = super().denoiser_conditioning(prompt_embeds, time_ids)
        hidden = prompt_embeds.encoder_hidden_states
        conditioning["txt_ids"] = torch.zeros(hidden.shape[1], 3, device=hidden.device, dtype=hidden.dtype)
        return conditioning

    def call_denoiser(
        self, model: torch.nn.Module, sample: torch.Tensor, timestep: torch.Tensor, conditioning: dict[str, object]
    ) -> torch.Tensor:
        from diffusers import FluxPipeline  # the pipeline module is slow to import: only when a FLUX model runs

        n, channels, height, width = sample.shape
        packed = FluxPipeline._pack_latents(sample, n, channels, height, width)
        img_ids = FluxPipeline._prepare_latent_image_ids(n, height // 2, width // 2, sample.device, sample.dtype)
        guidance = self.guidance(n, sample.device)
        out = model(
            hidden_states=packed,
            timestep=timestep / 1000,
            guidance=guidance,
            img_ids=img_ids,
            **conditioning,
            return_dict=False,
        )[0]
        # [N, (h/2)(w/2), 4C] back to [N, C, h, w] (the inverse of _pack_latents)
        out = out.view(n, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(n, channels, height, width)
