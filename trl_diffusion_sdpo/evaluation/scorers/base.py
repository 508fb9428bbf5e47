"""The `Scorer` interface every reward model implements, and the registry that builds scorers by name.

A scorer maps a batch of (image, prompt) pairs to one float per pair. `scale` says in words what the number is
("raw cosine", "x100 cosine", ...) because papers report the same metric on different scales.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from PIL import Image

from .registry import available_scorers, register_scorer, scorer_factory

__all__ = ["Scorer", "available_scorers", "build_scorer", "register_scorer", "resolve_device", "scorer_factory"]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as given, else CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Scorer(abc.ABC):
    """A reward model: ``score(images, prompts)`` returns a float32 CPU tensor with one score per pair.

    Subclasses set ``name`` (the metric's column name in the results) and ``scale`` (a human description of the
    number's units). ``mean_floor`` is set where the metric's convention clamps the set's mean from below
    (torchmetrics' CLIP score: ``max(mean, 0)``); `aggregate` applies it.
    """

    name: str = "scorer"
    scale: str = "unspecified"
    mean_floor: float | None = None

    @abc.abstractmethod
    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """One score per (image, prompt) pair."""

    def aggregate(self, scores: torch.Tensor) -> float:
        """The metric's value over a set of scores: the mean, clamped at ``mean_floor`` when that is set."""
        mean = float(scores.double().mean())
        return mean if self.mean_floor is None else max(mean, self.mean_floor)

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        if len(images) != len(prompts):
            raise ValueError(f"{self.name}: got {len(images)} images but {len(prompts)} prompts; they are paired.")
        if not images:
            return torch.zeros(0)
        return self.score(list(images), list(prompts)).detach().float().cpu().reshape(-1)

    def score_files(
        self, paths: Sequence[str], prompts: Sequence[str], batch_size: int, desc: str, progress: bool = True
    ) -> Iterator[list[float]]:
        """The scores of the image files ``paths`` (each with its prompt), ``batch_size`` images at a time, one list
        per batch as it is scored (so a caller may keep each batch before the next), under a progress bar."""
        from tqdm.auto import tqdm

        for start in tqdm(range(0, len(paths), batch_size), desc=desc, unit="batch", disable=not progress):
            images = [Image.open(path).convert("RGB") for path in paths[start : start + batch_size]]
            yield self(images, prompts[start : start + batch_size]).tolist()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, scale={self.scale!r})"


def build_scorer(name: str | Scorer, **kwargs: Any) -> Scorer:
    """A scorer instance from a registered name (or the instance itself, passed through)."""
    if isinstance(name, Scorer):
        return name
    return scorer_factory(name)(**kwargs)
