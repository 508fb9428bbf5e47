"""``trl-diffusion-sdpo export``: a trained LoRA in the formats the image tools load, or merged into its base.

The trainer writes LoRAs in diffusers' format (``pytorch_lora_weights.safetensors``: ``unet.``/``transformer.``
prefixed keys, the adapter config in the file's ``lora_adapter_metadata``). This module rewrites one for the tools:

The layouts, one per format and family, and the reader of diffusers-format LoRAs are in
:mod:`trl_diffusion_sdpo.io.lora_formats`.

Every export is checked against the base first: each adapted module must exist in the base's denoiser with the
LoRA's input and output sizes (read from the configs on the meta device, so nothing is loaded). Before that, an export
refuses to replace a file (or a merge to write into a folder holding anything) it did not write, unless told to
overwrite, and a base that leads nowhere (no folder, not cached, the Hub unreachable) is named in one line.

``merge_lora`` loads the base pipeline, loads the LoRA, fuses it at a strength (diffusers' ``fuse_lora``), drops
the adapters and writes the whole pipeline with ``save_pretrained`` (safetensors).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from ..config.file_modes import follow_umask
from ..config.messages import OutputExistsError, advice, overwrite_advice, replacing_refusal
from ..data.model_names import check_model_exists
from ..families import registered_families
from ..families.loading import dtype_keyword
from .checkpoints import earlier_run_files
from .export_names import EXPORT_DTYPE_NAMES, EXPORT_FORMATS
from .lora_formats import LoraFile, LoraModule, read_lora, tool_state_dict

__all__ = ["LoraModule", "export_lora", "merge_lora", "read_lora"]

EXPORT_DTYPES = {name: getattr(torch, name) for name in EXPORT_DTYPE_NAMES}


def _base_family(base: str) -> tuple[str, dict[str, Any]]:
    """The registered family of the pipeline at ``base`` (Hub id or folder), decided from ``model_index.json``
    alone: its pipeline class, else its denoiser class. Returns the family name and the model index."""
    from diffusers import DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(base)
    except Exception as error:  # noqa: BLE001 - diffusers raises several types for a missing/invalid folder
        raise ValueError(f"--base {base}: not a diffusers pipeline (no readable model_index.json): {error}") from error
    pipeline_class = index.get("_class_name", "")
    families = registered_families()
    for family in families:
        if pipeline_class in family.pipeline_classes:
            return family.name, index
    for family in families:
        denoiser_entry = index.get(family.denoiser_name) or [None, None]
        wanted = getattr(family, "transformer_class", None)
        if wanted and denoiser_entry[1] == wanted:
            return family.name, index
    if (index.get("unet") or [None, None])[1] == "UNet2DConditionModel":
        return ("stable-diffusion-xl" if index.get("text_encoder_2") else "stable-diffusion"), index
    supported = "; ".join(f"{family.name}: {', '.join(family.pipeline_classes)}" for family in families)
    raise ValueError(f"--base {base} is a {pipeline_class or 'pipeline of unknown class'}; supported: {supported}.")


def _meta_denoiser(base: str, index: dict[str, Any], name: str) -> torch.nn.Module:
    """The base's denoiser built from its config on the meta device: module names and sizes, no weights read."""
    import diffusers
    from accelerate import init_empty_weights

    entry = index.get(name)
    if not entry or entry[1] is None:
        raise ValueError(f"--base {base} has no `{name}` component.")
    cls = getattr(diffusers, entry[1])
    config = cls.load_config(base, subfolder=name)
    with init_empty_weights():
        return cls.from_config(config)


def check_against_base(lora: LoraFile, base: str) -> tuple[str, torch.nn.Module]:
    """Refuse a LoRA whose modules are not in ``base``'s denoiser with the same sizes (another family, another
    architecture); returns the base's family name and its (meta-device) denoiser."""
    family, index = _base_family(base)
    denoiser_name = next(f.denoiser_name for f in registered_families() if f.name == family)
    if lora.prefix != denoiser_name:
        raise ValueError(
            f"{lora.path} adapts a `{lora.prefix}`, but --base {base} is {family}, whose denoiser is its "
            f"`{denoiser_name}`: the LoRA was trained on another family."
        )
    denoiser = _meta_denoiser(base, index, denoiser_name)
    modules = dict(denoiser.named_modules())
    problems = []
    for name, module in lora.modules.items():
        target = modules.get(name)
        if target is None:
            problems.append(f"{name}: no such module")
            continue
        weight = getattr(target, "weight", None)
        if weight is None or weight.ndim != module.down.ndim:
            problems.append(f"{name}: not a Linear/Conv layer of the same kind")
            continue
        if module.down.shape[1] != weight.shape[1] or module.up.shape[0] != weight.shape[0]:
            problems.append(
                f"{name}: LoRA maps {module.down.shape[1]} -> {module.up.shape[0]}, the base layer "
                f"{weight.shape[1]} -> {weight.shape[0]}"
            )
    if problems:
        listed = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ValueError(
            f"{lora.path} does not fit the {denoiser_name} of --base {base} ({family}): {listed}. A LoRA applies "
            "only to the architecture it was trained on (a fine-tune of the same base model is fine)."
        )
    return family, denoiser


def check_base_exists(base: str) -> None:
    """A ``--base`` that leads to no pipeline (no folder, not cached, the Hub unreachable or without it) in one line,
    before the LoRA is read: in seconds, where diffusers retries an unreachable Hub for half a minute."""
    check_model_exists(base, "--base")


def refuse_replacing(output: str, writer: str, overwrite: bool) -> None:
    """Refuse, unless ``overwrite``, an ``output`` file that exists or an ``output`` folder holding anything (another
    run's files named as such), which ``writer`` would replace: what this export did not write."""
    if overwrite or not os.path.exists(output):
        return
    held, found = "", []
    if os.path.isdir(output):
        found = earlier_run_files(output)
        held = "another run's files" if found else ""
        found = found or sorted(os.listdir(output))
        if not found:
            return  # an empty folder: nothing to replace
    ways = [
        f"pass {overwrite_advice()} to replace it",
        f"write to a new {advice('--output', 'output')}",
    ]
    raise OutputExistsError(replacing_refusal(output, writer, ways, held, found))


@dataclass
class ExportResult:
    path: str
    family: str
    format: str
    modules: int


def export_lora(
    lora_path: str, base: str, export_format: str, output: str, dtype: str | None = None, overwrite: bool = False
) -> ExportResult:
    """Write the LoRA at ``lora_path`` (diffusers format, as ``train`` saves it) for the tools, in
    ``export_format`` (one of :data:`EXPORT_FORMATS`), to the ``.safetensors`` file ``output``, after checking it
    against ``base``. ``dtype`` (``float32``/``float16``/``bfloat16``) casts the weights; ``None`` keeps them. An
    existing ``output`` is refused unless ``overwrite``."""
    from safetensors.torch import save_file

    if export_format not in EXPORT_FORMATS:
        raise ValueError(f"--format {export_format!r}: choose one of {', '.join(EXPORT_FORMATS)}.")
    if not output.endswith(".safetensors"):
        raise ValueError(f"--output {output}: the exported LoRA is one .safetensors file; name it *.safetensors.")
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {', '.join(EXPORT_DTYPES)}.")
    refuse_replacing(output, "this export", overwrite)
    check_base_exists(base)
    lora = read_lora(lora_path)
    family, denoiser = check_against_base(lora, base)
    state, metadata = tool_state_dict(lora, family, export_format, denoiser, output)
    if dtype is not None:
        state = {k: (v.to(EXPORT_DTYPES[dtype]) if not k.endswith(".alpha") else v) for k, v in state.items()}
    state = {k: v.contiguous() for k, v in state.items()}
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    partial = f"{output}.partial"
    save_file(state, partial, metadata=metadata or None)
    follow_umask(partial)  # safetensors writes it owner-only; a tool running as another user reads it
    os.replace(partial, output)  # nothing half-written under the final name
    return ExportResult(output, family, export_format, len(lora.modules))


def merge_lora(
    lora_path: str,
    base: str,
    output_dir: str,
    strength: float = 1.0,
    dtype: str = "float32",
    device: str = "cpu",
    overwrite: bool = False,
) -> str:
    """Fuse the LoRA into a copy of ``base`` at ``strength`` and write the whole pipeline to ``output_dir`` (the base
    on disk is only read); an ``output_dir`` holding anything is refused unless ``overwrite``.

    diffusers' ``load_lora_weights`` then ``fuse_lora(lora_scale=strength)`` adds ``strength * scale * B A`` to
    each adapted weight; ``unload_lora_weights`` drops the adapter layers, and ``save_pretrained`` writes every
    component as safetensors, so ``DiffusionPipeline.from_pretrained(output_dir)`` loads the merged model and
    generates what the base with the LoRA at that strength generates.
    """
    from diffusers import DiffusionPipeline

    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {', '.join(EXPORT_DTYPES)}.")
    refuse_replacing(output_dir, "the merged pipeline", overwrite)
    check_base_exists(base)
    lora = read_lora(lora_path)
    check_against_base(lora, base)
    pipeline = DiffusionPipeline.from_pretrained(base, **dtype_keyword(EXPORT_DTYPES[dtype])).to(device)
    folder, weight_name = os.path.split(lora.path)
    pipeline.load_lora_weights(folder, weight_name=weight_name, adapter_name="export")
    pipeline.fuse_lora(components=[lora.prefix], lora_scale=strength, adapter_names=["export"])
    pipeline.unload_lora_weights()
    pipeline.save_pretrained(output_dir, safe_serialization=True)
    # What save_pretrained wrote, not the folder itself: a folder the user made keeps its mode.
    follow_umask(*(os.path.join(output_dir, name) for name in os.listdir(output_dir)))
    return output_dir
