"""The reward of an image: a weighted sum of reward functions, each a registered scorer or a callable (the online
trainer's ``reward_funcs``, and the offline trainer's for SmPO's scores).

``reward(prompts, images) = sum_f w_f * f(prompts, images, **columns)``, the weights 1 by default, as TRL's GRPO
combines its ``reward_funcs`` with ``reward_weights``. A callable takes the prompts, the PIL images and the prompt
rows' other columns (one list per column, one entry per image) and returns one float per image; a registered scorer
(:mod:`~trl_diffusion_sdpo.evaluation.scorers`) is called with the images and prompts (and, for an editing scorer,
each image's sources).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

if TYPE_CHECKING:
    from .data.scoring import RewardFn

__all__ = ["RewardFunction", "RewardFunctions", "dataset_scoring_function"]

#: ``f(prompts, images, **columns) -> one float per image``
RewardFunction = Callable[..., Sequence[float] | torch.Tensor]


def _scorer_function(name: str) -> tuple[str, RewardFunction]:
    """A registered scorer as a reward function (the scorers outside the evaluation package, the demo's ``colour``,
    registered first)."""
    from .evaluation.scorers import available_scorers, build_scorer
    from .evaluation.scorers.registry import register_outside_scorers

    register_outside_scorers()
    if name not in available_scorers():
        raise ValueError(
            f"reward_funcs names {name!r}, which is no registered scorer; registered: "
            f"{', '.join(available_scorers())}. Pass a callable (prompts, images, **columns) -> list[float] for your "
            "own reward."
        )
    scorer = build_scorer(name)

    def score(prompts: Sequence[str], images: Sequence[Image.Image], **columns: Any) -> torch.Tensor:
        sources = columns.get("source_images") if scorer.edits else None
        return scorer(images, prompts, sources)

    return name, score


class RewardFunctions:
    """The reward functions of a run and their weights.

    Args:
        functions: registered scorer names or callables ``(prompts, images, **columns) -> list[float]``.
        weights: one weight per function (``None``: 1 each).
    """

    def __init__(self, functions: Sequence[str | RewardFunction], weights: Sequence[float] | None = None) -> None:
        if not functions:
            raise ValueError(
                "reward_funcs needs at least one reward function: reward_funcs=['pickscore'] (a registered scorer) "
                "or a callable (prompts, images, **columns) -> list[float]."
            )
        if weights is not None and len(weights) != len(functions):
            raise ValueError(f"{len(weights)} reward_weights for {len(functions)} reward functions; give one each.")
        self.names: list[str] = []
        self.functions: list[RewardFunction] = []
        for function in functions:
            name, call = _scorer_function(function) if isinstance(function, str) else (_name_of(function), function)
            if name in self.names:
                name = f"{name}_{len(self.names)}"
            self.names.append(name)
            self.functions.append(call)
        self.weights = [1.0] * len(functions) if weights is None else [float(w) for w in weights]

    def __call__(
        self, prompts: Sequence[str], images: Sequence[Image.Image], columns: dict[str, list[Any]] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(reward, per function)``: the weighted sum (float64, one per image) and each function's scores."""
        columns = columns or {}
        per_function: dict[str, torch.Tensor] = {}
        total = torch.zeros(len(images), dtype=torch.float64)
        for name, function, weight in zip(self.names, self.functions, self.weights):
            scores = torch.as_tensor(function(list(prompts), list(images), **columns), dtype=torch.float64)
            scores = scores.detach().cpu().reshape(-1)
            if scores.numel() != len(images):
                raise ValueError(
                    f"reward function {name!r} returned {scores.numel()} scores for {len(images)} images; it must "
                    "return one float per image."
                )
            per_function[name] = scores
            total += weight * scores
        return total, per_function

    def describe(self) -> list[str]:
        """``name`` or ``name (weight w)`` per function, for the model card."""
        return [
            name if math.isclose(w, 1.0) else f"{name} (weight {w:g})" for name, w in zip(self.names, self.weights)
        ]


def _name_of(function: RewardFunction) -> str:
    return getattr(function, "__name__", None) or type(function).__name__


def dataset_scoring_function(
    reward_funcs: str | RewardFunction | Sequence[str | RewardFunction] | None, reward_fn: RewardFn | None
) -> RewardFn | None:
    """The function that scores a dataset's images, ``(images, prompts) -> scores``: from ``reward_funcs`` (TRL's
    name and argument order, summed over the functions), or the deprecated ``reward_fn`` as given."""
    if reward_fn is not None:
        if reward_funcs is not None:
            raise ValueError("Pass reward_funcs or reward_fn (its deprecated name), not both.")
        warnings.warn(
            "DiffusionSDPOTrainer(reward_fn=...) is deprecated: pass reward_funcs= (a registered scorer name, or a "
            "callable (prompts, images) -> list[float], prompts first as in TRL's trainers).",
            FutureWarning,
            stacklevel=3,
        )
        return reward_fn
    if reward_funcs is None:
        return None
    functions = [reward_funcs] if isinstance(reward_funcs, str) or callable(reward_funcs) else list(reward_funcs)
    rewards = RewardFunctions(functions)

    def score(images: list, prompts: list[str]) -> torch.Tensor:
        return rewards(prompts, images)[0]

    return score
