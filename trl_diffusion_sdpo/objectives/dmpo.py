"""DMPO as combined with the Diffusion-SDPO safeguard (Fu et al., arXiv 2511.03317, authors' code)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import (
    DenoisingErrors,
    ObjectiveHyperparameters,
    ObjectiveOutput,
    PreferencePredictions,
    diffusion_dpo_logits,
    register_objective,
    reject_pair_weights,
    require_open_unit,
    require_positive,
)

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
class DMPOObjective:
    """DMPO (see :func:`dmpo_loss`).

    Authors' settings (Diffusion-SDPO recipes): ``alpha = 0.01``; ``beta = 2000`` and safeguard ``mu = 0.9``
    (SD1.5), ``beta = 6000`` and ``mu = 0.6`` (SDXL).
    """

    name = "dmpo"
    requires_reference = True
    uses_loser = True
    needs_pair_weights = False
    metric_names: tuple[str, ...] = ("dmpo/mean_p",)

    def __init__(self, beta: float, alpha: float = 0.01) -> None:
        self.beta = require_positive("beta", beta)
        self.alpha = require_open_unit("dmpo_alpha", alpha)

    @classmethod
    def from_hyperparameters(cls, hyperparameters: ObjectiveHyperparameters) -> DMPOObjective:
        return cls(beta=hyperparameters.beta, alpha=hyperparameters.dmpo_alpha)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(beta={self.beta}, alpha={self.alpha})"

    def __call__(
        self,
        predictions: PreferencePredictions,
        errors: DenoisingErrors,
        *,
        pair_weights: torch.Tensor | None = None,
    ) -> ObjectiveOutput:
        reject_pair_weights(self.name, pair_weights)
        return dmpo_loss(errors, self.beta, self.alpha)
