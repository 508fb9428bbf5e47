"""``trl-diffusion-sdpo export``: a trained LoRA in the formats the image tools load, or merged into its base.

The trainer writes LoRAs in diffusers' format (``pytorch_lora_weights.safetensors``: ``unet.``/``transformer.``
prefixed keys, the adapter config in the file's ``lora_adapter_metadata``). This module rewrites one for the tools:

The layouts, one per format and family, and the reader of diffusers-format LoRAs are in
:mod:`trl_diffusion_sdpo.io.lora_formats`.

Every export is checked against the base first: each adapted module must exist in the base's denoiser with the
LoRA's input and output sizes (read from the configs on the meta device, so nothing is loaded).

``merge_lora`` loads the base pipeline, loads the LoRA, fuses it at a strength (diffusers' ``fuse_lora``), drops
the adapters and writes the whole pipeline with ``save_pretrained`` (safetensors).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch

from .lora_formats import LoraFile, LoraModule, read_lora, tool_state_dict

__all__ = ["LoraModule", "export_lora", "merge_lora", "read_lora"]

EXPORT_FORMATS = ("kohya", "comfyui", "diffusers")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _base_family(base: str) -> tuple[str, dict[str, Any]]:
    """The registered family of the pipeline at ``base`` (Hub id or folder), decided from ``model_index.json``
    alone: its pipeline class, else its denoiser class. Returns the family name and the model index."""
    from diffusers import DiffusionPipeline

    from ..families import registered_families

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
    from ..families import registered_families

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


@dataclass
class ExportResult:
    path: str
    family: str
    format: str
    modules: int


def export_lora(lora_path: str, base: str, export_format: str, output: str, dtype: str | None = None) -> ExportResult:
    """Write the LoRA at ``lora_path`` (diffusers format, as ``train`` saves it) for the tools, in
    ``export_format`` (one of :data:`EXPORT_FORMATS`), to the ``.safetensors`` file ``output``, after checking it
    against ``base``. ``dtype`` (``float32``/``float16``/``bfloat16``) casts the weights; ``None`` keeps them."""
    from safetensors.torch import save_file

    if export_format not in EXPORT_FORMATS:
        raise ValueError(f"--format {export_format!r}: choose one of {', '.join(EXPORT_FORMATS)}.")
    if not output.endswith(".safetensors"):
        raise ValueError(f"--output {output}: the exported LoRA is one .safetensors file; name it *.safetensors.")
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {', '.join(_DTYPES)}.")
    lora = read_lora(lora_path)
    family, denoiser = check_against_base(lora, base)
    state, metadata = tool_state_dict(lora, family, export_format, denoiser, output)
    if dtype is not None:
        state = {k: (v.to(_DTYPES[dtype]) if not k.endswith(".alpha") else v) for k, v in state.items()}
    state = {k: v.contiguous() for k, v in state.items()}
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    partial = f"{output}.partial"
    save_file(state, partial, metadata=metadata or None)
    os.replace(partial, output)  # nothing half-written under the final name
    return ExportResult(output, family, export_format, len(lora.modules))


def merge_lora(
    lora_path: str, base: str, output_dir: str, strength: float = 1.0, dtype: str = "float32", device: str = "cpu"
) -> str:
    """Fuse the LoRA into ``base`` at ``strength`` and write the whole pipeline to ``output_dir``.

    diffusers' ``load_lora_weights`` then ``fuse_lora(lora_scale=strength)`` adds ``strength * scale * B A`` to
    each adapted weight; ``unload_lora_weights`` drops the adapter layers, and ``save_pretrained`` writes every
    component as safetensors, so ``DiffusionPipeline.from_pretrained(output_dir)`` loads the merged model and
    generates what the base with the LoRA at that strength generates.
    """
    from diffusers import DiffusionPipeline

    from ..families.loading import dtype_keyword

    if dtype not in _DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {', '.join(_DTYPES)}.")
    if os.path.isfile(os.path.join(output_dir, "model_index.json")):
        raise FileExistsError(f"--output {output_dir} already holds a pipeline; choose a new folder.")
    lora = read_lora(lora_path)
    check_against_base(lora, base)
    pipeline = DiffusionPipeline.from_pretrained(base, **dtype_keyword(_DTYPES[dtype])).to(device)
    folder, weight_name = os.path.split(lora.path)
    pipeline.load_lora_weights(folder, weight_name=weight_name, adapter_name="export")
    pipeline.fuse_lora(components=[lora.prefix], lora_scale=strength, adapter_names=["export"])
    pipeline.unload_lora_weights()
    pipeline.save_pretrained(output_dir, safe_serialization=True)
    return output_dir


def build_export_parser() -> argparse.ArgumentParser:
    """The parser of ``trl-diffusion-sdpo export``."""
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="trl-diffusion-sdpo export",
        description=(
            "Write a LoRA trained by `trl-diffusion-sdpo train` (diffusers format) for the image tools: kohya "
            "(sd-scripts' layout: SD1.x/2.x and SDXL for AUTOMATIC1111/Forge, ComfyUI, InvokeAI, diffusers; "
            "FLUX.1, SD3 and FLUX.2 for ComfyUI, FLUX.1 and FLUX.2 also for diffusers) or comfyui (every family), "
            "checked against the base model; or, with --merge, the base pipeline with the LoRA fused in at --strength."
        ),
    )
    add_export_arguments(parser)
    return parser


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``export`` subcommand's options."""
    parser.add_argument(
        "--lora", required=True, help="The trained LoRA: an output/checkpoint folder of `train`, or its .safetensors."
    )
    parser.add_argument(
        "--base",
        required=True,
        help="The base pipeline it was trained on: Hub id, local folder or trl-diffusion-sdpo:tiny (the shipped one).",
    )
    parser.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        default=None,
        help="kohya (kohya-ss layout: SD1.x/2.x, SDXL, FLUX.1, SD3, FLUX.2 [dev]/[klein]), comfyui (every "
        "family), or diffusers.",
    )
    parser.add_argument(
        "--output", required=True, help="A .safetensors file (export), or a new folder for the pipeline (--merge)."
    )
    parser.add_argument(
        "--merge", action="store_true", help="Write the base pipeline with the LoRA fused in (a full pipeline folder)."
    )
    parser.add_argument(
        "--strength", type=float, default=1.0, help="LoRA strength fused by --merge (default: %(default)s)."
    )
    parser.add_argument(
        "--dtype",
        choices=tuple(_DTYPES),
        default=None,
        help="Weights' dtype: of the exported LoRA (default: as trained) or of the merged pipeline (default float32).",
    )
    parser.add_argument("--device", default="cpu", help="Device for --merge (default: %(default)s).")


def run_export(args: argparse.Namespace) -> int:
    """``trl-diffusion-sdpo export``: one export or merge; errors on bad input leave with a message, status 2."""
    from ..families.loading import resolve_model_name
    from .console import quiet_off_terminal

    quiet_off_terminal()

    args.base = resolve_model_name(args.base)
    try:
        if args.merge:
            if args.format is not None:
                raise ValueError("--merge writes a pipeline; --format applies to a LoRA export only (drop one).")
            folder = merge_lora(
                args.lora,
                args.base,
                args.output,
                strength=args.strength,
                dtype=args.dtype or "float32",
                device=args.device,
            )
            print(f"Merged {args.lora} into {args.base} at strength {args.strength:g}: {folder}")
            return 0
        if args.format is None:
            raise ValueError(f"--format is required without --merge: one of {', '.join(EXPORT_FORMATS)}.")
        if args.strength != 1.0:
            raise ValueError("--strength applies to --merge only; set the strength in the tool that loads the LoRA.")
        result = export_lora(args.lora, args.base, args.format, args.output, dtype=args.dtype)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"trl-diffusion-sdpo export: error: {error}", file=sys.stderr)
        return 2
    print(f"Wrote {result.modules} LoRA modules of a {result.family} model in {result.format} format: {result.path}")
    return 0
