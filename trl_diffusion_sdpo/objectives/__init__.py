"""Preference objectives over denoising errors, one module per objective over the shared pieces in :mod:`.base`.

Each objective is a frozen dataclass owning its hyperparameters (fields with their rules and the papers' defaults).
The trainer builds it with ``objective_from_config(config, num_train_timesteps=...)`` and calls it once per
micro-batch as ``objective(predictions, errors, pair_scores=...)``; ``build_objective(loss_type, **fields)`` builds
one by name. ``OBJECTIVES`` lists the built-in ``loss_type`` names; a new objective is a :class:`PreferenceObjective`
subclass decorated with :func:`register_objective`, and ``registered_objectives()`` lists every registered name.
"""

from .auto_beta import AutoBeta, auto_beta
from .base import (
    DenoisingErrors,
    DiffusionDPOLogitObjective,
    ObjectiveOutput,
    PreferenceObjective,
    PreferencePredictions,
    build_objective,
    check_objective_config,
    denoising_error,
    diffusion_dpo_logits,
    hyperparameter,
    implicit_accuracy,
    masked_residual,
    objective_class,
    objective_from_config,
    register_objective,
    registered_objectives,
)
from .dmpo import DMPOObjective, dmpo_loss
from .dpo import DiffusionDPOObjective, diffusion_dpo_loss
from .dspo import DSPO_FORMS, DSPOObjective, dspo_loss
from .mapo import MaPOObjective, mapo_loss, mapo_score
from .sft import SFTObjective, sft_loss
from .smpo import SmoothedPreferenceObjective, smoothed_preference_weights

# Every module above registers its objective on import: the built-in names (one registered later is not added).
OBJECTIVES: tuple[str, ...] = registered_objectives()

__all__ = [
    "DSPO_FORMS",
    "OBJECTIVES",
    "AutoBeta",
    "DMPOObjective",
    "DSPOObjective",
    "DenoisingErrors",
    "DiffusionDPOLogitObjective",
    "DiffusionDPOObjective",
    "MaPOObjective",
    "ObjectiveOutput",
    "PreferenceObjective",
    "PreferencePredictions",
    "SFTObjective",
    "SmoothedPreferenceObjective",
    "auto_beta",
    "build_objective",
    "check_objective_config",
    "denoising_error",
    "diffusion_dpo_logits",
    "diffusion_dpo_loss",
    "dmpo_loss",
    "dspo_loss",
    "hyperparameter",
    "implicit_accuracy",
    "mapo_loss",
    "masked_residual",
    "mapo_score",
    "objective_class",
    "objective_from_config",
    "register_objective",
    "registered_objectives",
    "sft_loss",
    "smoothed_preference_weights",
]
