"""Rows for the latent-cache tests."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# Shorter side already 32: no resize, so mirroring the decoded image is exactly the transform's flip.
SIZES = [(40, 32), (32, 48), (32, 32), (56, 32)]


def _png(rng: np.random.Generator, size: tuple[int, int]) -> bytes:
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)  # noise: a flip changes the image
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _rows(n: int = 4, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {
            "caption": f"a noisy picture number {i}",
            "jpg_0": _png(rng, SIZES[i % len(SIZES)]),
            "jpg_1": _png(rng, SIZES[(i + 1) % len(SIZES)]),
            "label_0": float(i % 2),  # alternately image 1 and image 0 wins
        }
        for i in range(n)
    ]
