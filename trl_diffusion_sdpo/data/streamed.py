"""A streamed dataset (an ``IterableDataset``): it cannot be scanned ahead, so its first row is checked strictly
before training and later bad rows are dropped by the collator and counted (the ``data/skipped_rows`` metric), never
crashing a run midway. A map-style dataset, checked in full before training, never loads this module.
"""

from __future__ import annotations

from typing import Any

from datasets import IterableDataset

from .columns import ROW_INDEX_COLUMN, PreferenceColumns
from .validation import DataReport, resolve_columns, row_problem, with_undecoded_images

__all__ = ["prepare_streamed"]


def prepare_streamed(
    dataset: IterableDataset, args: Any, split: str
) -> tuple[IterableDataset, PreferenceColumns, DataReport]:
    """:func:`~.preparation.prepare_preference_dataset` of a streamed ``dataset``: its first row checked strictly
    (unless ``skip_invalid_rows``), every row numbered for the collator's messages, the images kept undecoded."""
    first = next(iter(dataset), None)
    if first is None:
        raise ValueError(f"The {split} dataset is empty")
    names = dataset.column_names or list(first.keys())
    columns = resolve_columns(names, args)
    column, reason = row_problem(first, columns)
    if column and not args.skip_invalid_rows:
        raise ValueError(f"Invalid {split} dataset row 0, column {column!r}: {reason}")
    dataset = with_undecoded_images(dataset.select_columns(columns.all), columns)
    dataset = dataset.map(lambda _, index: {ROW_INDEX_COLUMN: index}, with_indices=True)
    report = DataReport(streamed=True, image_sizes_unknown="" if columns.clip else "a streamed dataset")
    return dataset, columns, report
