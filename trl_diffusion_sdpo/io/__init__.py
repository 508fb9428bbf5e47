"""What leaves the trainer: weights in diffusers' formats (:mod:`.saving`), model cards and Hub uploads
(:mod:`.hub`), atomic checkpoints (:mod:`.checkpoints`), all of it done for the trainer by one object,
``trainer.files`` (:mod:`.run_files`), the model's config as trackers read it (:mod:`.trackers`), the start
summary (:mod:`.run_summary`) and whether the output is a terminal (:mod:`.console`).

The names resolve on first use, so the command line's light modules (:mod:`.console`) import without diffusers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config._lazy import lazy_attributes

if TYPE_CHECKING:
    from .checkpoints import load_lora_adapters
    from .hub import CardMethod, RunHub, build_model_card, create_hub_repo, upload_folder_to_hub
    from .resume_check import check_resume_config, learning_rate_factor, read_run_identity, write_run_identity
    from .saving import (
        has_lora_adapters,
        load_full_denoiser,
        save_full_denoiser,
        save_lora_adapters,
        save_pipeline_components,
        write_training_config,
    )
    from .trackers import TrackerCallback

_EXPORTS = {
    "CardMethod": ".hub",
    "RunHub": ".hub",
    "build_model_card": ".hub",
    "create_hub_repo": ".hub",
    "upload_folder_to_hub": ".hub",
    "has_lora_adapters": ".saving",
    "load_full_denoiser": ".saving",
    "load_lora_adapters": ".checkpoints",
    "save_full_denoiser": ".saving",
    "save_lora_adapters": ".saving",
    "save_pipeline_components": ".saving",
    "write_training_config": ".saving",
    "TrackerCallback": ".trackers",
    "check_resume_config": ".resume_check",
    "learning_rate_factor": ".resume_check",
    "read_run_identity": ".resume_check",
    "write_run_identity": ".resume_check",
}

__all__ = [
    "check_resume_config",
    "learning_rate_factor",
    "read_run_identity",
    "write_run_identity",
    "CardMethod",
    "RunHub",
    "build_model_card",
    "create_hub_repo",
    "has_lora_adapters",
    "load_full_denoiser",
    "load_lora_adapters",
    "TrackerCallback",
    "save_full_denoiser",
    "save_lora_adapters",
    "save_pipeline_components",
    "upload_folder_to_hub",
    "write_training_config",
]

__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS, globals())
