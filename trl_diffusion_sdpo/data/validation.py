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
import functools
import io
import os
import re
import stat
from collections.abc import Sequence
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
from .transforms import image_mode_problem

if TYPE_CHECKING:
    from .video import VideoClip

__all__ = ["DataError", "DataReport", "image_problem", "image_size", "resolve_columns", "row_problem", "video_clip"]


class DataError(ValueError):
    """The data cannot be trained on (a bad row or image, no pairs, a dataset that does not exist): the user fixes
    the data or the name. The command line ends on it with one line and exit status 1."""


# A value with a URL scheme (``http://``, ``s3://``...): never fetched (the readers turn ``file://`` into a path).
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


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


def image_size(value: Any) -> tuple[int, int]:
    """``(width, height)`` of an image value (path, bytes, ``{"path", "bytes"}`` or PIL image) from its header."""
    if isinstance(value, Image.Image):
        return value.size
    if isinstance(value, dict):
        value = value["bytes"] if value.get("bytes") is not None else value.get("path")
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = io.BytesIO(bytes(value))
    with Image.open(value) as image:
        return image.size


def _file_stat(path: str) -> tuple[os.stat_result | None, str]:
    """``(stat, "")`` of the regular file at ``path``, or ``(None, why it cannot be opened)``: one ``stat`` call,
    which on a network file system is a round trip per image."""
    if _URL.match(path):
        return None, (
            f"{path!r} is a URL: images are never downloaded; download them first and give local paths (relative "
            "to the annotation file, absolute, or file://)"
        )
    try:
        result = os.stat(path)
    except (OSError, ValueError):  # as os.path.isfile: missing, unreadable, or a path with a NUL byte
        return None, f"No such file: {path}"
    if not stat.S_ISREG(result.st_mode):
        return None, f"No such file: {path}"
    return result, ""


def _decode_problem(image: Image.Image) -> str:
    """Empty string if the opened ``image`` decodes, else the reason. JPEGs decode at 1/8 scale: fast, still
    complete."""
    image.draft("RGB", (64, 64))
    image.load()
    return image_mode_problem(image)


# Files whose check is remembered, per process: more than HPDv3's 1.08M images, whose comparisons name each about
# twice in no particular order (about 240 MB at a million entries, the path strings aside).
REMEMBERED_IMAGE_FILES = 2_000_000


@functools.lru_cache(maxsize=REMEMBERED_IMAGE_FILES)
def _image_file_problem(path: str, mtime_ns: int, size: int) -> str:
    """:func:`_decode_problem` of the file at ``path``, remembered by path, modification time and size: an image
    named by several rows is decoded once, and a file rewritten since is checked again."""
    try:
        with Image.open(path) as image:
            return _decode_problem(image)
    except Exception as err:  # PIL raises many types for corrupt data
        return f"cannot decode image: {err}"


def image_problem(value: Any) -> str:
    """Empty string if the image decodes, else the reason; a file is decoded once while it is unchanged."""
    try:
        if isinstance(value, Image.Image):
            return image_mode_problem(value)
        path = value["path"] if isinstance(value, dict) and value.get("bytes") is None else value
        if isinstance(path, str) and path:
            result, problem = _file_stat(path)
            if problem:
                return problem
            return _image_file_problem(path, result.st_mtime_ns, result.st_size)
        if isinstance(value, dict) and value.get("bytes") is not None:
            return _decode_problem(Image.open(io.BytesIO(value["bytes"])))
        if isinstance(value, (bytes, bytearray, memoryview)):
            return _decode_problem(Image.open(io.BytesIO(bytes(value))))
        if value is None:
            return "image is missing (None)"
        if path == "" or isinstance(value, dict):
            return "image is missing (an empty path and no bytes)"
        return f"cannot read an image from a {type(value).__name__}"
    except Exception as err:  # PIL raises many types for corrupt data
        return f"cannot decode image: {err}"


def row_problem(row: dict[str, Any], columns: PreferenceColumns) -> tuple[str, str]:
    """``(column, reason)`` of the first problem in a row, or ``("", "")``. Ties are not problems (their scores
    are not looked at: the row is dropped anyway)."""
    prompt = row.get(columns.prompt)
    if prompt is None:
        return columns.prompt, "prompt is missing (None; the file readers read an empty caption or cell as missing)"
    if not isinstance(prompt, str):
        return columns.prompt, f"prompt must be a string, got {type(prompt).__name__}"
    column, reason = skip_mark(row, columns)
    if column:  # a bad label, named by its column as the label form had it
        return column, reason
    for column in (columns.first, columns.second):
        value = row.get(column)
        reason = image_problem(value) if columns.clip is None else _optional("video:clip_problem")(value, columns.clip)
        if reason:
            return column, reason
    if columns.edits:
        reason = _optional("editing:source_problem")(row, columns)
        if reason:
            return columns.source, reason
    if columns.masked:
        column, reason = _optional("masks:row_mask_problem")(row, columns)
        if reason:
            return column, reason
    if columns.scored and not is_tie(row, columns):
        for column in (columns.score_0, columns.score_1):
            try:
                score_value(row.get(column))
            except ValueError as err:
                return column, str(err)
    return "", ""


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
