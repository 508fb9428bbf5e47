"""Evaluation of preference-tuned text-to-image models: generate images for a prompt set with the SDPO authors'
protocol (cached on disk), score them with reward models, and compare models with bootstrap intervals and win rates.

`evaluate` runs the whole pipeline; the pieces are importable on their own: `load_prompts` (prompts; `load_edits`
and `EditPrompt` for a prompt set of edits: instructions with source images),
`generate_images` (generation and cache), `build_scorer` / `register_scorer` (reward models), `summarise` /
`win_rate_table` (comparison), and, for text-to-video
models, `sample_videos` / `score_videos` (clips scored frame by frame). `make_pairs` turns sampling and a scorer into
a preference dataset (AI feedback, on-policy rounds).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config._lazy import lazy_attributes

if TYPE_CHECKING:
    from ..rewards.scorers import EditScorer, Scorer, available_scorers, build_scorer, register_scorer
    from .compare import MetricSummary, WinRate, bootstrap_mean_ci, image_grid, summarise, win_rate, win_rate_table
    from .generation import GenerationSettings, ImageCache, ModelSpec, generate_images, sample_images
    from .pairs import PairsResult, make_pairs, select_pairs
    from .prompts import PROMPT_PRESETS, EditPrompt, load_edits, load_prompt_set, load_prompts
    from .run import EvaluationResult, evaluate
    from .video import sample_videos, score_videos

# Resolved on first use: the scorers import transformers' CLIP and BLIP models, generation imports diffusers.
_EXPORTS = {
    "PROMPT_PRESETS": ".prompts",
    "EditPrompt": ".prompts",
    "EditScorer": "..rewards.scorers",
    "EvaluationResult": ".run",
    "GenerationSettings": ".generation",
    "ImageCache": ".generation",
    "MetricSummary": ".compare",
    "ModelSpec": ".generation",
    "PairsResult": ".pairs",
    "Scorer": "..rewards.scorers",
    "WinRate": ".compare",
    "available_scorers": "..rewards.scorers",
    "bootstrap_mean_ci": ".compare",
    "build_scorer": "..rewards.scorers",
    "evaluate": ".run",
    "generate_images": ".generation",
    "image_grid": ".compare",
    "load_edits": ".prompts",
    "load_prompt_set": ".prompts",
    "load_prompts": ".prompts",
    "make_pairs": ".pairs",
    "register_scorer": "..rewards.scorers",
    "sample_images": ".generation",
    "sample_videos": ".video",
    "score_videos": ".video",
    "select_pairs": ".pairs",
    "summarise": ".compare",
    "win_rate": ".compare",
    "win_rate_table": ".compare",
}

__all__ = [
    "PROMPT_PRESETS",
    "EditPrompt",
    "EditScorer",
    "EvaluationResult",
    "GenerationSettings",
    "ImageCache",
    "MetricSummary",
    "ModelSpec",
    "PairsResult",
    "Scorer",
    "WinRate",
    "available_scorers",
    "bootstrap_mean_ci",
    "build_scorer",
    "evaluate",
    "generate_images",
    "image_grid",
    "load_edits",
    "load_prompt_set",
    "load_prompts",
    "make_pairs",
    "register_scorer",
    "sample_images",
    "sample_videos",
    "score_videos",
    "select_pairs",
    "summarise",
    "win_rate",
    "win_rate_table",
]

__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS, globals())
