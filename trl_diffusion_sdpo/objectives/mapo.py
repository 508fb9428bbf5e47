"""MaPO, margin-aware preference optimisation without a reference model (Hong et al., 2024; code: mapo-t2i/mapo)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..config.checks import Range
from .base import ObjectiveOutput, PreferenceObjective, hyperparameter, register_objective

if TYPE_CHECKING:
    from .base import DenoisingErrors, PreferencePredictions

__all__ = ["MaPOObjective", "mapo_loss", "mapo_score"]

# Below this |g*e| the score uses its Taylor series: x / expm1(x) is 0/0 at x = 0, its autograd derivative there is
# NaN, and near 0 that derivative loses digits to cancellation. The first omitted term, x^6 / 30240, is below 4e-17.
_SERIES_BELOW = 1e-2


def mapo_score(error: torch.Tensor, snr_value: float = 0.5) -> torch.Tensor:
    """MaPO's score of a denoising error, ``f(e) = g*e / (exp(g*e) - 1)`` with ``g = snr_value``.

    ``f(0) = 1`` (the limit) and ``f`` decreases in ``e``; ``expm1`` keeps the denominator accurate for small
    ``g*e``, and for ``|g*e| < 0.01`` the series ``1 - x/2 + x^2/12 - x^4/720`` (``x = g*e``) is used, so both
    ``f`` and its gradient (``-g/2`` at ``e = 0``) are exact to rounding and finite there.
    """
    x = snr_value * error
    small = x.abs() < _SERIES_BELOW
    safe_x = torch.where(small, torch.ones_like(x), x)  # keeps the unused branch (and its gradient) finite
    exact = safe_x / torch.expm1(safe_x)
    x_sq = x.pow(2)
    series = 1 - x / 2 + x_sq / 12 - x_sq.pow(2) / 720
    return torch.where(small, series, exact)


def mapo_loss(errors: DenoisingErrors, beta: float, snr_value: float, num_train_timesteps: int) -> ObjectiveOutput:
    """MaPO: ``loss = mean_pairs(e_theta^w) - beta * mean_pairs(logsigmoid(T * (f(e_theta^w) - f(e_theta^l))))``.

    ``f`` is :func:`mapo_score` with ``g = snr_value``, ``T = num_train_timesteps``, ``beta`` is MaPO's
    ``beta_mapo``. Policy errors only: no reference. ``logits`` is the margin ``T * (f(e^w) - f(e^l))``, positive
    when the winner has the smaller error. Metrics as the authors log them: ``mapo/win_score = mean f(e^w)``,
    ``mapo/lose_score = mean f(e^l)``, ``mapo/ratio_loss = -beta * mean logsigmoid(margin)``.
    """
    win_score = mapo_score(errors.policy_winner, snr_value)
    lose_score = mapo_score(errors.policy_loser, snr_value)
    logits = num_train_timesteps * (win_score - lose_score)
    ratio_loss = -beta * F.logsigmoid(logits).mean()
    loss = errors.policy_winner.mean() + ratio_loss
    metrics = {
        "mapo/win_score": win_score.detach().mean(),
        "mapo/lose_score": lose_score.detach().mean(),
        "mapo/ratio_loss": ratio_loss.detach(),
    }
    return ObjectiveOutput(loss=loss, logits=logits, metrics=metrics)


@register_objective
@dataclass(frozen=True)
class MaPOObjective(PreferenceObjective):
    """MaPO (see :func:`mapo_loss`); reference-free.

    Attributes (defaults: the MaPO authors' SDXL settings):
        mapo_beta: weight of the odds-ratio term, > 0 (0.1).
        mapo_snr_value: ``g`` in ``f(e) = g*e / (exp(g*e) - 1)``, > 0 (0.5).
        num_train_timesteps: ``T`` multiplying the margin, the scheduler's ``num_train_timesteps`` (1000); not a
            config field: :func:`~.base.objective_from_config` takes it from the scheduler.

    MaPO was not trained with the Diffusion-SDPO safeguard by either group of authors (no published ``mu``); it
    composes with it, since the loser enters only through its error.
    """

    mapo_beta: float = hyperparameter(Range(0, low_open=True, hint="MaPO's authors use 0.1."), 0.1)
    mapo_snr_value: float = hyperparameter(Range(0, low_open=True, hint="MaPO's authors use 0.5."), 0.5)
    num_train_timesteps: int = hyperparameter(Range(1, integer=True), 1000)

    name = "mapo"
    requires_reference = False
    # See docs/sd3.md, "Objectives".
    not_for_flow_matching = (
        "MaPO's margin T * (f(e_w) - f(e_l)), f(e) = g e / (exp(g e) - 1), multiplies by the DDPM timestep count T "
        "and uses an epsilon-space constant g; velocity errors are (1 - s)^-2 times the epsilon errors of the same "
        "prediction (unbounded as s -> 1), so f saturates at high noise and neither constant has a flow counterpart"
    )
    metric_names = ("mapo/win_score", "mapo/lose_score", "mapo/ratio_loss")

    def loss(self, predictions: PreferencePredictions, errors: DenoisingErrors) -> ObjectiveOutput:
        return mapo_loss(errors, self.mapo_beta, self.mapo_snr_value, self.num_train_timesteps)
