"""Preference data: column resolution, validation before training, pair transforms and collation.

Two input forms are accepted:

* Pick-a-Pic: ``caption``, ``jpg_0``, ``jpg_1`` (encoded bytes, ``datasets.Image`` values or PIL images) and
  ``label_0`` (1: image 0 preferred, 0: image 1 preferred, 0.5: tie). Ties are dropped and counted.
* TRL preference form: ``prompt``, ``chosen``, ``rejected``.

A map-style dataset is checked in full before training (missing columns, missing prompts, labels outside
{0, 0.5, 1}, undecodable images): the first problem raises a ``ValueError`` naming the row and column, or, with
``skip_invalid_rows``, every bad row is dropped and counted. The check runs through ``datasets.map`` so its result
is cached by the dataset's fingerprint. The data itself is never rewritten: rows are selected by index.

An ``IterableDataset`` cannot be scanned ahead; its first row is checked strictly before training and later bad
rows are dropped by the collator and counted (the ``data/skipped_rows`` metric), never crashing a run midway.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from datasets import Dataset, IterableDataset
from datasets import Image as ImageFeature
from PIL import Image

__all__ = [
    "DataReport",
    "PairTransform",
    "PreferenceCollator",
    "PreferenceColumns",
    "load_image",
    "load_preference_dataset",
    "mirrored_time_ids",
    "prepare_preference_dataset",
    "resized_size",
    "resolve_columns",
]

logger = logging.getLogger(__name__)

_LABEL_VALUES = (0.0, 0.5, 1.0)


@dataclass(frozen=True)
class PreferenceColumns:
    """Where a dataset keeps its prompt and images. ``label`` is ``None`` for TRL form (``first`` is chosen)."""

    prompt: str
    first: str
    second: str
    label: str | None = None

    @property
    def all(self) -> list[str]:
        return [c for c in (self.prompt, self.first, self.second, self.label) if c is not None]


@dataclass
class DataReport:
    """What preparation did to a dataset; logged before training."""

    num_rows: int | None = None
    num_kept: int | None = None
    ties_dropped: int = 0
    invalid_skipped: int = 0
    examples: list[str] = field(default_factory=list)  # first few reasons a row was skipped

    def summary(self) -> str:
        parts = [f"{self.num_kept} of {self.num_rows} rows kept", f"{self.ties_dropped} ties dropped"]
        parts.append(f"{self.invalid_skipped} invalid rows skipped")
        text = ", ".join(parts)
        if self.examples:
            text += " (e.g. " + "; ".join(self.examples[:3]) + ")"
        return text


def resolve_columns(column_names: Sequence[str], args: Any) -> PreferenceColumns:
    """Pick the Pick-a-Pic or the TRL layout from the column names, or raise naming what is missing."""
    names = set(column_names)
    pickapic = PreferenceColumns(args.caption_column, args.image_0_column, args.image_1_column, args.label_0_column)
    trl = PreferenceColumns(args.prompt_column, args.chosen_column, args.rejected_column)
    for layout in (pickapic, trl):
        if set(layout.all) <= names:
            return layout
    # Report against the layout the dataset resembles most.
    best = max((pickapic, trl), key=lambda layout: len(set(layout.all) & names))
    missing = [c for c in best.all if c not in names]
    raise ValueError(
        f"Dataset is missing column(s) {missing}. Expected Pick-a-Pic columns {pickapic.all} or TRL preference "
        f"columns {trl.all} (names can be changed in the config); found {sorted(names)}."
    )


def load_image(value: Any) -> Image.Image:
    """Decode an image given as bytes, a ``datasets.Image`` dict (``bytes``/``path``), a path or a PIL image."""
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, (bytes, bytearray, memoryview)):
        image = Image.open(io.BytesIO(bytes(value)))
    elif isinstance(value, dict) and (value.get("bytes") is not None or value.get("path")):
        source = value["bytes"] if value.get("bytes") is not None else value["path"]
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    elif isinstance(value, str):
        image = Image.open(value)
    elif value is None:
        raise ValueError("image is missing (None)")
    else:
        raise ValueError(f"cannot read an image from a {type(value).__name__}")
    image.load()
    return image.convert("RGB") if image.mode != "RGB" else image


def _check_image(value: Any) -> str:
    """Empty string if the image decodes, else the reason. JPEGs decode at 1/8 scale: fast, still complete."""
    try:
        if isinstance(value, Image.Image):
            return ""
        if isinstance(value, dict) and value.get("bytes") is None and value.get("path"):
            image = Image.open(value["path"])
        elif isinstance(value, dict):
            image = Image.open(io.BytesIO(value["bytes"]))
        elif isinstance(value, (bytes, bytearray, memoryview)):
            image = Image.open(io.BytesIO(bytes(value)))
        elif isinstance(value, str):
            image = Image.open(value)
        elif value is None:
            return "image is missing (None)"
        else:
            return f"cannot read an image from a {type(value).__name__}"
        image.draft("RGB", (64, 64))
        image.load()
        return ""
    except Exception as err:  # PIL raises many types for corrupt data
        return f"cannot decode image: {err}"


def _label_problem(label: Any) -> str:
    if label is None:
        return "label is missing (None)"
    try:
        value = float(label)
    except (TypeError, ValueError):
        return f"label {label!r} is not a number"
    if math.isnan(value) or not any(abs(value - v) < 1e-6 for v in _LABEL_VALUES):
        return f"label {label!r} is not one of 0, 0.5, 1"
    return ""


def _row_problem(row: dict[str, Any], columns: PreferenceColumns) -> tuple[str, str]:
    """``(column, reason)`` of the first problem in a row, or ``("", "")``. Ties are not problems."""
    prompt = row.get(columns.prompt)
    if not isinstance(prompt, str):
        return columns.prompt, f"prompt must be a string, got {type(prompt).__name__}"
    if columns.label is not None:
        reason = _label_problem(row.get(columns.label))
        if reason:
            return columns.label, reason
    for column in (columns.first, columns.second):
        reason = _check_image(row.get(column))
        if reason:
            return column, reason
    return "", ""


def _is_tie(label: Any) -> bool:
    return label is not None and abs(float(label) - 0.5) < 1e-6


def _undecoded(dataset: Dataset | IterableDataset, columns: PreferenceColumns):
    """Keep ``datasets.Image`` columns as raw bytes so a corrupt file is reported by us, not raised on access."""
    features = dataset.features or {}
    for column in (columns.first, columns.second):
        feature = features.get(column)
        if isinstance(feature, ImageFeature) and feature.decode:
            dataset = dataset.cast_column(column, ImageFeature(decode=False))
    return dataset


def prepare_preference_dataset(
    dataset: Dataset | IterableDataset, args: Any, split: str = "train"
) -> tuple[Dataset | IterableDataset, PreferenceColumns, DataReport]:
    """Validate ``dataset`` and drop ties (and, if asked, bad rows), without rewriting the data.

    Returns the dataset restricted to the usable rows and columns, the resolved columns and a report.
    Raises ``ValueError`` naming the split, row and column of the first problem unless ``args.skip_invalid_rows``.
    """
    if isinstance(dataset, IterableDataset):
        return _prepare_iterable(dataset, args, split)
    if not isinstance(dataset, Dataset):
        raise TypeError(f"{split} dataset must be a datasets.Dataset or IterableDataset, got {type(dataset).__name__}")
    columns = resolve_columns(dataset.column_names, args)
    dataset = _undecoded(dataset.select_columns(columns.all), columns)
    report = DataReport(num_rows=len(dataset))

    def check(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        rows = [{k: batch[k][i] for k in batch} for i in range(len(indices))]
        problems = [_row_problem(row, columns) for row in rows]
        ties = [
            columns.label is not None and not p[0] and _is_tie(row[columns.label]) for row, p in zip(rows, problems)
        ]
        return {"_column": [p[0] for p in problems], "_reason": [p[1] for p in problems], "_tie": ties}

    checks = dataset.map(
        check,
        batched=True,
        batch_size=64,
        with_indices=True,
        remove_columns=dataset.column_names,
        num_proc=args.dataset_num_proc,
        desc=f"Validating {split} preference pairs",
    )
    bad_columns, reasons, ties = checks["_column"], checks["_reason"], checks["_tie"]
    keep: list[int] = []
    for index, (column, reason, tie) in enumerate(zip(bad_columns, reasons, ties)):
        if column:
            message = f"row {index}, column {column!r}: {reason}"
            if not args.skip_invalid_rows:
                raise ValueError(
                    f"Invalid {split} dataset {message}. Fix the data or set skip_invalid_rows=True to skip and "
                    "count such rows."
                )
            report.invalid_skipped += 1
            if len(report.examples) < 5:
                report.examples.append(message)
        elif tie:
            report.ties_dropped += 1
        else:
            keep.append(index)
    report.num_kept = len(keep)
    if not keep:
        raise ValueError(f"The {split} dataset is empty after filtering: {report.summary()}")
    if len(keep) < len(dataset):
        dataset = dataset.select(keep)
    logger.info("Prepared %s dataset: %s", split, report.summary())
    return dataset, columns, report


def _prepare_iterable(
    dataset: IterableDataset, args: Any, split: str
) -> tuple[IterableDataset, PreferenceColumns, DataReport]:
    first = next(iter(dataset), None)
    if first is None:
        raise ValueError(f"The {split} dataset is empty")
    names = dataset.column_names or list(first.keys())
    columns = resolve_columns(names, args)
    column, reason = _row_problem(first, columns)
    if column and not args.skip_invalid_rows:
        raise ValueError(f"Invalid {split} dataset row 0, column {column!r}: {reason}")
    dataset = _undecoded(dataset.select_columns(columns.all), columns)
    return dataset, columns, DataReport()


def resized_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The size an image of ``width x height`` is resized to: shorter side ``resolution``, aspect ratio kept."""
    scale = resolution / min(width, height)
    return max(resolution, round(width * scale)), max(resolution, round(height * scale))


def mirrored_time_ids(time_ids: torch.Tensor) -> torch.Tensor:
    """SDXL ``time_ids [..., 6]`` of the mirrored view: ``crop_left`` becomes the crop's offset in the mirrored
    resized image, ``resized_width - target_width - crop_left``; everything else is unchanged."""
    mirrored = time_ids.clone()
    flat = mirrored.reshape(-1, 6)
    for row in flat:
        orig_h, orig_w, _, left, _, target_w = (int(v) for v in row.tolist())
        resized_w, _ = resized_size(orig_w, orig_h, int(target_w))
        row[3] = resized_w - target_w - left
    return mirrored


class PairTransform:
    """Resize the shorter side to ``resolution`` and crop a square: the same crop position for both images, or
    (``independent``, with ``random_crop``) a random position for each.

    Returns the pixel tensors in [-1, 1] and, per image, SDXL's micro-conditioning
    ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``: ``orig`` is the size of the image as decoded
    (before resizing), ``crop_top, crop_left`` the offset of the crop in the resized image, as diffusers' SDXL training
    script measures it, and ``target`` the resolution. The winner and the loser share the relative crop position but
    get their own sizes and offsets.

    The flip augmentation is not drawn here: the trainer mirrors the cropped pair (both images) itself, with the
    ``time_ids`` of the mirrored view (:func:`mirrored_time_ids`), so that its draw is reproducible (see the trainer).
    """

    def __init__(self, resolution: int, random_crop: bool = False, independent: bool = False) -> None:
        self.resolution = resolution
        self.random_crop = random_crop
        self.independent = independent  # a random crop of its own for each image (the Diffusion-SDPO authors')

    def _one(self, image: Image.Image, crop_fraction: tuple[float, float] | None):
        res = self.resolution
        orig_w, orig_h = image.size
        new_w, new_h = resized_size(orig_w, orig_h, res)
        if (new_w, new_h) != (orig_w, orig_h):
            image = image.resize((new_w, new_h), resample=Image.Resampling.BILINEAR)
        if crop_fraction is None:  # center crop, rounded like torchvision's CenterCrop
            top, left = round((new_h - res) / 2), round((new_w - res) / 2)
        else:  # each valid offset equally likely (as torchvision's RandomCrop), same relative position for the pair
            top = min(int(crop_fraction[0] * (new_h - res + 1)), new_h - res)
            left = min(int(crop_fraction[1] * (new_w - res + 1)), new_w - res)
        image = image.crop((left, top, left + res, top + res))
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        pixels = torch.from_numpy(array.copy()).permute(2, 0, 1)
        time_ids = torch.tensor([orig_h, orig_w, top, left, res, res], dtype=torch.float32)
        return pixels, time_ids

    def __call__(
        self, winner: Image.Image, loser: Image.Image, train: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``pixels [2, 3, R, R]`` (winner, loser) and ``time_ids [2, 6]``; a random crop only when training."""
        crop = (float(torch.rand(())), float(torch.rand(()))) if train and self.random_crop else None
        loser_crop = (float(torch.rand(())), float(torch.rand(()))) if crop is not None and self.independent else crop
        pixels_w, ids_w = self._one(winner, crop)
        pixels_l, ids_l = self._one(loser, loser_crop)
        return torch.stack([pixels_w, pixels_l]), torch.stack([ids_w, ids_l])

    def center_crop_pair(
        self, winner: Image.Image, loser: Image.Image, flip: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The center-cropped view of a pair, mirrored or not, as the trainer sees it (for the latent cache)."""
        pixels, time_ids = self(winner, loser, train=False)
        if flip:
            return pixels.flip(-1), mirrored_time_ids(time_ids)
        return pixels, time_ids


class PreferenceCollator:
    """Turn raw rows into ``pixel_values [B, 2, 3, R, R]`` (winner first), ``time_ids [B, 2, 6]`` and token ids.

    With ``with_flipped``, ``time_ids_flipped`` holds the ``time_ids`` of the mirrored views, for the trainer's flip.
    The only random draw here is a random crop (``torch``'s global generator); flip and prompt dropout are drawn by
    the trainer. ``train=False`` gives the deterministic evaluation view: center crop.
    """

    def __init__(
        self,
        columns: PreferenceColumns,
        tokenize: Callable[[list[str]], dict[str, torch.Tensor]],
        transform: PairTransform,
        train: bool = True,
        with_flipped: bool = False,
    ) -> None:
        self.columns = columns
        self.tokenize = tokenize
        self.transform = transform
        self.train = train
        self.with_flipped = with_flipped

    def _winner_loser(self, row: dict[str, Any]) -> tuple[Any, Any] | None:
        if self.columns.label is None:
            return row[self.columns.first], row[self.columns.second]
        problem = _label_problem(row[self.columns.label])
        if problem:  # a streamed row with a label outside {0, 0.5, 1} is bad, not a preference
            raise ValueError(f"column {self.columns.label!r}: {problem}")
        label = float(row[self.columns.label])
        if abs(label - 0.5) < 1e-6:
            return None
        first_wins = label > 0.5
        a, b = row[self.columns.first], row[self.columns.second]
        return (a, b) if first_wins else (b, a)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pixels, time_ids, prompts = [], [], []
        skipped = 0
        for row in rows:
            # Rows of a map-style dataset were validated up front; this guards streamed rows.
            try:
                prompt = row[self.columns.prompt]
                pair = self._winner_loser(row)
                if pair is None or not isinstance(prompt, str):
                    skipped += 1
                    continue
                winner, loser = load_image(pair[0]), load_image(pair[1])
            except Exception as err:
                logger.warning("Skipping a bad row: %s", err)
                skipped += 1
                continue
            pair_pixels, pair_ids = self.transform(winner, loser, train=self.train)
            pixels.append(pair_pixels)
            time_ids.append(pair_ids)
            prompts.append(prompt)
        res = self.transform.resolution
        batch: dict[str, torch.Tensor] = {
            "pixel_values": torch.stack(pixels) if pixels else torch.empty(0, 2, 3, res, res),
            "time_ids": torch.stack(time_ids) if time_ids else torch.empty(0, 2, 6),
            "num_skipped": torch.tensor(skipped, dtype=torch.float32),
        }
        if self.with_flipped:
            batch["time_ids_flipped"] = mirrored_time_ids(batch["time_ids"])
        batch.update(self.tokenize(prompts) if prompts else {})
        return batch


def load_preference_dataset(
    name_or_path: str, split: str = "train", streaming: bool = False, max_rows: int | None = None
) -> Dataset | IterableDataset:
    """Load a preference dataset from the Hub, a local data folder, or a folder written by ``save_to_disk``."""
    import os

    from datasets import DatasetDict, load_dataset, load_from_disk

    if os.path.isdir(name_or_path) and any(
        os.path.isfile(os.path.join(name_or_path, f)) for f in ("state.json", "dataset_dict.json")
    ):
        loaded = load_from_disk(name_or_path)
        dataset = loaded[split] if isinstance(loaded, DatasetDict) else loaded
        if streaming:
            dataset = dataset.to_iterable_dataset()
    else:
        dataset = load_dataset(name_or_path, split=split, streaming=streaming)
    if max_rows is not None:
        dataset = dataset.take(max_rows) if isinstance(dataset, IterableDataset) else dataset.select(
            range(min(max_rows, len(dataset)))
        )
    return dataset
