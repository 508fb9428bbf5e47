"""The `Scorer` interface every reward model implements, and the registry that builds scorers by name.

A scorer maps a batch of (image, prompt) pairs to one float per pair. `scale` says in words what the number is
("raw cosine", "x100 cosine", ...) because papers report the same metric on different scales.

Editing: the source image is an optional input. A scorer for edits subclasses `EditScorer` (``edits = True``) and
its ``score(images, prompts, sources)`` receives, per edited image, the list of its source image(s). Any other scorer
still scores edits: the edited image against the instruction, without the source (it says so once in the log).
"""

from __future__ import annotations

import abc
import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import torch
from PIL import Image

from .registry import available_scorers, register_scorer, scorer_factory

__all__ = [
    "EditScorer",
    "Scorer",
    "available_scorers",
    "build_scorer",
    "register_scorer",
    "scorer_factory",
    "scores_edits",
]

logger = logging.getLogger(__name__)

# Per edited image: its source image(s), or a function returning them (decoded only when the batch is scored).
Sources = Sequence[Sequence[Image.Image] | Callable[[], Sequence[Image.Image]]]


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
    # True for a reward model of edits: ``score`` then takes the source images too (see `EditScorer`).
    edits: ClassVar[bool] = False
    _sources_ignored_said: bool = False

    @abc.abstractmethod
    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """One score per (image, prompt) pair."""

    @classmethod
    def check_prompts(cls, prompts: Sequence[str]) -> None:
        """Raise a ``ValueError`` naming the first prompt this scorer cannot score, before any image is generated
        (a scorer that reads its prompts in a fixed form); any prompt by default."""
        return None

    @classmethod
    def model_sources(cls, **kwargs: Any) -> dict[str, str]:
        """The models the scorer built with ``kwargs`` loads, as ``{constructor argument: Hub id or local path}``,
        checked before any image is generated (:mod:`.preflight`); none by default."""
        return {}

    def aggregate(self, scores: torch.Tensor) -> float:
        """The metric's value over a set of scores: the mean, clamped at ``mean_floor`` when that is set."""
        mean = float(scores.double().mean())
        return mean if self.mean_floor is None else max(mean, self.mean_floor)

    def __call__(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        sources: Sequence[Sequence[Image.Image]] | None = None,
    ) -> torch.Tensor:
        """One score per image. ``sources``: per image, the source image(s) it was edited from; an `EditScorer`
        needs them, any other scorer ignores them (scoring the edit against its instruction) and says so once."""
        if len(images) != len(prompts):
            raise ValueError(f"{self.name}: got {len(images)} images but {len(prompts)} prompts; they are paired.")
        if sources is not None and len(sources) != len(images):
            raise ValueError(
                f"{self.name}: got {len(images)} images but {len(sources)} source lists; they are paired."
            )
        if self.edits and sources is None:
            raise ValueError(
                f"{self.name} scores edits: it needs each image's source image(s) (a prompt set with source_image or "
                "source_images columns)."
            )
        if not images:
            return torch.zeros(0)
        if self.edits:
            scores = self.score(list(images), list(prompts), [list(s) for s in sources])
        else:
            if sources is not None and not self._sources_ignored_said:
                logger.warning(
                    "%s is a text-to-image scorer: it scores each edited image against its instruction, without the "
                    "source image (register an EditScorer to compare them).",
                    self.name,
                )
                self._sources_ignored_said = True
            scores = self.score(list(images), list(prompts))
        return scores.detach().float().cpu().reshape(-1)

    def score_files(
        self,
        paths: Sequence[str],
        prompts: Sequence[str],
        batch_size: int,
        desc: str,
        progress: bool = True,
        sources: Sources | None = None,
    ) -> Iterator[list[float]]:
        """The scores of the image files ``paths`` (each with its prompt and, for edits, ``sources``: its source
        images or a function returning them), ``batch_size`` images at a time, one list per batch as it is scored
        (so a caller may keep each batch before the next), under a progress bar."""
        from tqdm.auto import tqdm

        for start in tqdm(range(0, len(paths), batch_size), desc=desc, unit="batch", disable=not progress):
            images = [Image.open(path).convert("RGB") for path in paths[start : start + batch_size]]
            batch_sources = None
            if sources is not None:
                entries = sources[start : start + batch_size]
                # A text-to-image scorer never reads them: pass placeholders instead of decoding every source.
                batch_sources = [(list(e()) if callable(e) else list(e)) if self.edits else [] for e in entries]
            yield self(images, prompts[start : start + batch_size], batch_sources).tolist()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, scale={self.scale!r})"


class EditScorer(Scorer):
    """A reward model of edits: ``score(images, prompts, sources)``, where ``sources[i]`` lists the source image(s)
    (8-bit RGB PIL images, usually one; several for multi-image editing) that ``images[i]`` was edited from with the
    instruction ``prompts[i]``. Register it like any scorer (`register_scorer`); `evaluate` and `make_pairs` pass the
    sources of a prompt set of edits and refuse it, before generating, for a text-to-image prompt set."""

    edits: ClassVar[bool] = True

    @abc.abstractmethod
    def score(  # type: ignore[override]
        self, images: Sequence[Image.Image], prompts: Sequence[str], sources: Sequence[Sequence[Image.Image]]
    ) -> torch.Tensor:
        """One score per (edited image, instruction, source images)."""


def scores_edits(entry: str | Scorer) -> bool:
    """Whether a scorer instance, or the factory registered under a name, scores edits (needs source images)."""
    if isinstance(entry, Scorer):
        return entry.edits
    return getattr(scorer_factory(entry), "edits", False) is True


def arguments_with_defaults(factory: Callable[..., Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` completed with the defaults of ``factory``'s signature (for :meth:`Scorer.model_sources`)."""
    parameters = inspect.signature(factory).parameters.values()
    defaults = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
    return {**defaults, **kwargs}


def build_scorer(name: str | Scorer, **kwargs: Any) -> Scorer:
    """A scorer instance from a registered name (or the instance itself, passed through)."""
    if isinstance(name, Scorer):
        return name
    return scorer_factory(name)(**kwargs)
