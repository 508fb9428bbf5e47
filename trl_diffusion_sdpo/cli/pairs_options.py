"""``trl-diffusion-sdpo pairs``' options: preference pairs from a reward model. Argparse only: its parser is the
command line's (:mod:`.main` adds it with the others, and ``trl-diffusion-sdpo --help`` imports nothing heavy);
:mod:`.pairs` runs what it parses. Sampling flags are ``evaluate``'s (:mod:`.sample_options`)."""

from __future__ import annotations

import argparse

from .sample_options import add_base_argument, add_sampling_arguments, add_scorer_arg_argument, registered_lists

__all__ = ["add_pairs_parser"]


def add_pairs_parser(
    commands, scorers: list[str] | None = None, presets: list[str] | None = None
) -> argparse.ArgumentParser:
    """The ``pairs`` subcommand; ``scorers`` and ``presets`` (the registries' names) are listed in its help."""
    listed, presets_listed = registered_lists(scorers, presets)
    pairs = commands.add_parser(
        "pairs",
        allow_abbrev=False,
        help="Sample K images per prompt, score them with a reward model and write the pairs above a margin as a "
        "training dataset (AI-feedback / on-policy Diffusion-DPO rounds).",
        description=(
            "Sample --num_images images per prompt (seeds SEED..SEED+K-1, cached: a rerun resamples nothing), score "
            "them, keep the best-worst pair (or every pair) whose score gap exceeds --margin, and write "
            "OUTPUT_DIR/dataset (train with --dataset_name OUTPUT_DIR/dataset), summary.json and scores.jsonl."
        ),
    )
    add_base_argument(pairs)
    pairs.add_argument(
        "--model",
        default=None,
        metavar="PATH",
        help="Sample from this instead of the base: a LoRA folder/file or a full-tuning output of this package "
        "(a folder with unet/ or transformer/, a pipeline folder, a Hub id).",
    )
    pairs.add_argument(
        "--prompts", default="pickapic_v2", help=f"Preset ({presets_listed}), a .txt file, or a dataset id/folder "
        "(default: %(default)s); a .jsonl file or dataset whose rows carry source_image or source_images is a set of "
        "edits: the K images are edits of each source, and the rows keep the source.",
    )  # fmt: skip
    pairs.add_argument(
        "--num_images", "--num-images", type=int, default=4, help="Images per prompt, K (default: %(default)s)."
    )
    pairs.add_argument("--scorer", default="pickscore", help=f"Reward model ({listed}default: %(default)s).")
    add_scorer_arg_argument(
        pairs,
        "NAME.KEY=VALUE",
        "Argument of the scorer, e.g. hpsv3.checkpoint=/path (VALUE parsed as JSON if it can be).",
    )
    pairs.add_argument(
        "--margin",
        type=float,
        default=0.0,
        help="Keep a pair only if chosen_score - rejected_score exceeds this (default: %(default)s).",
    )
    pairs.add_argument(
        "--mode",
        choices=("best-worst", "all"),
        default="best-worst",
        help="best-worst: one pair per prompt; all: every pair above the margin (default: %(default)s).",
    )
    pairs.add_argument("--output_dir", "--output-dir", default="pairs", help="Output folder (default: %(default)s).")
    pairs.add_argument("--seed", type=int, default=0, help="First seed; image k uses SEED + k (default: %(default)s).")
    add_sampling_arguments(pairs)
    return pairs
