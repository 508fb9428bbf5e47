"""A loss mask's weights on a residual, for the output-space safeguard's sums (``loss_mask``): a run whose data has no
loss mask never calls it, and one without the output space's rule never loads this module.
"""

from __future__ import annotations

import torch

from .base import per_pair

__all__ = ["masked_residual"]


def masked_residual(residual: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``w * residual`` with ``w = m * N / sum(m)`` per sample (``N`` its element count), or ``residual`` unchanged
    without a mask.

    The gradient of the micro-batch's mean masked error with respect to the predictions is ``2 w r / (B N)``, the
    unmasked one's ``2 r / (B N)``: the output-space safeguard's sums over ``w * r`` are then those of the masked
    errors' gradients, in the units of the unmasked ones (an all-ones mask gives ``w = 1`` exactly).
    """
    if mask is None:
        return residual
    weights = mask.float().to(residual.device).expand_as(residual)
    per_sample = weights.flatten(1).sum(dim=1).clamp(min=1e-12)
    scale = weights[0].numel() / per_sample
    return residual.float() * weights * per_pair(scale, residual)
