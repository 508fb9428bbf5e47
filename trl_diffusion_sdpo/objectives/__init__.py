"""Preference objectives over denoising errors, one module per objective over the shared pieces in :mod:`.base`.

``build_objective(loss_type, beta=..., ...)`` returns an object carrying its hyperparameters; the trainer calls it
once per micro-batch as ``objective(predictions, errors, pair_weights=...)``. ``OBJECTIVES`` lists the valid
``loss_type`` names.
"""

from .base import (
    DenoisingErrors,
    ObjectiveHyperparameters,
    ObjectiveOutput,
    PreferenceObjective,
    PreferencePredictions,
    build_objective,
    denoising_error,
    diffusion_dpo_logits,
    implicit_accuracy,
    registered_objectives,
)
from .dmpo import DMPOObjective, dmpo_loss
from .dpo import DiffusionDPOObjective, diffusion_dpo_loss
from .dspo import DSPOObjective, dspo_loss
from .mapo import MaPOObjective, mapo_loss, mapo_score
from .sft import SFTObjective, sft_loss
from .smpo import SmoothedPreferenceObjective, smoothed_preference_weights

# Every module above registers its objective on import, so the list is complete here.
OBJECTIVES: tuple[str, ...] = registered_objectives()


def get_objective(name: str, *, beta: float, **hyperparameters) -> PreferenceObjective:
    """Backwards-compatible alias of :func:`build_objective` (``beta`` is required)."""
    return build_objective(name, beta=beta, **hyperparameters)


__all__ = [
    "OBJECTIVES",
    "DMPOObjective",
    "DSPOObjective",
    "DenoisingErrors",
    "DiffusionDPOObjective",
    "MaPOObjective",
    "ObjectiveHyperparameters",
    "ObjectiveOutput",
    "PreferenceObjective",
    "PreferencePredictions",
    "SFTObjective",
    "SmoothedPreferenceObjective",
    "build_objective",
    "denoising_error",
    "diffusion_dpo_logits",
    "diffusion_dpo_loss",
    "dmpo_loss",
    "dspo_loss",
    "get_objective",
    "implicit_accuracy",
    "mapo_loss",
    "mapo_score",
    "sft_loss",
    "smoothed_preference_weights",
]
