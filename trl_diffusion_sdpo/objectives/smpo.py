"""SmPO-Diffusion's smoothed preference (Lu et al., arXiv 2506.02698): Diffusion-DPO with per-pair weights.

Only the objective half of SmPO lives here; its ReNoise inversion (which replaces forward noising) is a separate
stage of the training step.
"""

from __future__ import annotations

import math

import torch

from .base import (
    DenoisingErrors,
    ObjectiveOutput,
    PreferencePredictions,
    register_objective,
    require_positive,
)
from .dpo import DiffusionDPOObjective, diffusion_dpo_loss

__all__ = ["PICKSCORE_MAX", "PICKSCORE_MIN", "SmoothedPreferenceObjective", "smoothed_preference_weights"]

# SmPO's fixed, dataset-wide PickScore normalisation constants (raw cosine, no logit scale), SmPO train.py.
PICKSCORE_MIN = 0.11543526500463486
PICKSCORE_MAX = 0.28201571106910706


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
    gamma = require_positive("gamma", gamma)
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
class SmoothedPreferenceObjective(DiffusionDPOObjective):
    """SmPO: ``loss = mean_pairs(-logsigmoid(w * u))`` with ``w = gamma * (2p - 1)`` from
    :func:`smoothed_preference_weights` and ``u`` the Diffusion-DPO logit.

    The weights come from the data path (``needs_pair_weights``); calling without them is an error. The returned
    ``logits`` are the unweighted ``u`` (so implicit accuracy means what it means for DPO).

    Authors' settings (SmPO recipes): ``beta = 2000`` (SD1.5, policy and reference from an SFT UNet) and ``5000``
    (SDXL), ``gamma = 10``. SmPO's code uses the weight of the FIRST pair of a micro-batch for all its pairs
    (correct only with 1 pair per device, as their scripts run); here each pair has its own weight. SmPO was not
    combined with the safeguard by its authors; it composes with it like DPO.
    """

    name = "smpo"
    needs_pair_weights = True
    metric_names: tuple[str, ...] = ("smpo/mean_pair_weight",)

    def __call__(
        self,
        predictions: PreferencePredictions,
        errors: DenoisingErrors,
        *,
        pair_weights: torch.Tensor | None = None,
    ) -> ObjectiveOutput:
        if pair_weights is None:
            raise ValueError(
                "loss_type='smpo' needs pair_weights (gamma * (2p - 1) per pair, see smoothed_preference_weights); "
                "the dataset must provide a score for each image of a pair"
            )
        output = diffusion_dpo_loss(errors, self.beta, pair_weights)
        output.metrics["smpo/mean_pair_weight"] = pair_weights.detach().float().mean()
        return output
