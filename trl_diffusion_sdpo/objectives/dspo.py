"""DSPO in the two forms the Diffusion-SDPO authors (Fu et al., arXiv 2511.03317) trained SD1.5 and SDXL with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..config.checks import Choice
from .base import (
    DiffusionDPOLogitObjective,
    ObjectiveOutput,
    diffusion_dpo_logits,
    hyperparameter,
    per_pair,
    register_objective,
)

if TYPE_CHECKING:
    from .base import DenoisingErrors, PreferencePredictions

__all__ = ["DSPO_FORMS", "SDXL_GAP_THRESHOLD", "DSPOObjective", "dspo_loss"]

# The two forms of the authors' code, named after the model each trained.
DSPO_FORMS = ("sd15", "sdxl")

# The SDXL form switches on the winner's policy-reference gap at this value (authors' constant).
SDXL_GAP_THRESHOLD = 0.1


def _upcast(tensor: torch.Tensor) -> torch.Tensor:
    """Half precision to float32; float32 and float64 unchanged."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def dspo_loss(
    predictions: PreferencePredictions, errors: DenoisingErrors, beta: float, form: str = "sd15"
) -> ObjectiveOutput:
    """DSPO as the Diffusion-SDPO authors implement it, over the WINNER half only (the loser enters through ``u``).

    With ``u`` the Diffusion-DPO logit (loser through ``errors.policy_loser``), ``r_w = pred_w - target_w`` and
    ``D_w = pred_w - ref_w`` (policy minus reference prediction on the winner):

    - ``form="sd15"``: ``loss = mean_pairs mean_CHW((r_w - beta * (1 - sigmoid(u)) * D_w)^2)``; the same ``beta``
      scales ``u`` and the coefficient (authors: 0.001, so ``sigmoid(u)`` stays near 0.5).
    - ``form="sdxl"``: with ``m = mean over all winner elements of D_w^2`` (the micro-batch mean),
      ``loss = mean_pairs (1 - sigmoid(u))^2 * mean_CHW(D_w^2)`` if ``m >= 0.1``, else
      ``loss = mean_pairs (1 - sigmoid(u))^2``; ``beta`` (authors: 5000) only scales ``u``. At step 0 (policy equal
      to reference) ``m = 0`` and the second branch is active.

    The gradient flows through ``r_w``, ``D_w`` and ``u``. Everything is computed in at least float32.
    ``logits`` is ``u``; ``metrics["dspo/winner_reference_gap"]`` is ``m``.
    """
    Choice(DSPO_FORMS).check("form", form)
    if predictions.reference_winner is None:
        raise ValueError("DSPO needs the reference model's prediction on the winner")
    logits = diffusion_dpo_logits(errors, beta)
    pred_w = _upcast(predictions.policy_winner)
    gap = pred_w - _upcast(predictions.reference_winner)  # D_w
    gap_sq = gap.pow(2).flatten(1).mean(dim=1)  # mean_CHW(D_w^2), [B]
    mean_gap_sq = gap_sq.mean()  # m
    shortfall = 1 - torch.sigmoid(logits)  # 1 - sigmoid(u), [B]
    if form == "sd15":
        residual = pred_w - _upcast(predictions.target_winner)  # r_w
        corrected = residual - beta * per_pair(shortfall, gap) * gap
        loss = corrected.pow(2).flatten(1).mean(dim=1).mean()
    else:
        # torch.where rather than a Python branch: no host sync; both branches are cheap [B] vectors.
        per_pair_loss = torch.where(mean_gap_sq >= SDXL_GAP_THRESHOLD, shortfall.pow(2) * gap_sq, shortfall.pow(2))
        loss = per_pair_loss.mean()
    return ObjectiveOutput(loss=loss, logits=logits, metrics={"dspo/winner_reference_gap": mean_gap_sq.detach()})


@register_objective
@dataclass(frozen=True)
class DSPOObjective(DiffusionDPOLogitObjective):
    """DSPO (see :func:`dspo_loss`).

    Attributes:
        beta: the Diffusion-DPO logit's scale (in the SD1.5 form also the correction's coefficient); authors 0.001
            for SD1.5 (about 10^6 times smaller than DPO's) with safeguard ``mu = 0.2``, 5000 for SDXL with
            ``mu = 0.6``.
        dspo_form: ``"sd15"`` or ``"sdxl"``, the authors' form for that model (default ``"sd15"``).
    """

    dspo_form: str = hyperparameter(Choice(DSPO_FORMS), "sd15")

    name = "dspo"
    reads_predictions = True
    metric_names = ("dspo/winner_reference_gap",)

    def loss(self, predictions: PreferencePredictions, errors: DenoisingErrors) -> ObjectiveOutput:
        return dspo_loss(predictions, errors, self.beta, self.dspo_form)
