"""Latents in the denoiser's space: a VAE posterior sample scaled as the pipelines scale it. Its own module, below
both :mod:`.base` (the families encode with it) and :mod:`.noising` (the noisers re-scale cached moments with it),
so that neither imports the other for it."""

from __future__ import annotations

import torch

__all__ = ["scale_latents", "unscale_latents"]


def scale_latents(sample: torch.Tensor, vae_config) -> torch.Tensor:
    """A posterior sample ``[N, C, h, w]`` in the denoiser's latent space: ``(sample - shift_factor) *
    scaling_factor`` for the scalar-normalised VAEs (SD, SDXL, SD3, FLUX, Z-Image), or per channel
    ``(sample - latents_mean[c]) / latents_std[c]`` for VAEs whose config carries those lists instead (Qwen-Image,
    Wan), as their pipelines invert it before decoding."""
    latents_mean = getattr(vae_config, "latents_mean", None)
    if latents_mean is not None and getattr(vae_config, "scaling_factor", None) is None:
        view = (1, len(latents_mean), *([1] * (sample.dim() - 2)))
        mean = torch.tensor(latents_mean, dtype=sample.dtype, device=sample.device).view(view)
        std = torch.tensor(vae_config.latents_std, dtype=sample.dtype, device=sample.device).view(view)
        return (sample - mean) / std
    shift = getattr(vae_config, "shift_factor", None)
    if shift is not None:
        sample = sample - shift
    return sample * vae_config.scaling_factor


def unscale_latents(latents: torch.Tensor, vae_config) -> torch.Tensor:
    """The inverse of :func:`scale_latents`: latents ``[N, C, ...]`` of the denoiser's latent space back to the VAE's
    (what its decoder takes, and what a posterior's mean is in), as the pipelines do before decoding."""
    latents_mean = getattr(vae_config, "latents_mean", None)
    if latents_mean is not None and getattr(vae_config, "scaling_factor", None) is None:
        view = (1, len(latents_mean), *([1] * (latents.dim() - 2)))
        mean = torch.tensor(latents_mean, dtype=latents.dtype, device=latents.device).view(view)
        std = torch.tensor(vae_config.latents_std, dtype=latents.dtype, device=latents.device).view(view)
        return latents * std + mean
    latents = latents / vae_config.scaling_factor
    shift = getattr(vae_config, "shift_factor", None)
    return latents if shift is None else latents + shift
