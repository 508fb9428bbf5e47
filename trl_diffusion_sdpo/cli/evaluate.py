"""``trl-diffusion-sdpo evaluate``: sample a base model and its variants on a prompt set, score and compare them
(:func:`trl_diffusion_sdpo.evaluation.evaluate`), with the options :mod:`.evaluate_options` parses."""

from __future__ import annotations

import argparse
import sys

from ..config.extras import ExtraNotInstalled
from ..evaluation.run import evaluate
from ..rewards.scorers.preflight import ScorerModelUnavailable, ScorerPromptError
from .sample import command_sampling_keywords, start_sampling_command
from .sample_options import scorer_arguments

__all__ = ["run_evaluate"]


def run_evaluate(args: argparse.Namespace) -> int:
    """``trl-diffusion-sdpo evaluate`` with its parsed ``args`` (:mod:`.evaluate_options`): the scores' summary and
    win rates printed; the exit status."""
    scorers = args.scorer or ["pickscore"]
    start_sampling_command(args)
    try:
        result = evaluate(
            args.base,
            args.model,
            scorers=scorers,
            seeds=args.seed or [0],
            scorer_kwargs=scorer_arguments(args.scorer_arg, scorers),
            n_resamples=args.bootstrap_resamples,
            **command_sampling_keywords(args),
        )
    except (ScorerModelUnavailable, ExtraNotInstalled, ScorerPromptError) as err:  # found before any generation
        print(f"trl-diffusion-sdpo evaluate: error: {err}", file=sys.stderr)
        return 2
    for row in result.summary:
        print(f"{row.model:>16} {row.metric:>12} {row.mean:.4f} [{row.ci_low:.4f}, {row.ci_high:.4f}] ({row.scale})")
    for row in result.win_rates:
        print(f"{row.model} vs {row.opponent} [{row.metric}]: win rate {row.win_rate:.3f} over {row.n}")
    print(f"Results in {args.output_dir}")
    return 0
