"""Preference objectives over denoising errors, one module per objective over the shared pieces in :mod:`.base`.

Each objective is a frozen dataclass owning its hyperparameters (fields with their rules and the papers' defaults).
The trainer builds it with ``objective_from_config(config, num_train_timesteps=...)`` and calls it once per
micro-batch as ``objective(predictions, errors, pair_scores=...)``; ``build_objective(loss_type, **fields)`` builds
one by name. ``OBJECTIVES`` lists the built-in ``loss_type`` names; a new objective is a :class:`PreferenceObjective`
subclass decorated with :func:`register_objective`, and ``registered_objectives()`` lists every registered name. A
built-in objective's module (named in :data:`BUILT_IN_OBJECTIVES`) is imported when the objective is chosen.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config._lazy import lazy_attributes
from .base import (
    BUILT_IN_OBJECTIVES,
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
    objective_class,
    objective_from_config,
    register_objective,
    registered_objectives,
)

if TYPE_CHECKING:  # the eager imports, for type checkers and IDEs only
    from .auto_beta import AutoBeta, auto_beta
    from .dmpo import DMPOObjective, dmpo_loss
    from .dpo import DiffusionDPOObjective, diffusion_dpo_loss
    from .dspo import DSPO_FORMS, DSPOObjective, dspo_loss
    from .mapo import MaPOObjective, mapo_loss, mapo_score
    from .masks import masked_residual
    from .sft import SFTObjective, sft_loss
    from .smpo import SmoothedPreferenceObjective, smoothed_preference_weights

# The built-in ``loss_type`` names (base.BUILT_IN_OBJECTIVES; one registered later is not added). Each objective's
# module is imported when it is chosen (objective_class) or one of its names below is first used.
OBJECTIVES: tuple[str, ...] = tuple(BUILT_IN_OBJECTIVES)

_EXPORTS = {
    "AutoBeta": ".auto_beta",
    "auto_beta": ".auto_beta",
    "DMPOObjective": ".dmpo",
    "dmpo_loss": ".dmpo",
    "DiffusionDPOObjective": ".dpo",
    "diffusion_dpo_loss": ".dpo",
    "DSPO_FORMS": ".dspo",
    "DSPOObjective": ".dspo",
    "dspo_loss": ".dspo",
    "MaPOObjective": ".mapo",
    "mapo_loss": ".mapo",
    "mapo_score": ".mapo",
    "masked_residual": ".masks",
    "SFTObjective": ".sft",
    "sft_loss": ".sft",
    "SmoothedPreferenceObjective": ".smpo",
    "smoothed_preference_weights": ".smpo",
}

__all__ = [
    "BUILT_IN_OBJECTIVES",
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

__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS, globals())
