"""The checks of an image given by a path: the file found (never a URL), decoded once while it is unchanged, and the
size read from an image's header. Loaded with the first image a dataset names by path, or by the optional columns'
checks that read a size (:mod:`.editing`, :mod:`.masks`); images given as bytes or PIL images never load it.
"""

from __future__ import annotations

import functools
import io
import os
import re
import stat
from typing import Any

from PIL import Image

from .validation import ImageSize, _decode_check

__all__ = ["image_file_check", "image_size"]


# A value with a URL scheme (``http://``, ``s3://``...): never fetched (the readers turn ``file://`` into a path).
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


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


# Files whose check is remembered, per process: more than HPDv3's 1.08M images, whose comparisons name each about
# twice in no particular order (about 240 MB at a million entries, the path strings aside).
REMEMBERED_IMAGE_FILES = 2_000_000


# One tuple per distinct decoded size, which every remembered file of that size refers to: a remembered file then costs
# about what its problem string alone did (tracemalloc over 3,000 files of one size: 181 bytes an entry against 179;
# 349 with a (problem, size) pair of its own).
_SHARED_SIZES: dict[ImageSize, ImageSize] = {}


@functools.lru_cache(maxsize=REMEMBERED_IMAGE_FILES)
def _image_file_check(path: str, mtime_ns: int, size: int) -> str | ImageSize:
    """:func:`~.validation._decode_check` of the file at ``path``, remembered by path, modification time and size: an
    image named by several rows is decoded once, and a file rewritten since is checked again. The problem, or the
    decoded size when there is none."""
    try:
        with Image.open(path) as image:
            problem, decoded = _decode_check(image)
    except Exception as err:  # PIL raises many types for corrupt data
        return f"cannot decode image: {err}"
    return problem or _SHARED_SIZES.setdefault(decoded, decoded)


def image_file_check(path: str) -> tuple[str, ImageSize | None]:
    """``("", (width, height))`` if the image file at ``path`` decodes, else ``(the reason, None)``
    (:func:`~.validation.image_check` of a path): found with one ``stat``, decoded once while it is unchanged."""
    result, problem = _file_stat(path)
    if problem:
        return problem, None
    checked = _image_file_check(path, result.st_mtime_ns, result.st_size)
    return (checked, None) if isinstance(checked, str) else ("", checked)
