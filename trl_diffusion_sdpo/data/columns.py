"""The one schema training reads: TRL's preference columns, Pick-a-Pic's label columns (mapped onto TRL's, with ties
and bad labels skipped and counted), and the optional columns of SmPO's scores, editing sources and loss masks; a
dataset's resolved layout (:class:`PreferenceColumns`) and which image of a row wins (:func:`order_pair`), the one
rule the collators and the latent cache read at every step.

Data in other column names is renamed before training: ``train --dataset_columns`` maps the known layouts at load,
and ``datasets.Dataset.rename_columns`` any other (docs/data.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .video import VideoClip

__all__ = [
    "ROW_INDEX_COLUMN",
    "SKIP_COLUMN",
    "SOURCE_COLUMN",
    "TIE_REASON",
    "PreferenceColumns",
    "column_names",
    "in_label_form",
    "is_tie",
    "order_pair",
    "prompt_column",
    "score_value",
    "skip_mark",
    "CAPTION",
    "CHOSEN",
    "IMAGE_0",
    "IMAGE_1",
    "LABEL_0",
    "MASK",
    "PROMPT",
    "REJECTED",
    "SCORE_0",
    "SCORE_1",
    "SOURCE_IMAGE",
    "SOURCE_IMAGES",
]

# TRL's preference columns
PROMPT, CHOSEN, REJECTED = "prompt", "chosen", "rejected"
# Pick-a-Pic's: label_0 is 1 (or "leftvote") when image 0 is preferred, 0 ("rightvote") when image 1 is, 0.5 a tie
CAPTION, IMAGE_0, IMAGE_1, LABEL_0 = "caption", "jpg_0", "jpg_1", "label_0"
# SmPO: the score of each image (the higher-scored one is the winner)
SCORE_0, SCORE_1 = "score_0", "score_1"
# editing: each row's source image, or its list of source images (multi-image editing)
SOURCE_IMAGE, SOURCE_IMAGES = "source_image", "source_images"
# the loss mask (loss_mask=True): an image per row, white where the preference lives
MASK = "mask"


def prompt_column(names: Sequence[str]) -> str | None:
    """The column holding each row's prompt: TRL's ``prompt``, else Pick-a-Pic's ``caption``; ``None`` with neither."""
    return PROMPT if PROMPT in names else CAPTION if CAPTION in names else None


# Why a row mapped from Pick-a-Pic's label form (:func:`~.pickapic.pickapic_to_trl`) gives no pair, as
# ``{"column", "reason"}``: both empty for a pair; an empty column and TIE_REASON for a tie (dropped and counted as a
# tie); the label column and its problem for a bad label (an invalid row, named by that column).
SKIP_COLUMN = "__skip__"


TIE_REASON = "a tie (equal labels or scores)"


# A streamed row's position in the stream, added by preparation so a bad row's warning can name it.
ROW_INDEX_COLUMN = "__row_index__"


# Where a row came from in the user's files (a pair folder, an annotation record), written by the file-format readers
# (:mod:`.formats`) so a bad row's error names the file as well as the row.
SOURCE_COLUMN = "__source__"


@dataclass(frozen=True)
class PreferenceColumns:
    """Where a dataset keeps its prompt and images, in TRL's form: ``first`` is the chosen image, ``second`` the
    rejected one. ``skip`` names :data:`SKIP_COLUMN` where the rows were mapped from Pick-a-Pic's label form.

    ``score_0``, ``score_1`` (SmPO only) hold a score per image (``first``, ``second``); when set, the scores, not the
    columns, order the pair. ``clip`` is set for video data (``num_frames``): ``first`` and ``second`` then hold
    videos, of which this clip is read (:mod:`.video`). ``source`` names an editing dataset's source column: one image
    per row, or a list of them when ``source_list``. ``mask`` names the loss-mask column (``loss_mask``; derived and
    grown before training by :func:`~.masks.add_loss_masks`).
    """

    prompt: str
    first: str
    second: str
    score_0: str | None = None
    score_1: str | None = None
    clip: VideoClip | None = None
    source: str | None = None
    source_list: bool = False
    mask: str | None = None
    skip: str | None = None

    @property
    def all(self) -> list[str]:
        columns = (self.prompt, self.first, self.second, self.score_0, self.score_1, self.source, self.mask)
        return [c for c in (*columns, self.skip) if c is not None]

    @property
    def masked(self) -> bool:
        """Whether each pair trains on a loss mask (read from ``mask``)."""
        return self.mask is not None

    @property
    def edits(self) -> bool:
        """Whether the rows are edits (a source column beside the prompt and the two images)."""
        return self.source is not None

    @property
    def scored(self) -> bool:
        return self.score_0 is not None and self.score_1 is not None


def skip_mark(row: dict[str, Any], columns: PreferenceColumns) -> tuple[str, str]:
    """``(column, reason)`` of a row's :data:`SKIP_COLUMN`: ``("", "")`` for a pair (and for every row without the
    column), ``("", TIE_REASON)`` for a tie, ``(label column, problem)`` for a bad label."""
    mark = row.get(columns.skip) if columns.skip is not None else None
    if not mark:
        return "", ""
    return mark.get("column") or "", mark.get("reason") or ""


def is_tie(row: dict[str, Any], columns: PreferenceColumns) -> bool:
    """Whether the row is a human tie (marked by the label form's mapping): dropped and counted apart from bad rows."""
    return skip_mark(row, columns) == ("", TIE_REASON)


def score_value(value: Any) -> float:
    """A score as a float, or ``ValueError`` saying why it is not a finite real number. A one-element list (as
    SmPO's scored Pick-a-Pic stores PickScore) counts as its element."""
    if isinstance(value, (list, tuple, np.ndarray)) and len(value) == 1:
        value = value[0]
    if value is None:
        raise ValueError("score is missing (None)")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"score {value!r} is not a real number")
    score = float(value)
    if not math.isfinite(score):
        raise ValueError(f"score {value!r} is not finite")
    return score


def order_pair(row: dict[str, Any], columns: PreferenceColumns) -> tuple[Any, Any, tuple[float, float] | None] | None:
    """``(winner, loser, scores)`` of a row, the one rule for both collators and the latent cache.

    ``None`` for a human tie (marked in :data:`SKIP_COLUMN`), which is dropped whatever the scores. With score columns
    the higher-scored image wins (equal scores: ``second``, as SmPO's strict ``>``; the pair's weight is then 0) and
    ``scores`` is ``(score_winner, score_loser)``; otherwise ``first`` (chosen) wins and ``scores`` is ``None``.
    Raises ``ValueError`` naming the column of a bad label (marked) or score.
    """
    column, reason = skip_mark(row, columns)
    if column:  # a streamed row with a label outside {0, 0.5, 1} is bad, not a preference
        raise ValueError(f"column {column!r}: {reason}")
    if reason:
        return None
    first, second = row[columns.first], row[columns.second]
    if columns.scored:
        scores = []
        for column in (columns.score_0, columns.score_1):
            try:
                scores.append(score_value(row.get(column)))
            except ValueError as err:
                raise ValueError(f"column {column!r}: {err}") from None
        score_0, score_1 = scores
        return (first, second, (score_0, score_1)) if score_0 > score_1 else (second, first, (score_1, score_0))
    return first, second, None


def column_names(dataset: Any) -> list[str]:
    """The columns of a ``datasets`` dataset; a streamed one without features, its first row's."""
    names = dataset.column_names
    if names is None:
        first = next(iter(dataset), None)
        names = list(first) if first is not None else []
    return list(names)


def in_label_form(names: Sequence[str]) -> bool:
    """Whether columns ``names`` hold Pick-a-Pic's label form (``caption``, ``jpg_0``, ``jpg_1``, ``label_0``), which
    :mod:`.pickapic` maps onto TRL's: asked of every dataset, so a run in TRL's form never loads that module."""
    return {CAPTION, IMAGE_0, IMAGE_1, LABEL_0} <= set(names)
