"""The start summary says how many training images are resized or cropped to ``resolution``, and from what size to
what size, counted by the validation pass that already decodes every image (and by the sharded cache's row checks);
a streamed dataset says the sizes are not known up front, and images used at their own size add no line."""

from __future__ import annotations

from pathlib import Path

import pytest
from datasets import Dataset
from PIL import Image
from transformers import TrainerState

from tests.helpers.data_formats import load, png
from tests.helpers.latent_cache import _rows
from trl_diffusion_sdpo.data.preparation import prepare_preference_dataset
from trl_diffusion_sdpo.data.sharded_cache import build_sharded_latent_cache
from trl_diffusion_sdpo.data.transforms import PairTransform, load_image
from trl_diffusion_sdpo.data.validation import resize_summary
from trl_diffusion_sdpo.families import family_for_pipeline
from trl_diffusion_sdpo.io.run_summary import StartSummary
from trl_diffusion_sdpo.testing import build_tiny_sd_pipeline

RESOLUTION = 32
LOGGER = "trl_diffusion_sdpo.io.run_summary"


def _pair_folder(root: Path, sizes: list[tuple[tuple[int, int], tuple[int, int]]]) -> Path:
    """One folder per pair (chosen.png, rejected.png, prompt.txt) with the given ``(chosen, rejected)`` sizes."""
    for i, (chosen, rejected) in enumerate(sizes):
        png(root / f"pair{i}" / "chosen.png", (200, 20, 20), chosen)
        png(root / f"pair{i}" / "rejected.png", (20, 20, 200), rejected)
        (root / f"pair{i}" / "prompt.txt").write_text(f"a red square {i}")
    return root


def _logged_summary(trainer, caplog) -> str:
    """What the trainer's start-summary callback logs when training begins (called as transformers calls it)."""
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, StartSummary))
    state = TrainerState(max_steps=1, is_world_process_zero=True)
    with caplog.at_level("INFO", logger=LOGGER):
        callback.on_train_begin(trainer.args, state, None)
    return next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Training "))


def _images(folder: Path) -> list[Image.Image]:
    return [load_image(str(path)) for path in sorted(folder.rglob("*.png"))]


def test_a_pair_folder_of_64px_images_trained_at_32px_is_counted_in_the_start_summary(tmp_path, make_trainer, caplog):
    folder = _pair_folder(tmp_path / "pairs", [((64, 64), (64, 64)), ((64, 64), (32, 32)), ((64, 64), (64, 64))])
    trainer = make_trainer(train_dataset=load(folder), resolution=RESOLUTION, max_steps=1)
    summary = _logged_summary(trainer, caplog)
    # Independently: the images the transform changes are those whose pixels it returns at another size than read.
    images = _images(folder)
    transform = PairTransform(RESOLUTION)
    changed = [image for image in images if transform.source(image).shape[-2:] != image.size[::-1]]
    assert {image.size for image in changed} == {(64, 64)}
    assert (
        f"{len(changed)} of {len(images)} images resized from 64x64 to {RESOLUTION}x{RESOLUTION} "
        f"(center crop to {RESOLUTION}x{RESOLUTION}: 0)" in summary
    )


def test_images_at_the_training_size_add_no_resize_line(tmp_path, make_trainer, caplog):
    folder = _pair_folder(tmp_path / "pairs", [((32, 32), (32, 32)), ((32, 32), (32, 32))])
    trainer = make_trainer(train_dataset=load(folder), resolution=RESOLUTION, max_steps=1)
    summary = _logged_summary(trainer, caplog)
    assert trainer.train_data_report.image_sizes == {(32, 32): 4}  # counted, and nothing to say
    assert "resized" not in summary and "crop" not in summary


def test_several_sizes_name_each_resize_and_count_the_crops(tmp_path, make_config):
    sizes = [((48, 64), (64, 64)), ((64, 64), (32, 48)), ((32, 32), (64, 64))]
    folder = _pair_folder(tmp_path / "pairs", sizes)
    args = make_config(resolution=RESOLUTION)
    _, _, report = prepare_preference_dataset(load(folder), args)
    text = report.resize_text(RESOLUTION, random_crop=False)
    # Independently, from the transform: the size each image is resized to (before its crop), and whether it is
    # cropped (resized to something other than the square).
    transform = PairTransform(RESOLUTION)
    resized = [(im.size, tuple(transform.resized_pair(im, im)[0][0].shape[:0:-1])) for im in _images(folder)]
    cropped = sum(target != (RESOLUTION, RESOLUTION) for _, target in resized)
    moved = [(size, target) for size, target in resized if size != target]
    # the three 64x64 and the 48x64 are resized, the 48x64 and the 32x48 (shorter side 32 already) cropped
    assert cropped == 2 and len(moved) == 4
    assert text.startswith(f"{len(moved)} of {len(resized)} images resized: 3 from 64x64 to 32x32, 1 from 48x64 to ")
    target = next(t for s, t in moved if s == (48, 64))
    assert f"1 from 48x64 to {target[0]}x{target[1]}" in text
    assert text.endswith(f"(center crop to 32x32: {cropped})")
    assert report.resize_text(RESOLUTION, random_crop=True).endswith(f"(random crop to 32x32: {cropped})")


def test_a_streamed_dataset_says_the_sizes_are_not_known_up_front(tmp_path, make_trainer, caplog):
    folder = _pair_folder(tmp_path / "pairs", [((64, 64), (64, 64)), ((64, 64), (64, 64))])
    trainer = make_trainer(train_dataset=load(folder).to_iterable_dataset(), resolution=RESOLUTION, max_steps=1)
    summary = _logged_summary(trainer, caplog)
    assert "image sizes not known up front (a streamed dataset)" in summary
    assert f"center cropped to {RESOLUTION}x{RESOLUTION}" in summary


@pytest.fixture(scope="module")
def family():
    return family_for_pipeline(build_tiny_sd_pipeline(seed=0))


def test_the_sharded_cache_counts_what_the_validation_pass_counts_even_when_resumed(tmp_path, make_config, family):
    """The cache's manifest carries the sizes its row checks read, so a run trained from it says what was resized;
    a cache built in two calls (one chunk, then the rest) counts each image once."""
    rows = _rows(5)
    rows[2]["label_0"] = 0.5  # a tie: dropped, its images not trained on and not counted
    data = Dataset.from_list(rows)
    args = make_config(resolution=RESOLUTION, random_flip=False)
    _, _, prepared = prepare_preference_dataset(data, args)
    folder = str(tmp_path / "cache")
    assert build_sharded_latent_cache(data, args, family, folder, chunk_size=2, max_chunks=1, progress=False) is None
    cache = build_sharded_latent_cache(data, args, family, folder, chunk_size=2, progress=False)
    expected: dict[tuple[int, int], int] = {}
    for i, row in enumerate(rows):
        if i != 2:
            for key in ("jpg_0", "jpg_1"):
                size = load_image(row[key]).size
                expected[size] = expected.get(size, 0) + 1
    assert cache.report().image_sizes == prepared.image_sizes == expected
    assert cache.report().resize_text(RESOLUTION, False) == prepared.resize_text(RESOLUTION, False) != ""


def test_the_data_page_quotes_the_line_the_summary_writes():
    page = " ".join((Path(__file__).resolve().parents[2] / "docs" / "data.md").read_text().split())
    line = resize_summary({(64, 64): 12, (32, 32): 28}, RESOLUTION, random_crop=False)
    assert f"(e.g. `{line}`)" in page


def test_sizes_are_counted_past_a_first_batch_of_invalid_rows(make_pickapic, make_config):
    """The validation pass writes its rows in batches of 64: a first batch of invalid rows only (skipped, no sizes)
    does not stop the later rows' sizes from being written and counted."""
    rows = make_pickapic(67).to_list()
    for row in rows[:64]:
        row["jpg_1"] = b"not an image"
    data = Dataset.from_list(rows)
    _, _, report = prepare_preference_dataset(data, make_config(resolution=RESOLUTION, skip_invalid_rows=True))
    expected: dict[tuple[int, int], int] = {}
    for row in rows[64:]:
        for key in ("jpg_0", "jpg_1"):
            size = load_image(row[key]).size
            expected[size] = expected.get(size, 0) + 1
    assert (report.invalid_skipped, report.num_kept) == (64, 3) and report.image_sizes == expected
