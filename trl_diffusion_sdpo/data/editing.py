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

from .columns import SOURCE_IMAGE, SOURCE_IMAGES, PreferenceColumns
from .image_files import image_size
from .validation import DataError, image_problem

__all__ = ["SOURCE_ASPECT_TOLERANCE", "source_problem", "source_values", "with_source_column"]

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
