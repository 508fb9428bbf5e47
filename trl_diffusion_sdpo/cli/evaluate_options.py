"""``trl-diffusion-sdpo evaluate``'s options: generate, score and compare a base model and its variants. Its parser is
the command line's (:mod:`.main` adds it with the others); :mod:`.evaluate` runs what it parses."""

from __future__ import annotations

import argparse

from .family_titles import evaluated_family_titles
from .sample_options import add_base_argument, add_sampling_arguments, add_scorer_arg_argument, registered_lists

__all__ = ["add_evaluate_parser"]


def add_evaluate_parser(
    commands, scorers: list[str] | None = None, presets: list[str] | None = None
) -> argparse.ArgumentParser:
    """The ``evaluate`` subcommand: generate, score and compare a base model and its variants. ``scorers`` and
    ``presets`` (the registry's names) are listed in its help."""
    listed, presets_listed = registered_lists(scorers, presets)
    evaluate = commands.add_parser(
        "evaluate",
        allow_abbrev=False,
        help="Generate images for a prompt set from a base model and its variants, score them, compare.",
        description=(
            "Sample every model on the prompt set with the SDPO authors' protocol (Euler, 50 steps, guidance 8.5, "
            "native resolution, seed-0 noise for every prompt; images cached), score them, and write scores.csv, "
            "summary.csv/json (means with bootstrap 95% intervals), win_rates.csv/json, plots/ and grid.png. "
            f"Models of every image family: {', '.join(evaluated_family_titles())} (LoRA folders, full-tuning "
            "outputs with unet/ or transformer/, or whole pipelines; a video family's clips are evaluated from "
            "Python, docs/evaluation.md). Edits: a prompt set with source images is sampled by the editing pipeline "
            "from each source and scored against the instruction (an editing scorer such as editreward also reads "
            "the source)."
        ),
    )
    add_base_argument(evaluate)
    evaluate.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="A variant: LoRA folder/file, a full-tuning output (pipeline folder, or a folder with "
        "unet/ or transformer/), a UNet or transformer folder, Hub id, or .pth UNet state dict "
        "(repeatable).",
    )
    evaluate.add_argument(
        "--prompts",
        default="partiprompts",
        help=f"Preset ({presets_listed}), a .txt file, or a dataset id/folder (default: %(default)s); a .jsonl file "
        "or dataset whose rows carry source_image or source_images is a set of edits, sampled by an editing pipeline "
        "(FLUX.1 Kontext, Qwen-Image-Edit, FLUX.2) with the sources as its image.",
    )
    evaluate.add_argument(
        "--scorer",
        action="append",
        default=None,
        metavar="NAME",
        help=f"Scorer ({listed}repeatable; default: pickscore).",
    )
    add_scorer_arg_argument(
        evaluate,
        "NAME.KEY=VALUE",
        "Argument of a scorer, e.g. pickscore.model=/path (VALUE parsed as JSON if it can be).",
    )
    evaluate.add_argument(
        "--output_dir", "--output-dir", default="evaluation", help="Output folder (default: %(default)s)."
    )
    evaluate.add_argument(
        "--seed", type=int, action="append", default=None, help="Noise seed (repeatable; default 0)."
    )
    evaluate.add_argument(
        "--bootstrap_resamples", "--bootstrap-resamples", type=int, default=1000, help="Bootstrap resamples."
    )
    add_sampling_arguments(evaluate)
    return evaluate
