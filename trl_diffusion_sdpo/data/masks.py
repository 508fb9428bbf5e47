"""Loss masks: made before training, derived from where the two images of each pair differ (editing pairs, whose
chosen and rejected images copy the source outside an edited region) and grown by a number of pixels; and checked
for each row that trains on one.

:func:`add_loss_masks` writes the ``mask`` column that ``loss_mask=True`` trains on (docs/masked-loss.md); the
``train`` command calls it for ``--auto_mask`` and ``--mask_dilate``. With ``loss_mask=True`` the dataset's layout
takes that column (:func:`with_mask_column`) and every row's mask is checked against its images
(:func:`row_mask_problem`, :func:`mask_problem`); data without a loss mask never loads this module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter

from ..config._lazy import import_target
from ..config.checks import Range
from .collators import _load_from
from .columns import CHOSEN, IMAGE_0, IMAGE_1, MASK, REJECTED, PreferenceColumns
from .image_files import image_size
from .transforms import PairTransform, load_image
from .validation import DataError, image_problem

__all__ = [
    "AUTO_MASK_THRESHOLD",
    "add_loss_masks",
    "difference_mask",
    "mask_problem",
    "pair_mask",
    "pair_difference_mask",
    "row_mask_problem",
    "with_mask_column",
]

#: the smallest difference (a fraction of the full range) that marks a pixel: about 13 of 255, above JPEG noise
AUTO_MASK_THRESHOLD = 0.05


def _frames(value: Any) -> list[Image.Image]:
    """An image value, or a video clip's frames (a list of image values), as RGB images."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return [load_image(v) for v in values]


def difference_mask(first: Image.Image, second: Image.Image, threshold: float) -> Image.Image:
    """The loss mask of an editing pair (:func:`~.masks.add_loss_masks`): an 8-bit grey image, white (255) where any
    channel of the two RGB images differs by more than ``threshold`` of the full range (``|a - b| / 255 >
    threshold``), black elsewhere. Both images must have one size."""
    if first.size != second.size:
        raise ValueError(f"auto_mask needs a pair's images of one size, got {first.size} and {second.size}")
    difference = np.abs(np.asarray(first, dtype=np.int16) - np.asarray(second, dtype=np.int16)).max(axis=-1)
    return Image.fromarray(np.where(difference > threshold * 255.0, 255, 0).astype(np.uint8), mode="L")


def pair_difference_mask(first: Any, second: Any, threshold: float = AUTO_MASK_THRESHOLD) -> Image.Image:
    """White where any channel of the two images (or any frame of two clips) differs by more than ``threshold`` of
    the full range (:func:`difference_mask`), black elsewhere; an 8-bit grey image."""
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


def with_mask_column(layout: PreferenceColumns, column_names: Sequence[str]) -> PreferenceColumns:
    """``layout`` with the loss-mask column, for ``loss_mask=True``; refused where the dataset lacks it."""
    column = MASK
    if column not in column_names:
        raise DataError(
            f"loss_mask=True reads each row's mask from column {column!r}, which the dataset lacks (found "
            f"{sorted(column_names)}): add it (an image per row, white where the preference lives; mask.<ext> in a "
            "pair folder, a mask/ folder beside the side folders, or a mask column of paths in a table), or derive "
            "the masks of editing pairs with add_loss_masks / train --auto_mask (docs/masked-loss.md)"
        )
    return dataclasses.replace(layout, mask=column)


def mask_problem(first_size: tuple[int, int], second_size: tuple[int, int], mask: Image.Image | None) -> str:
    """Empty string if a pair can take a loss mask, else the reason: both images of one size (the mask marks the
    same region in each) and, for a given ``mask`` (8-bit grey), that size and at least one marked pixel."""
    if first_size != second_size:
        return (
            f"the two images are {first_size[0]}x{first_size[1]} and {second_size[0]}x{second_size[1]}: a loss mask "
            "marks one region in both, so they must have one size (resize them to match, or turn the mask off)"
        )
    if mask is None:
        return ""
    if mask.size != first_size:
        return (
            f"the mask is {mask.size[0]}x{mask.size[1]} and the images {first_size[0]}x{first_size[1]}: give a mask "
            "of the images' size"
        )
    if mask.getextrema()[1] == 0:
        return "the mask is all black: the pair would train nothing (mark its region in white, or drop the row)"
    return ""


def row_mask_problem(row: dict[str, Any], columns: PreferenceColumns) -> tuple[str, str]:
    """``(column, reason)`` of a row whose loss mask is missing, undecodable, of the wrong size or empty."""
    mask = None
    if columns.mask is not None:
        reason = image_problem(row.get(columns.mask))
        if reason:
            return columns.mask, reason
    try:
        sizes = [
            image_size(row.get(column))
            if columns.clip is None
            else import_target("trl_diffusion_sdpo.data.video:read_video")(row.get(column), columns.clip)[0].size
            for column in (columns.first, columns.second)
        ]
        if columns.mask is not None:
            mask = load_image(row.get(columns.mask)).convert("L")
    except Exception as err:  # checked to decode above
        return columns.mask or columns.first, f"cannot read the image: {err}"
    return columns.mask or columns.second, mask_problem(sizes[0], sizes[1], mask)


def pair_mask(
    row: dict[str, Any],
    winner: Image.Image,
    loser: Image.Image,
    columns: PreferenceColumns,
    transform: PairTransform,
    resized_only: bool = False,
) -> torch.Tensor | None:
    """A pair's loss mask ``[1, R, R]`` in [0, 1] as :meth:`~.transforms.PairTransform.mask` makes it
    (``resized_only``: for the trainer's crop) from the row's mask column (``loss_mask``; one mask serves every
    frame of a video clip); ``None`` without a mask. A ``ValueError`` names the column and the reason where the
    images' sizes differ or the mask is missing, of another size or empty."""
    if not columns.masked:
        return None
    winners, losers = (list(x) if isinstance(x, (list, tuple)) else [x] for x in (winner, loser))  # video: frames
    mask = _load_from(row.get(columns.mask), columns.mask).convert("L")
    problem = mask_problem(winners[0].size, losers[0].size, mask)
    column = columns.mask
    if problem:
        raise ValueError(f"column {column!r}: {problem}")
    return transform.mask(mask, resized_only)
