"""The demo's colour reward as an evaluation ``Scorer``, registered as ``colour`` when this module is imported
(the demo sits above the evaluation package, which never imports it): ``trl-diffusion-sdpo evaluate --scorer colour``
imports it and scores demo samples through the same interface.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from ..rewards.scorers.base import Scorer, register_scorer
from ..rewards.scorers.preflight import ScorerPromptError
from .shapes import BACKGROUNDS, COLOURS, SHAPES, Caption, all_captions, colour_reward

__all__ = ["ColourRewardScorer"]


class ColourRewardScorer(Scorer):
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

    @classmethod
    def check_prompts(cls, prompts: Sequence[str]) -> None:
        """Every prompt must be a demo caption, ``"<colour> <shape> on <background>"`` with the demo's words."""
        for index, prompt in enumerate(prompts):
            caption = _parsed(prompt)
            if caption is None:
                raise ScorerPromptError(
                    f"The colour scorer scores the demo's captions, '<colour> <shape> on <background>' (colours "
                    f"{', '.join(COLOURS)}; shapes {', '.join(SHAPES)}; backgrounds {', '.join(BACKGROUNDS)}), e.g. "
                    f"{all_captions()[0].text!r}; prompt {index} is {prompt!r}. Use the demo's prompts or another "
                    "scorer."
                )

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


def _parsed(prompt: str) -> Caption | None:
    """``prompt`` as a demo caption, or ``None`` where it is not one."""
    try:
        caption = Caption.parse(prompt)
    except ValueError:  # not four words
        return None
    known = caption.colour in COLOURS and caption.shape in SHAPES and caption.background in BACKGROUNDS
    return caption if known else None


register_scorer("colour", ColourRewardScorer)
