"""A loss mask (``loss_mask``) at the size of the latents the step's errors are taken on, for every family's layout
(:meth:`~.base.ModelFamily.latent_mask`): a run whose data has no loss mask never loads this module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["latent_mask"]


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
