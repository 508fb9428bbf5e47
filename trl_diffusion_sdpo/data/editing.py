"""Editing data: each row's source image, or its list of source images, beside the prompt and the pair.

Editing data adds the source: ``source_image`` (one image, the picture the instruction edits) or ``source_images``
(a list, for multi-image editing and reference images); the prompt column then holds the instruction. A source
must decode, and a single source must have the edited images' aspect ratio within :data:`SOURCE_ASPECT_TOLERANCE`
(both are resized and center-cropped alike, so the crops then show the same part of the scene).

Data without a source column never loads this module: :func:`~.validation.resolve_columns` and
:func:`~.validation.row_problem` import it for a dataset that has one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from .collators import _load_from
from .columns import SOURCE_IMAGE, SOURCE_IMAGES, PreferenceColumns
from .image_files import image_size
from .validation import DataError, image_problem

__all__ = [
    "SOURCE_ASPECT_TOLERANCE",
    "check_editing_settings",
    "row_sources",
    "source_problem",
    "source_values",
    "with_source_column",
]

# How far a single source's aspect ratio may be from the chosen image's, as |log(ratio_source / ratio_chosen)|:
# 1 % keeps the two center crops within about 1 % of the crop's side of each other (5 px at 512).
SOURCE_ASPECT_TOLERANCE = 0.01


def with_source_column(layout: PreferenceColumns, column_names: Sequence[str]) -> PreferenceColumns:
    """``layout`` with the editing source column the dataset has (``source_image`` or ``source_images``), or
    unchanged for text-to-image data; both at once is refused."""
    single, multiple = SOURCE_IMAGE, SOURCE_IMAGES
    present = [column for column in (single, multiple) if column in column_names]
    if len(present) == 2:
        raise DataError(
            f"Dataset has both {single!r} (one source image per row) and {multiple!r} (a list per row): keep one. "
            "A single source belongs in a one-element list when the pipeline takes several."
        )
    if not present:
        return layout
    if layout.clip is not None:
        raise DataError(f"column {present[0]!r}: editing data (source images) is for image models, not video")
    return dataclasses.replace(layout, source=present[0], source_list=present[0] == multiple)


def source_values(row: dict[str, Any], columns: PreferenceColumns) -> list[Any]:
    """The source image values of an editing row, as a list (one for ``source_image``); raises ``ValueError`` naming
    the column when a ``source_images`` value is not a non-empty list."""
    value = row.get(columns.source)
    if not columns.source_list:
        return [value]
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, (list, tuple)):
        raise ValueError(
            f"column {columns.source!r}: expected a list of source images, got {type(value).__name__} (one image "
            "per row goes in a `source_image` column)"
        )
    if not value:
        raise ValueError(f"column {columns.source!r}: the list of source images is empty")
    return list(value)


def source_problem(row: dict[str, Any], columns: PreferenceColumns) -> str:
    """Empty string if the row's source image(s) decode and a single source matches the chosen image's aspect
    ratio, else the reason."""
    try:
        values = source_values(row, columns)
    except ValueError as err:
        return str(err).split(": ", 1)[1]
    for index, value in enumerate(values):
        reason = image_problem(value)
        if reason:
            which = "source image" if not columns.source_list else f"source image {index}"
            return f"{which}: {reason}"
    if columns.source_list:  # reference images: not aligned with the edit, any shape
        return ""
    try:
        (source_w, source_h), (target_w, target_h) = image_size(values[0]), image_size(row.get(columns.first))
    except Exception as err:  # checked to decode above; a header that then fails to read is still bad
        return f"cannot read the image size: {err}"
    if abs(math.log((source_w / source_h) / (target_w / target_h))) > SOURCE_ASPECT_TOLERANCE:
        return (
            f"the source is {source_w}x{source_h} and {columns.first!r} is {target_w}x{target_h}: an edit must keep "
            "the source's aspect ratio (both are resized and center-cropped alike, so other shapes would crop "
            "different parts of the scene); crop or pad the source to the edited images' shape"
        )
    return ""


def check_editing_settings(columns: PreferenceColumns, args: Any, family: Any) -> None:
    """The settings editing data cannot take on ``family`` (:func:`~.training_data.check_sources`, for data with a
    source column on an editing family): a ValueError naming the column or the field."""
    if columns.source_list and family.max_sources == 1:
        raise ValueError(
            f"column {columns.source!r} holds lists of source images, but {family.name} edits one image: use a "
            f"{SOURCE_IMAGE!r} column"
        )
    if args.random_crop:
        raise ValueError(
            "random_crop=True cannot be used with editing data: the source and the edited images must stay aligned, "
            "and the crop is drawn for the edited images only. Set random_crop=False (the center crop)."
        )
    if args.random_flip and args.independent_augmentation:
        raise ValueError(
            "random_flip=True with independent_augmentation=True mirrors the two edits of a pair independently, but "
            "they share one source: set independent_augmentation=False (a pair, its source included, is mirrored "
            "together) or random_flip=False."
        )
    if family.prompt_reads_sources and args.random_flip:
        raise ValueError(
            f"random_flip=True cannot be used with {family.name}: its prompt encoding reads the source images as "
            "the data gives them, while the flip mirrors the pair and its source latents, so the two would disagree. "
            "Set random_flip=False."
        )
    if family.prompt_reads_sources and args.proportion_empty_prompts > 0:
        raise ValueError(
            f"proportion_empty_prompts={args.proportion_empty_prompts} cannot be used with {family.name}: its prompt "
            "encoding reads the source images, so an empty prompt has no encoding of its own. Set it to 0."
        )


def row_sources(row: dict[str, Any], columns: PreferenceColumns, first: list[Any] | None) -> list[Any]:
    """An editing row's decoded source images, for the collator (:class:`~.collators.PreferenceCollator`); ``first``,
    the batch's first row's, sets how many each row must have."""
    values = source_values(row, columns)
    if first is not None and len(values) != len(first):
        raise ValueError(
            f"column {columns.source!r}: {len(values)} source images where the batch's first row has "
            f"{len(first)}; every row of a batch needs the same number (group the rows by their number of sources)"
        )
    return [_load_from(value, columns.source) for value in values]
