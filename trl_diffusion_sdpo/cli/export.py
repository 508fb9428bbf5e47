"""``trl-diffusion-sdpo export``'s entry point: a trained LoRA in the image tools' formats, or merged into its base
(:mod:`trl_diffusion_sdpo.io.export` does the work), with the options :mod:`.export_options` parses."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..families.loading import resolve_model_name
from ..io.export import EXPORT_FORMATS, export_lora, merge_lora
from .export_options import add_export_arguments, build_export_parser

# The parser's names are this module's too (the command's Python entry points import them here).
__all__ = ["add_export_arguments", "build_export_parser", "main", "run_export"]


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
