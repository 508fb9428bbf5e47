"""Is a preference dataset usable, and which image of a row wins: column layouts, row checks, pair ordering.

One layout is read: TRL's preference form (``prompt``, ``chosen``, ``rejected``; Pick-a-Pic's label form is mapped
onto it by :mod:`.pickapic`, which marks ties and bad labels in :data:`SKIP_COLUMN`). With ``loss_type="smpo"`` each
row also needs one finite score per image (``score_0``, ``score_1``), and the scores, not the order of the columns,
order the pair (:func:`order_pair`, the one rule for every collator and cache).

Editing data adds the source: ``source_image`` (one image, the picture the instruction edits) or ``source_images``
(a list, for multi-image editing and reference images); the prompt column then holds the instruction. A source
must decode, and a single source must have the edited images' aspect ratio within :data:`SOURCE_ASPECT_TOLERANCE`
(both are resized and center-cropped alike, so the crops then show the same part of the scene).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
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
    MASK,
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
from .transforms import image_mode_problem, load_image

if TYPE_CHECKING:
    from .video import VideoClip

__all__ = ["DataError", "DataReport", "SOURCE_ASPECT_TOLERANCE", "resolve_columns", "video_clip"]


class DataError(ValueError):
    """The data cannot be trained on (a bad row or image, no pairs, a dataset that does not exist): the user fixes
    the data or the name. The command line ends on it with one line and exit status 1."""


# A value with a URL scheme (``http://``, ``s3://``...): never fetched (the readers turn ``file://`` into a path).
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# How far a single source's aspect ratio may be from the chosen image's, as |log(ratio_source / ratio_chosen)|:
# 1 % keeps the two center crops within about 1 % of the crop's side of each other (5 px at 512).
SOURCE_ASPECT_TOLERANCE = 0.01


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
    return _video("VideoClip")(args.num_frames, getattr(args, "frame_stride", 1))


def resolve_columns(column_names: Sequence[str], args: Any) -> PreferenceColumns:
    """Pick the Pick-a-Pic or the TRL layout from the column names, or raise naming what is missing.

    With an objective that reads pair scores (``loss_type="smpo"``; :func:`uses_scores`) the two score columns
    (``score_0``, ``score_1``) are required as well and included in the result; for every other loss
    type they are ignored even when present.
    """
    layout = resolve_layout(column_names, args)
    if video_clip(args) is not None:  # video data
        layout = dataclasses.replace(layout, clip=video_clip(args))
    layout = _with_source(layout, column_names, args)
    layout = _with_mask(layout, column_names, args)
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


def _with_source(layout: PreferenceColumns, column_names: Sequence[str], args: Any) -> PreferenceColumns:
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


def _with_mask(layout: PreferenceColumns, column_names: Sequence[str], args: Any) -> PreferenceColumns:
    """``layout`` with the loss-mask column (``loss_mask``), else unchanged."""
    if not getattr(args, "loss_mask", False):
        return layout
    column = MASK
    if column not in column_names:
        raise DataError(
            f"loss_mask=True reads each row's mask from column {column!r}, which the dataset lacks (found "
            f"{sorted(column_names)}): add it (an image per row, white where the preference lives; mask.<ext> in a "
            "pair folder, a mask/ folder beside the side folders, or a mask column of paths in a table), or derive "
            "the masks of editing pairs with add_loss_masks / train --auto_mask (docs/masked-loss.md)"
        )
    return dataclasses.replace(layout, mask=column)


def mask_problem(first_size: tuple[int, int], second_size: tuple[int, int], mask: Image.Image | None) -> str:
    """Empty string if a pair can take a loss mask, else the reason: both images of one size (the mask marks the
    same region in each) and, for a given ``mask`` (8-bit grey), that size and at least one marked pixel."""
    if first_size != second_size:
        return (
            f"the two images are {first_size[0]}x{first_size[1]} and {second_size[0]}x{second_size[1]}: a loss mask "
            "marks one region in both, so they must have one size (resize them to match, or turn the mask off)"
        )
    if mask is None:
        return ""
    if mask.size != first_size:
        return (
            f"the mask is {mask.size[0]}x{mask.size[1]} and the images {first_size[0]}x{first_size[1]}: give a mask "
            "of the images' size"
        )
    if mask.getextrema()[1] == 0:
        return "the mask is all black: the pair would train nothing (mark its region in white, or drop the row)"
    return ""


def _row_mask_problem(row: dict[str, Any], columns: PreferenceColumns) -> tuple[str, str]:
    """``(column, reason)`` of a row whose loss mask is missing, undecodable, of the wrong size or empty."""
    mask = None
    if columns.mask is not None:
        reason = _check_image(row.get(columns.mask))
        if reason:
            return columns.mask, reason
    try:
        sizes = [
            image_size(row.get(column))
            if columns.clip is None
            else _video("read_video")(row.get(column), columns.clip)[0].size
            for column in (columns.first, columns.second)
        ]
        if columns.mask is not None:
            mask = load_image(row.get(columns.mask)).convert("L")
    except Exception as err:  # checked to decode above
        return columns.mask or columns.first, f"cannot read the image: {err}"
    return columns.mask or columns.second, mask_problem(sizes[0], sizes[1], mask)


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


def _source_problem(row: dict[str, Any], columns: PreferenceColumns) -> str:
    """Empty string if the row's source image(s) decode and a single source matches the chosen image's aspect
    ratio, else the reason."""
    try:
        values = source_values(row, columns)
    except ValueError as err:
        return str(err).split(": ", 1)[1]
    for index, value in enumerate(values):
        reason = _check_image(value)
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


def _check_image(value: Any) -> str:
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


def _check_video(value: Any, clip: VideoClip) -> str:
    """Empty string if the clip of ``value`` reads (every frame it needs decoded), else the reason."""
    try:
        _video("read_video")(value, clip)
        return ""
    except Exception as err:  # PyAV and PIL raise many types for corrupt data
        return f"cannot read video: {err}"


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
        reason = _check_image(row.get(column)) if columns.clip is None else _check_video(row.get(column), columns.clip)
        if reason:
            return column, reason
    if columns.edits:
        reason = _source_problem(row, columns)
        if reason:
            return columns.source, reason
    if columns.masked:
        column, reason = _row_mask_problem(row, columns)
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


def _video(name: str) -> Any:
    """``name`` of :mod:`.video`, that module imported by video data only."""
    return import_target(f"trl_diffusion_sdpo.data.video:{name}")
