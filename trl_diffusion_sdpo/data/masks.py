"""Loss masks made before training: derived from where the two images of each pair differ (editing pairs, whose
chosen and rejected images copy the source outside an edited region), and grown by a number of pixels.

:func:`add_loss_masks` writes the ``mask`` column that ``loss_mask=True`` trains on (docs/masked-loss.md); the
``train`` command calls it for ``--auto_mask`` and ``--mask_dilate``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from ..config.checks import Range
from .columns import CHOSEN, IMAGE_0, IMAGE_1, MASK, REJECTED
from .transforms import difference_mask, load_image

__all__ = ["AUTO_MASK_THRESHOLD", "add_loss_masks", "pair_difference_mask"]

#: the smallest difference (a fraction of the full range) that marks a pixel: about 13 of 255, above JPEG noise
AUTO_MASK_THRESHOLD = 0.05


def _frames(value: Any) -> list[Image.Image]:
    """An image value, or a video clip's frames (a list of image values), as RGB images."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return [load_image(v) for v in values]


def pair_difference_mask(first: Any, second: Any, threshold: float = AUTO_MASK_THRESHOLD) -> Image.Image:
    """White where any channel of the two images (or any frame of two clips) differs by more than ``threshold`` of
    the full range (:func:`~.transforms.difference_mask`), black elsewhere; an 8-bit grey image."""
    frames = [np.asarray(difference_mask(a, b, threshold)) for a, b in zip(_frames(first), _frames(second))]
    return Image.fromarray(np.maximum.reduce(frames), mode="L")


def dilated(mask: Image.Image, pixels: int) -> Image.Image:
    """``mask`` grown by ``pixels`` in every direction (a square max filter over ``2p+1`` pixels)."""
    return mask if pixels <= 0 else mask.filter(ImageFilter.MaxFilter(2 * pixels + 1))


def add_loss_masks(dataset: Any, derive: bool = False, threshold: float = AUTO_MASK_THRESHOLD, dilate: int = 0) -> Any:
    """``dataset`` with a ``mask`` column for ``loss_mask=True``: with ``derive``, each pair's mask is where its two
    images differ (:func:`pair_difference_mask`; TRL's ``chosen``/``rejected`` or Pick-a-Pic's ``jpg_0``/``jpg_1``,
    both of one size); else its own ``mask`` column. Every mask is then grown by ``dilate`` pixels at the images'
    size. A pair whose images differ nowhere gets an all-black mask, which training refuses naming the row (or
    skips with ``skip_invalid_rows``)."""
    Range(0, 1, high_open=True, hint="0.05 is about 13 of 255.").check("auto_mask_threshold", threshold)
    Range(0, integer=True, hint="In pixels; 0 keeps the mask as it is.").check("mask_dilate", dilate)
    if not derive and dilate == 0:
        return dataset
    columns = dataset.column_names or []
    if not derive and MASK not in columns:
        raise ValueError(f"mask_dilate grows the {MASK!r} column, which the dataset lacks (found {columns})")
    first, second = (CHOSEN, REJECTED) if CHOSEN in columns else (IMAGE_0, IMAGE_1)

    def make(row: dict[str, Any]) -> dict[str, Image.Image]:
        if derive:
            mask = pair_difference_mask(row[first], row[second], threshold)
        else:
            mask = load_image(row[MASK]).convert("L")
        return {MASK: dilated(mask, int(dilate))}

    return dataset.map(make)
