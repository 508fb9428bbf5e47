"""Preparing a preference dataset for training: validating every row, dropping ties and bad rows (loading one by
name or path: :func:`~.formats.load_preference_dataset`).

Training reads one form, TRL's: ``prompt``, ``chosen``, ``rejected`` (images as encoded bytes, ``datasets.Image``
values, PIL images or paths). Pick-a-Pic's label form (``caption``, ``jpg_0``, ``jpg_1``, ``label_0``: 1 image 0
preferred, 0 image 1 preferred, 0.5 a tie; or ``vote_type`` words) is mapped onto it, at load with
``dataset_columns="pickapic"`` or here, with one log line, when a dataset arrives in it (:mod:`.pickapic`); its ties
are dropped and counted, its bad labels checked as below, from the marks the mapping leaves in
:data:`~.columns.SKIP_COLUMN`.

With ``loss_type="smpo"`` each row also needs one score per image (``score_0``, ``score_1``: finite real numbers,
e.g. PickScore): the higher-scored image is the winner (equal scores: the rejected one, as SmPO's strict ``>``) and
each batch carries the pairs' scores (:func:`~.columns.order_pair`, :class:`~.collators.PreferenceCollator`).
Human ties are still dropped. :func:`~.scoring.add_reward_scores` writes the score columns with a ``reward_fn`` when a
dataset has none.

A map-style dataset is checked in full before training (missing columns, missing prompts, labels outside
{0, 0.5, 1}, undecodable images): the first problem raises a ``ValueError`` naming the row and column, or, with
``skip_invalid_rows``, every bad row is dropped and counted. The check runs through ``datasets.map`` so its result
is cached by the dataset's fingerprint. The data itself is never rewritten: rows are selected by index.

An ``IterableDataset`` cannot be scanned ahead (:mod:`.streamed`); its first row is checked strictly before training
and later bad rows are dropped by the collator and counted (the ``data/skipped_rows`` metric), never crashing a run
midway.
"""

from __future__ import annotations

import logging
from typing import Any

from datasets import Dataset, Features, IterableDataset, List, Value

from ..config._lazy import import_target
from ..config.messages import advice
from .columns import SOURCE_COLUMN, PreferenceColumns, column_names, in_label_form, is_tie
from .progress import datasets_progress_bars
from .validation import (
    DataError,
    DataReport,
    resolve_columns,
    row_check,
    with_undecoded_images,
)

__all__ = ["prepare_preference_dataset"]

logger = logging.getLogger(__name__)


# What the validation pass writes per row (the problem's column and reason, whether it is a tie, the images' sizes).
_CHECK_FEATURES = Features(
    {"_column": Value("string"), "_reason": Value("string"), "_tie": Value("bool"), "_sizes": List(Value("int64"))}
)


def prepare_preference_dataset(
    dataset: Dataset | IterableDataset, args: Any, split: str = "train"
) -> tuple[Dataset | IterableDataset, PreferenceColumns, DataReport]:
    """Validate ``dataset`` and drop ties (and, if asked, bad rows), without rewriting the data.

    Returns the dataset restricted to the usable rows and columns, the resolved columns and a report.
    Raises ``ValueError`` naming the split, row and column of the first problem unless ``args.skip_invalid_rows``.
    A dataset in Pick-a-Pic's label form is mapped to TRL's first (:func:`~.pickapic.as_trl_form`).
    """
    if isinstance(dataset, (Dataset, IterableDataset)) and in_label_form(column_names(dataset)):
        # Pick-a-Pic's mapping, its module imported for a dataset in that form only
        dataset = import_target("trl_diffusion_sdpo.data.pickapic:as_trl_form")(dataset, args, split)
    if isinstance(dataset, IterableDataset):  # its first row checked by the streamed data's module
        return import_target("trl_diffusion_sdpo.data.streamed:prepare_streamed")(dataset, args, split)
    if not isinstance(dataset, Dataset):
        raise TypeError(f"{split} dataset must be a datasets.Dataset or IterableDataset, got {type(dataset).__name__}")
    columns = resolve_columns(dataset.column_names, args)
    if len(dataset) == 0:
        raise DataError(f"The {split} dataset is empty (0 rows)")
    # Where each row came from (a pair folder, an annotation record), when a file-format reader wrote it.
    sources = dataset[SOURCE_COLUMN] if SOURCE_COLUMN in dataset.column_names else None
    dataset = with_undecoded_images(dataset.select_columns(columns.all), columns)
    report = DataReport(num_rows=len(dataset))

    def check(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        rows = [{k: batch[k][i] for k in batch} for i in range(len(indices))]
        problems = [row_check(row, columns) for row in rows]
        ties = [not p[0] and is_tie(row, columns) for row, p in zip(rows, problems)]
        return {
            "_column": [p[0] for p in problems],
            "_reason": [p[1] for p in problems],
            "_tie": ties,
            # the two images' decoded sizes as [w, h, w, h] (empty for a bad row or video), for the start summary
            "_sizes": [[n for size in p[2] for n in size] for p in problems],
        }

    with datasets_progress_bars(not getattr(args, "disable_tqdm", False)):
        checks = dataset.map(
            check,
            batched=True,
            batch_size=64,
            with_indices=True,
            remove_columns=dataset.column_names,
            features=_CHECK_FEATURES,  # not inferred: a first batch of bad rows or ties has no sizes to infer from
            num_proc=args.dataloader_num_workers or None,  # the data workers validate the rows too
            desc=f"Validating {split} preference pairs",
        )
    bad_columns, reasons, ties, sizes = checks["_column"], checks["_reason"], checks["_tie"], checks["_sizes"]
    keep: list[int] = []
    kept_sizes: list[tuple[int, int]] = []
    for index, (column, reason, tie, row_sizes) in enumerate(zip(bad_columns, reasons, ties, sizes)):
        if column:
            message = f"row {index}, column {column!r}: {reason}"
            if sources is not None and sources[index]:
                message += f" (from {sources[index]})"
            if not args.skip_invalid_rows:
                raise DataError(
                    f"Invalid {split} dataset {message}. Fix the data or set "
                    f"{advice('--skip_invalid_rows true', 'skip_invalid_rows=True')} to skip and count such rows."
                )
            report.invalid_skipped += 1
            if len(report.examples) < 5:
                report.examples.append(message)
        elif tie:
            report.ties_dropped += 1
        else:
            keep.append(index)
            kept_sizes.extend(zip(row_sizes[::2], row_sizes[1::2]))
    report.num_kept = len(keep)
    if columns.clip is None:  # images, each resized to the resolution (the start summary counts them)
        report.count_images(kept_sizes)
    if not keep:
        raise DataError(f"The {split} dataset is empty after filtering: {report.summary()}")
    if len(keep) < len(dataset):
        dataset = dataset.select(keep)
    if report.invalid_skipped:
        logger.warning(
            "Skipped %d invalid %s row(s) of %d (skip_invalid_rows=True; counted in data/skipped_rows): %s%s",
            report.invalid_skipped,
            split,
            report.num_rows,
            "; ".join(report.examples),
            "; ..." if report.invalid_skipped > len(report.examples) else "",
        )
    logger.info("Prepared %s dataset: %s", split, report.summary())
    return dataset, columns, report
