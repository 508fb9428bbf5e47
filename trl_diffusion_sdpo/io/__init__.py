"""What leaves the trainer: weights in diffusers' formats (:mod:`.saving`), model cards and Hub uploads
(:mod:`.hub`)."""

from .hub import build_model_card, upload_folder_to_hub
from .saving import load_full_unet, load_lora_adapters, save_full_unet, save_lora_adapters

__all__ = [
    "build_model_card",
    "load_full_unet",
    "load_lora_adapters",
    "save_full_unet",
    "save_lora_adapters",
    "upload_folder_to_hub",
]
