"""Supervised fine-tuning on the winners, the Diffusion-SDPO authors' SFT baseline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .base import ObjectiveOutput, PreferenceObjective, register_objective

if TYPE_CHECKING:
    from .base import DenoisingErrors, PreferencePredictions

__all__ = ["SFTObjective", "sft_loss"]


def sft_loss(errors: DenoisingErrors) -> ObjectiveOutput:
    """SFT: ``loss = mean_pairs(e_theta^w)``, the policy's denoising error on the winners only.

    With every sample of equal size this is the mean over all winner elements of ``(pred_w - target_w)^2``, the
    authors' form. No reference and no loser enter the loss (so there is nothing for the safeguard to scale).
    ``logits`` is the policy's own margin ``e_theta^l - e_theta^w`` (positive when the policy denoises the winner
    better), detached, for implicit accuracy only; it is ``d_theta`` without a reference and without ``-0.5 beta``.
    """
    loss = errors.policy_winner.mean()
    logits = (errors.policy_loser - errors.policy_winner).detach()
    return ObjectiveOutput(loss=loss, logits=logits)


@register_objective
@dataclass(frozen=True)
class SFTObjective(PreferenceObjective):
    """SFT on the winners (see :func:`sft_loss`); no hyperparameters, no reference, no safeguard."""

    name = "sft"
    requires_reference = False
    uses_loser = False

    def loss(self, predictions: PreferencePredictions, errors: DenoisingErrors) -> ObjectiveOutput:
        return sft_loss(errors)
