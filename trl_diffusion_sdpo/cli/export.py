"""``trl-diffusion-sdpo export``'s options and entry point: a trained LoRA in the image tools' formats, or merged
into its base (:mod:`trl_diffusion_sdpo.io.export` does the work)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..config.messages import OVERWRITE_FLAG
from ..families.loading import resolve_model_name
from ..io.export import EXPORT_DTYPES, EXPORT_FORMATS, export_lora, merge_lora
from .command_parser import CommandParser

__all__ = ["add_export_arguments", "build_export_parser", "main", "run_export"]


def build_export_parser() -> argparse.ArgumentParser:
    """The parser of ``trl-diffusion-sdpo export``."""
    parser = CommandParser(
        prog="trl-diffusion-sdpo export",
        description=(
            "Write a LoRA trained by `trl-diffusion-sdpo train` (diffusers format) for the image tools: kohya "
            "(sd-scripts' layout: SD1.x/2.x and SDXL for AUTOMATIC1111/Forge, ComfyUI, InvokeAI, diffusers; "
            "FLUX.1, SD3 and FLUX.2 for ComfyUI, FLUX.1 and FLUX.2 also for diffusers) or comfyui (every family), "
            "checked against the base model; or, with --merge, a copy of the base pipeline with the LoRA fused in at "
            "--strength, written to --output (the base itself is only read). Neither replaces what exists at --output "
            f"unless {OVERWRITE_FLAG}."
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
        "--merge",
        action="store_true",
        help="Write a copy of the base pipeline with the LoRA fused in to --output (a full pipeline folder; the base "
        "is not modified).",
    )
    parser.add_argument(
        "--strength", type=float, default=1.0, help="LoRA strength fused by --merge (default: %(default)s)."
    )
    parser.add_argument(
        "--dtype",
        choices=tuple(EXPORT_DTYPES),
        default=None,
        help="Weights' dtype: of the exported LoRA (default: as trained) or of the merged pipeline (default float32).",
    )
    parser.add_argument("--device", default="cpu", help="Device for --merge (default: %(default)s).")
    parser.add_argument(
        OVERWRITE_FLAG,
        action="store_true",
        help="Replace an existing --output file, or write the merged pipeline into a folder that holds files "
        "(refused otherwise).",
    )


def run_export(args: argparse.Namespace) -> int:
    """``trl-diffusion-sdpo export``: one export or merge; errors on bad input leave with a message, status 2."""
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
                overwrite=args.overwrite,
            )
            print(
                f"Wrote the merged copy to {folder}: {args.base} with {args.lora} fused in at strength "
                f"{args.strength:g} (the base itself is unchanged)."
            )
            return 0
        if args.format is None:
            raise ValueError(f"--format is required without --merge: one of {', '.join(EXPORT_FORMATS)}.")
        if args.strength != 1.0:
            raise ValueError("--strength applies to --merge only; set the strength in the tool that loads the LoRA.")
        result = export_lora(
            args.lora, args.base, args.format, args.output, dtype=args.dtype, overwrite=args.overwrite
        )
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"trl-diffusion-sdpo export: error: {error}", file=sys.stderr)
        return 2
    print(f"Wrote {result.modules} LoRA modules of a {result.family} model in {result.format} format: {result.path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``trl-diffusion-sdpo export`` with the words after its name: parse them and run; the exit status."""
    return run_export(build_export_parser().parse_args(argv))
