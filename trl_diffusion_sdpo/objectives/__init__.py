"""Preference objectives over denoising errors, one module per objective (see :mod:`.base` for the notation)."""

from .base import (
    OBJECTIVES,
    DenoisingErrors,
    DiffusionDPOObjective,
    ObjectiveOutput,
    PreferenceObjective,
    PreferencePredictions,
    build_objective,
    denoising_error,
    diffusion_dpo_logits,
    diffusion_dpo_loss,
    get_objective,
    implicit_accuracy,
)

__all__ = [
    "OBJECTIVES",
    "DenoisingErrors",
    "DiffusionDPOObjective",
    "ObjectiveOutput",
    "PreferenceObjective",
    "PreferencePredictions",
    "build_objective",
    "denoising_error",
    "diffusion_dpo_logits",
    "diffusion_dpo_loss",
    "get_objective",
    "implicit_accuracy",
]
