"""Preference tuning of text-to-image diffusion models: Diffusion-DPO and Diffusion-SDPO."""

from .config import DiffusionSDPOConfig
from .distributed import load_pipeline, zero3_init_disabled
from .objectives import OBJECTIVES, build_objective
from .step.safeguard import parameter_space_lambda, safeguarded_gradients, winner_preserving_lambda
from .trainer import DiffusionSDPOTrainer

__version__ = "0.1.0.dev0"

__all__ = [
    "DiffusionSDPOConfig",
    "DiffusionSDPOTrainer",
    "OBJECTIVES",
    "__version__",
    "build_objective",
    "load_pipeline",
    "parameter_space_lambda",
    "safeguarded_gradients",
    "winner_preserving_lambda",
    "zero3_init_disabled",
]
