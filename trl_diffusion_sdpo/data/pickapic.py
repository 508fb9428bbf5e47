"""Pick-a-Pic's label form mapped onto TRL's preference form, the one schema training reads.

Pick-a-Pic keeps a row as ``caption``, ``jpg_0``, ``jpg_1`` and ``label_0``: 1 when image 0 is preferred, 0 when image
1 is, 0.5 for a tie; EditReward-Data writes the label as a vote word (``vote_type``: ``leftvote``, ``rightvote``,
``tie``; :data:`LABEL_WORDS`). :func:`pickapic_to_trl` turns every row into ``prompt``, ``chosen`` (the preferred
image), ``rejected``, with SmPO's ``score_0`` / ``score_1`` following their images, and keeps every row in its place:
a tie or a bad label is not dropped here but marked in :data:`~.columns.SKIP_COLUMN`, so that validation counts it
as it counts every other skipped row (a map-style dataset before training, the collator and the ``data/skipped_rows``
metric for a stream) and names it by its row. The loaders map with ``dataset_columns="pickapic"``;
:func:`as_trl_form` maps a dataset handed to the trainer in the label form, with one log line.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from datasets import Dataset, Image, IterableDataset, Value, concatenate_datasets

from ..config.messages import advice
from .columns import (
    CAPTION,
    CHOSEN,
    IMAGE_0,
    IMAGE_1,
    LABEL_0,
    PROMPT,
    REJECTED,
    SCORE_0,
    SCORE_1,
    SKIP_COLUMN,
    TIE_REASON,
    column_names,
    in_label_form,
)

__all__ = ["LABEL_WORDS", "as_trl_form", "label_problem", "pickapic_to_trl"]

# The setting that reads each column form, as a Python user writes it (the command line's flag: advice).
TRL_COLUMNS, PICKAPIC_COLUMNS = "dataset_columns='trl'", "dataset_columns='pickapic'"

logger = logging.getLogger(__name__)

_LABEL_VALUES = (0.0, 0.5, 1.0)
# Votes written as words, as EditReward-Data's ``vote_type`` column holds them (image 0 is the left output): read as
# the label of image 0.
LABEL_WORDS = {"leftvote": 1.0, "rightvote": 0.0, "tie": 0.5}


def label_value(label: Any) -> float:
    """Image 0's label as a number: the number itself, or a vote word of :data:`LABEL_WORDS`."""
    if isinstance(label, str) and label.strip().lower() in LABEL_WORDS:
        return LABEL_WORDS[label.strip().lower()]
    return float(label)


def label_problem(label: Any) -> str:
    """Empty string for a label of 0, 0.5 or 1 (within 1e-6) or a vote word, else why it is none of them."""
    if label is None:
        return "label is missing (None)"
    try:
        value = label_value(label)
    except (TypeError, ValueError):
        return f"label {label!r} is not a number or one of {sorted(LABEL_WORDS)}"
    if math.isnan(value) or not any(abs(value - v) < 1e-6 for v in _LABEL_VALUES):
        return f"label {label!r} is not one of 0, 0.5, 1"
    return ""


def _mark(label: Any, column: str) -> tuple[dict[str, str], bool]:
    """A row's :data:`~.columns.SKIP_COLUMN` value and whether image 1 is the chosen one (label 0)."""
    problem = label_problem(label)
    if problem:
        return {"column": column, "reason": problem}, False
    value = label_value(label)
    if abs(value - 0.5) < 1e-6:
        return {"column": "", "reason": TIE_REASON}, False
    return {"column": "", "reason": ""}, value < 0.5


def pickapic_to_trl(
    dataset: Dataset | IterableDataset,
    caption: str = "caption",
    image_0: str = "jpg_0",
    image_1: str = "jpg_1",
    label_0: str = "label_0",
    prompt: str = "prompt",
    chosen: str = "chosen",
    rejected: str = "rejected",
    score_0: str = "score_0",
    score_1: str = "score_1",
) -> Dataset | IterableDataset:
    """Pick-a-Pic's rows in TRL's preference columns, every row kept in its place.

    ``prompt`` is the caption; ``chosen`` is image 0 when ``label_0`` is 1 (or ``leftvote``), image 1 when it is 0
    (``rightvote``); ``score_0`` / ``score_1`` follow their images. A tie (0.5, ``tie``) or a label that is none of
    these keeps image 0 as ``chosen`` and is marked in :data:`~.columns.SKIP_COLUMN` (``{"column", "reason"}``: an
    empty column and :data:`~.columns.TIE_REASON` for a tie, the label column and the problem for a bad label),
    which validation counts and names as it did the label. The label column goes; other columns are kept.

    A map-style dataset is renamed and reindexed, not rewritten (the images are not copied; a dataset that already
    has an indices mapping, e.g. a shuffled one, is flattened once to add the mark column); a streamed one is mapped
    lazily.
    """
    label_form = [caption, image_0, image_1, label_0]
    missing = [c for c in label_form if dataset.column_names is not None and c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"Pick-a-Pic's columns {label_form} are mapped onto TRL's, but the dataset lacks {missing} (found "
            f"{sorted(dataset.column_names)}): rename them ({advice('--rename_columns', 'rename_columns')}), or read "
            f"data already in TRL's prompt, chosen, rejected with {advice('--dataset_columns trl', TRL_COLUMNS)}"
        )
    kept = {caption: prompt, image_0: chosen, image_1: rejected}
    swapped = {caption: prompt, image_0: rejected, image_1: chosen}
    scores = {score_0: score_1, score_1: score_0}  # SmPO's scores follow their images

    if isinstance(dataset, IterableDataset):  # column names may be unknown until a row is read

        def to_trl(row: dict[str, Any]) -> dict[str, Any]:
            mark, swap = _mark(row[label_0], label_0)
            out = {new: row[old] for old, new in (swapped if swap else kept).items()}
            if swap and score_0 in row and score_1 in row:
                out.update({new: row[old] for old, new in scores.items()})
            out[SKIP_COLUMN] = mark
            return out

        return dataset.map(to_trl, remove_columns=[caption, image_0, image_1, label_0])
    if score_0 in dataset.column_names and score_1 in dataset.column_names:
        swapped.update(scores)
        dataset = _one_score_type(dataset, score_0, score_1)
    if dataset.features[image_0] != dataset.features[image_1]:
        # The two sides' rows are stacked into one column each: one type, the undecoded image validation reads.
        dataset = dataset.cast_column(image_0, Image(decode=False)).cast_column(image_1, Image(decode=False))

    marks, swaps = zip(*(_mark(value, label_0) for value in dataset[label_0])) if len(dataset) else ((), ())
    first = [i for i, swap in enumerate(swaps) if not swap]
    second = [i for i, swap in enumerate(swaps) if swap]
    marked = dataset.add_column(SKIP_COLUMN, list(marks)).remove_columns(label_0)
    parts = [marked.select(first).rename_columns(kept), marked.select(second).rename_columns(swapped)]
    merged = concatenate_datasets(parts)
    origin = first + second
    return merged.select(sorted(range(len(origin)), key=origin.__getitem__))  # the rows' own order


def _one_score_type(dataset: Dataset, score_0: str, score_1: str) -> Dataset:
    """``dataset`` with both score columns of one type, so that the rows whose scores swap can be stacked with the
    others: float64 for two numeric types; text when one holds text (its rows are invalid anyway)."""
    features = dataset.features
    if features[score_0] == features[score_1]:
        return dataset
    dtypes = {getattr(features[c], "dtype", "") for c in (score_0, score_1)}
    target = Value("string") if "string" in dtypes else Value("float64")
    return dataset.cast_column(score_0, target).cast_column(score_1, target)


def as_trl_form(dataset: Any, args: Any, split: str = "train") -> Any:
    """``dataset`` in TRL's columns: mapped by :func:`pickapic_to_trl` (with one log line) when it has Pick-a-Pic's
    columns (:mod:`.columns`), else unchanged. A dataset holding both layouts raises, naming them."""
    if not isinstance(dataset, (Dataset, IterableDataset)):
        return dataset
    names = column_names(dataset)
    label_form = (CAPTION, IMAGE_0, IMAGE_1, LABEL_0)
    trl_form = (PROMPT, CHOSEN, REJECTED)
    if not in_label_form(names):
        return dataset
    clash = [c for c in trl_form if c in names]
    if clash:
        raise ValueError(
            f"The {split} dataset has both Pick-a-Pic's columns {list(label_form)} and TRL's {clash}: training reads "
            f"TRL's {list(trl_form)}. Drop one set, or map Pick-a-Pic's at load with "
            f"{advice('--dataset_columns pickapic', PICKAPIC_COLUMNS)} after dropping TRL's."
        )
    logger.info(
        "The %s dataset has Pick-a-Pic's columns %s: mapped to %s (%s maps them at load; ties and bad labels are "
        "skipped and counted as before)",
        split,
        list(label_form),
        list(trl_form),
        advice("--dataset_columns pickapic", PICKAPIC_COLUMNS),
    )
    return pickapic_to_trl(dataset, *label_form, *trl_form, SCORE_0, SCORE_1)
