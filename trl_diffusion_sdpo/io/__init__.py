"""What leaves the trainer: weights in diffusers' formats (:mod:`.saving`), model cards and Hub uploads
(:mod:`.hub`), atomic checkpoints (:mod:`.checkpoints`), all of it done for the trainer by one object,
``trainer.files`` (:mod:`.run_files`), and the model's config as trackers read it (:mod:`.trackers`)."""

from .hub import build_model_card, create_hub_repo, push_checkpoint, upload_folder_to_hub
from .saving import (
    has_lora_adapters,
    load_full_denoiser,
    load_lora_adapters,
    save_full_denoiser,
    save_lora_adapters,
    save_pipeline_components,
    write_training_config,
)
from .trackers import make_config_trackable

__all__ = [
    "build_model_card",
    "create_hub_repo",
    "has_lora_adapters",
    "load_full_denoiser",
    "load_lora_adapters",
    "make_config_trackable",
    "push_checkpoint",
    "save_full_denoiser",
    "save_lora_adapters",
    "save_pipeline_components",
    "upload_folder_to_hub",
    "write_training_config",
]
