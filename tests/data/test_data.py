"""Preference data: validation before training, tie handling, winner order, column layouts, streaming, transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, IterableDataset, Value
from datasets import Image as ImageFeature
from PIL import Image

from tests.helpers.common import COLOURS, encode_image, pickapic_rows
from trl_diffusion_sdpo import DiffusionSDPOTrainer
from trl_diffusion_sdpo.data.collators import PreferenceCollator
from trl_diffusion_sdpo.data.pickapic import pickapic_to_trl
from trl_diffusion_sdpo.data.preparation import prepare_preference_dataset
from trl_diffusion_sdpo.data.transforms import PairTransform, load_image, mirrored_time_ids
from trl_diffusion_sdpo.data.validation import resolve_columns


def colour_of(pixels: torch.Tensor) -> tuple[int, int, int]:
    """The mean RGB colour (0..255) of a ``[3, H, W]`` tensor in [-1, 1]."""
    return tuple(round(v) for v in ((pixels.mean(dim=(1, 2)) + 1) * 127.5).tolist())


def assert_colour(pixels: torch.Tensor, colour: tuple[int, int, int], tol: int = 6) -> None:
    got = colour_of(pixels)
    assert all(abs(a - b) <= tol for a, b in zip(got, colour)), f"{got} is not {colour}"


def eval_batch(trainer: DiffusionSDPOTrainer, indices) -> dict[str, torch.Tensor]:
    """The deterministic (no flip, center crop, no prompt dropout) collation of some prepared rows."""
    return trainer._eval_collator([trainer.train_dataset[i] for i in indices])


def not_an_image() -> bytes:
    return b"\x89PNG\r\n\x1a\n this is not really a PNG"


# ----------------------------------------------------------------------------------------------- validation
# Pick-a-Pic rows are mapped to TRL's columns before validation: an error names the row as before, and an image or
# prompt by its TRL column (image 1 is "chosen" where label_0 is 0, as in the odd rows here), a label by label_0.


def _bad_bytes(rows):
    rows[3]["jpg_1"] = not_an_image()  # label_0 0: image 1 is chosen
    return "chosen", 3


def _truncated_jpeg(rows):
    rows[2]["jpg_0"] = encode_image((10, 20, 30), (64, 64), "JPEG")[:100]  # label_0 1
    return "chosen", 2


def _label_out_of_range(rows):
    rows[4]["label_0"] = 0.7
    return "label_0", 4


def _label_two(rows):
    rows[1]["label_0"] = 2.0
    return "label_0", 1


def _none_prompt(rows):
    rows[5]["caption"] = None
    return "prompt", 5


def _none_image(rows):
    rows[0]["jpg_0"] = None
    return "chosen", 0


@pytest.mark.parametrize(
    "corrupt",
    [_bad_bytes, _truncated_jpeg, _label_out_of_range, _label_two, _none_prompt, _none_image],
    ids=lambda f: f.__name__.strip("_"),
)
def test_bad_row_raises_value_error_naming_row_and_column_before_training(corrupt, make_pickapic, make_trainer):
    rows = pickapic_rows(6)
    column, row = corrupt(rows)
    with pytest.raises(ValueError) as info:
        make_trainer(train_dataset=make_pickapic(rows=rows))
    message = str(info.value)
    assert f"row {row}," in message
    assert repr(column) in message
    assert "skip_invalid_rows" in message  # says what to change


def test_bad_eval_row_raises_value_error_naming_the_eval_split(make_pickapic, make_trainer, pickapic_dataset):
    rows = pickapic_rows(4)
    rows[2]["label_0"] = -1.0
    with pytest.raises(ValueError, match=r"eval .*row 2, column 'label_0'"):
        make_trainer(train_dataset=pickapic_dataset, eval_dataset=make_pickapic(rows=rows))


def test_missing_column_raises_value_error_naming_it(pickapic_dataset, make_trainer):
    with pytest.raises(ValueError, match=r"missing column\(s\) \['jpg_1'\]"):
        make_trainer(train_dataset=pickapic_dataset.remove_columns("jpg_1"))
    with pytest.raises(ValueError, match=r"missing column\(s\) \['rejected'\]"):
        chosen_only = Dataset.from_dict({"prompt": ["a"], "chosen": [encode_image(COLOURS[0], (32, 32))]})
        make_trainer(train_dataset=chosen_only)


def test_dataset_of_only_ties_raises_value_error(make_pickapic, make_trainer):
    with pytest.raises(ValueError, match="empty after filtering.*4 ties dropped"):
        make_trainer(train_dataset=make_pickapic(n=4, labels=[0.5] * 4))


def test_skip_invalid_rows_skips_and_counts_bad_rows_and_ties(make_pickapic, make_trainer):
    rows = pickapic_rows(8)
    rows[1]["jpg_0"] = not_an_image()
    rows[3]["label_0"] = 0.25
    rows[4]["caption"] = None
    rows[6]["label_0"] = 0.5  # a tie: dropped, counted apart from the invalid rows
    trainer = make_trainer(train_dataset=make_pickapic(rows=rows), skip_invalid_rows=True, max_steps=1)
    report = trainer.train_data_report
    assert (report.num_rows, report.num_kept, report.invalid_skipped, report.ties_dropped) == (8, 4, 3, 1)
    assert any("row 1" in e and "'rejected'" in e for e in report.examples)  # label_0 0: image 0 is rejected
    assert trainer.train_dataset["prompt"] == [rows[i]["caption"] for i in (0, 2, 5, 7)]
    trainer.train()  # the kept rows train
    assert trainer.state.global_step == 1


def test_ties_are_dropped_and_counted_without_skip_invalid_rows(make_pickapic, make_trainer):
    trainer = make_trainer(train_dataset=make_pickapic(n=6, labels=[1.0, 0.5, 0.0, 0.5, 1.0, 0.0]))
    report = trainer.train_data_report
    assert (report.num_rows, report.num_kept, report.ties_dropped, report.invalid_skipped) == (6, 4, 2, 0)
    assert trainer.train_dataset["prompt"] == [f"a picture number {i}" for i in (0, 2, 4, 5)]
    assert "2 ties dropped" in report.summary()


# ----------------------------------------------------------------------------------------------- winner order


def test_pickapic_label_decides_which_image_is_the_winner(make_pickapic, make_trainer):
    # label_0 == 1: image 0 wins; label_0 == 0: image 1 wins. PNG rows keep their colours exactly.
    dataset = make_pickapic(n=4, labels=[1.0, 0.0, 0.0, 1.0])
    trainer = make_trainer(train_dataset=dataset)
    batch = eval_batch(trainer, range(4))
    assert batch["pixel_values"].shape == (4, 2, 3, 32, 32)
    for i, label in enumerate([1.0, 0.0, 0.0, 1.0]):
        colour_0, colour_1 = COLOURS[(2 * i) % 6], COLOURS[(2 * i + 1) % 6]
        winner, loser = (colour_0, colour_1) if label == 1.0 else (colour_1, colour_0)
        assert_colour(batch["pixel_values"][i, 0], winner)
        assert_colour(batch["pixel_values"][i, 1], loser)


@pytest.mark.slow  # two runs; the mapping's pairs and counts are checked by default in test_data_formats.py
def test_label_form_data_trains_exactly_as_the_trl_pairs_it_means(make_trainer, caplog):
    """Pick-a-Pic rows handed to the trainer are mapped with one log line and train as the TRL rows the test writes
    from their labels (ties and a bad label left out): the same losses and metrics, the same weights; the dropped
    rows are counted in data/skipped_rows. Rows holding both layouts are refused, naming the loader option."""
    import logging

    from tests.helpers.common import snapshot

    labels = [1.0, 0.0, 0.5, 1.0, 0.0, 0.25, 0.0, 1.0]
    rows = pickapic_rows(len(labels), labels)
    trl_rows = [
        {"prompt": r["caption"], "chosen": r["jpg_0" if r["label_0"] == 1 else "jpg_1"],
         "rejected": r["jpg_1" if r["label_0"] == 1 else "jpg_0"]}
        for r in rows if r["label_0"] in (0.0, 1.0)
    ]  # fmt: skip
    runs = {}
    for name, data in (("label form", rows), ("TRL", trl_rows)):
        with caplog.at_level(logging.INFO, logger="trl_diffusion_sdpo.data.pickapic"):
            caplog.clear()
            trainer = make_trainer(train_dataset=Dataset.from_list(data), skip_invalid_rows=True, max_steps=2)
            mapped = [r.getMessage() for r in caplog.records if "Pick-a-Pic's columns" in r.getMessage()]
        assert len(mapped) == (1 if name == "label form" else 0)
        trainer.train()
        logs = [h for h in trainer.state.log_history if "loss" in h]
        runs[name] = (logs, snapshot(trainer.model))
    (label_logs, label_weights), (trl_logs, trl_weights) = runs["label form"], runs["TRL"]
    assert [h.pop("data/skipped_rows") for h in label_logs] == [2, 0]  # the tie and the bad label, counted once
    assert [h.pop("data/skipped_rows") for h in trl_logs] == [0, 0]
    assert label_logs == trl_logs
    assert all(torch.equal(label_weights[k], trl_weights[k]) for k in trl_weights)
    both = Dataset.from_list([dict(r, **t) for r, t in zip(rows, trl_rows)])
    with pytest.raises(ValueError, match="both Pick-a-Pic's columns.*dataset_columns='pickapic'"):
        make_trainer(train_dataset=both)


def test_train_collator_also_puts_the_winner_first(make_pickapic, make_trainer):
    trainer = make_trainer(train_dataset=make_pickapic(n=2, labels=[0.0, 0.0]), proportion_empty_prompts=0.0)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    assert_colour(batch["pixel_values"][0, 0], COLOURS[1])
    assert_colour(batch["pixel_values"][1, 0], COLOURS[3])


def test_trl_form_dataset_with_pil_images_trains_with_chosen_as_winner(trl_dataset, make_trainer):
    trainer = make_trainer(train_dataset=trl_dataset, max_steps=2)
    assert resolve_columns(trl_dataset.column_names, trainer.args).skip is None  # nothing mapped, nothing marked
    batch = eval_batch(trainer, range(4))
    for i in range(4):
        assert_colour(batch["pixel_values"][i, 0], COLOURS[i])
        assert_colour(batch["pixel_values"][i, 1], COLOURS[i + 2])
    trainer.train()
    assert trainer.state.global_step == 2
    assert np.isfinite([h["loss"] for h in trainer.state.log_history if "loss" in h]).all()


def test_other_column_names_are_refused_naming_the_schema_and_train_once_renamed(
    pickapic_dataset, trl_dataset, make_trainer
):
    """Training reads one schema; data under other names is renamed first (``train --rename_columns``)."""
    from trl_diffusion_sdpo.cli.data_options import column_renames

    renamed = pickapic_dataset.rename_columns({"caption": "text", "jpg_0": "a", "jpg_1": "b", "label_0": "pref"})
    with pytest.raises(ValueError, match=r"missing column.*rename other columns to these"):
        make_trainer(train_dataset=renamed)
    back = renamed.rename_columns(column_renames("text:caption, a:jpg_0,b:jpg_1,pref:label_0"))
    trainer = make_trainer(train_dataset=back)
    batch = eval_batch(trainer, [1])  # label_0 of row 1 is 0: image 1 wins
    assert_colour(batch["pixel_values"][0, 0], COLOURS[3])
    trainer.train()

    renamed_trl = trl_dataset.rename_columns({"prompt": "q", "chosen": "good", "rejected": "bad"})
    with pytest.raises(ValueError, match="missing column"):
        make_trainer(train_dataset=renamed_trl)
    with pytest.raises(ValueError, match="rename_columns: 'q' is not old:new"):
        column_renames("q,chosen:good")


def test_image_feature_columns_are_accepted_and_corrupt_ones_reported(make_pickapic, make_trainer):
    rows = pickapic_rows(4)
    features = Features(
        {
            "caption": Value("string"),
            "jpg_0": ImageFeature(),
            "jpg_1": ImageFeature(),
            "label_0": Value("float64"),
            "label_1": Value("float64"),
            "model_0": Value("string"),
            "model_1": Value("string"),
        }
    )

    def as_images(rows):
        encoded = [
            {**r, "jpg_0": {"bytes": r["jpg_0"], "path": None}, "jpg_1": {"bytes": r["jpg_1"], "path": None}}
            for r in rows
        ]
        return Dataset.from_list(encoded, features=features)

    dataset = as_images(rows)
    assert isinstance(dataset.features["jpg_0"], ImageFeature)
    trainer = make_trainer(train_dataset=dataset, max_steps=1)
    assert_colour(eval_batch(trainer, [1])["pixel_values"][0, 0], COLOURS[3])
    trainer.train()

    rows[2]["jpg_1"] = not_an_image()
    with pytest.raises(ValueError, match=r"row 2, column 'rejected'"):  # label_0 1: image 1 is rejected
        make_trainer(train_dataset=as_images(rows))


# ----------------------------------------------------------------------------------------------- streaming


def test_iterable_dataset_trains_and_counts_bad_later_rows_in_skipped_rows_metric(make_pickapic, make_trainer):
    rows = pickapic_rows(8)
    rows[3]["jpg_1"] = not_an_image()
    rows[5]["label_0"] = 0.7
    rows[6]["caption"] = None
    stream = make_pickapic(rows=rows).to_iterable_dataset()
    assert isinstance(stream, IterableDataset)
    trainer = make_trainer(train_dataset=stream, max_steps=4)
    trainer.train()
    assert trainer.state.global_step == 4
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 4
    assert sum(h["data/skipped_rows"] for h in logged) == 3
    assert all(np.isfinite(h["loss"]) for h in logged)


def test_iterable_dataset_whose_first_row_is_bad_raises_before_training(make_pickapic, make_trainer):
    rows = pickapic_rows(4)
    rows[0]["label_0"] = 3.0
    with pytest.raises(ValueError, match=r"row 0, column 'label_0'"):
        make_trainer(train_dataset=make_pickapic(rows=rows).to_iterable_dataset())


def test_iterable_dataset_from_generator_without_features_trains(make_trainer):
    rows = pickapic_rows(4)
    stream = IterableDataset.from_generator(lambda: iter(rows))
    trainer = make_trainer(train_dataset=stream, max_steps=2)
    trainer.train()
    assert trainer.state.global_step == 2


def test_collator_skips_and_counts_streamed_bad_rows_and_ties(pickapic_dataset, make_trainer):
    trainer = make_trainer()
    rows = pickapic_rows(5)
    rows[0]["label_0"] = 0.5
    rows[1]["jpg_0"] = not_an_image()
    rows[2]["label_0"] = 1.5
    rows = list(pickapic_to_trl(Dataset.from_list(rows)))  # the tie and the bad label marked, not dropped
    collator = trainer._eval_collator
    batch = collator(rows)
    assert batch["num_skipped"].item() == 3
    assert batch["pixel_values"].shape[0] == 2 and batch["input_ids"].shape[0] == 2
    empty = collator(rows[:3])
    assert empty["pixel_values"].shape == (0, 2, 3, 32, 32) and empty["num_skipped"].item() == 3


# ----------------------------------------------------------------------------------------------- transforms


def halves(size, left_colour, right_colour) -> Image.Image:
    width, height = size
    image = Image.new("RGB", size, right_colour)
    image.paste(Image.new("RGB", (width // 2, height), left_colour), (0, 0))
    return image


def ramp(width: int, height: int = 32) -> Image.Image:
    """Red channel = column index: a crop's left offset and orientation can be read off its pixels."""
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[:, :, 0] = np.arange(width, dtype=np.uint8)[None, :]
    return Image.fromarray(array)


def red_columns(pixels: torch.Tensor) -> np.ndarray:
    """The red values (0..255) along the top row of one ``[3, H, W]`` image."""
    return np.rint((pixels[0, 0].numpy() + 1) * 127.5).astype(int)


def test_pair_transform_shapes_range_and_exact_values():
    transform = PairTransform(32, random_crop=False)
    pixels, time_ids = transform(halves((48, 40), (0, 0, 0), (255, 255, 255)), Image.new("RGB", (32, 32), (255, 0, 0)))
    assert pixels.shape == (2, 3, 32, 32) and pixels.dtype == torch.float32
    assert time_ids.shape == (2, 6)
    assert pixels.min().item() == -1.0 and pixels.max().item() == 1.0
    torch.testing.assert_close(pixels[1, 0], torch.ones(32, 32))
    torch.testing.assert_close(pixels[1, 1:], -torch.ones(2, 32, 32))
    # (orig_h, orig_w, crop_top, crop_left, target_h, target_w)
    assert time_ids[1].tolist() == [32, 32, 0, 0, 32, 32]
    assert time_ids[0, :2].tolist() == [40, 48]


def test_center_crop_takes_the_middle_and_never_flips():
    transform = PairTransform(32, random_crop=False)
    image = ramp(64)
    for train in (True, False, True):
        pixels, time_ids = transform(image, image, train=train)
        np.testing.assert_array_equal(red_columns(pixels[0]), np.arange(16, 48))
        assert time_ids[0, 2:4].tolist() == [0, 16]


def test_random_crop_varies_and_reports_its_offset_in_time_ids():
    transform = PairTransform(32, random_crop=True)
    torch.manual_seed(0)
    offsets = set()
    for _ in range(20):
        pixels, time_ids = transform(ramp(96), ramp(64))
        for k, width in ((0, 96), (1, 64)):
            left = int(time_ids[k, 3])
            assert 0 <= left <= width - 32
            np.testing.assert_array_equal(red_columns(pixels[k]), np.arange(left, left + 32))
        # The pair shares the relative crop position.
        assert abs(time_ids[0, 3].item() / 65 - time_ids[1, 3].item() / 33) < 1 / 33 + 1e-6
        offsets.add(int(time_ids[0, 3]))
    assert len(offsets) > 5


@pytest.mark.parametrize("width", [48, 49, 96])
def test_mirrored_view_is_the_crop_of_the_mirrored_image_where_its_time_ids_say(width):
    """The flipped view mirrors the cropped pair; its time_ids give the crop's offset in the mirrored resized image
    (for an odd margin the center crop is not symmetric, so the offset changes)."""
    transform = PairTransform(32, random_crop=False)
    winner, loser = ramp(width), ramp(40, 64)
    plain, plain_ids = transform.center_crop_pair(winner, loser, flip=False)
    mirrored, mirrored_ids = transform.center_crop_pair(winner, loser, flip=True)
    torch.testing.assert_close(mirrored, plain.flip(-1))  # both images mirrored, never one alone
    for k, image in ((0, winner), (1, loser)):
        resized_w = round(image.width * 32 / min(image.size))
        assert mirrored_ids[k].tolist()[:3] == plain_ids[k].tolist()[:3]
        left = int(mirrored_ids[k, 3])
        assert left == resized_w - 32 - int(plain_ids[k, 3])
        # Columns of the mirrored resized image [left, left + 32): red = resized_w - 1 - column (ramp images).
        expected = resized_w - 1 - np.arange(left, left + 32)
        if image.width == resized_w:  # no resampling: exact values
            np.testing.assert_array_equal(red_columns(mirrored[k]), expected)
    assert mirrored_ids[0, 3].item() == (width - 32) - round((width - 32) / 2)
    torch.testing.assert_close(mirrored_time_ids(mirrored_ids), plain_ids)  # mirroring twice is the identity


def test_images_smaller_than_the_resolution_are_upscaled():
    pixels, time_ids = PairTransform(32)(Image.new("RGB", (16, 8), COLOURS[0]), Image.new("RGB", (8, 8), COLOURS[1]))
    assert pixels.shape == (2, 3, 32, 32)
    assert_colour(pixels[0], COLOURS[0], tol=1)
    assert time_ids[0, :2].tolist() == [8, 16]


@pytest.mark.parametrize(
    "value",
    [
        encode_image(COLOURS[2], (20, 10)),
        {"bytes": encode_image(COLOURS[2], (20, 10), "JPEG"), "path": None},
        Image.new("RGBA", (20, 10), COLOURS[2] + (255,)),
        Image.new("L", (20, 10), 128),
    ],
    ids=["png-bytes", "image-dict", "rgba-pil", "grey-pil"],
)
def test_load_image_decodes_every_accepted_form_to_rgb(value):
    image = load_image(value)
    assert image.mode == "RGB" and image.size == (20, 10)


def test_load_image_from_a_path(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(encode_image(COLOURS[0], (10, 10)))
    assert load_image(str(path)).getpixel((0, 0)) == COLOURS[0]
    assert load_image({"bytes": None, "path": str(path)}).getpixel((0, 0)) == COLOURS[0]


def test_prepare_does_not_rewrite_the_image_bytes(pickapic_dataset, make_config):
    prepared, columns, report = prepare_preference_dataset(pickapic_dataset, make_config(), "train")
    assert report.num_kept == len(pickapic_dataset)
    assert prepared[0]["chosen"] == pickapic_dataset[0]["jpg_0"]  # label_0 1: image 0 is chosen
    assert set(prepared.column_names) == set(columns.all)


def test_collator_is_usable_without_a_trainer(pickapic_dataset, make_pipeline, make_config):
    pipe = make_pipeline()

    def tokenize(prompts):
        ids = pipe.tokenizer(prompts, padding="max_length", max_length=32, return_tensors="pt").input_ids
        return {"input_ids": ids}

    dataset = pickapic_to_trl(pickapic_dataset)
    columns = resolve_columns(dataset.column_names, make_config())
    collator = PreferenceCollator(columns, tokenize, PairTransform(32), train=True, with_flipped=True)
    rows = [dataset[i] for i in range(3)]
    batch = collator(rows)
    assert torch.equal(batch["input_ids"], tokenize([row["prompt"] for row in rows])["input_ids"])
    assert batch["time_ids"].shape == (3, 2, 6) and batch["num_skipped"].item() == 0
    torch.testing.assert_close(batch["time_ids_flipped"], mirrored_time_ids(batch["time_ids"]))


def test_each_named_eval_dataset_is_collated_by_its_own_collator():
    from trl_diffusion_sdpo.data.training_data import eval_collator_for

    named, single = {"a": object(), "b": object()}, object()
    assert eval_collator_for(named, "b") is named["b"]  # transformers asks for each named set by name
    assert eval_collator_for(named, None) is named["a"]  # a dataset passed to evaluate() directly: the first
    assert eval_collator_for(single, "b") is single
