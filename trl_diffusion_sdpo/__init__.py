"""Preference tuning of text-to-image diffusion models: Diffusion-DPO and Diffusion-SDPO."""

from .config import DiffusionSDPOConfig
from .distributed import load_pipeline, zero3_init_disabled
from .step.safeguard import winner_preserving_lambda
from .trainer import DiffusionSDPOTrainer

__version__ = "0.1.0.dev0"

__all__ = [
    "DiffusionSDPOConfig",
    "DiffusionSDPOTrainer",
    "__version__",
    "load_pipeline",
    "winner_preserving_lambda",
    "zero3_init_disabled",
]
