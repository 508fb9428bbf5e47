"""Writing and reading trained weights in the formats diffusers loads.

* LoRA: ``pytorch_lora_weights.safetensors`` in diffusers' format (``unet.``-prefixed keys), loadable with
  ``pipeline.load_lora_weights(output_dir)``.
* Full tuning: ``unet/`` written by ``UNet2DConditionModel.save_pretrained`` (safetensors), loadable with
  ``UNet2DConditionModel.from_pretrained(output_dir, subfolder="unet")``; in the final output folder also the rest
  of the pipeline (:func:`save_pipeline_components`), so ``DiffusionPipeline.from_pretrained(output_dir)`` loads it,
  as after diffusers' full fine-tuning scripts.

The same files serve as the weights of a training checkpoint, so resuming reads exactly what a user would load.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import torch
from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from huggingface_hub import save_torch_state_dict
from peft import set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

__all__ = [
    "LORA_WEIGHTS_NAME",
    "UNET_SUBFOLDER",
    "TRAINING_CONFIG_NAME",
    "copy_saved_model",
    "has_pipeline_components",
    "has_saved_weights",
    "load_full_unet",
    "load_lora_adapters",
    "save_full_unet",
    "save_lora_adapters",
    "save_pipeline_components",
    "unet_has_lora",
    "write_training_config",
]

LORA_WEIGHTS_NAME = LORA_WEIGHT_NAME_SAFE
UNET_SUBFOLDER = "unet"
TRAINING_CONFIG_NAME = "training_config.json"
PIPELINE_INDEX_NAME = "model_index.json"
# diffusion_pytorch_model.safetensors, or -00001-of-0000N shards with diffusion_pytorch_model.safetensors.index.json
_DIFFUSERS_WEIGHTS_PATTERN = "diffusion_pytorch_model{suffix}.safetensors"


def unet_has_lora(unet: torch.nn.Module) -> bool:
    return bool(getattr(unet, "peft_config", None))


def lora_state_dict(unet: torch.nn.Module, state_dict: dict[str, torch.Tensor] | None = None):
    """The adapter weights of ``unet`` in diffusers' key format, on CPU."""
    peft_state = get_peft_model_state_dict(unet, state_dict=state_dict)
    return {k: v.detach().cpu().contiguous() for k, v in convert_state_dict_to_diffusers(peft_state).items()}


def save_lora_adapters(
    unet: torch.nn.Module,
    output_dir: str,
    pipeline_cls: type,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> str:
    """Write the UNet's LoRA adapters with ``pipeline_cls.save_lora_weights``; returns the file path.

    The adapter config (``lora_alpha`` above all) is stored in the file's metadata: without it ``load_lora_weights``
    assumes ``lora_alpha == r`` and a model trained with another alpha would load with the wrong scale.
    """
    os.makedirs(output_dir, exist_ok=True)
    pipeline_cls.save_lora_weights(
        output_dir,
        unet_lora_layers=lora_state_dict(unet, state_dict),
        safe_serialization=True,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
    )
    return os.path.join(output_dir, LORA_WEIGHTS_NAME)


def load_lora_adapters(unet: torch.nn.Module, directory: str, adapter_name: str = "default") -> None:
    """Load adapters saved by :func:`save_lora_adapters` into a UNet that already carries the same adapter config."""
    state = load_file(os.path.join(directory, LORA_WEIGHTS_NAME))
    unet_state = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(unet_state), adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"LoRA weights in {directory} do not match the model's adapters: {unexpected[:5]}")


def save_full_unet(unet: torch.nn.Module, output_dir: str, state_dict: dict[str, torch.Tensor] | None = None) -> str:
    """Write ``output_dir/unet`` as ``save_pretrained`` does (config plus safetensors); returns that folder.

    ``state_dict`` (for example weights gathered from ZeRO-3 shards, where the module itself holds only its shard)
    is written in place of the module's own, with diffusers' file names and shard index.
    """
    folder = os.path.join(output_dir, UNET_SUBFOLDER)
    if state_dict is None:
        unet.save_pretrained(folder, safe_serialization=True)
        return folder
    os.makedirs(folder, exist_ok=True)
    unet.save_config(folder)
    save_torch_state_dict(
        {k: v.detach().cpu().contiguous() for k, v in state_dict.items()},
        folder,
        filename_pattern=_DIFFUSERS_WEIGHTS_PATTERN,
        max_shard_size="10GB",
    )
    return folder


def load_full_unet(unet: torch.nn.Module, directory: str) -> None:
    """Load weights written by :func:`save_full_unet` into ``unet`` in place (strict: every key must match)."""
    folder = os.path.join(directory, UNET_SUBFOLDER)
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"No safetensors weights in {folder}")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(os.path.join(folder, name)))
    unet.load_state_dict(state, strict=True)


def has_saved_weights(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, LORA_WEIGHTS_NAME)) or os.path.isdir(
        os.path.join(directory, UNET_SUBFOLDER)
    )


def save_pipeline_components(pipeline: Any, output_dir: str) -> None:
    """Write ``model_index.json`` and every component but the UNet as ``pipeline.save_pretrained`` would
    (safetensors), so that with the ``unet/`` of :func:`save_full_unet` the folder is a whole pipeline."""
    for name, component in pipeline.components.items():
        if name == UNET_SUBFOLDER or component is None or not hasattr(component, "save_pretrained"):
            continue
        component.save_pretrained(os.path.join(output_dir, name))
    pipeline.save_config(output_dir)


def write_training_config(args: Any, output_dir: str) -> str:
    """Write ``training_config.json``: ``args`` as JSON (the Hub token masked), never a pickle."""
    path = os.path.join(output_dir, TRAINING_CONFIG_NAME)
    with open(path, "w") as f:
        json.dump(json.loads(args.to_json_string()), f, indent=2, sort_keys=True)
    return path


def copy_saved_model(source: str, destination: str) -> None:
    """Copy the weights and ``training_config.json`` that :func:`save_lora_adapters` / :func:`save_full_unet`
    wrote in ``source`` (a checkpoint) into ``destination``, replacing older copies."""
    os.makedirs(destination, exist_ok=True)
    for name in (LORA_WEIGHTS_NAME, TRAINING_CONFIG_NAME):
        if os.path.isfile(os.path.join(source, name)):
            shutil.copy(os.path.join(source, name), os.path.join(destination, name))
    if os.path.isdir(os.path.join(source, UNET_SUBFOLDER)):
        shutil.rmtree(os.path.join(destination, UNET_SUBFOLDER), ignore_errors=True)
        shutil.copytree(os.path.join(source, UNET_SUBFOLDER), os.path.join(destination, UNET_SUBFOLDER))


def has_pipeline_components(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, PIPELINE_INDEX_NAME))
