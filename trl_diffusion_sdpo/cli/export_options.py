"""``trl-diffusion-sdpo export``'s options: argparse and the export's names only (:mod:`~..io.export_names`), so that
a misspelt or refused option, or ``--help``, ends the command before torch loads; :mod:`.export` runs what they
parse."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..config.messages import OVERWRITE_FLAG
from ..io.export_names import EXPORT_DTYPE_NAMES, EXPORT_FORMATS
from .command_parser import CommandParser

__all__ = ["add_export_arguments", "build_export_parser", "parse_args"]


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
        choices=EXPORT_DTYPE_NAMES,
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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``export``'s words as its parsed options; exits with a usage error on a bad or unknown option, or on
    ``--help``."""
    return build_export_parser().parse_args(argv)
