"""Procedural captioned images (coloured shapes on plain backgrounds) and a programmatic reward on pixels.

A caption names a shape colour, a shape and a background, e.g. ``"red circle on white"``. Images are drawn at
twice the target size and downsampled, so edges are anti-aliased. The shape is centred (jittered by at most one
pixel) and always covers the central 4x4 patch; the outer two-pixel ring is always background.

The reward is *colour agreement with the caption*, computed on decoded pixels only:

    reward = 1 - (|centre - shape_colour| + |border - background_colour|) / (2 * sqrt(3))

where ``centre`` is the mean RGB (in [0, 1]) of the central 4x4 patch, ``border`` the mean RGB of the outer
two-pixel ring and ``|.|`` the Euclidean distance. It lies in [0, 1]; 1 means both colours are exactly right.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["SHAPES", "Caption", "all_captions", "colour_reward", "draw_shape", "split_captions"]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 50, 190),
    "orange": (245, 140, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (240, 240, 240), "black": (25, 25, 25)}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

_CENTRE = 2  # half-width of the central patch scored against the shape colour
_RING = 2  # width of the border ring scored against the background colour


@dataclass(frozen=True)
class Caption:
    """What an image shows; ``text`` is the prompt, e.g. ``"red circle on white"``."""

    colour: str
    shape: str
    background: str

    @property
    def text(self) -> str:
        return f"{self.colour} {self.shape} on {self.background}"

    @classmethod
    def parse(cls, text: str) -> Caption:
        """Inverse of :attr:`text`."""
        colour, shape, _, background = text.split()
        return cls(colour, shape, background)


def all_captions() -> list[Caption]:
    """Every colour x shape x background combination (36), in a fixed order."""
    return [Caption(c, s, b) for c, s, b in itertools.product(COLOURS, SHAPES, BACKGROUNDS)]


def split_captions(num_held_out: int, seed: int) -> tuple[list[Caption], list[Caption]]:
    """Split the captions into (preference-pair prompts, held-out evaluation prompts).

    The held-out set covers every colour at least once when ``num_held_out >= len(COLOURS)``, so the evaluation
    reward is not dominated by one easy or hard colour.
    """
    rng = random.Random(seed)
    captions = all_captions()
    held_out: list[Caption] = []
    colours = list(COLOURS)
    while len(held_out) < num_held_out:
        colour = colours[len(held_out) % len(colours)]
        candidates = [c for c in captions if c.colour == colour and c not in held_out]
        held_out.append(rng.choice(candidates))
    train = [c for c in captions if c not in held_out]
    return train, held_out


def draw_shape(caption: Caption, size: int, rng: random.Random) -> Image.Image:
    """Draw ``caption`` as a ``size`` x ``size`` RGB image with random size, one-pixel jitter and colour jitter."""
    scale = 2
    big = size * scale
    background = _jitter(BACKGROUNDS[caption.background], rng, 10)
    colour = _jitter(COLOURS[caption.colour], rng, 20)
    image = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(image)
    cx = big / 2 + rng.uniform(-1, 1) * scale
    cy = big / 2 + rng.uniform(-1, 1) * scale
    radius = rng.uniform(0.30, 0.40) * big  # stays inside the background ring, always covers the centre
    if caption.shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
    elif caption.shape == "square":
        half = radius * 0.85
        draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=colour)
    elif caption.shape == "triangle":
        angles = (-90.0, 30.0, 150.0)
        points = [(cx + radius * math.cos(math.radians(a)), cy + radius * math.sin(math.radians(a))) for a in angles]
        draw.polygon(points, fill=colour)
    else:
        raise ValueError(f"unknown shape {caption.shape!r}; choose one of {SHAPES}")
    return image.resize((size, size), resample=Image.Resampling.BOX)


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, v + rng.randint(-amount, amount)))) for v in rgb)


def colour_reward(images: np.ndarray, captions: list[Caption]) -> np.ndarray:
    """Colour agreement of ``images`` (``[N, H, W, 3]`` floats in [0, 1]) with their captions, shape ``[N]``.

    See the module docstring for the formula.
    """
    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must have shape [N, H, W, 3], got {images.shape}")
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    height, width = images.shape[1:3]
    cy, cx = height // 2, width // 2
    centre = images[:, cy - _CENTRE : cy + _CENTRE, cx - _CENTRE : cx + _CENTRE].mean(axis=(1, 2))
    ring = np.ones((height, width), dtype=bool)
    ring[_RING:-_RING, _RING:-_RING] = False
    border = images[:, ring].mean(axis=1)
    shape_target = np.array([COLOURS[c.colour] for c in captions], dtype=np.float64) / 255.0
    background_target = np.array([BACKGROUNDS[c.background] for c in captions], dtype=np.float64) / 255.0
    distance = np.linalg.norm(centre - shape_target, axis=1) + np.linalg.norm(border - background_target, axis=1)
    return 1.0 - distance / (2.0 * math.sqrt(3.0))
