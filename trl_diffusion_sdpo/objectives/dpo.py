"""Diffusion-DPO (Wallace et al., arXiv 2311.12908)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from ..config.checks import Range
from .base import (
    DiffusionDPOLogitObjective,
    ObjectiveOutput,
    diffusion_dpo_logits,
    hyperparameter,
    register_objective,
)

if TYPE_CHECKING:
    from .base import DenoisingErrors, PreferencePredictions

__all__ = ["DiffusionDPOObjective", "diffusion_dpo_loss"]


def diffusion_dpo_loss(
    errors: DenoisingErrors,
    beta: float | torch.Tensor,
    pair_weights: torch.Tensor | None = None,
    *,
    max_margin: float | None = None,
    sft_weight: float = 0.0,
) -> ObjectiveOutput:
    """Diffusion-DPO with its two guards::

        loss = mean_i(-logsigmoid(min(w_i * u_i, max_margin))) + sft_weight * mean_i(e_theta^w_i)

    with ``w_i = 1`` unless ``pair_weights`` is given, ``min(., max_margin)`` only when ``max_margin`` is set.

    ``u = -0.5 * beta * ((e_theta^w - e_theta^l) - (e_ref^w - e_ref^l))`` (:func:`.base.diffusion_dpo_logits`;
    ``beta`` may be a 0-dim tensor, the auto-beta's). The mean is taken AFTER the log-sigmoid (an early public script
    averaged ``u`` first, which was a bug). ``pair_weights`` (shape ``[B]``) multiplies each pair's logit, as SmPO's
    smoothed preferences do with ``gamma * (2p - 1)``; the returned ``logits`` are the unweighted ``u``.

    ``max_margin`` caps the logit before the log-sigmoid: a pair whose margin is past the cap has a constant loss and
    stops pushing (zero gradient), so an already-won pair cannot keep widening its margin by degrading both images.
    ``sft_weight`` mixes in the winner's plain denoising error (an SFT anchor on the preferred images). Metrics:
    ``guard/capped_fraction`` (pairs at the cap) and ``guard/sft_loss`` (``mean_i(e_theta^w_i)``) when the guard is on.
    """
    logits = diffusion_dpo_logits(errors, beta)
    if pair_weights is None:
        weighted = logits
    else:
        if pair_weights.shape != logits.shape:
            raise ValueError(f"pair_weights must have shape {tuple(logits.shape)}, got {tuple(pair_weights.shape)}")
        weighted = logits * pair_weights.to(device=logits.device, dtype=logits.dtype)
    metrics: dict[str, torch.Tensor] = {}
    if max_margin is not None:
        metrics["guard/capped_fraction"] = (weighted.detach() >= max_margin).float().mean()
        weighted = weighted.clamp(max=max_margin)
    loss = -F.logsigmoid(weighted).mean()
    if sft_weight:
        sft = errors.policy_winner.mean()
        metrics["guard/sft_loss"] = sft.detach()
        loss = loss + sft_weight * sft
    return ObjectiveOutput(loss=loss, logits=logits, metrics=metrics)


@register_objective
@dataclass(frozen=True)
class DiffusionDPOObjective(DiffusionDPOLogitObjective):
    """Diffusion-DPO, ``loss = mean_pairs(-logsigmoid(u))`` (see :func:`diffusion_dpo_loss`), with the optional guards
    ``max_margin`` and ``sft_weight`` of :func:`diffusion_dpo_loss`.

    Authors' settings (Diffusion-SDPO recipes): ``beta = 5000`` for SD1.5 and SDXL; with the safeguard
    ``mu = 0.9`` (SD1.5) and ``0.6`` (SDXL).

    Attributes:
        max_margin: the cap on the logit ``u`` before the log-sigmoid (``None``: no cap); > 0.
        sft_weight: the weight of the winner's plain denoising error added to the loss; >= 0 (0: off).
    """

    max_margin: float | None = hyperparameter(
        Range(0, low_open=True, optional=True, hint="None turns the cap off; a logit of 5 is a 0.993 win chance."),
        None,
    )
    sft_weight: float = hyperparameter(Range(0, hint="0 turns the SFT anchor off."), 0.0)

    name = "dpo"
    unet_scale_beta_warning = True  # SmPO inherits it: its beta scales the same logit
    #: the auto-beta (``auto_beta``) may rescale ``beta``: the logit is linear in it
    beta_scales_logit: ClassVar[bool] = True
    #: the metrics this objective records besides the guards'
    own_metric_names: ClassVar[tuple[str, ...]] = ()

    @property
    def metric_names(self) -> tuple[str, ...]:  # type: ignore[override]  # the guards' metrics when they are on
        guards = ("guard/capped_fraction",) if self.max_margin is not None else ()
        return (*self.own_metric_names, *guards, *(("guard/sft_loss",) if self.sft_weight else ()))

    def loss(self, predictions: PreferencePredictions, errors: DenoisingErrors) -> ObjectiveOutput:
        return diffusion_dpo_loss(errors, self.beta, max_margin=self.max_margin, sft_weight=self.sft_weight)
