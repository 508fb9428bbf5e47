"""Full tuning's files: the trained denoiser as ``unet/`` (or ``transformer/``), written by the model's
``save_pretrained`` (safetensors) or from weights an engine gathered, read back into the engine's shards at resume,
and in the final output folder the rest of the pipeline, so that ``DiffusionPipeline.from_pretrained(output_dir)``
loads it (:mod:`.saving` describes the formats). A run that tunes LoRA never loads this module: its names resolve
from :mod:`.saving` on first use.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file

from ..config.file_modes import follow_umask
from ..engines.collectives import shard_like
from .run_folder import UNET_SUBFOLDER

__all__ = ["has_pipeline_components", "load_full_denoiser", "save_full_denoiser", "save_pipeline_components"]

PIPELINE_INDEX_NAME = "model_index.json"
# diffusion_pytorch_model.safetensors, or -00001-of-0000N shards with diffusion_pytorch_model.safetensors.index.json
_DIFFUSERS_WEIGHTS_PATTERN = "diffusion_pytorch_model{suffix}.safetensors"


def save_full_denoiser(
    denoiser: torch.nn.Module,
    output_dir: str,
    state_dict: dict[str, torch.Tensor] | None = None,
    subfolder: str = UNET_SUBFOLDER,
) -> str:
    """Write ``output_dir/<subfolder>`` (``unet`` or ``transformer``) as ``save_pretrained`` does (config plus
    safetensors); returns that folder.

    ``state_dict`` (for example weights gathered from ZeRO-3 shards, where the module itself holds only its shard)
    is written in place of the module's own, with diffusers' file names and shard index.
    """
    folder = os.path.join(output_dir, subfolder)
    if state_dict is None:
        denoiser.save_pretrained(folder, safe_serialization=True)
        follow_umask(folder)
        return folder
    os.makedirs(folder, exist_ok=True)
    denoiser.save_config(folder)
    save_torch_state_dict(
        {k: v.detach().cpu().contiguous() for k, v in state_dict.items()},
        folder,
        filename_pattern=_DIFFUSERS_WEIGHTS_PATTERN,
        max_shard_size="10GB",
    )
    follow_umask(folder)
    return folder


def load_full_denoiser(denoiser: torch.nn.Module, directory: str, subfolder: str = UNET_SUBFOLDER) -> None:
    """Load weights written by :func:`save_full_denoiser` into ``denoiser`` in place (strict: every key must match;
    into an FSDP2-sharded denoiser, each process's shards of them)."""
    folder = os.path.join(directory, subfolder)
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"No safetensors weights in {folder}")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(os.path.join(folder, name)))
    denoiser.load_state_dict(shard_like(denoiser, state), strict=True)


def save_pipeline_components(pipeline: Any, output_dir: str, denoiser: str = UNET_SUBFOLDER) -> None:
    """Write ``model_index.json`` and every component but the trained ``denoiser`` (``"unet"`` or
    ``"transformer"``) as ``pipeline.save_pretrained`` would (safetensors), so that with the folder
    :func:`save_full_denoiser` wrote the output is a whole pipeline."""
    for name, component in pipeline.components.items():
        if name == denoiser or component is None or not hasattr(component, "save_pretrained"):
            continue
        component.save_pretrained(os.path.join(output_dir, name))
        follow_umask(os.path.join(output_dir, name))
    pipeline.save_config(output_dir)


def has_pipeline_components(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, PIPELINE_INDEX_NAME))
