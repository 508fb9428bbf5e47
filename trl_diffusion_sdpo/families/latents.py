"""Latents in the denoiser's space: a VAE posterior sample scaled as the pipelines scale it. Its own module, below
both :mod:`.base` (the families encode with it) and :mod:`.noising` (the noisers re-scale cached moments with it),
so that neither imports the other for it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["latent_mask", "scale_latents", "unscale_latents"]


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


def latent_mask(mask: torch.Tensor, latent_shape: tuple[int, ...]) -> torch.Tensor:
    """A loss mask in pixels ``[N, 1, H, W]`` (weights in [0, 1]) at the size of latents ``[N, C, ..., h, w]``:
    ``[N, 1, ..., h, w]`` (ones for the dims between, so it broadcasts over a video's latent frames), float32.

    Area interpolation: each latent position gets the fraction of its ``(H/h) x (W/w)`` pixels the mask covers, so a
    one-pixel mark keeps a small weight instead of vanishing (nearest) or spreading (bilinear). Every family's step
    sees its latents in this layout: FLUX's and Qwen-Image's packed tokens are unpacked before the errors, and Wan's
    and HunyuanVideo's ``[N, C, F, h, w]`` take one mask for every frame.
    """
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"a loss mask must be [N, 1, H, W], got {tuple(mask.shape)}")
    height, width = latent_shape[-2:]
    resized = F.interpolate(mask.float(), size=(height, width), mode="area")
    return resized.view(mask.shape[0], 1, *([1] * (len(latent_shape) - 4)), height, width)
