"""Is a preference dataset usable, and which image of a row wins: column layouts, row checks, pair ordering.

One layout is read: TRL's preference form (``prompt``, ``chosen``, ``rejected``; Pick-a-Pic's label form is mapped
onto it by :mod:`.pickapic`, which marks ties and bad labels in :data:`SKIP_COLUMN`). With ``loss_type="smpo"`` each
row also needs one finite score per image (``score_0``, ``score_1``), and the scores, not the order of the columns,
order the pair (:func:`order_pair`, the one rule for every collator and cache).

The optional columns' checks sit beside their data, each module imported when a dataset has that column: editing
sources (:mod:`.editing`), loss masks (:mod:`.masks`), video clips (:mod:`.video`).
"""

from __future__ import annotations

import dataclasses
import io
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from datasets import Dataset, IterableDataset
from datasets import Image as ImageFeature
from datasets import List as ListFeature
from datasets import Video as VideoFeature
from PIL import Image

from ..config._lazy import import_target
from ..config.messages import advice
from ..objectives import objective_class
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
    SOURCE_IMAGE,
    SOURCE_IMAGES,
    PreferenceColumns,
    is_tie,
    score_value,
    skip_mark,
)
from .errors import DataError
from .transforms import image_mode_problem, resized_size

if TYPE_CHECKING:
    from .video import VideoClip

__all__ = [
    "DataError",
    "DataReport",
    "image_check",
    "image_problem",
    "resize_summary",
    "resolve_columns",
    "row_check",
    "row_problem",
    "video_clip",
]

# ``(width, height)`` of an image as decoded, before any resizing.
ImageSize = tuple[int, int]


@dataclass
class DataReport:
    """What preparation did to a dataset; logged before training."""

    num_rows: int | None = None
    num_kept: int | None = None
    ties_dropped: int = 0
    invalid_skipped: int = 0
    examples: list[str] = field(default_factory=list)  # first few reasons a row was skipped
    streamed: bool = False  # rows are checked as they are read, so nothing is counted ahead of training
    # The kept pairs' images by decoded size (size -> how many), read by the decode that validates them; None where
    # no pass read them ahead of training, ``image_sizes_unknown`` then saying why (empty: no images to resize).
    image_sizes: dict[ImageSize, int] | None = None
    image_sizes_unknown: str = ""

    def count_images(self, sizes: Iterable[ImageSize]) -> None:
        """Add the decoded sizes of kept images to :attr:`image_sizes`."""
        counted = Counter(self.image_sizes or {})
        counted.update(sizes)
        self.image_sizes = dict(counted)

    def resize_text(self, resolution: int, random_crop: bool) -> str:
        """How the kept images are resized and cropped to ``resolution`` (:func:`resize_summary`), that it is not
        known before training and why, or ``""`` when no image is resized or cropped (or there are none)."""
        if self.image_sizes is None:
            if not self.image_sizes_unknown:
                return ""
            return (
                f"image sizes not known up front ({self.image_sizes_unknown}): each image is resized to shorter side "
                f"{resolution} and {_crop_name(random_crop)}ped to {resolution}x{resolution}"
            )
        return resize_summary(self.image_sizes, resolution, random_crop)

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


# Resize groups (one per decoded size) that :func:`resize_summary` names; the rest are counted together.
SIZES_NAMED = 3


def _crop_name(random_crop: bool) -> str:
    return "random crop" if random_crop else "center crop"


def resize_summary(sizes: Mapping[ImageSize, int], resolution: int, random_crop: bool) -> str:
    """What :class:`~.transforms.PairTransform` does to images of these decoded sizes (``(width, height)`` -> how
    many) at ``resolution``, e.g. ``12 of 40 images resized from 64x64 to 32x32 (center crop to 32x32: 0)``: an
    image is resized when its shorter side is not ``resolution`` (to :func:`~.transforms.resized_size`), and cropped
    when that size is not square. The most common resizes are named, up to :data:`SIZES_NAMED`; ``""`` when no image
    is resized or cropped."""
    total = sum(sizes.values())
    resized: list[tuple[int, ImageSize, ImageSize]] = []
    cropped = 0
    for (width, height), count in sizes.items():
        target = resized_size(width, height, resolution)
        if min(width, height) != resolution:
            resized.append((count, (width, height), target))
        if target != (resolution, resolution):
            cropped += count
    if not resized and not cropped:
        return ""
    resized.sort(key=lambda group: (-group[0], group[1]))
    steps = [f"from {w}x{h} to {tw}x{th}" for _, (w, h), (tw, th) in resized[:SIZES_NAMED]]
    if len(resized) <= 1:
        detail = f" {steps[0]}" if steps else ""
    else:
        detail = ": " + ", ".join(f"{count} {step}" for (count, _, _), step in zip(resized, steps))
        if len(resized) > SIZES_NAMED:
            others = sum(count for count, _, _ in resized[SIZES_NAMED:])
            detail += f", {others} from {len(resized) - SIZES_NAMED} other sizes"
    return (
        f"{sum(count for count, _, _ in resized)} of {total} images resized{detail} "
        f"({_crop_name(random_crop)} to {resolution}x{resolution}: {cropped})"
    )


def uses_scores(args: Any) -> bool:
    """Whether ``args.loss_type`` names an objective that reads the data's pair scores (its ``needs_pair_scores``:
    SmPO, or one registered with :func:`~trl_diffusion_sdpo.objectives.register_objective`)."""
    loss_type = getattr(args, "loss_type", None)
    if loss_type is None:
        return False
    return objective_class(loss_type).needs_pair_scores


def score_columns_of(args: Any) -> tuple[str, str]:
    return SCORE_0, SCORE_1


def resolve_layout(column_names: Sequence[str], args: Any) -> PreferenceColumns:
    """TRL's layout (without score columns), or raise naming what is missing; a dataset whose columns resemble
    Pick-a-Pic's more is told what it lacks of those (they are mapped onto TRL's: :func:`~.pickapic.as_trl_form`)."""
    names = set(column_names)
    trl = PreferenceColumns(PROMPT, CHOSEN, REJECTED)
    if set(trl.all) <= names:
        return dataclasses.replace(trl, skip=SKIP_COLUMN if SKIP_COLUMN in names else None)
    pickapic = [CAPTION, IMAGE_0, IMAGE_1, LABEL_0]
    missing = [c for c in trl.all if c not in names]
    if len(set(pickapic) & names) > len(set(trl.all) & names):
        missing = [c for c in pickapic if c not in names]
    scores = ""
    if uses_scores(args):
        scores = f" and, for loss_type={args.loss_type!r}, score columns {list(score_columns_of(args))}"
    columns = "dataset_columns='pickapic'"
    raise DataError(
        f"Dataset is missing column(s) {missing}. Expected TRL preference columns {trl.all}{scores}, or Pick-a-Pic "
        f"columns {pickapic}, which are mapped onto them ({advice('--dataset_columns pickapic', columns)}; rename "
        f"other columns to these with {advice('--rename_columns', 'rename_columns')}); found {sorted(names)}."
    )


def video_clip(args: Any) -> VideoClip | None:
    """The frames a video run reads (``num_frames``, ``frame_stride``), or ``None`` for image data."""
    if getattr(args, "num_frames", None) is None:
        return None
    return _optional("video:VideoClip")(args.num_frames, getattr(args, "frame_stride", 1))


def resolve_columns(column_names: Sequence[str], args: Any) -> PreferenceColumns:
    """Pick the Pick-a-Pic or the TRL layout from the column names, or raise naming what is missing.

    With an objective that reads pair scores (``loss_type="smpo"``; :func:`uses_scores`) the two score columns
    (``score_0``, ``score_1``) are required as well and included in the result; for every other loss
    type they are ignored even when present.
    """
    layout = resolve_layout(column_names, args)
    if video_clip(args) is not None:  # video data
        layout = dataclasses.replace(layout, clip=video_clip(args))
    if SOURCE_IMAGE in column_names or SOURCE_IMAGES in column_names:  # editing data
        layout = _optional("editing:with_source_column")(layout, column_names)
    if getattr(args, "loss_mask", False):
        layout = _optional("masks:with_mask_column")(layout, column_names)
    if not uses_scores(args):
        return layout
    names = set(column_names)
    scores = score_columns_of(args)
    missing = [c for c in scores if c not in names]
    if missing:
        raise DataError(
            f"loss_type={args.loss_type!r} needs a score per image, but the dataset is missing score column(s) "
            f"{missing} (expected {list(scores)}; rename the dataset's score columns to these); found "
            f"{sorted(names)}. Alternatively hand DiffusionSDPOTrainer reward_funcs (a registered scorer name or a "
            "callable (prompts, images) -> list[float]) to score both images of every row."
        )
    return dataclasses.replace(layout, score_0=scores[0], score_1=scores[1])


def _decode_check(image: Image.Image) -> tuple[str, ImageSize | None]:
    """``("", size)`` if the opened ``image`` decodes, else ``(the reason, None)``; ``size`` is ``(width, height)``
    as the file stores it. JPEGs decode at 1/8 scale: fast, still complete (the size is read before, from the
    header)."""
    size = image.size
    image.draft("RGB", (64, 64))
    image.load()
    problem = image_mode_problem(image)
    return problem, None if problem else size


def image_check(value: Any) -> tuple[str, ImageSize | None]:
    """``("", (width, height))`` if the image decodes, else ``(the reason, None)``; a file is decoded once while it
    is unchanged. The size is the image's as decoded, before any resizing: what the start summary counts
    (:meth:`DataReport.resize_text`)."""
    try:
        if isinstance(value, Image.Image):
            problem = image_mode_problem(value)
            return problem, None if problem else value.size
        path = value["path"] if isinstance(value, dict) and value.get("bytes") is None else value
        if isinstance(path, str) and path:  # an image file: its checks load with the first image given by path
            return import_target("trl_diffusion_sdpo.data.image_files:image_file_check")(path)
        if isinstance(value, dict) and value.get("bytes") is not None:
            return _decode_check(Image.open(io.BytesIO(value["bytes"])))
        if isinstance(value, (bytes, bytearray, memoryview)):
            return _decode_check(Image.open(io.BytesIO(bytes(value))))
        if value is None:
            return "image is missing (None)", None
        if path == "" or isinstance(value, dict):
            return "image is missing (an empty path and no bytes)", None
        return f"cannot read an image from a {type(value).__name__}", None
    except Exception as err:  # PIL raises many types for corrupt data
        return f"cannot decode image: {err}", None


def image_problem(value: Any) -> str:
    """Empty string if the image decodes, else the reason (:func:`image_check`)."""
    return image_check(value)[0]


def row_problem(row: dict[str, Any], columns: PreferenceColumns) -> tuple[str, str]:
    """``(column, reason)`` of the first problem in a row, or ``("", "")`` (:func:`row_check`)."""
    column, reason, _ = row_check(row, columns)
    return column, reason


def row_check(row: dict[str, Any], columns: PreferenceColumns) -> tuple[str, str, list[ImageSize]]:
    """``(column, reason, [])`` of the first problem in a row, or ``("", "", sizes)``: the decoded ``(width,
    height)`` of its two images (``columns.first``, ``columns.second``), read by the same decode that checks them
    (none for video clips). Ties are not problems (their scores are not looked at: the row is dropped anyway)."""
    prompt = row.get(columns.prompt)
    if prompt is None:
        missing = "prompt is missing (None; the file readers read an empty caption or cell as missing)"
        return columns.prompt, missing, []
    if not isinstance(prompt, str):
        return columns.prompt, f"prompt must be a string, got {type(prompt).__name__}", []
    column, reason = skip_mark(row, columns)
    if column:  # a bad label, named by its column as the label form had it
        return column, reason, []
    sizes: list[ImageSize] = []
    for column in (columns.first, columns.second):
        value = row.get(column)
        if columns.clip is None:
            reason, size = image_check(value)
            if size is not None:
                sizes.append(size)
        else:
            reason = _optional("video:clip_problem")(value, columns.clip)
        if reason:
            return column, reason, []
    if columns.edits:
        reason = _optional("editing:source_problem")(row, columns)
        if reason:
            return columns.source, reason, []
    if columns.masked:
        column, reason = _optional("masks:row_mask_problem")(row, columns)
        if reason:
            return column, reason, []
    if columns.scored and not is_tie(row, columns):
        for column in (columns.score_0, columns.score_1):
            try:
                score_value(row.get(column))
            except ValueError as err:
                return column, str(err), []
    return "", "", sizes


def _inner(feature: Any) -> Any:
    """The element feature of a list feature (``[Image()]`` or ``Sequence(Image())``)."""
    return feature[0] if isinstance(feature, list) else getattr(feature, "feature", None)


def with_undecoded_images(dataset: Dataset | IterableDataset, columns: PreferenceColumns):
    """Keep ``datasets.Image`` (and ``datasets.Video``) columns as raw bytes so a corrupt file is reported by us, not
    raised on access."""
    features = dataset.features or {}
    for column in (columns.first, columns.second, columns.source, columns.mask):
        feature = features.get(column)
        if isinstance(feature, ImageFeature) and feature.decode:
            dataset = dataset.cast_column(column, ImageFeature(decode=False))
        elif isinstance(feature, (list, ListFeature)) and isinstance(_inner(feature), ImageFeature):
            dataset = dataset.cast_column(column, ListFeature(ImageFeature(decode=False)))  # a list of sources
        elif isinstance(feature, VideoFeature) and feature.decode:  # decoded by us (PyAV), as raw bytes/path
            dataset = dataset.cast_column(column, VideoFeature(decode=False))
    return dataset


def _optional(target: str) -> Any:
    """``"module:name"`` of the data module of an optional column (:mod:`.editing`, :mod:`.masks`, :mod:`.video`),
    that module imported by data that has the column."""
    return import_target(f"trl_diffusion_sdpo.data.{target}")
