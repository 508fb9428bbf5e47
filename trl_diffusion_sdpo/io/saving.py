"""Writing and reading trained weights in the formats diffusers loads.

* LoRA: ``pytorch_lora_weights.safetensors`` in diffusers' format (``unet.``-prefixed keys; ``transformer.``-prefixed
  PEFT keys for SD3 and FLUX, as diffusers' own training scripts write them), loadable with
  ``pipeline.load_lora_weights(output_dir)`` (with ``pipeline.transformer.load_lora_adapter(output_dir,
  prefix="transformer", use_safetensors=True)`` for a pipeline without a LoRA loader in diffusers, as HunyuanVideo
  1.5's).
* Full tuning: ``unet/`` (or ``transformer/``) written by the model's ``save_pretrained`` (safetensors), loadable with
  ``UNet2DConditionModel.from_pretrained(output_dir, subfolder="unet")`` (``SD3Transformer2DModel`` /
  ``FluxTransformer2DModel`` with ``subfolder="transformer"``); in the final output folder also the rest of the
  pipeline (:func:`save_pipeline_components`), so ``DiffusionPipeline.from_pretrained(output_dir)`` loads it, as
  after diffusers' full fine-tuning scripts. Its functions live in :mod:`.full_tuning`, which a full tuning loads
  when it first saves or resumes; they resolve here too.

The same files serve as the weights of a training checkpoint, so resuming reads exactly what a user would load.
"""

from __future__ import annotations

import json
import os
import struct
from typing import TYPE_CHECKING, Any

import torch
from diffusers.utils import convert_state_dict_to_diffusers
from peft.utils import get_peft_model_state_dict

from ..config._lazy import lazy_attributes
from ..config.file_modes import follow_umask
from .run_folder import LORA_WEIGHTS_NAME, TRAINING_CONFIG_NAME, TRANSFORMER_SUBFOLDER, UNET_SUBFOLDER

if TYPE_CHECKING:  # the names resolved on first use, for type checkers and IDEs only
    from .full_tuning import has_pipeline_components, load_full_denoiser, save_full_denoiser, save_pipeline_components

__all__ = [
    "LORA_WEIGHTS_NAME",
    "TRANSFORMER_SUBFOLDER",
    "UNET_SUBFOLDER",
    "TRAINING_CONFIG_NAME",
    "has_pipeline_components",
    "has_lora_adapters",
    "has_saved_weights",
    "load_full_denoiser",
    "save_full_denoiser",
    "save_lora_adapters",
    "save_pipeline_components",
    "write_training_config",
]

#: full tuning's files, in their own module: a run that tunes LoRA never loads it
_FULL_TUNING = {
    name: f"{__package__}.full_tuning"
    for name in ("load_full_denoiser", "save_full_denoiser", "save_pipeline_components", "has_pipeline_components")
}


def has_lora_adapters(denoiser: torch.nn.Module) -> bool:
    """Whether ``denoiser`` already carries PEFT adapters (a ``peft_config``)."""
    return bool(getattr(denoiser, "peft_config", None))


def lora_state_dict(
    denoiser: torch.nn.Module, state_dict: dict[str, torch.Tensor] | None = None, prefix: str = UNET_SUBFOLDER
):
    """The adapter weights of ``denoiser`` in diffusers' key format, on CPU (PEFT keys for transformers, as diffusers'
    SD3 and FLUX scripts save them; the UNet keys converted as its SD/SDXL scripts do)."""
    peft_state = get_peft_model_state_dict(denoiser, state_dict=state_dict)
    if prefix == UNET_SUBFOLDER:
        peft_state = convert_state_dict_to_diffusers(peft_state)
    return {k: v.detach().cpu().contiguous() for k, v in peft_state.items()}


def save_lora_adapters(
    denoiser: torch.nn.Module,
    output_dir: str,
    pipeline_cls: type,
    state_dict: dict[str, torch.Tensor] | None = None,
    prefix: str = UNET_SUBFOLDER,
) -> str:
    """Write the denoiser's LoRA adapters with ``pipeline_cls.save_lora_weights`` (diffusers' shared LoRA writer
    for a pipeline class without one); returns the file path.

    The adapter config (``lora_alpha`` above all) is stored in the file's metadata: without it ``load_lora_weights``
    assumes ``lora_alpha == r`` and a model trained with another alpha would load with the wrong scale. Its sets
    (``target_modules``) are written sorted: diffusers lists a set in its iteration order, which Python's string
    hashing makes differ from one process to the next, and safetensors writes the file's metadata in a hash map's
    order, which differs from one save to the next (:func:`_metadata_sorted`): without both, the same weights would
    give other bytes after a resume.
    ``prefix`` is the pipeline's name of the denoiser (``"unet"`` or ``"transformer"``).
    """
    os.makedirs(output_dir, exist_ok=True)
    layers = lora_state_dict(denoiser, state_dict, prefix)
    metadata = _sets_sorted(denoiser.peft_config["default"].to_dict())
    if not hasattr(pipeline_cls, "save_lora_weights"):
        # A pipeline diffusers has no LoRA loader for (HunyuanVideo15Pipeline in 0.42): the same file through the
        # writer every loader's save_lora_weights calls, which the denoiser's own load_lora_adapter reads back.
        from diffusers.loaders.lora_base import LoraBaseMixin

        LoraBaseMixin._save_lora_weights(output_dir, {prefix: layers}, {prefix: metadata}, safe_serialization=True)
    else:
        pipeline_cls.save_lora_weights(
            output_dir,
            safe_serialization=True,
            **{f"{prefix}_lora_layers": layers, f"{prefix}_lora_adapter_metadata": metadata},
        )
    path = os.path.join(output_dir, LORA_WEIGHTS_NAME)
    _metadata_sorted(path)
    follow_umask(path)  # safetensors writes it owner-only
    return path


def _metadata_sorted(path: str) -> None:
    """The safetensors file at ``path`` with its header's ``__metadata__`` keys in sorted order: safetensors (0.8)
    serialises them from a Rust hash map, whose order changes from one save to the next. Only the order changes, so
    the header keeps its length and is rewritten in place (padded with spaces, as safetensors pads it); where it
    would not fit, the whole file is rewritten."""
    with open(path, "rb+") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        if not header.get("__metadata__"):
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) <= length:
            f.seek(8)
            f.write(text + b" " * (length - len(text)))
            return
        data = f.read()
        padded = text + b" " * (-len(text) % 8)
        f.seek(0)
        f.write(struct.pack("<Q", len(padded)) + padded + data)
        f.truncate()


def _sets_sorted(value: Any) -> Any:
    """``value`` with every set in it (nested in dicts and lists too) a list sorted by its items' text."""
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    if isinstance(value, dict):
        return {key: _sets_sorted(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_sets_sorted(item) for item in value)
    return value


def has_saved_weights(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, LORA_WEIGHTS_NAME)) or any(
        os.path.isdir(os.path.join(directory, sub)) for sub in (UNET_SUBFOLDER, TRANSFORMER_SUBFOLDER)
    )


def write_training_config(args: Any, output_dir: str) -> str:
    """Write ``training_config.json``: ``args`` as JSON (the Hub token masked), never a pickle."""
    path = os.path.join(output_dir, TRAINING_CONFIG_NAME)
    with open(path, "w") as f:
        json.dump(json.loads(args.to_json_string()), f, indent=2, sort_keys=True)
    return path


__getattr__, __dir__ = lazy_attributes(__name__, _FULL_TUNING, globals())
