"""The corpus of bad inputs, one test per kind: each gives a clear error naming where the problem is, or is skipped
and counted; none trains silently on a wrong value. (More kinds live beside the feature they test:
``test_data.py``, ``test_config.py``, ``test_smpo_data.py``, ``test_image_modes.py``, ``test_checkpoints.py``.)"""

from __future__ import annotations

import logging
import os

import pytest
from datasets import Dataset

from tests.helpers.common import encode_image, pickapic_rows
from trl_diffusion_sdpo import DiffusionSDPOTrainer
from trl_diffusion_sdpo.data.collators import PreferenceCollator
from trl_diffusion_sdpo.data.preparation import prepare_preference_dataset
from trl_diffusion_sdpo.data.transforms import PairTransform
from trl_diffusion_sdpo.io.checkpoints import CheckpointError, resolve_resume_checkpoint


def prepare(rows, make_config, **overrides):
    return prepare_preference_dataset(Dataset.from_list(rows), make_config(**overrides), "train")


def expect_row_error(rows, make_config, row: int, column: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason) as info:
        prepare(rows, make_config)
    assert f"row {row}, column {column!r}" in str(info.value)
    assert "skip_invalid_rows" in str(info.value)
    _, _, report = prepare(rows, make_config, skip_invalid_rows=True)  # or skipped and counted
    assert report.invalid_skipped == 1 and report.num_kept == len(rows) - 1


def stream_collate(rows, make_config, caplog):
    """Prepare ``rows`` as a stream and collate all of them, capturing the warnings."""
    stream, columns, _ = prepare_preference_dataset(Dataset.from_list(rows).to_iterable_dataset(), make_config())
    collator = PreferenceCollator(columns, lambda prompts: {}, PairTransform(32), train=True)
    with caplog.at_level(logging.WARNING, logger="trl_diffusion_sdpo.data.collators"):
        return collator(list(stream))


# ----------------------------------------------------------------------------------------------- map-style data


def test_an_image_path_that_does_not_exist_names_the_row_and_column(make_config):
    rows = pickapic_rows(4)
    rows[2]["jpg_1"] = {"bytes": None, "path": "/nonexistent/picture.png"}
    rows = [dict(r, jpg_1={"bytes": r["jpg_1"], "path": None}) if i != 2 else r for i, r in enumerate(rows)]
    expect_row_error(rows, make_config, 2, "rejected", "No such file")  # label_0 1: image 1 is rejected


def test_a_zero_byte_image_names_the_row_and_column(make_config):
    rows = pickapic_rows(4)
    rows[1]["jpg_0"] = b""
    expect_row_error(rows, make_config, 1, "rejected", "cannot decode image")  # label_0 0: image 0 is rejected


def test_an_image_file_named_by_several_rows_is_decoded_once_until_it_changes(tmp_path, make_config, monkeypatch):
    """HPDv3 names each image in about two comparisons: validation decodes a file once, and again once rewritten."""
    from PIL import Image

    paths = []
    for name, colour in (("a", (255, 0, 0)), ("b", (0, 255, 0)), ("c", (0, 0, 255))):
        paths.append(str(tmp_path / f"{name}.png"))
        Image.new("RGB", (8, 8), colour).save(paths[-1])
    a, b, c = paths
    rows = [{"prompt": f"p{i}", "chosen": w, "rejected": r} for i, (w, r) in enumerate([(a, b), (a, c), (c, b)])]
    opened: list[str] = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *args, **kw: opened.append(fp) or real_open(fp, *args, **kw))
    stated: list[str] = []  # one stat per row naming a file (a network file system's round trip), not two
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda path, *args, **kw: stated.append(path) or real_stat(path, *args, **kw))
    _, _, report = prepare(rows, make_config)
    assert report.num_kept == 3 and sorted(opened) == [a, b, c]
    assert stated.count(a) == 2 and stated.count(c) == 2
    monkeypatch.setattr(os, "stat", real_stat)
    with open(a, "wb") as f:  # the same path, now not an image
        f.write(b"not an image any more")
    expect_row_error([rows[0], rows[2]], make_config, 0, "chosen", "cannot decode image")
    assert opened.count(a) == 2


def test_text_bytes_in_an_image_column_name_the_row_and_column(make_config):
    rows = pickapic_rows(4)
    rows[3]["jpg_0"] = b"a caption where an image should be"
    expect_row_error(rows, make_config, 3, "rejected", "cannot decode image")


def test_prompts_that_are_numbers_name_the_row_and_column(make_config):
    rows = [dict(r, caption=i) for i, r in enumerate(pickapic_rows(4))]  # datasets keeps one type per column
    with pytest.raises(ValueError, match=r"row 0, column 'prompt': prompt must be a string, got int"):
        prepare(rows, make_config)


def test_a_label_that_is_a_word_names_the_row_and_column(make_config):
    rows = [dict(r, label_0=str(r["label_0"])) for r in pickapic_rows(4)]
    rows[2]["label_0"] = "yes"
    expect_row_error(rows, make_config, 2, "label_0", "is not a number")


def test_a_nan_label_names_the_row_and_column(make_config):
    rows = pickapic_rows(4)
    rows[1]["label_0"] = float("nan")
    expect_row_error(rows, make_config, 1, "label_0", "is not one of 0, 0.5, 1")


def test_a_negative_label_names_the_row_and_column(make_config):
    rows = pickapic_rows(4)
    rows[3]["label_0"] = -1.0
    expect_row_error(rows, make_config, 3, "label_0", "is not one of 0, 0.5, 1")


def test_an_empty_dataset_is_refused(make_config):
    empty = Dataset.from_list(pickapic_rows(2)).select([])
    with pytest.raises(ValueError, match=r"The train dataset is empty \(0 rows\)"):
        prepare_preference_dataset(empty, make_config(), "train")


def test_a_list_instead_of_a_dataset_is_refused_naming_its_type(make_config):
    with pytest.raises(TypeError, match="train dataset must be a datasets.Dataset or IterableDataset, got list"):
        prepare_preference_dataset(pickapic_rows(2), make_config(), "train")


def test_a_sixteen_bit_image_out_of_range_names_the_row_and_column(make_config):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("I", (32, 32), 100_000).save(buffer, format="TIFF")
    rows = pickapic_rows(4)
    rows[0]["jpg_1"] = buffer.getvalue()
    expect_row_error(rows, make_config, 0, "rejected", "mode I")


# ----------------------------------------------------------------------------------------------- streamed data


def test_a_truncated_streamed_image_is_skipped_with_a_warning_naming_its_position_and_column(make_config, caplog):
    rows = pickapic_rows(6)
    rows[3]["jpg_1"] = encode_image((10, 20, 30), (64, 64), "JPEG")[:300]
    batch = stream_collate(rows, make_config, caplog)
    assert batch["num_skipped"].item() == 1 and batch["pixel_values"].shape[0] == 5
    assert "Skipping streamed row 3: column 'chosen':" in caplog.text  # label_0 0: image 1 is chosen


def test_a_bad_streamed_label_is_skipped_with_a_warning_naming_its_position_and_column(make_config, caplog):
    rows = pickapic_rows(6)
    rows[4]["label_0"] = 0.3
    batch = stream_collate(rows, make_config, caplog)
    assert batch["num_skipped"].item() == 1
    assert "Skipping streamed row 4: column 'label_0': label 0.3 is not one of 0, 0.5, 1" in caplog.text


def test_a_missing_streamed_prompt_is_skipped_with_a_warning_naming_its_position_and_column(make_config, caplog):
    rows = pickapic_rows(6)
    rows[5]["caption"] = None
    batch = stream_collate(rows, make_config, caplog)
    assert batch["num_skipped"].item() == 1
    assert "Skipping streamed row 5: column 'prompt': prompt must be a string, got NoneType" in caplog.text


# ----------------------------------------------------------------------------------------------- the trainer


def test_no_train_dataset_is_refused(make_pipeline, make_config):
    with pytest.raises(ValueError, match="needs a train_dataset"):
        DiffusionSDPOTrainer(make_pipeline(), args=make_config(), train_dataset=None)


def test_transformers_training_arguments_instead_of_the_config_are_refused(make_pipeline, pickapic_dataset, tmp_path):
    from transformers import TrainingArguments

    with pytest.raises(TypeError, match="args must be a DiffusionSDPOConfig, got TrainingArguments"):
        DiffusionSDPOTrainer(make_pipeline(), args=TrainingArguments(str(tmp_path)), train_dataset=pickapic_dataset)


def test_resuming_from_a_checkpoint_that_does_not_exist_names_it(tmp_path):
    missing = tmp_path / "out" / "checkpoint-7"
    with pytest.raises(CheckpointError, match=f"{missing}: {missing} is not a folder"):
        resolve_resume_checkpoint(str(missing), str(tmp_path / "out"))


def test_resume_true_without_any_checkpoint_says_so(tmp_path):
    with pytest.raises(ValueError, match="No complete checkpoint found in output directory"):
        resolve_resume_checkpoint(True, str(tmp_path))
