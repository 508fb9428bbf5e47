"""Pair folders: preference pairs laid out as files, read into the trainer's columns (see :mod:`.formats`).

One folder per side, files paired by their path inside it (kohya-ss/sd-scripts' ``w/`` and ``l/``, SimpleTuner's
``win/`` and ``lose/``, ``chosen/`` and ``rejected/``), or one folder per pair holding ``chosen.<ext>``,
``rejected.<ext>`` and ``prompt.txt``. Editing pairs add their source: ``source.<ext>`` (``source_<i>.<ext>`` for
several) in a pair's folder, or a ``source/`` folder beside the side folders; a loss mask likewise, ``mask.<ext>`` in a
pair's folder or ``mask/<key>.<ext>`` beside the side folders. A reader never drops a row: what is
missing is a ``None`` value that validation names, with the reason in :data:`~.columns.SOURCE_COLUMN`.
"""

from __future__ import annotations

import os
from typing import Any

from datasets import Dataset

from .columns import SOURCE_COLUMN
from .validation import DataError

__all__ = ["IMAGE_EXTENSIONS", "SIDE_FOLDERS", "VIDEO_EXTENSIONS", "pair_root", "prompt_text", "read_pair_folders"]

# (chosen, rejected) folder names: kohya-ss/sd-scripts PR #1427 (w, l), SimpleTuner's Flow-DPO docs (win, lose), TRL.
SIDE_FOLDERS = (("w", "l"), ("win", "lose"), ("chosen", "rejected"))
CAPTION_EXTENSIONS = (".txt", ".caption")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Video files a pair folder may hold instead of images (the video families' clips, decoded by PyAV/FFmpeg).
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v")
# The side-folder layout's folder of source images, beside the chosen and rejected folders.
SOURCE_FOLDERS = ("source", "sources", "input")
# The side-folder layout's folder of loss masks (white where the preference lives), beside the side folders.
MASK_FOLDERS = ("mask", "masks")


def prompt_text(value: Any) -> Any:
    """A prompt with surrounding whitespace removed; an empty one is missing (``None``), which validation names."""
    if isinstance(value, str):
        value = value.strip()
        return value or None
    return value


def _side_folders(root: str) -> tuple[str, str] | None:
    for chosen, rejected in SIDE_FOLDERS:
        if os.path.isdir(os.path.join(root, chosen)) and os.path.isdir(os.path.join(root, rejected)):
            return chosen, rejected
    return None


def _is_image(name: str) -> bool:
    """An image or video file of a pair folder (not hidden)."""
    return name.lower().endswith(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS) and not name.startswith(".")


def _kind_mismatch(pair: list[str | None], sides: tuple[str, str]) -> str:
    """The note for a pair of one image and one video ('' when both are of one kind or one is missing)."""
    kinds = ["video" if p.lower().endswith(VIDEO_EXTENSIONS) else "image" for p in pair if p is not None]
    if len(kinds) == 2 and kinds[0] != kinds[1]:
        return f"{sides[0]} is {kinds[0]}, {sides[1]} {kinds[1]}: a pair is two images or two videos"
    return ""


def _one_file(
    files_by_key: dict[str, list[str]], key: str, folder: str, plural: str, singular: str, notes: list[str]
) -> str | None:
    """The one file of ``folder`` (a source-image or mask folder) for pair ``key``, or ``None`` with a note in
    ``notes`` naming how many were found (``plural``) or that none was (``singular``)."""
    found = files_by_key.get(key, [])
    if len(found) != 1:
        side = os.path.basename(folder)
        notes.append(f"{len(found)} {plural} {side}/{key}.*" if found else f"no {singular} {side}/{key}.*")
    return found[0] if len(found) == 1 else None


def _pair_subfolders(root: str) -> list[str]:
    """Sub-folders of ``root`` holding a ``chosen.<ext>`` or ``rejected.<ext>`` image (the one-folder-per-pair
    layout)."""
    found = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.is_dir() and not entry.name.startswith("."):
            stems = {os.path.splitext(f)[0].lower() for f in os.listdir(entry.path) if _is_image(f)}
            if stems & {"chosen", "rejected"}:
                found.append(entry.path)
    return found


def pair_root(path: str, split: str) -> str | None:
    """The folder holding ``split``'s pairs: ``path/<split>`` if it holds them, else ``path`` for the train split."""
    candidates = [os.path.join(path, split)] + ([path] if split == "train" else [])
    for root in candidates:
        if os.path.isdir(root) and (_side_folders(root) is not None or _pair_subfolders(root)):
            return root
    return None


def _caption_file(stem_paths: list[str]) -> str | None:
    """The first caption file ``<stem>.txt`` / ``<stem>.caption`` that exists."""
    for stem in stem_paths:
        for extension in CAPTION_EXTENSIONS:
            if os.path.isfile(stem + extension):
                return stem + extension
    return None


def _caption(stem_paths: list[str]) -> str | None:
    """The text of the first caption file that exists (:func:`_caption_file`), stripped; ``None`` without one or
    for an empty one."""
    path = _caption_file(stem_paths)
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        return prompt_text(f.read())


def _no_caption_note(stem_paths: list[str], missing: str) -> str:
    """Why a pair has no prompt: its caption file is empty (named), or ``missing``."""
    path = _caption_file(stem_paths)
    return f"{os.path.basename(path)} is empty" if path is not None else missing


def _images_by_key(folder: str) -> dict[str, list[str]]:
    """Every image under ``folder`` by its path inside it without extension (``sub/cat`` for ``sub/cat.png``)."""
    images: dict[str, list[str]] = {}
    for directory, subdirs, files in os.walk(folder):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in sorted(files):
            if _is_image(name):
                path = os.path.join(directory, name)
                key = os.path.splitext(os.path.relpath(path, folder))[0].replace(os.sep, "/")
                images.setdefault(key, []).append(path)
    return images


def _folder_sources(folder: str) -> tuple[list[str], str]:
    """A pair folder's source images: ``source.<ext>``, or ``source_0.<ext>``, ``source_1.<ext>``, ... in order;
    and a note when they cannot be read as one list (both forms, a gap in the numbering)."""
    single, numbered = [], {}
    for name in sorted(os.listdir(folder)):
        stem = os.path.splitext(name)[0].lower()
        if not _is_image(name):
            continue
        if stem == "source":
            single.append(os.path.join(folder, name))
        elif stem.startswith("source_") and stem[7:].isdigit():
            numbered.setdefault(int(stem[7:]), []).append(os.path.join(folder, name))
    if single and numbered:
        return [], "both source.<ext> and source_<i>.<ext>: keep one form"
    if len(single) > 1 or any(len(paths) > 1 for paths in numbered.values()):
        return [], "two source images with one name (different extensions)"
    if numbered and sorted(numbered) != list(range(len(numbered))):
        return [], f"source images numbered {sorted(numbered)}: number them from 0 without gaps"
    return single or [numbered[i][0] for i in sorted(numbered)], ""


def _folder_masks(folder: str) -> list[str]:
    """A pair folder's ``mask.<ext>`` files (one expected)."""
    return sorted(
        os.path.join(folder, name)
        for name in os.listdir(folder)
        if _is_image(name) and os.path.splitext(name)[0].lower() == "mask"
    )


def _source_column(sources: list[tuple[list[str], str]]) -> str | None:
    """``source_image`` when every pair folder with a source has one ``source.<ext>``, ``source_images`` when any
    has numbered ones, ``None`` when no folder has a source."""
    if not any(values or note for values, note in sources):
        return None
    numbered = any(
        len(values) > 1 or any(os.path.splitext(os.path.basename(p))[0].lower() != "source" for p in values)
        for values, _ in sources
    )
    return "source_images" if numbered else "source_image"


def read_pair_folders(root: str) -> Dataset:
    """Pairs from side folders (``w``/``l``, ``win``/``lose``, ``chosen``/``rejected``) or one folder per pair.

    Rows are sorted by the pair's name. An image without its counterpart, two images for one side of a pair or a
    missing caption gives a row whose bad value (``None``) validation names, with the reason in ``__source__``.
    """
    rows: dict[str, list] = {"prompt": [], "chosen": [], "rejected": [], SOURCE_COLUMN: []}
    sides = _side_folders(root)
    if sides is not None:
        chosen_dir, rejected_dir = (os.path.join(root, s) for s in sides)
        chosen, rejected = _images_by_key(chosen_dir), _images_by_key(rejected_dir)
        source_dir = next(
            (os.path.join(root, s) for s in SOURCE_FOLDERS if os.path.isdir(os.path.join(root, s))), None
        )
        sources = _images_by_key(source_dir) if source_dir is not None else None
        if sources is not None:
            rows["source_image"] = []
        mask_dir = next((os.path.join(root, s) for s in MASK_FOLDERS if os.path.isdir(os.path.join(root, s))), None)
        masks = _images_by_key(mask_dir) if mask_dir is not None else None
        if masks is not None:
            rows["mask"] = []
        for key in sorted(chosen.keys() | rejected.keys()):
            notes = []
            pair = []
            for side, found in ((sides[0], chosen.get(key, [])), (sides[1], rejected.get(key, []))):
                if not found:
                    notes.append(f"no image {side}/{key}.*")
                elif len(found) > 1:
                    notes.append(f"{len(found)} images for {side}/{key}: {[os.path.basename(p) for p in found]}")
                pair.append(found[0] if len(found) == 1 else None)
            if mismatch := _kind_mismatch(pair, sides):
                notes.append(mismatch)
                pair = [None, None]
            stems = [os.path.join(chosen_dir, key), os.path.join(rejected_dir, key), os.path.join(root, key)]
            prompt = _caption(stems)
            if prompt is None:
                notes.append(_no_caption_note(stems, f"no caption {key}.txt or {key}.caption"))
            if sources is not None:
                rows["source_image"].append(_one_file(sources, key, source_dir, "source images", "image", notes))
            if masks is not None:
                rows["mask"].append(_one_file(masks, key, mask_dir, "masks", "mask", notes))
            rows["prompt"].append(prompt)
            rows["chosen"].append(pair[0])
            rows["rejected"].append(pair[1])
            rows[SOURCE_COLUMN].append(f"pair {key!r} in {root}" + (": " + "; ".join(notes) if notes else ""))
    else:
        folders = _pair_subfolders(root)
        sources_per_folder = [_folder_sources(folder) for folder in folders]
        source_column = _source_column(sources_per_folder)
        if source_column is not None:
            rows[source_column] = []
        masked = any(_folder_masks(folder) for folder in folders)
        if masked:
            rows["mask"] = []
        for folder, (source_values, source_note) in zip(folders, sources_per_folder, strict=True):
            images = {}
            for name in sorted(os.listdir(folder)):
                if _is_image(name):
                    images.setdefault(os.path.splitext(name)[0].lower(), []).append(os.path.join(folder, name))
            notes = []
            pair = []
            for side in ("chosen", "rejected"):
                found = images.get(side, [])
                if len(found) != 1:
                    notes.append(f"{len(found)} {side} images" if found else f"no {side}.<ext>")
                pair.append(found[0] if len(found) == 1 else None)
            if mismatch := _kind_mismatch(pair, ("chosen", "rejected")):
                notes.append(mismatch)
                pair = [None, None]
            stems = [os.path.join(folder, "prompt"), os.path.join(folder, "caption")]
            prompt = _caption(stems)
            if prompt is None:
                notes.append(_no_caption_note(stems, "no prompt.txt or caption.txt"))
            if source_column == "source_image":
                if source_note:
                    notes.append(source_note)
                rows[source_column].append(source_values[0] if len(source_values) == 1 and not source_note else None)
            elif source_column == "source_images":
                if source_note or not source_values:
                    notes.append(source_note or "no source.<ext> or source_<i>.<ext>")
                rows[source_column].append(source_values if source_values and not source_note else None)
            if masked:
                found = _folder_masks(folder)
                if len(found) != 1:
                    notes.append(f"{len(found)} mask images" if found else "no mask.<ext>")
                rows["mask"].append(found[0] if len(found) == 1 else None)
            rows["prompt"].append(prompt)
            rows["chosen"].append(pair[0])
            rows["rejected"].append(pair[1])
            rows[SOURCE_COLUMN].append(f"pair folder {folder}" + (": " + "; ".join(notes) if notes else ""))
    if not rows["prompt"]:
        raise DataError(f"{root} holds no image or video pairs")
    return Dataset.from_dict(rows)
