"""Held-out measures of the toy demo that the colour reward never sees: shape correctness, sample diversity and the
denoising error on clean drawings (``online_comparison.py``'s judges).

Shape: the demo's colour reward scores only the central 4x4 patch and the outer two-pixel ring, so a sample can earn
it with any shape. :func:`shape_scores` reads the shape alone: the foreground is every pixel whose RGB distance (in
[0, 1]) from the image's *own* border colour (the mean of its outer two-pixel ring) exceeds ``FOREGROUND_DISTANCE``,
so neither the caption's colours nor the shape's colour enter it; the score is the best intersection over union of
that foreground with the demo's own drawings of a shape (``shapes.draw_shape`` with its radius and one-pixel jitter
pinned on a grid), and the predicted shape is the one whose templates fit best. :func:`validate_shape_scorer` checks
it on fresh drawings of the right shape and of the two wrong ones.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from trl_diffusion_sdpo.demo.base_check import held_out_denoising_loss
from trl_diffusion_sdpo.demo.shapes import SHAPES, Caption, all_captions, draw_shape
from trl_diffusion_sdpo.online.generation import sample_diversity

__all__ = [
    "FOREGROUND_DISTANCE",
    "diversity",
    "drawings",
    "held_out_denoising_error",
    "shape_scores",
    "shape_templates",
    "validate_shape_scorer",
]

FOREGROUND_DISTANCE = 0.25  # RGB distance in [0, 1] from the image's border colour above which a pixel is foreground
_RADII = (0.30, 0.325, 0.35, 0.375, 0.40)  # draw_shape's radius range, as a fraction of the canvas
_OFFSETS = (-1.0, -0.5, 0.0, 0.5, 1.0)  # draw_shape's centre jitter range, in target pixels
_RING = 2


class _Pinned:
    """A stand-in for ``random.Random`` that makes ``draw_shape`` draw a set geometry: no colour jitter, then the
    centre's two jitters and the radius fraction (its ``uniform`` calls, in order) as given."""

    def __init__(self, dx: float, dy: float, radius: float) -> None:
        self._uniform: Iterator[float] = iter((dx, dy, radius))

    def randint(self, low: int, high: int) -> int:
        return 0

    def uniform(self, low: float, high: float) -> float:
        return next(self._uniform)


def shape_templates(size: int = 32) -> dict[str, np.ndarray]:
    """Per shape, ``[T, size, size]`` boolean masks: ``draw_shape``'s drawing of it at every pinned radius and
    centre offset, a pixel in the mask where the shape covers more than half of it."""
    out = {}
    for shape in SHAPES:
        masks = []
        for radius in _RADII:
            for dx in _OFFSETS:
                for dy in _OFFSETS:
                    # white on black: the coverage is the red channel's share of the way from black to white
                    image = draw_shape(Caption("red", shape, "black"), size, _Pinned(dx, dy, radius))  # type: ignore[arg-type]
                    red = np.asarray(image, dtype=np.float64)[..., 0]
                    masks.append((red - 25.0) / (220.0 - 25.0) > 0.5)
        out[shape] = np.stack(masks)
    return out


def _foreground(images: np.ndarray) -> np.ndarray:
    """``[N, H, W]``: pixels far from the image's own border colour (images ``[N, H, W, 3]`` in [0, 1])."""
    ring = np.ones(images.shape[1:3], dtype=bool)
    ring[_RING:-_RING, _RING:-_RING] = False
    border = images[:, ring].mean(axis=1)  # [N, 3]
    return np.linalg.norm(images - border[:, None, None, :], axis=-1) > FOREGROUND_DISTANCE


def shape_scores(
    images: np.ndarray, captions: Sequence[Caption], templates: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """``(iou [N], correct [N])``: the best IoU of each image's foreground with its caption's shape templates, and
    whether the caption's shape fits best of the three (ties count as wrong)."""
    foreground = _foreground(np.asarray(images, dtype=np.float64))
    flat = foreground.reshape(len(foreground), 1, -1)
    best = {}
    for shape, masks in templates.items():
        m = masks.reshape(1, len(masks), -1)
        intersection = (flat & m).sum(-1)
        union = (flat | m).sum(-1)
        best[shape] = (intersection / np.maximum(union, 1)).max(axis=1)  # [N]
    table = np.stack([best[s] for s in SHAPES], axis=1)  # [N, shapes]
    wanted = np.array([SHAPES.index(c.shape) for c in captions])
    iou = table[np.arange(len(captions)), wanted]
    others = table.copy()
    others[np.arange(len(captions)), wanted] = -1.0
    return iou, iou > others.max(axis=1)


def validate_shape_scorer(per_caption: int = 4, seed: int = 4321, size: int = 32) -> dict[str, float]:
    """The scorer on fresh ``draw_shape`` drawings of every caption (random radius, jitter and colour jitter):
    scored against their own caption (should be IoU near 1, all correct) and against the same caption with each of
    the two other shapes (should be low IoU, none correct)."""
    rng = random.Random(seed)
    templates = shape_templates(size)
    captions = [c for c in all_captions() for _ in range(per_caption)]
    images = np.stack([np.asarray(draw_shape(c, size, rng), dtype=np.float64) / 255.0 for c in captions])
    iou, correct = shape_scores(images, captions, templates)
    wrong = [Caption(c.colour, s, c.background) for c in captions for s in SHAPES if s != c.shape]
    repeated = np.repeat(images, len(SHAPES) - 1, axis=0)
    wrong_iou, wrong_correct = shape_scores(repeated, wrong, templates)
    return {
        "drawings": len(captions),
        "right_shape_iou_mean": float(iou.mean()),
        "right_shape_iou_min": float(iou.min()),
        "right_shape_accuracy": float(correct.mean()),
        "wrong_shape_iou_mean": float(wrong_iou.mean()),
        "wrong_shape_iou_max": float(wrong_iou.max()),
        "wrong_shape_accuracy": float(wrong_correct.mean()),
    }


def diversity(images: np.ndarray) -> np.ndarray:
    """Per prompt, the mean over its samples' pairs of the RMS distance of their pixels in [0, 1] (images
    ``[P, S, H, W, 3]``): the online trainer's ``online/diversity`` (``sample_diversity``)."""
    return sample_diversity(torch.from_numpy(np.asarray(images, dtype=np.float64))).numpy()


def drawings(captions: Sequence[Caption], per_caption: int, seed: int, size: int = 32) -> torch.Tensor:
    """Clean ``draw_shape`` drawings, ``per_caption`` of each caption, as pixels ``[N, 3, H, W]`` in [-1, 1]."""
    rng = random.Random(seed)
    arrays = [np.asarray(draw_shape(c, size, rng), dtype=np.float32) for c in captions for _ in range(per_caption)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


def held_out_denoising_error(pipeline, pixels: torch.Tensor, captions: Sequence[Caption], per_caption: int) -> float:
    """The demo's held-out denoising loss (``base_check.held_out_denoising_loss``: fixed timesteps and noise) of
    ``pipeline``'s UNet, adapters on, on the drawings of ``drawings(captions, per_caption, ...)``."""
    repeated = [c for c in captions for _ in range(per_caption)]
    return held_out_denoising_loss(pipeline, pixels, repeated)
