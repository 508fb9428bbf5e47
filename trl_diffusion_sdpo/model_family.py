"""What differs between Stable Diffusion UNet families: prompt encoding, UNet conditioning and VAE precision.

* SD 1.x / 2.x: one CLIP text encoder, ``encoder_hidden_states = last_hidden_state``.
* SDXL: two text encoders; ``encoder_hidden_states`` is the concatenation of both encoders' penultimate hidden
  states, ``text_embeds`` the pooled (projected) output of the second, and ``time_ids`` the per-image
  micro-conditioning ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``.

Tokenisation happens in the data collator (CPU, possibly in dataloader workers); encoding happens on the
accelerator in the trainer. Both go through a family object so the trainer never branches on the model type.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline

__all__ = [
    "ModelFamily",
    "PromptEmbeddings",
    "PromptTokenizer",
    "StableDiffusionFamily",
    "StableDiffusionXLFamily",
    "family_for_pipeline",
    "scale_latents",
]


@dataclass
class PromptEmbeddings:
    """Text conditioning of the UNet for a batch of prompts."""

    encoder_hidden_states: torch.Tensor
    pooled: torch.Tensor | None = None  # SDXL ``text_embeds``

    def repeat(self, times: int) -> PromptEmbeddings:
        """Stack the batch ``times`` times along dim 0 (winner and loser share the prompt)."""
        pooled = None if self.pooled is None else self.pooled.repeat(times, 1)
        return PromptEmbeddings(self.encoder_hidden_states.repeat(times, 1, 1), pooled)


def scale_latents(sample: torch.Tensor, vae_config) -> torch.Tensor:
    """``(sample - shift_factor) * scaling_factor``: a posterior sample in the UNet's latent space."""
    shift = getattr(vae_config, "shift_factor", None)
    if shift is not None:
        sample = sample - shift
    return sample * vae_config.scaling_factor


class PromptTokenizer:
    """Tokenise prompts with each of a pipeline's tokenizers; small and picklable for dataloader workers."""

    def __init__(self, tokenizers: dict[str, object]) -> None:
        self.tokenizers = tokenizers  # output key -> tokenizer

    def __call__(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return {
            key: tokenizer(
                prompts,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            for key, tokenizer in self.tokenizers.items()
        }


class ModelFamily:
    """Base class: a pipeline's frozen components and how to condition its UNet."""

    name: str = "base"
    needs_time_ids: bool = False

    def __init__(self, pipeline: DiffusionPipeline) -> None:
        self.pipeline = pipeline

    @property
    def unet(self) -> torch.nn.Module:
        return self.pipeline.unet

    @property
    def vae(self) -> torch.nn.Module:
        return self.pipeline.vae

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        """Modules that never train (VAE and text encoders), by pipeline attribute name."""
        raise NotImplementedError

    def prompt_tokenizer(self) -> PromptTokenizer:
        raise NotImplementedError

    def encode_prompts(self, tokens: dict[str, torch.Tensor]) -> PromptEmbeddings:
        raise NotImplementedError

    def vae_needs_fp32(self) -> bool:
        """Whether the VAE must encode in float32 (the SDXL VAE overflows in fp16; diffusers flags it)."""
        return bool(getattr(self.vae.config, "force_upcast", False))

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """VAE latents of ``pixel_values`` in [-1, 1]: a posterior sample, scaled (see :func:`scale_latents`).

        The VAE computes in its own dtype: an enclosing autocast is switched off, so a VAE kept in float32 (see
        :meth:`vae_needs_fp32`) really encodes in float32 while the UNet runs in the mixed-precision dtype.
        """
        posterior = self._posterior(pixel_values)
        return scale_latents(posterior.sample(generator=generator), self.vae.config)

    @torch.no_grad()
    def encode_moments(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE posterior's mean and standard deviation for ``pixel_values``, unscaled, in float32."""
        posterior = self._posterior(pixel_values)
        return posterior.mean.float(), posterior.std.float()

    def _posterior(self, pixel_values: torch.Tensor):
        vae = self.vae
        with torch.autocast(device_type=vae.device.type, enabled=False):
            return vae.encode(pixel_values.to(device=vae.device, dtype=vae.dtype)).latent_dist

    def unet_conditioning(
        self, prompt_embeds: PromptEmbeddings, time_ids: torch.Tensor | None
    ) -> dict[str, object]:
        """Keyword arguments for ``unet(sample, timestep, **kwargs)``."""
        return {"encoder_hidden_states": prompt_embeds.encoder_hidden_states}


class StableDiffusionFamily(ModelFamily):
    """SD 1.x / 2.x: one CLIP text encoder, last hidden state as cross-attention context."""

    name = "stable-diffusion"

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        return {"vae": self.pipeline.vae, "text_encoder": self.pipeline.text_encoder}

    def prompt_tokenizer(self) -> PromptTokenizer:
        return PromptTokenizer({"input_ids": self.pipeline.tokenizer})

    @torch.no_grad()
    def encode_prompts(self, tokens: dict[str, torch.Tensor]) -> PromptEmbeddings:
        encoder = self.pipeline.text_encoder
        hidden = encoder(tokens["input_ids"].to(encoder.device), return_dict=True).last_hidden_state
        return PromptEmbeddings(hidden)


class StableDiffusionXLFamily(ModelFamily):
    """SDXL: two CLIP text encoders (penultimate hidden states concatenated), pooled ``text_embeds``,
    per-image ``time_ids`` micro-conditioning."""

    name = "stable-diffusion-xl"
    needs_time_ids = True

    def frozen_modules(self) -> dict[str, torch.nn.Module]:
        return {
            "vae": self.pipeline.vae,
            "text_encoder": self.pipeline.text_encoder,
            "text_encoder_2": self.pipeline.text_encoder_2,
        }

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

    def unet_conditioning(
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
