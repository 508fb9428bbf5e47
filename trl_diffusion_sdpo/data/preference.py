"""Preference data: column resolution, validation before training, pair transforms and collation.

Two input forms are accepted:

* Pick-a-Pic: ``caption``, ``jpg_0``, ``jpg_1`` (encoded bytes, ``datasets.Image`` values or PIL images) and
  ``label_0`` (1: image 0 preferred, 0: image 1 preferred, 0.5: tie). Ties are dropped and counted.
* TRL preference form: ``prompt``, ``chosen``, ``rejected``.

With ``loss_type="smpo"`` either form also needs one score per image (``score_0``, ``score_1``: finite real numbers,
e.g. PickScore): the higher-scored image is the winner (equal scores: image 1, as SmPO's strict ``>``) and each pair
carries SmPO's weight ``pair_weights`` (see :func:`order_pair`). Human ties (``label_0 = 0.5``) are still dropped.
:func:`add_reward_scores` writes the score columns with a ``reward_fn`` when a dataset has none.

A map-style dataset is checked in full before training (missing columns, missing prompts, labels outside
{0, 0.5, 1}, undecodable images): the first problem raises a ``ValueError`` naming the row and column, or, with
``skip_invalid_rows``, every bad row is dropped and counted. The check runs through ``datasets.map`` so its result
is cached by the dataset's fingerprint. The data itself is never rewritten: rows are selected by index.

An ``IterableDataset`` cannot be scanned ahead; its first row is checked strictly before training and later bad
rows are dropped by the collator and counted (the ``data/skipped_rows`` metric), never crashing a run midway.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from datasets import Dataset, Features, IterableDataset, Value
from datasets import Image as ImageFeature
from PIL import Image

from ..objectives.smpo import PICKSCORE_MAX, PICKSCORE_MIN, smoothed_preference_weights
from .images import image_mode_problem, stored_bits, to_rgb
from .progress import datasets_progress_bars

__all__ = [
    "DataReport",
    "PairTransform",
    "PreferenceCollator",
    "PreferenceColumns",
    "add_reward_scores",
    "load_image",
    "load_preference_dataset",
    "mirrored_time_ids",
    "order_pair",
    "pair_weights",
    "prepare_preference_dataset",
    "resized_size",
    "resolve_columns",
]

logger = logging.getLogger(__name__)

_LABEL_VALUES = (0.0, 0.5, 1.0)
# A streamed row's position in the stream, added by preparation so a bad row's warning can name it.
ROW_INDEX_COLUMN = "__row_index__"


@dataclass(frozen=True)
class PreferenceColumns:
    """Where a dataset keeps its prompt and images. ``label`` is ``None`` for TRL form (``first`` is chosen).

    ``score_0``, ``score_1`` (SmPO only) hold a score per image (``first``, ``second``); when set, the scores, not the
    label, order the pair.
    """

    prompt: str
    first: str
    second: str
    label: str | None = None
    score_0: str | None = None
    score_1: str | None = None

    @property
    def all(self) -> list[str]:
        columns = (self.prompt, self.first, self.second, self.label, self.score_0, self.score_1)
        return [c for c in columns if c is not None]

    @property
    def scored(self) -> bool:
        return self.score_0 is not None and self.score_1 is not None


@dataclass
class DataReport:
    """What preparation did to a dataset; logged before training."""

    num_rows: int | None = None
    num_kept: int | None = None
    ties_dropped: int = 0
    invalid_skipped: int = 0
    examples: list[str] = field(default_factory=list)  # first few reasons a row was skipped
    streamed: bool = False  # rows are checked as they are read, so nothing is counted ahead of training

    def summary(self) -> str:
        if self.streamed:
            return (
                "streamed: the first row was checked; ties and invalid rows are dropped as rows are read during "
                "training and counted in the data/skipped_rows metric"
            )
        parts = [f"{self.num_kept} of {self.num_rows} rows kept", f"{self.ties_dropped} ties dropped"]
        parts.append(f"{self.invalid_skipped} invalid rows skipped")
        text = ", ".join(parts)
        if self.examples:
            text += " (e.g. " + "; ".join(self.examples[:3]) + ")"
        return text


def _uses_scores(args: Any) -> bool:
    return getattr(args, "loss_type", None) == "smpo"


def _score_columns(args: Any) -> tuple[str, str]:
    return args.score_0_column, args.score_1_column


def _resolve_layout(column_names: Sequence[str], args: Any) -> PreferenceColumns:
    """The Pick-a-Pic or TRL layout (without score columns), or raise naming what is missing."""
    names = set(column_names)
    pickapic = PreferenceColumns(args.caption_column, args.image_0_column, args.image_1_column, args.label_0_column)
    trl = PreferenceColumns(args.prompt_column, args.chosen_column, args.rejected_column)
    for layout in (pickapic, trl):
        if set(layout.all) <= names:
            return layout
    # Report against the layout the dataset resembles most.
    best = max((pickapic, trl), key=lambda layout: len(set(layout.all) & names))
    missing = [c for c in best.all if c not in names]
    scores = f" and, for loss_type='smpo', score columns {list(_score_columns(args))}" if _uses_scores(args) else ""
    raise ValueError(
        f"Dataset is missing column(s) {missing}. Expected Pick-a-Pic columns {pickapic.all} or TRL preference "
        f"columns {trl.all}{scores} (names can be changed in the config); found {sorted(names)}."
    )


def resolve_columns(column_names: Sequence[str], args: Any) -> PreferenceColumns:
    """Pick the Pick-a-Pic or the TRL layout from the column names, or raise naming what is missing.

    With ``loss_type="smpo"`` the two score columns (``score_0_column``, ``score_1_column``) are required as well and
    included in the result; for every other loss type they are ignored even when present.
    """
    layout = _resolve_layout(column_names, args)
    if not _uses_scores(args):
        return layout
    names = set(column_names)
    scores = _score_columns(args)
    missing = [c for c in scores if c not in names]
    if missing:
        raise ValueError(
            f"loss_type='smpo' needs a score per image, but the dataset is missing score column(s) {missing} "
            f"(expected {list(scores)}; names can be changed with score_0_column/score_1_column); found "
            f"{sorted(names)}. Alternatively hand DiffusionSDPOTrainer a reward_fn(images, prompts) to score both "
            "images of every row."
        )
    return dataclasses.replace(layout, score_0=scores[0], score_1=scores[1])


def load_image(value: Any) -> Image.Image:
    """Decode an image given as bytes, a ``datasets.Image`` dict (``bytes``/``path``), a path or a PIL image, to
    8-bit RGB with every PIL mode scaled by what its values mean (:func:`.images.to_rgb`; ``ValueError`` naming the
    mode when it cannot be)."""
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
    bits = stored_bits(image)  # before load(), which forgets the decoder's raw mode
    image.load()
    return to_rgb(image, bits)


def _check_image(value: Any) -> str:
    """Empty string if the image decodes, else the reason. JPEGs decode at 1/8 scale: fast, still complete."""
    try:
        if isinstance(value, Image.Image):
            return image_mode_problem(value)
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
        return image_mode_problem(image)
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


def _score_value(value: Any) -> float:
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


def _row_problem(row: dict[str, Any], columns: PreferenceColumns) -> tuple[str, str]:
    """``(column, reason)`` of the first problem in a row, or ``("", "")``. Ties are not problems (their scores
    are not looked at: the row is dropped anyway)."""
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
    if columns.scored and not (columns.label is not None and _is_tie(row[columns.label])):
        for column in (columns.score_0, columns.score_1):
            try:
                _score_value(row.get(column))
            except ValueError as err:
                return column, str(err)
    return "", ""


def _is_tie(label: Any) -> bool:
    return label is not None and abs(float(label) - 0.5) < 1e-6


def order_pair(row: dict[str, Any], columns: PreferenceColumns) -> tuple[Any, Any, tuple[float, float] | None] | None:
    """``(winner, loser, scores)`` of a row, the one rule for both collators and the latent cache.

    ``None`` for a human tie (label 0.5), which is dropped whatever the scores. With score columns the higher-scored
    image wins (equal scores: image 1, as SmPO's strict ``>``; the pair's weight is then 0) and ``scores`` is
    ``(score_winner, score_loser)``; otherwise the label decides (TRL form: ``first`` is chosen) and ``scores`` is
    ``None``. Raises ``ValueError`` naming the column of a bad label or score.
    """
    if columns.label is not None:
        problem = _label_problem(row.get(columns.label))
        if problem:  # a streamed row with a label outside {0, 0.5, 1} is bad, not a preference
            raise ValueError(f"column {columns.label!r}: {problem}")
        if _is_tie(row[columns.label]):
            return None
    first, second = row[columns.first], row[columns.second]
    if columns.scored:
        scores = []
        for column in (columns.score_0, columns.score_1):
            try:
                scores.append(_score_value(row.get(column)))
            except ValueError as err:
                raise ValueError(f"column {column!r}: {err}") from None
        score_0, score_1 = scores
        return (first, second, (score_0, score_1)) if score_0 > score_1 else (second, first, (score_1, score_0))
    if columns.label is None or float(row[columns.label]) > 0.5:
        return first, second, None
    return second, first, None


def pair_weights(
    scores: Sequence[tuple[float, float]] | torch.Tensor, gamma: float, score_min: float, score_max: float
) -> torch.Tensor:
    """SmPO's ``pair_weights [B]`` (float32) from ``(score_winner, score_loser)`` per pair, computed in float64."""
    scores = torch.as_tensor(scores, dtype=torch.float64).reshape(-1, 2)
    return smoothed_preference_weights(scores[:, 0], scores[:, 1], gamma, score_min, score_max).float()


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
    if len(dataset) == 0:
        raise ValueError(f"The {split} dataset is empty (0 rows)")
    dataset = _undecoded(dataset.select_columns(columns.all), columns)
    report = DataReport(num_rows=len(dataset))

    def check(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        rows = [{k: batch[k][i] for k in batch} for i in range(len(indices))]
        problems = [_row_problem(row, columns) for row in rows]
        ties = [
            columns.label is not None and not p[0] and _is_tie(row[columns.label]) for row, p in zip(rows, problems)
        ]
        return {"_column": [p[0] for p in problems], "_reason": [p[1] for p in problems], "_tie": ties}

    with datasets_progress_bars(not getattr(args, "disable_tqdm", False)):
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
    dataset = dataset.map(lambda _, index: {ROW_INDEX_COLUMN: index}, with_indices=True)
    return dataset, columns, DataReport(streamed=True)


RewardFn = Callable[[list[Image.Image], list[str]], "Sequence[float] | torch.Tensor"]


def add_reward_scores(
    dataset: Dataset | IterableDataset,
    args: Any,
    reward_fn: RewardFn | None,
    split: str = "train",
    batch_size: int = 16,
) -> Dataset | IterableDataset:
    """Write SmPO's two score columns with ``reward_fn`` when ``loss_type="smpo"`` and the dataset has neither.

    ``reward_fn(images, prompts)`` gets the decoded RGB images and their prompts (each row's first images, then its
    second images, ``2 * rows`` of each per call) and returns one finite score per image (a sequence or tensor).
    The scores go to ``args.score_0_column`` and ``args.score_1_column`` (float64) through ``dataset.map(...,
    batched=True)``: cached by the dataset's fingerprint for a map-style dataset, lazily for an
    ``IterableDataset``. Rows that cannot be scored (bad prompt, label or image) and human ties (dropped anyway) get
    NaN and no call; validation then reports or skips the bad ones.

    Returns the dataset unchanged when both score columns exist (``reward_fn`` is then not used) or when no
    ``reward_fn`` is given (:func:`resolve_columns` then names the missing columns). Raises ``ValueError`` for a
    ``reward_fn`` with another loss type, or when only one of the two score columns exists.
    """
    if reward_fn is None:
        return dataset
    if not _uses_scores(args):
        raise ValueError(
            f"reward_fn is only used by loss_type='smpo' (to score both images of a pair for SmPO's smoothed "
            f"preferences); loss_type={getattr(args, 'loss_type', None)!r} does not use it. Remove reward_fn or "
            "set loss_type='smpo'."
        )
    if not callable(reward_fn):
        raise TypeError(f"reward_fn must be callable as reward_fn(images, prompts), got {type(reward_fn).__name__}")
    names = dataset.column_names
    if names is None:  # a streamed dataset without features: read the column names off its first row
        first = next(iter(dataset), None)
        if first is None:
            raise ValueError(f"The {split} dataset is empty")
        names = list(first.keys())
    score_columns = _score_columns(args)
    present = [c for c in score_columns if c in names]
    if len(present) == 2:
        logger.info("The %s dataset has score columns %s; reward_fn is not used for it", split, list(score_columns))
        return dataset
    if present:
        raise ValueError(
            f"The {split} dataset has score column {present[0]!r} but not "
            f"{[c for c in score_columns if c not in present][0]!r}; provide both or neither (reward_fn then scores "
            "both images of every row)."
        )
    layout = _resolve_layout(names, args)
    dataset = _undecoded(dataset, layout)

    def score(batch: dict[str, list]) -> dict[str, list[float]]:
        size = len(batch[layout.prompt])
        scored: list[int] = []
        firsts, seconds, prompts = [], [], []
        for i in range(size):
            row = {k: batch[k][i] for k in batch}
            if _row_problem(row, layout)[0] or (layout.label is not None and _is_tie(row[layout.label])):
                continue
            scored.append(i)
            firsts.append(load_image(row[layout.first]))
            seconds.append(load_image(row[layout.second]))
            prompts.append(row[layout.prompt])
        score_0, score_1 = [math.nan] * size, [math.nan] * size
        if scored:
            values = reward_fn(firsts + seconds, prompts + prompts)
            values = torch.as_tensor(values).detach().reshape(-1).to("cpu", torch.float64).tolist()
            if len(values) != 2 * len(scored):
                raise ValueError(f"reward_fn returned {len(values)} scores for {2 * len(scored)} images")
            for j, i in enumerate(scored):
                score_0[i], score_1[i] = values[j], values[len(scored) + j]
        return {score_columns[0]: score_0, score_columns[1]: score_1}

    features = dataset.features
    if features is not None:
        features = Features({**features, score_columns[0]: Value("float64"), score_columns[1]: Value("float64")})
    kwargs: dict[str, Any] = {"desc": f"Scoring {split} images with reward_fn"} if isinstance(dataset, Dataset) else {}
    with datasets_progress_bars(not getattr(args, "disable_tqdm", False)):
        return dataset.map(score, batched=True, batch_size=batch_size, features=features, **kwargs)


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


def _pixels(image: Image.Image) -> torch.Tensor:
    """An 8-bit RGB image as ``[3, H, W]`` float32 in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


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

    def _resize(self, image: Image.Image) -> Image.Image:
        new_w, new_h = resized_size(*image.size, self.resolution)
        if (new_w, new_h) != image.size:
            image = image.resize((new_w, new_h), resample=Image.Resampling.BILINEAR)
        return image

    def _one(self, image: Image.Image, crop_fraction: tuple[float, float] | None):
        res = self.resolution
        orig_w, orig_h = image.size
        image = self._resize(image)
        new_w, new_h = image.size
        if crop_fraction is None:  # center crop, rounded like torchvision's CenterCrop
            top, left = round((new_h - res) / 2), round((new_w - res) / 2)
        else:  # each valid offset equally likely (as torchvision's RandomCrop), same relative position for the pair
            top = min(int(crop_fraction[0] * (new_h - res + 1)), new_h - res)
            left = min(int(crop_fraction[1] * (new_w - res + 1)), new_w - res)
        image = image.crop((left, top, left + res, top + res))
        time_ids = torch.tensor([orig_h, orig_w, top, left, res, res], dtype=torch.float32)
        return _pixels(image), time_ids

    def resized_pair(self, winner: Image.Image, loser: Image.Image) -> tuple[list[torch.Tensor], torch.Tensor]:
        """For a random crop drawn later by the trainer (keyed, so resume is exact): the two images resized but not
        cropped (``[3, h, w]`` each, in [-1, 1]) and their ``time_ids [2, 6]`` with crop offsets 0, to be filled in
        by :func:`~trl_diffusion_sdpo.step.batch.crop_pairs`."""
        pixels, time_ids = [], []
        for image in (winner, loser):
            orig_w, orig_h = image.size
            pixels.append(_pixels(self._resize(image)))
            res = self.resolution
            time_ids.append(torch.tensor([orig_h, orig_w, 0, 0, res, res], dtype=torch.float32))
        return pixels, torch.stack(time_ids)

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
    Nothing random is drawn here. With a random crop (``train`` and the transform's ``random_crop``) the images are
    only resized: ``pixel_values [B, 2, 3, H, W]`` holds them zero-padded to the largest, ``crop_sizes [B, 2, 2]``
    their ``(height, width)``, and the trainer crops with keyed draws (:func:`~trl_diffusion_sdpo.step.batch.
    crop_pairs`), so a resumed run crops exactly as the uninterrupted one. ``train=False`` gives the deterministic
    evaluation view: center crop.

    With ``smpo_gamma`` (``loss_type="smpo"``; ``columns`` must have score columns) the batch also holds SmPO's
    ``pair_weights [B]`` float32, :func:`~trl_diffusion_sdpo.objectives.smoothed_preference_weights` of the ordered
    pair's scores with ``smpo_gamma``, ``smpo_score_min`` and ``smpo_score_max``. Without it no weights are made.
    """

    def __init__(
        self,
        columns: PreferenceColumns,
        tokenize: Callable[[list[str]], dict[str, torch.Tensor]],
        transform: PairTransform,
        train: bool = True,
        with_flipped: bool = False,
        smpo_gamma: float | None = None,
        smpo_score_min: float = PICKSCORE_MIN,
        smpo_score_max: float = PICKSCORE_MAX,
    ) -> None:
        if smpo_gamma is not None and not columns.scored:
            raise ValueError("smpo_gamma was given but the columns have no score columns to weight pairs with")
        self.columns = columns
        self.tokenize = tokenize
        self.transform = transform
        self.train = train
        self.with_flipped = with_flipped
        self.smpo_gamma = smpo_gamma
        self.smpo_score_min = smpo_score_min
        self.smpo_score_max = smpo_score_max

    @property
    def crops_later(self) -> bool:
        """Whether the random crop is left to the trainer's keyed draws (training with ``random_crop``)."""
        return self.train and self.transform.random_crop

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pixels, time_ids, prompts, scores = [], [], [], []
        skipped = 0
        reasons: list[str] = []  # one per skipped row, for data.stream_guard's error
        for row in rows:
            # Rows of a map-style dataset were validated up front; this guards streamed rows.
            try:
                prompt = row[self.columns.prompt]
                if not isinstance(prompt, str):
                    raise ValueError(
                        f"column {self.columns.prompt!r}: prompt must be a string, got {type(prompt).__name__}"
                    )
                pair = order_pair(row, self.columns)  # a bad label or score raises, naming its column
                if pair is None:  # a tie
                    skipped += 1
                    reasons.append("a tie (equal labels or scores)")
                    continue
                winner_column, loser_column = (self.columns.first, self.columns.second)
                if pair[0] is not row[self.columns.first]:
                    winner_column, loser_column = loser_column, winner_column
                winner, loser = _load_from(pair[0], winner_column), _load_from(pair[1], loser_column)
            except Exception as err:
                position = row.get(ROW_INDEX_COLUMN)
                where = f"streamed row {position}" if position is not None else "a bad row"
                logger.warning("Skipping %s: %s", where, err)
                skipped += 1
                reasons.append(f"{where}: {err}")
                continue
            if self.crops_later:
                pair_pixels, pair_ids = self.transform.resized_pair(winner, loser)
            else:
                pair_pixels, pair_ids = self.transform(winner, loser, train=self.train)
            pixels.append(pair_pixels)
            time_ids.append(pair_ids)
            prompts.append(prompt)
            scores.append(pair[2])
        res = self.transform.resolution
        batch: dict[str, torch.Tensor] = {
            "time_ids": torch.stack(time_ids) if time_ids else torch.empty(0, 2, 6),
            "num_skipped": torch.tensor(skipped, dtype=torch.float32),
            "skip_reasons": reasons,
        }
        if self.crops_later:
            batch["pixel_values"], batch["crop_sizes"] = _padded_pairs(pixels, res)
        else:
            batch["pixel_values"] = torch.stack(pixels) if pixels else torch.empty(0, 2, 3, res, res)
        if self.with_flipped:
            batch["time_ids_flipped"] = mirrored_time_ids(batch["time_ids"])
        if self.smpo_gamma is not None:
            batch["pair_weights"] = pair_weights(scores, self.smpo_gamma, self.smpo_score_min, self.smpo_score_max)
        batch.update(self.tokenize(prompts) if prompts else {})
        return batch


def _load_from(value: Any, column: str) -> Image.Image:
    try:
        return load_image(value)
    except Exception as err:  # PIL raises many types for corrupt data
        raise ValueError(f"column {column!r}: {err}") from None


def _padded_pairs(pairs: list[list[torch.Tensor]], resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Resized pairs (``[3, h, w]`` each) zero-padded into ``[B, 2, 3, H, W]``, and their sizes ``[B, 2, 2]``."""
    if not pairs:
        return torch.empty(0, 2, 3, resolution, resolution), torch.empty(0, 2, 2)
    height = max(image.shape[1] for pair in pairs for image in pair)
    width = max(image.shape[2] for pair in pairs for image in pair)
    padded = torch.zeros(len(pairs), 2, 3, height, width)
    sizes = torch.zeros(len(pairs), 2, 2)
    for i, pair in enumerate(pairs):
        for k, image in enumerate(pair):
            padded[i, k, :, : image.shape[1], : image.shape[2]] = image
            sizes[i, k, 0], sizes[i, k, 1] = image.shape[1], image.shape[2]
    return padded, sizes


def load_preference_dataset(
    name_or_path: str,
    split: str = "train",
    streaming: bool = False,
    max_rows: int | None = None,
    config_name: str | None = None,
) -> Dataset | IterableDataset:
    """Load a preference dataset from the Hub, a local data folder, or a folder written by ``save_to_disk``
    (``config_name``: the dataset configuration, as ``load_dataset``'s ``name``)."""
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
        dataset = load_dataset(name_or_path, config_name, split=split, streaming=streaming)
    if max_rows is not None:
        dataset = (
            dataset.take(max_rows)
            if isinstance(dataset, IterableDataset)
            else dataset.select(range(min(max_rows, len(dataset))))
        )
    return dataset
