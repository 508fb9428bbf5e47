"""The pair transform's pixels through diffusers' ``VaeImageProcessor`` equal, bit for bit, the computation it
replaced: PIL's bilinear resize of the shorter side to the resolution, torchvision-rounded center crop or a uniform
random crop, and ``x / 127.5 - 1``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from trl_diffusion_sdpo.data.transforms import PairTransform, image_pixels

SIZES = [(64, 48), (33, 71), (100, 100), (37, 37), (51, 20)]


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]


def _reference(image: Image.Image, res: int, crop: tuple[float, float] | None) -> tuple[torch.Tensor, list[int]]:
    """Resize (shorter side ``res``, rounded), crop (center: rounded offsets; random: uniform offsets), scale."""
    w, h = image.size
    scale = res / min(w, h)
    new_w, new_h = max(res, round(w * scale)), max(res, round(h * scale))
    resized = image.resize((new_w, new_h), resample=Image.Resampling.BILINEAR)
    if crop is None:
        top, left = round((new_h - res) / 2), round((new_w - res) / 2)
    else:
        top = min(int(crop[0] * (new_h - res + 1)), new_h - res)
        left = min(int(crop[1] * (new_w - res + 1)), new_w - res)
    array = np.asarray(resized.crop((left, top, left + res, top + res)), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array.copy()).permute(2, 0, 1), [h, w, top, left, res, res]


@pytest.mark.parametrize("res", [16, 32])
@pytest.mark.parametrize("random_crop", [False, True], ids=["center", "random"])
def test_pair_pixels_equal_the_reference_bit_for_bit(res, random_crop):
    images = _images()
    transform = PairTransform(res, random_crop=random_crop, independent=random_crop)
    for first, second in zip(images, images[1:]):
        torch.manual_seed(len(first.getdata()))
        pixels, time_ids = transform(first, second, train=True)
        torch.manual_seed(len(first.getdata()))  # the transform's own draws: winner's (top, left), then the loser's
        crops = [(float(torch.rand(())), float(torch.rand(()))) for _ in range(2)] if random_crop else [None, None]
        for got, ids, image, crop in zip(pixels, time_ids, (first, second), crops):
            expected, expected_ids = _reference(image, res, crop)
            assert got.dtype == torch.float32 and torch.equal(got, expected)
            assert ids.tolist() == expected_ids


def test_resized_pair_mask_and_pixels_equal_the_reference():
    images, res = _images(), 16
    transform = PairTransform(res)
    for image in images:
        w, h = image.size
        scale = res / min(w, h)
        size = max(res, round(w * scale)), max(res, round(h * scale))
        resized = np.asarray(image.resize(size, resample=Image.Resampling.BILINEAR), dtype=np.float32) / 127.5 - 1
        (pixels, _), _ = transform.resized_pair(image, image)
        assert torch.equal(pixels, torch.from_numpy(resized.copy()).permute(2, 0, 1))
        grey = image.convert("L")
        mask = transform.mask(grey)
        expected, _ = _reference(grey.convert("RGB"), res, None)
        assert torch.equal(mask, (expected[:1] + 1.0) / 2.0)
    array = np.asarray(images[0], dtype=np.float32) / 127.5 - 1.0
    assert torch.equal(image_pixels(images[0]), torch.from_numpy(array.copy()).permute(2, 0, 1))
