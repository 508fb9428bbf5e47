"""Every PIL image mode becomes 8-bit RGB scaled by what its values mean, or its row is refused by name."""

from __future__ import annotations

import io

import numpy as np
import pytest
from datasets import Dataset
from PIL import Image

from trl_diffusion_sdpo.data.preparation import prepare_preference_dataset
from trl_diffusion_sdpo.data.transforms import load_image, to_rgb


def palette_image(mode: str) -> Image.Image:
    image = Image.new(mode, (4, 4), 1 if mode == "P" else (1, 255))
    palette = [0, 0, 0, 10, 20, 30] + [0] * (256 * 3 - 6)
    image.putpalette(palette)
    return image


def sixteen_bit(mode: str, value: int) -> Image.Image:
    array = np.full((4, 4), value, dtype="<u2" if mode in ("I;16", "I;16L") else ">u2" if mode == "I;16B" else "=u2")
    return Image.frombytes(mode, (4, 4), array.tobytes())


# (image, the 8-bit RGB it must become). Expected values are worked out by hand from each mode's definition.
CASES = {
    "1": (Image.new("1", (4, 4), 1), (255, 255, 255)),
    "L": (Image.new("L", (4, 4), 100), (100, 100, 100)),
    "LA opaque": (Image.new("LA", (4, 4), (100, 255)), (100, 100, 100)),
    "LA transparent": (Image.new("LA", (4, 4), (100, 0)), (255, 255, 255)),  # over white
    "La": (Image.new("La", (4, 4), (100, 255)), (100, 100, 100)),
    "P": (palette_image("P"), (10, 20, 30)),
    "PA": (palette_image("PA"), (10, 20, 30)),
    "RGB": (Image.new("RGB", (4, 4), (10, 20, 30)), (10, 20, 30)),
    "RGBA opaque": (Image.new("RGBA", (4, 4), (10, 20, 30, 255)), (10, 20, 30)),
    "RGBA half": (Image.new("RGBA", (4, 4), (0, 0, 0, 128)), (127, 127, 127)),  # 255 * (1 - 128/255)
    "RGBa": (Image.new("RGBa", (4, 4), (10, 20, 30, 255)), (10, 20, 30)),
    "RGBX": (Image.new("RGBX", (4, 4), (10, 20, 30, 0)), (10, 20, 30)),
    "CMYK": (Image.new("CMYK", (4, 4), (0, 255, 255, 0)), (255, 0, 0)),
    "YCbCr": (Image.new("YCbCr", (4, 4), (255, 128, 128)), (255, 255, 255)),
    "HSV": (Image.new("HSV", (4, 4), (0, 255, 255)), (255, 0, 0)),
    "LAB": (Image.new("LAB", (4, 4), (255, 128, 128)), (255, 255, 255)),  # L* 100, a* b* 0: white
    "I 8-bit scale": (Image.new("I", (4, 4), 200), (200, 200, 200)),
    "I 16-bit scale": (Image.new("I", (4, 4), 128 * 257), (128, 128, 128)),
    "F intensities": (Image.new("F", (4, 4), 0.5), (128, 128, 128)),  # round(127.5)
    "F 8-bit scale": (Image.new("F", (4, 4), 200.0), (200, 200, 200)),
    "I;16": (sixteen_bit("I;16", 128 * 257), (128, 128, 128)),  # a grey, not the white square of convert("RGB")
    "I;16L": (sixteen_bit("I;16L", 65535), (255, 255, 255)),
    "I;16B": (sixteen_bit("I;16B", 64 * 257), (64, 64, 64)),
    "I;16N": (sixteen_bit("I;16N", 1000), (4, 4, 4)),  # round(1000 / 257)
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_pil_mode_becomes_rgb_with_the_values_its_mode_means(case):
    image, expected = CASES[case]
    converted = load_image(image)
    assert converted.mode == "RGB" and converted.size == image.size
    pixels = np.asarray(converted).reshape(-1, 3)
    assert np.abs(pixels.astype(int) - np.array(expected)).max() <= 1, (case, pixels[0].tolist(), expected)


@pytest.mark.parametrize(("mode", "fmt"), [("I;16", "PNG"), ("I;16", "TIFF"), ("F", "TIFF"), ("CMYK", "JPEG")])
def test_encoded_images_of_wide_modes_decode_to_the_same_values(mode, fmt):
    image = {"I;16": sixteen_bit("I;16", 128 * 257), "F": Image.new("F", (4, 4), 0.25)}.get(
        mode, Image.new("CMYK", (4, 4), (0, 255, 255, 0))
    )
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    assert np.abs(np.asarray(load_image(buffer.getvalue())).astype(int) - np.asarray(to_rgb(image))).max() <= 2


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (Image.new("I", (4, 4), 70000), r"mode I .*\[70000, 70000\]"),
        (Image.new("I", (4, 4), -5), r"mode I .*\[-5, -5\]"),
        (Image.new("F", (4, 4), 300.0), r"mode F .*\[300, 300\]"),
        (Image.new("F", (4, 4), float("nan")), "mode F .*NaN"),
    ],
    ids=["I-above-16-bit", "I-negative", "F-above-255", "F-nan"],
)
def test_images_whose_scale_cannot_be_known_are_refused_naming_the_row_and_column(image, message, make_config):
    good = Image.new("RGB", (4, 4), (1, 2, 3))
    dataset = Dataset.from_dict({"prompt": ["a", "b"], "chosen": [good, good], "rejected": [good, image]}).cast_column(
        "rejected", Dataset.from_dict({"x": [good]}).features["x"]
    )
    with pytest.raises(ValueError, match=message) as info:
        prepare_preference_dataset(dataset, make_config(), "train")
    assert "row 1, column 'rejected'" in str(info.value)
    with pytest.raises(ValueError, match=message):
        load_image(image)


def test_a_dark_16_bit_file_that_pillow_opens_as_mode_i_is_read_as_16_bit():
    # A 16-bit PGM (maxval 65535) opens in mode I; all its values (200) lie within 8 bits, yet they are 16-bit
    # values: 200 / 257 rounds to 1, a nearly black image, not the mid-grey 200 that the 8-bit reading gives.
    pgm = b"P5\n4 4\n65535\n" + np.full((4, 4), 200, dtype=">u2").tobytes()
    assert Image.open(io.BytesIO(pgm)).mode == "I"
    rgb = np.asarray(load_image(pgm))
    assert rgb.shape == (4, 4, 3) and (rgb == round(200 / 257)).all()
    # An 8-bit PGM of the same values stays 200.
    assert (np.asarray(load_image(b"P5\n4 4\n255\n" + bytes([200] * 16))) == 200).all()
