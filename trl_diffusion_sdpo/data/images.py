"""Every PIL image mode to 8-bit RGB, scaled by what its values mean, or a clear refusal.

``Image.convert("RGB")`` clips the values of the 16- and 32-bit modes at 255: a 16-bit image (``I;16``) trains as a
white square. Here:

* ``I;16``, ``I;16L``, ``I;16B``, ``I;16N`` (16-bit unsigned): ``round(v / 257)``, so 65535 is 255.
* ``I`` (32-bit signed): decoded from a file that stores 16 bits per sample (a 16-bit PGM, which Pillow opens as
  ``I``; :func:`stored_bits` reads the decoder's raw mode before the pixels are loaded), always 16-bit
  (``round(v / 257)``), however dark. Otherwise, by its values: Pillow's own scale (0 to 255, as ``L``) when every
  value lies in [0, 255]; values up to 65535 are read as 16-bit (as a 16-bit PNG converted to ``I``); negative
  values or values above 65535 are refused. (An ``I`` image made in memory says nothing of its source: a dark 16-bit
  one is read as 8-bit. Convert such images to ``I;16`` before training.)
* ``F`` (32-bit float): values in [0, 1] are read as intensities (``round(255 v)``); values up to 255 as Pillow's
  scale; NaN, infinite, negative values or values above 255 are refused.
* Modes with transparency (``LA``, ``La``, ``PA``, ``RGBA``, ``RGBa``, and ``P``/``L``/``RGB`` with a transparent
  colour) are composited over white, as img2dataset does, instead of keeping whatever colour hides under alpha 0.
* Every other mode (``1``, ``L``, ``P``, ``RGBX``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``) goes through Pillow's
  colour conversion; a mode Pillow cannot convert is refused.

Precision above 8 bits is rounded away: the VAEs were trained on 8-bit images.
"""

from __future__ import annotations

import hashlib

import numpy as np
import PIL
from PIL import Image

__all__ = ["image_conversion_digest", "image_mode_problem", "stored_bits", "to_rgb"]

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA = ("LA", "La", "PA", "RGBA", "RGBa")


def _from_intensities(values: np.ndarray, scale: float) -> Image.Image:
    """Grey values ``values * scale`` rounded to 8 bits, as an RGB image."""
    grey = np.clip(np.rint(values.astype(np.float64) * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def image_conversion_digest() -> str:
    """SHA-256 of this module's source and Pillow's version: the latent cache's fingerprint includes it, so a cache
    encoded under other conversion rules (or another decoder) is never reused."""
    with open(__file__, "rb") as f:
        source = f.read()
    return hashlib.sha256(source + PIL.__version__.encode()).hexdigest()


def stored_bits(image: Image.Image) -> int | None:
    """16 when ``image`` (opened, not yet loaded) is decoded from 16 bits per sample, else ``None`` (unknown or
    other). Pillow forgets this at ``load()``, so it must be read before."""
    for tile in getattr(image, "tile", None) or []:
        args = tile.args if hasattr(tile, "args") else tile[3]
        rawmode = args if isinstance(args, str) else (args[0] if args else "")
        if isinstance(rawmode, str) and rawmode.startswith("I;16"):
            return 16
    return None


def _scale(image: Image.Image, bits: int | None = None) -> tuple[float | None, str]:
    """``(scale, "")`` for the modes whose values need scaling (``None`` for the others), or ``(None, reason)``.
    ``bits``: the file's bits per sample when known (:func:`stored_bits`)."""
    mode = image.mode
    if mode in _SIXTEEN_BIT or (mode == "I" and bits == 16):
        return 1 / 257, ""
    if mode == "I":
        low, high = image.getextrema()
        if low < 0 or high > 65535:
            return None, (
                f"image mode I (32-bit integers) holds values in [{low}, {high}], outside both the 8-bit [0, 255] and "
                "the 16-bit [0, 65535] range; save it as 8-bit or 16-bit"
            )
        return (1.0 if high <= 255 else 1 / 257), ""
    if mode == "F":
        values = np.asarray(image, dtype=np.float32)
        if not np.isfinite(values).all():
            return None, "image mode F (32-bit floats) holds NaN or infinite values"
        low, high = float(values.min()), float(values.max())
        if low < 0 or high > 255:
            return None, (
                f"image mode F (32-bit floats) holds values in [{low:g}, {high:g}]; only [0, 1] (intensities) or "
                "[0, 255] (8-bit scale) can be read; rescale it"
            )
        return (255.0 if high <= 1 else 1.0), ""
    return None, ""


def image_mode_problem(image: Image.Image) -> str:
    """Why ``image`` cannot be converted to RGB (naming its mode), or ``""``. Reads pixel values only for ``I``
    and ``F``, whose scale depends on them."""
    if image.mode in _SIXTEEN_BIT or image.mode in ("I", "F"):
        return _scale(image)[1]
    if image.mode not in Image.MODES:
        return f"image mode {image.mode} is not supported"
    return ""


def to_rgb(image: Image.Image, bits: int | None = None) -> Image.Image:
    """``image`` as an 8-bit RGB image (see the module docstring for each mode), or ``ValueError`` naming the mode.
    ``bits``: :func:`stored_bits` of the image as opened (before ``load()``), when it came from a file."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in _SIXTEEN_BIT or mode in ("I", "F"):
        scale, problem = _scale(image, bits)
        if problem:
            raise ValueError(problem)
        return _from_intensities(np.asarray(image), scale)
    try:
        if mode in _ALPHA or "transparency" in image.info:
            rgba = (image.convert("LA") if mode == "La" else image).convert("RGBA")
            background = Image.new("RGB", image.size, (255, 255, 255))
            background.paste(rgba, mask=rgba.getchannel("A"))
            return background
        return image.convert("RGB")
    except (ValueError, OSError) as err:
        raise ValueError(f"image mode {mode} cannot be converted to RGB: {err}") from None
