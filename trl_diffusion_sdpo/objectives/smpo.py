"""SmPO-Diffusion's smoothed preference (Lu et al., arXiv 2506.02698): Diffusion-DPO with per-pair weights.

This is the objective half of SmPO. Its other half, the ReNoise inversion that replaces forward noising, is a noising
mode of the families (:mod:`trl_diffusion_sdpo.families.inversion`), which ``loss_type="smpo"`` turns on by default
(``noising=None``; ``noising="forward"`` trains this objective on forward-noised inputs instead).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..config.checks import Range
from .base import ObjectiveOutput, hyperparameter, register_objective
from .dpo import DiffusionDPOObjective, diffusion_dpo_loss

if TYPE_CHECKING:
    from .base import DenoisingErrors, PreferencePredictions

__all__ = ["PICKSCORE_MAX", "PICKSCORE_MIN", "SmoothedPreferenceObjective", "smoothed_preference_weights"]

# SmPO's fixed, dataset-wide PickScore normalisation constants (raw cosine, no logit scale), SmPO train.py.
PICKSCORE_MIN = 0.11543526500463486
PICKSCORE_MAX = 0.28201571106910706

_GAMMA = Range(0, low_open=True, hint="SmPO's default is 10; 0 would weight every pair 0 (no gradient).")


def smoothed_preference_weights(
    score_winner: torch.Tensor,
    score_loser: torch.Tensor,
    gamma: float = 10.0,
    score_min: float = PICKSCORE_MIN,
    score_max: float = PICKSCORE_MAX,
) -> torch.Tensor:
    """SmPO's per-pair logit weight ``gamma * (2p - 1)`` from reward-model scores of the two images.

    ``n = (s - score_min) / (score_max - score_min)`` (fixed min-max normalisation),
    ``p = sigmoid(n_w - n_l)`` (the smoothed probability that the winner is preferred), weight ``gamma * (2p - 1)``.

    The defaults are SmPO's: ``gamma = 10`` and the PickScore range of Pick-a-Pic v2. With scores inside that
    range ``p`` lies in ``[0.5, sigmoid(1) = 0.731]`` and the weight in ``[0, 4.62]``; equal scores give weight 0
    (no gradient from that pair). SmPO orders each pair by the reward model (the higher-scored image is the winner),
    so weights are ``>= 0``; a pair ordered otherwise gets a negative weight, which reverses its preference.

    Returns:
        Weights of the broadcast shape of the scores, in their floating dtype (float32 for integer scores).
    """
    gamma = _GAMMA.check("gamma", gamma)
    if not (math.isfinite(score_min) and math.isfinite(score_max) and score_max > score_min):
        raise ValueError(f"score_max must be finite and > score_min, got score_min={score_min}, score_max={score_max}")
    score_winner, score_loser = torch.as_tensor(score_winner), torch.as_tensor(score_loser)
    dtype = torch.promote_types(score_winner.dtype, score_loser.dtype)
    if not dtype.is_floating_point:
        dtype = torch.float32
    span = score_max - score_min
    normalised_winner = (score_winner.to(dtype) - score_min) / span
    normalised_loser = (score_loser.to(dtype) - score_min) / span
    p = torch.sigmoid(normalised_winner - normalised_loser)
    return gamma * (2 * p - 1)


@register_objective
@dataclass(frozen=True)
class SmoothedPreferenceObjective(DiffusionDPOObjective):
    """SmPO: ``loss = mean_pairs(-logsigmoid(w * u))`` with ``u`` the Diffusion-DPO logit and ``w = gamma * (2p - 1)``
    the pair's weight, from the data's pair scores by :func:`smoothed_preference_weights`.

    Every call needs ``pair_scores [B, 2]`` (``needs_pair_scores``): the raw (winner, loser) scores the collators hand
    on; the weights are computed from them here, in float64. The returned ``logits`` are the unweighted ``u`` (so
    implicit accuracy means what it means for DPO); ``metrics["smpo/mean_pair_weight"]`` is ``mean(w)``.

    Attributes (defaults: SmPO's):
        beta: the Diffusion-DPO logit's scale; SmPO's authors 2000 (SD1.5, policy and reference from an SFT UNet)
            and 5000 (SDXL).
        smpo_gamma: the weight's scale ``gamma``, > 0 (10).
        smpo_score_min, smpo_score_max: the normalisation ``n = (s - min) / (max - min)`` of the scores; SmPO's
            constants for PickScore's raw cosine on Pick-a-Pic v2.

    SmPO's code uses the weight of the FIRST pair of a micro-batch for all its pairs (correct only with 1 pair per
    device, as their scripts run); here each pair has its own weight. The noised inputs this objective sees come from
    the ReNoise inversion by default (the config's ``noising``), as in the paper. SmPO was not combined with the
    safeguard by its authors; it composes with it like DPO.
    """

    smpo_gamma: float = hyperparameter(_GAMMA, 10.0)
    smpo_score_min: float = hyperparameter(
        Range(hint="Set it to the smallest score your scorer gives."), PICKSCORE_MIN
    )
    smpo_score_max: float = hyperparameter(Range(hint="Set it to the largest score your scorer gives."), PICKSCORE_MAX)

    name = "smpo"
    needs_pair_scores = True
    own_metric_names = ("smpo/mean_pair_weight",)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_score_range(self.smpo_score_min, self.smpo_score_max)

    @classmethod
    def check_config(cls, config: Any) -> None:
        super().check_config(config)
        _check_score_range(config.smpo_score_min, config.smpo_score_max)

    def pair_weights(self, pair_scores: torch.Tensor) -> torch.Tensor:
        """``w = gamma * (2p - 1)`` per pair, ``[B]`` float64, from ``pair_scores [B, 2]`` = (winner, loser)."""
        if pair_scores.dim() != 2 or pair_scores.shape[1] != 2:
            raise ValueError(f"pair_scores must have shape [B, 2] (winner, loser), got {tuple(pair_scores.shape)}")
        scores = pair_scores.to(torch.float64)
        return smoothed_preference_weights(
            scores[:, 0], scores[:, 1], self.smpo_gamma, self.smpo_score_min, self.smpo_score_max
        )

    def loss(
        self, predictions: PreferencePredictions, errors: DenoisingErrors, pair_scores: torch.Tensor
    ) -> ObjectiveOutput:
        """Diffusion-DPO with each pair's logit weighted by ``gamma * (2p - 1)`` from its (winner, loser) scores."""
        weights = self.pair_weights(pair_scores)
        output = diffusion_dpo_loss(errors, self.beta, weights, max_margin=self.max_margin, sft_weight=self.sft_weight)
        output.metrics["smpo/mean_pair_weight"] = weights.detach().float().mean()
        return output


def _check_score_range(low: float, high: float) -> None:
    """The score normalisation divides by ``max - min``: it must be positive."""
    if not high > low:
        raise ValueError(f"smpo_score_max ({high}) must be larger than smpo_score_min ({low})")
