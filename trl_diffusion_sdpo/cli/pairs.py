"""``trl-diffusion-sdpo pairs``: preference pairs from a reward model (:mod:`.evaluation.pairs`), with the options
:mod:`.pairs_options` parses.

    trl-diffusion-sdpo pairs --base stable-diffusion-v1-5/stable-diffusion-v1-5 --prompts pickapic_v2 \\
        --num_images 4 --scorer pickscore --margin 0.005 --mode best-worst --output_dir pairs-round0
"""

from __future__ import annotations

import argparse

from ..demo import scorer as _demo_scorer  # noqa: F401  registers the demo's ``colour`` scorer
from ..evaluation.pairs import make_pairs
from .sample import command_sampling_keywords, start_sampling_command
from .sample_options import scorer_arguments

__all__: list[str] = []  # nothing here is imported by users; the command registry names run_pairs


def run_pairs(args: argparse.Namespace) -> int:
    """``trl-diffusion-sdpo pairs`` with its parsed ``args`` (:mod:`.pairs_options`): the pairs written, a summary
    printed; the exit status."""
    start_sampling_command(args)
    result = make_pairs(
        args.base,
        args.model,
        num_images=args.num_images,
        scorer=args.scorer,
        scorer_kwargs=scorer_arguments(args.scorer_arg, [args.scorer]).get(args.scorer, {}),
        margin=args.margin,
        mode=args.mode,
        seed=args.seed,
        **command_sampling_keywords(args),
    )
    s = result.summary
    print(f"{s['pairs']} pairs from {s['prompts_with_pair']} of {s['prompts']} prompts, {s['generated']} new images")
    if s["pairs"]:
        print(
            f"margin: mean {s['margin_mean']:.4g}, min {s['margin_min']:.4g}, q10 {s['q10']:.4g}, q50 {s['q50']:.4g}, "
            f"q90 {s['q90']:.4g}, max {s['margin_max']:.4g}"
        )
    if s["prompts_without_pair"]:
        print(f"{len(s['prompts_without_pair'])} prompts gave no pair above the margin (listed in summary.json)")
    print(f"Dataset in {result.dataset_dir} (train with --dataset_name {result.dataset_dir})")
    return 0
