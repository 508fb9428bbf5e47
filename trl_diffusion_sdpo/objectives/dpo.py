"""Diffusion-DPO (Wallace et al., arXiv 2311.12908)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .base import DiffusionDPOLogitObjective, ObjectiveOutput, diffusion_dpo_logits, register_objective

if TYPE_CHECKING:
    from .base import DenoisingErrors, PreferencePredictions

__all__ = ["DiffusionDPOObjective", "diffusion_dpo_loss"]


def diffusion_dpo_loss(
    errors: DenoisingErrors, beta: float, pair_weights: torch.Tensor | None = None
) -> ObjectiveOutput:
    """Diffusion-DPO: ``loss = mean_i(-logsigmoid(w_i * u_i))`` with ``w_i = 1`` unless ``pair_weights`` is given.

    ``u = -0.5 * beta * ((e_theta^w - e_theta^l) - (e_ref^w - e_ref^l))`` (:func:`.base.diffusion_dpo_logits`).
    The mean is taken AFTER the log-sigmoid (an early public script averaged ``u`` first, which was a bug).
    ``pair_weights`` (shape ``[B]``) multiplies each pair's logit, as SmPO's smoothed preferences do with
    ``gamma * (2p - 1)``; the returned ``logits`` are the unweighted ``u``.
    """
    logits = diffusion_dpo_logits(errors, beta)
    if pair_weights is None:
        weighted = logits
    else:
        if pair_weights.shape != logits.shape:
            raise ValueError(f"pair_weights must have shape {tuple(logits.shape)}, got {tuple(pair_weights.shape)}")
        weighted = logits * pair_weights.to(device=logits.device, dtype=logits.dtype)
    return ObjectiveOutput(loss=-F.logsigmoid(weighted).mean(), logits=logits)


@register_objective
@dataclass(frozen=True)
class DiffusionDPOObjective(DiffusionDPOLogitObjective):
    """Diffusion-DPO, ``loss = mean_pairs(-logsigmoid(u))`` (see :func:`diffusion_dpo_loss`).

    Authors' settings (Diffusion-SDPO recipes): ``beta = 5000`` for SD1.5 and SDXL; with the safeguard
    ``mu = 0.9`` (SD1.5) and ``0.6`` (SDXL).
    """

    name = "dpo"
    unet_scale_beta_warning = True  # SmPO inherits it: its beta scales the same logit

    def loss(self, predictions: PreferencePredictions, errors: DenoisingErrors) -> ObjectiveOutput:
        return diffusion_dpo_loss(errors, self.beta)
