"""DMPO as combined with the Diffusion-SDPO safeguard (Fu et al., arXiv 2511.03317, authors' code)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..config.checks import Range
from .base import DiffusionDPOLogitObjective, ObjectiveOutput, diffusion_dpo_logits, hyperparameter, register_objective

if TYPE_CHECKING:
    from .base import DenoisingErrors, PreferencePredictions

__all__ = ["DMPOObjective", "dmpo_loss"]

_Q_CLAMP = 1e-6  # the authors clamp q to [1e-6, 1 - 1e-6]


def dmpo_loss(errors: DenoisingErrors, beta: float, alpha: float) -> ObjectiveOutput:
    """DMPO: ``loss = mean_pairs KL(Bernoulli(p) || Bernoulli(q))`` with ``p = sigmoid(u)``, ``q = 1 - alpha``.

    ``KL = p * (log p - log q) + (1 - p) * (log(1 - p) - log(1 - q))``, computed stably from the logit as the
    authors do: ``log p = -softplus(-u)``, ``log(1 - p) = -softplus(u)``; ``q`` is clamped to ``[1e-6, 1 - 1e-6]``.
    ``d loss / d u = p (1 - p) (u - logit(q))`` (per pair, before the mean), so the loss is minimised at
    ``u* = log((1 - alpha) / alpha)`` (4.595 for ``alpha = 0.01``) and pushes ``u`` back down past it, unlike
    DPO which always pushes ``u`` up. ``logits`` is ``u``; ``metrics["dmpo/mean_p"]`` is ``mean(p)``.
    """
    logits = diffusion_dpo_logits(errors, beta)
    q = min(max(1.0 - alpha, _Q_CLAMP), 1.0 - _Q_CLAMP)
    log_p = -F.softplus(-logits)
    log_not_p = -F.softplus(logits)
    p = torch.sigmoid(logits)
    kl = p * (log_p - math.log(q)) + (1 - p) * (log_not_p - math.log1p(-q))
    return ObjectiveOutput(loss=kl.mean(), logits=logits, metrics={"dmpo/mean_p": p.detach().mean()})


@register_objective
@dataclass(frozen=True)
class DMPOObjective(DiffusionDPOLogitObjective):
    """DMPO (see :func:`dmpo_loss`).

    Attributes:
        beta: the Diffusion-DPO logit's scale; authors 2000 (SD1.5) and 6000 (SDXL), with safeguard ``mu = 0.9``
            (SD1.5) and ``0.6`` (SDXL).
        dmpo_alpha: the target ``q = 1 - alpha``, in (0, 1); authors 0.01.
    """

    dmpo_alpha: float = hyperparameter(
        Range(0, 1, low_open=True, high_open=True, hint="DMPO's target is q = 1 - alpha (authors: 0.01)."), 0.01
    )

    name = "dmpo"
    unet_scale_beta_warning = True
    metric_names = ("dmpo/mean_p",)

    def loss(self, predictions: PreferencePredictions, errors: DenoisingErrors) -> ObjectiveOutput:
        return dmpo_loss(errors, self.beta, self.dmpo_alpha)
