"""Editing-like preference pairs with a local edit: the two images copy one random picture outside a rectangle and
differ inside it; the mask marks the rectangle."""

from __future__ import annotations

import io

import numpy as np
from datasets import Dataset
from PIL import Image

SIZE = 40  # resized to the tests' 32-pixel resolution: the mask is resized and cropped with the images
EDIT = (slice(8, 24), slice(16, 32))  # rows, columns of the edited rectangle


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def mask_image(fill: int | None = None, size: tuple[int, int] = (SIZE, SIZE)) -> Image.Image:
    """The edited rectangle in white on black (``fill``: one grey level everywhere instead)."""
    if fill is not None:
        return Image.new("L", size, fill)
    array = np.zeros((size[1], size[0]), np.uint8)
    array[EDIT] = 255
    return Image.fromarray(array, mode="L")


def edited_pair(seed: int) -> tuple[Image.Image, Image.Image]:
    """A random picture and its copy with the rectangle's values shifted by half the range (every channel of every
    pixel there differs by 128)."""
    picture = np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    edited = picture.copy()
    edited[EDIT] = edited[EDIT] + np.uint8(128)  # wraps around: |a - b| = 128
    return Image.fromarray(picture), Image.fromarray(edited)


def masked_rows(n: int = 4, fill: int | None = None, with_mask: bool = True) -> list[dict]:
    """TRL rows of edited pairs with a ``mask`` column (``fill``: a uniform mask, 255 all white, 0 all black)."""
    rows = []
    for i in range(n):
        chosen, rejected = edited_pair(i)
        row = {"prompt": f"shift the patch of picture {i}", "chosen": png(chosen), "rejected": png(rejected)}
        if with_mask:
            row["mask"] = png(mask_image(fill))
        rows.append(row)
    return rows


def masked_dataset(n: int = 4, fill: int | None = None, with_mask: bool = True) -> Dataset:
    return Dataset.from_list(masked_rows(n, fill, with_mask))
