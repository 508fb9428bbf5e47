"""Preference tuning of text-to-image diffusion models: Diffusion-DPO and Diffusion-SDPO.

The names below are resolved on first access (see :mod:`.config._lazy`): ``import trl_diffusion_sdpo`` imports no
torch, transformers or diffusers, so the command line's ``--help`` and tools that only read the package stay fast.
Importing the package, or any of its modules, changes no setting of another library (progress bars, verbosity,
logger filters); the command line quiets its own process (:mod:`.cli.main`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config._lazy import lazy_attributes
from .config.rules import connect_objective_check

__version__ = "0.1.0.dev0"

if TYPE_CHECKING:  # the eager imports, for type checkers and IDEs only
    from .config import DiffusionSDPOConfig
    from .engines import Engine, engine_for
    from .engines.collectives import load_pipeline, zero3_init_disabled
    from .families import FlowMatchingFamily, ModelFamily, Noiser, family_for_pipeline, register_family
    from .objectives import (
        OBJECTIVES,
        PreferenceObjective,
        build_objective,
        objective_from_config,
        register_objective,
    )
    from .online import OnlineDiffusionSDPOConfig, OnlineDiffusionSDPOTrainer
    from .rewards.scorers import Scorer, register_scorer
    from .safeguards.output import winner_preserving_lambda
    from .safeguards.parameter import parameter_space_lambda, safeguarded_gradients
    from .trainer import DiffusionSDPOTrainer

# Public name -> the submodule that defines it, imported when the name is first used.
_EXPORTS = {
    "DiffusionSDPOConfig": ".config",
    "DiffusionSDPOTrainer": ".trainer",
    "OnlineDiffusionSDPOConfig": ".online",
    "OnlineDiffusionSDPOTrainer": ".online",
    # extension points: a model family and its noiser, an objective, an engine, a scorer
    "Engine": ".engines",
    "FlowMatchingFamily": ".families",
    "ModelFamily": ".families",
    "Noiser": ".families",
    "OBJECTIVES": ".objectives",
    "PreferenceObjective": ".objectives",
    "Scorer": ".rewards.scorers",
    "build_objective": ".objectives",
    "engine_for": ".engines",
    "family_for_pipeline": ".families",
    "load_pipeline": ".engines.collectives",
    "objective_from_config": ".objectives",
    "parameter_space_lambda": ".safeguards.parameter",
    "register_family": ".families",
    "register_objective": ".objectives",
    "register_scorer": ".rewards.scorers",
    "safeguarded_gradients": ".safeguards.parameter",
    "winner_preserving_lambda": ".safeguards.output",
    "zero3_init_disabled": ".engines.collectives",
}

__all__ = [
    "OBJECTIVES",
    "DiffusionSDPOConfig",
    "OnlineDiffusionSDPOConfig",
    "OnlineDiffusionSDPOTrainer",
    "DiffusionSDPOTrainer",
    "Engine",
    "FlowMatchingFamily",
    "ModelFamily",
    "Noiser",
    "PreferenceObjective",
    "Scorer",
    "__version__",
    "build_objective",
    "engine_for",
    "family_for_pipeline",
    "load_pipeline",
    "objective_from_config",
    "parameter_space_lambda",
    "register_family",
    "register_objective",
    "register_scorer",
    "safeguarded_gradients",
    "winner_preserving_lambda",
    "zero3_init_disabled",
]

__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS, globals())


def _check_objective(config: Any) -> None:
    """The chosen objective's rules for a config being made: imported when the first config is checked."""
    # lazy: `import trl_diffusion_sdpo` loads the config's light modules alone (tests/docs/test_imports.py)
    from .objectives import check_objective_config

    check_objective_config(config)


# The config (the bottom layer) asks the chosen objective to check its fields; this module runs before any module of
# the package, so every config asks it, whatever was imported first (config.rules).
connect_objective_check(_check_objective)
