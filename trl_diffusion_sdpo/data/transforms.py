"""Images to training pixels: decoding any image value to RGB, resizing, cropping the pair, SDXL's ``time_ids``,
and the pair's loss mask (given, or derived from where the two images differ)."""

from __future__ import annotations

import hashlib
import io
from typing import Any

import numpy as np
import PIL
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

__all__ = [
    "image_conversion_digest",
    "image_mode_problem",
    "image_pixels",
    "load_image",
    "mirrored_time_ids",
    "PairTransform",
    "resized_size",
    "stored_bits",
    "to_rgb",
]


# Resizing and pixel scaling as diffusers' pipelines do them (bilinear, as the training scripts resize). Not its
# resize_mode="crop" for the center crop: it floors the resized size and the crop offset where the crop here rounds
# them as torchvision's Resize and CenterCrop do (diffusers' SDXL training script), and it has no random crop.
_PROCESSOR = VaeImageProcessor(vae_scale_factor=1, resample="bilinear", do_resize=False, do_normalize=True)


def load_image(value: Any) -> Image.Image:
    """Decode an image given as bytes, a ``datasets.Image`` dict (``bytes``/``path``), a path or a PIL image, to
    8-bit RGB with every PIL mode scaled by what its values mean (:func:`to_rgb`; ``ValueError`` naming the
    mode when it cannot be).

    Not ``diffusers.utils.load_image``: it reads neither bytes nor ``datasets`` dicts, fetches a string that is a URL,
    turns the image by its EXIF orientation (which a latent cache built before would not match) and converts with
    PIL's ``convert("RGB")``, which clips 16-bit and float modes instead of scaling them."""
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, (bytes, bytearray, memoryview)):
        image = Image.open(io.BytesIO(bytes(value)))
    elif isinstance(value, dict) and (value.get("bytes") is not None or value.get("path")):
        source = value["bytes"] if value.get("bytes") is not None else value["path"]
        image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    elif isinstance(value, str):
        image = Image.open(value)
    elif value is None:
        raise ValueError("image is missing (None)")
    else:
        raise ValueError(f"cannot read an image from a {type(value).__name__}")
    bits = stored_bits(image)  # before load(), which forgets the decoder's raw mode
    image.load()
    return to_rgb(image, bits)


def resized_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The size an image of ``width x height`` is resized to: shorter side ``resolution``, aspect ratio kept."""
    scale = resolution / min(width, height)
    return max(resolution, round(width * scale)), max(resolution, round(height * scale))


def mirrored_time_ids(time_ids: torch.Tensor) -> torch.Tensor:
    """SDXL ``time_ids [..., 6]`` of the mirrored view: ``crop_left`` becomes the crop's offset in the mirrored
    resized image, ``resized_width - target_width - crop_left``; everything else is unchanged."""
    mirrored = time_ids.clone()
    flat = mirrored.reshape(-1, 6)
    for row in flat:
        orig_h, orig_w, _, left, _, target_w = (int(v) for v in row.tolist())
        resized_w, _ = resized_size(orig_w, orig_h, int(target_w))
        row[3] = resized_w - target_w - left
    return mirrored


def image_pixels(image: Image.Image) -> torch.Tensor:
    """An 8-bit RGB image as ``[3, H, W]`` float32 in [-1, 1] (``VaeImageProcessor.preprocess``)."""
    return _PROCESSOR.preprocess(image)[0]


class PairTransform:
    """Resize the shorter side to ``resolution`` and crop a square: the same crop position for both images, or
    (``independent``, with ``random_crop``) a random position for each.

    Returns the pixel tensors in [-1, 1] and, per image, SDXL's micro-conditioning
    ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``: ``orig`` is the size of the image as decoded
    (before resizing), ``crop_top, crop_left`` the offset of the crop in the resized image, as diffusers' SDXL training
    script measures it, and ``target`` the resolution. The winner and the loser share the relative crop position but
    get their own sizes and offsets.

    The flip augmentation is not drawn here: the trainer mirrors the cropped pair (both images) itself, with the
    ``time_ids`` of the mirrored view (:func:`mirrored_time_ids`), so that its draw is reproducible (see the trainer).
    """

    def __init__(self, resolution: int, random_crop: bool = False, independent: bool = False) -> None:
        self.resolution = resolution
        self.random_crop = random_crop
        self.independent = independent  # a random crop of its own for each image (the Diffusion-SDPO authors')

    load = staticmethod(load_image)  # one value of an image column to RGB (the video transform reads clips)

    @property
    def pixel_shape(self) -> tuple[int, ...]:
        """The shape of one image's pixels: ``(3, resolution, resolution)``."""
        return 3, self.resolution, self.resolution

    def _resize(self, image: Image.Image) -> Image.Image:
        new_w, new_h = resized_size(*image.size, self.resolution)
        return _PROCESSOR.resize(image, new_h, new_w)

    def _one(self, image: Image.Image, crop_fraction: tuple[float, float] | None):
        res = self.resolution
        orig_w, orig_h = image.size
        image = self._resize(image)
        new_w, new_h = image.size
        if crop_fraction is None:  # center crop, rounded like torchvision's CenterCrop
            top, left = round((new_h - res) / 2), round((new_w - res) / 2)
        else:  # each valid offset equally likely (as torchvision's RandomCrop), same relative position for the pair
            top = min(int(crop_fraction[0] * (new_h - res + 1)), new_h - res)
            left = min(int(crop_fraction[1] * (new_w - res + 1)), new_w - res)
        image = image.crop((left, top, left + res, top + res))
        time_ids = torch.tensor([orig_h, orig_w, top, left, res, res], dtype=torch.float32)
        return image_pixels(image), time_ids

    def source(self, image: Image.Image) -> torch.Tensor:
        """An editing pair's source image as ``[3, R, R]`` in [-1, 1]: resized and center-cropped as the edited
        images are, so a source of their aspect ratio stays aligned with them."""
        return self._one(image, None)[0]

    def mask(self, mask: Image.Image, resized_only: bool = False) -> torch.Tensor:
        """A pair's loss mask (8-bit grey, of the images' size) as ``[1, R, R]`` weights in [0, 1], resized and
        center-cropped as the images are (``resized_only``: resized, for the trainer's keyed crop); white is 1."""
        rgb = mask.convert("RGB")
        pixels = image_pixels(self._resize(rgb)) if resized_only else self._one(rgb, None)[0]
        return (pixels[:1] + 1.0) / 2.0

    def resized_pair(self, winner: Image.Image, loser: Image.Image) -> tuple[list[torch.Tensor], torch.Tensor]:
        """For a random crop drawn later by the trainer (keyed, so resume is exact): the two images resized but not
        cropped (``[3, h, w]`` each, in [-1, 1]) and their ``time_ids [2, 6]`` with crop offsets 0, to be filled in
        by :func:`~trl_diffusion_sdpo.data.random_crop.crop_pairs`."""
        pixels, time_ids = [], []
        for image in (winner, loser):
            orig_w, orig_h = image.size
            pixels.append(image_pixels(self._resize(image)))
            res = self.resolution
            time_ids.append(torch.tensor([orig_h, orig_w, 0, 0, res, res], dtype=torch.float32))
        return pixels, torch.stack(time_ids)

    def __call__(
        self, winner: Image.Image, loser: Image.Image, train: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``pixels [2, 3, R, R]`` (winner, loser) and ``time_ids [2, 6]``; a random crop only when training."""
        crop = (float(torch.rand(())), float(torch.rand(()))) if train and self.random_crop else None
        loser_crop = (float(torch.rand(())), float(torch.rand(()))) if crop is not None and self.independent else crop
        pixels_w, ids_w = self._one(winner, crop)
        pixels_l, ids_l = self._one(loser, loser_crop)
        return torch.stack([pixels_w, pixels_l]), torch.stack([ids_w, ids_l])

    def center_crop_pair(
        self, winner: Image.Image, loser: Image.Image, flip: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The center-cropped view of a pair, mirrored or not, as the trainer sees it (for the latent cache)."""
        pixels, time_ids = self(winner, loser, train=False)
        if flip:
            return pixels.flip(-1), mirrored_time_ids(time_ids)
        return pixels, time_ids


_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA = ("LA", "La", "PA", "RGBA", "RGBa")


def _from_intensities(values: np.ndarray, scale: float) -> Image.Image:
    """Grey values ``values * scale`` rounded to 8 bits, as an RGB image."""
    grey = np.clip(np.rint(values.astype(np.float64) * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


def image_conversion_digest() -> str:
    """SHA-256 of this module's source (its decoding, resizing and cropping rules) and Pillow's version: the latent
    cache's fingerprint includes it, so a cache encoded under other conversion rules (or another decoder) is never
    reused."""
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
