"""The `Scorer` interface every reward model implements, and the registry that builds scorers by name.

A scorer maps a batch of (image, prompt) pairs to one float per pair. `scale` says in words what the number is
("raw cosine", "x100 cosine", ...) because papers report the same metric on different scales.
"""

from __future__ import annotations

import abc
import importlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

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

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, scale={self.scale!r})"


# name -> factory, or "package.module:attribute" naming it, imported when the scorer is first built (the built-in
# scorers' modules import transformers' CLIP and BLIP models, which listing the names should not pay for).
_REGISTRY: dict[str, Callable[..., Scorer] | str] = {}


def register_scorer(name: str, factory: Callable[..., Scorer] | str, overwrite: bool = False) -> None:
    """Make ``build_scorer(name, **kwargs)`` call ``factory(**kwargs)``. ``factory`` may be a `Scorer` subclass, or
    ``"package.module:attribute"`` naming one, imported on first use."""
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"A scorer named {name!r} is already registered; pass overwrite=True to replace it.")
    if isinstance(factory, str) and ":" not in factory:
        raise ValueError(f"A scorer factory given by name reads 'package.module:attribute', got {factory!r}.")
    _REGISTRY[name] = factory


def available_scorers() -> list[str]:
    """The registered scorer names, sorted."""
    return sorted(_REGISTRY)


def scorer_factory(name: str) -> Callable[..., Scorer]:
    """The factory registered under ``name`` (importing its module when it was registered by name)."""
    if name not in _REGISTRY:
        raise KeyError(f"Unknown scorer {name!r}. Registered scorers: {', '.join(available_scorers())}.")
    factory = _REGISTRY[name]
    if isinstance(factory, str):
        module, _, attribute = factory.partition(":")
        factory = _REGISTRY[name] = getattr(importlib.import_module(module), attribute)
    return factory


def build_scorer(name: str | Scorer, **kwargs: Any) -> Scorer:
    """A scorer instance from a registered name (or the instance itself, passed through)."""
    if isinstance(name, Scorer):
        return name
    return scorer_factory(name)(**kwargs)
