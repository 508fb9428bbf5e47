"""Image files and folder layouts for the data-format tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from trl import ScriptArguments

from tests.helpers.common import COLOURS
from trl_diffusion_sdpo.cli.train import DiffusionScriptArguments, load_train_split
from trl_diffusion_sdpo.data.preparation import prepare_preference_dataset
from trl_diffusion_sdpo.data.transforms import load_image


def png(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def colour(value) -> tuple[int, int, int]:
    """Which of ``COLOURS`` a one-colour image is, given as the dataset holds it (a path, or a datasets.Image value);
    JPEG's error is a few levels."""
    pixel = load_image(value).getpixel((0, 4))
    nearest = min(COLOURS, key=lambda c: max(abs(a - b) for a, b in zip(c, pixel)))
    assert max(abs(a - b) for a, b in zip(nearest, pixel)) <= 6, pixel
    return nearest


def load(path, split: str = "train", **options):
    """Load ``path`` exactly as ``trl-diffusion-sdpo train --dataset_name path`` does."""
    return load_train_split(
        ScriptArguments(dataset_name=str(path), dataset_train_split=split), DiffusionScriptArguments(**options)
    )


def expect_bad_row(dataset, make_config, row: int, column: str, *fragments: str) -> None:
    with pytest.raises(ValueError) as info:
        prepare_preference_dataset(dataset, make_config(), "train")
    message = str(info.value)
    assert f"row {row}, column {column!r}" in message, message
    for fragment in fragments:
        assert fragment in message, message
