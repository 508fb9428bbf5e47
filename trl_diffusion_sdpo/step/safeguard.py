"""The Diffusion-SDPO winner-preserving safeguard (Fu et al., arXiv 2511.03317).

Diffusion-DPO can raise the denoising error of the preferred (winner) image while the preference margin grows. The
safeguard scales the gradient of the loser's error by a scalar ``lambda`` chosen so that, to first order, the
winner's error does not increase:

    <g_w, g_w - lambda * g_l> >= mu * ||g_w||^2.

The authors evaluate this in output space (treating the UNet Jacobians of the two branches as equal), with one
detached ``lambda`` per micro-batch computed from the policy's residuals ``r = prediction - target``:

    num    = sum(r_w * r_w)
    den    = sum(r_l * r_w)
    lambda = clamp((1 - mu) * num / (den + 1e-9), 0, max_lambda)   if den > 0
    lambda = max_lambda                                             otherwise

Everything here is a pure function over tensors; sums are taken in float32 whatever the input dtype, because fp16
sums of squared residuals over a whole micro-batch overflow.
"""

from __future__ import annotations

import torch

__all__ = [
    "lambda_from_sums",
    "safeguard_sums",
    "scale_gradient",
    "winner_preserving_lambda",
]

_EPS = 1e-9


def safeguard_sums(winner_residual: torch.Tensor, loser_residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(sum(r_w * r_w), sum(r_l * r_w))`` in float32, detached.

    These two scalars are all that ``lambda`` depends on; they are exposed separately so that several processes can
    all-reduce them and share one ``lambda`` for a global micro-batch.
    """
    if winner_residual.shape != loser_residual.shape:
        raise ValueError(
            f"winner and loser residuals must have the same shape, got {tuple(winner_residual.shape)} and "
            f"{tuple(loser_residual.shape)}"
        )
    r_w = winner_residual.detach().float()
    r_l = loser_residual.detach().float()
    return (r_w * r_w).sum(), (r_l * r_w).sum()


def lambda_from_sums(
    winner_sq_sum: torch.Tensor, cross_sum: torch.Tensor, mu: float, max_lambda: float = 1.0
) -> torch.Tensor:
    """``lambda = clamp((1 - mu) * num / (den + 1e-9), 0, max_lambda)`` if ``den > 0`` else ``max_lambda``.

    Args:
        winner_sq_sum: ``num = sum(r_w * r_w)``, a 0-dim tensor.
        cross_sum: ``den = sum(r_l * r_w)``, a 0-dim tensor.
        mu: the safeguard margin in [0, 1]; larger is more conservative (smaller ``lambda``).
        max_lambda: upper bound of ``lambda``; 1.0 recovers plain Diffusion-DPO when the constraint is inactive.
    """
    num = winner_sq_sum.float()
    den = cross_sum.float()
    ratio = ((1.0 - mu) * num / (den + _EPS)).clamp(min=0.0, max=max_lambda)
    return torch.where(den > 0, ratio, torch.full_like(ratio, max_lambda))


def winner_preserving_lambda(
    winner_residual: torch.Tensor, loser_residual: torch.Tensor, mu: float, max_lambda: float = 1.0
) -> torch.Tensor:
    """The Diffusion-SDPO loser-gradient scale for one micro-batch (a detached float32 0-dim tensor).

    Args:
        winner_residual: policy prediction minus target on the winner images, shape ``[B, C, H, W]``.
        loser_residual: the same on the loser images, same shape, same timesteps and noise.
        mu: safeguard margin ``mu`` (authors: 0.9 for SD1.5 DPO, 0.6 for SDXL).
        max_lambda: upper bound of ``lambda`` (authors: 1.0).

    Returns:
        ``clamp((1 - mu) * sum(r_w^2) / (sum(r_l * r_w) + 1e-9), 0, max_lambda)`` when ``sum(r_l * r_w) > 0``,
        else ``max_lambda``. Zero residuals give ``den = 0`` and hence ``max_lambda``.
    """
    num, den = safeguard_sums(winner_residual, loser_residual)
    return lambda_from_sums(num, den, mu, max_lambda)


def scale_gradient(value: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Straight-through gradient scaling: returns ``value`` unchanged, with its gradient multiplied by ``scale``.

    ``value.detach() + scale * (value - value.detach())``: the forward value is exactly ``value`` and
    ``d out / d value = scale``.
    """
    detached = value.detach()
    return detached + scale * (value - detached)
