"""The interface every model family implements: frozen components, prompt encoding, the denoiser and its call.

Tokenisation happens in the data collator (CPU, possibly in dataloader workers); encoding happens on the
accelerator in the trainer. Both go through a family object so the trainer never branches on the model type.
One module per family beside this one (:mod:`.sd`, :mod:`.sdxl`, :mod:`.sd3`, :mod:`.flux`);
:func:`~.family_for_pipeline` picks one.

What a family defines:

* ``denoiser_name``: the pipeline attribute of the trained network (``"unet"`` or ``"transformer"``); it also names
  the LoRA key prefix and the full-weights subfolder the pipeline's loaders expect.
* ``flow_matching``: ``False`` for DDPM-style UNets (noised with the scheduler's ``add_noise``, target from its
  ``prediction_type``), ``True`` for rectified-flow transformers (``x_s = (1 - s) x0 + s eps``, target
  ``eps - x0``; see :mod:`trl_diffusion_sdpo.step.flow`).
* :meth:`frozen_modules`, :meth:`prompt_tokenizer`, :meth:`encode_prompts`: the text side.
* :meth:`unet_conditioning` and :meth:`call_denoiser`: how one prediction is made, in the latent layout
  ``[N, C, h, w]`` whatever the network's own input layout (FLUX packs 2x2 patches inside the call).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline

__all__ = ["ModelFamily", "PromptEmbeddings", "PromptTokenizer", "scale_latents"]


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
    """Tokenise prompts with each of a pipeline's tokenizers; small and picklable for dataloader workers.

    Each tokenizer pads and truncates to its ``model_max_length`` unless ``max_lengths`` names another length for its
    key (T5's sequence length is a training choice: 77 to 512 tokens).
    """

    def __init__(self, tokenizers: dict[str, object], max_lengths: dict[str, int] | None = None) -> None:
        self.tokenizers = tokenizers  # output key -> tokenizer
        self.max_lengths = dict(max_lengths or {})

    def __call__(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        return {
            key: tokenizer(
                prompts,
                padding="max_length",
                max_length=self.max_lengths.get(key, tokenizer.model_max_length),
                truncation=True,
                return_tensors="pt",
            ).input_ids
            for key, tokenizer in self.tokenizers.items()
        }


class ModelFamily:
    """Base class: a pipeline's frozen components, its trained denoiser and how to condition and call it."""

    name: str = "base"
    needs_time_ids: bool = False
    denoiser_name: str = "unet"
    flow_matching: bool = False
    # LoRA targets when the user names none: the attention projections of the denoiser's blocks.
    lora_target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")

    def __init__(self, pipeline: DiffusionPipeline) -> None:
        self.pipeline = pipeline

    @property
    def denoiser(self) -> torch.nn.Module:
        """The trained network: the pipeline's UNet or transformer."""
        return getattr(self.pipeline, self.denoiser_name)

    @property
    def unet(self) -> torch.nn.Module:
        """The denoiser, under its historical name (a transformer for the flow families)."""
        return self.denoiser

    def call_denoiser(
        self, model: torch.nn.Module, sample: torch.Tensor, timestep: torch.Tensor, conditioning: dict[str, object]
    ) -> torch.Tensor:
        """One prediction of ``model`` (the policy, possibly DDP-wrapped, or the reference) on ``sample [N, C, h, w]``
        at ``timestep [N]``, with ``conditioning`` from :meth:`unet_conditioning`; returns ``[N, C, h, w]``."""
        return model(sample, timestep, **conditioning, return_dict=False)[0]

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

    def unet_conditioning(self, prompt_embeds: PromptEmbeddings, time_ids: torch.Tensor | None) -> dict[str, object]:
        """Keyword arguments for ``unet(sample, timestep, **kwargs)``."""
        return {"encoder_hidden_states": prompt_embeds.encoder_hidden_states}
