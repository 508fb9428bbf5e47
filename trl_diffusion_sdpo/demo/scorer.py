"""The demo's colour reward behind the evaluation package's ``Scorer`` interface.

``trl_diffusion_sdpo.evaluation`` (on its own branch for now) defines ``Scorer``: a class attribute ``name`` (the
metric's column name), ``scale`` (what the number means), ``mean_floor`` (``None`` unless the metric clamps its
mean), ``score(images, prompts) -> torch.Tensor`` (one float per pair), ``aggregate(scores) -> float`` and a
``__call__`` that checks the pairing and returns a flat float32 CPU tensor. :class:`ColourRewardScorer` implements
the same surface without importing that package; once it is merged, make ``Scorer`` its base class and register
it with ``register_scorer("colour", ColourRewardScorer)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from .shapes import Caption, colour_reward

__all__ = ["ColourRewardScorer"]


class ColourRewardScorer:
    """Colour agreement of an image with its ``"<colour> <shape> on <background>"`` prompt, in [0, 1].

    The formula is :func:`~trl_diffusion_sdpo.demo.shapes.colour_reward`'s, on the 8-bit pixels of the image
    (resized with a box filter to ``image_size`` if it is another size, since the scored regions are fixed pixel
    counts of the demo's 32x32 images).
    """

    name: str = "colour"
    scale: str = "colour agreement in [0, 1]: 1 - (centre + border RGB distances to the caption's colours) / 2 sqrt 3"
    mean_floor: float | None = None

    def __init__(self, image_size: int = 32) -> None:
        self.image_size = image_size

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """One reward per (image, prompt) pair; prompts must parse as demo captions."""
        size = (self.image_size, self.image_size)
        arrays = []
        for image in images:
            image = image.convert("RGB")
            if image.size != size:
                image = image.resize(size, resample=Image.Resampling.BOX)
            arrays.append(np.asarray(image, dtype=np.float64) / 255.0)
        captions = [Caption.parse(p) for p in prompts]
        return torch.from_numpy(colour_reward(np.stack(arrays), captions)).float()

    def aggregate(self, scores: torch.Tensor) -> float:
        """The mean (no floor)."""
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
