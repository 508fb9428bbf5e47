"""The file layouts people keep preference data in (trl_diffusion_sdpo.data.formats), each written here as a tiny
local copy (a few PNGs), loaded through the function ``trl-diffusion-sdpo train`` loads ``--dataset_name`` with, and
checked for prompts, images and order; a bad row of each is named by row and column; one trains end to end."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch
from trl import ScriptArguments

from tests.helpers.common import COLOURS
from tests.helpers.data_formats import colour, expect_bad_row, load, png
from trl_diffusion_sdpo.cli.train import DiffusionScriptArguments, load_split, load_train_split
from trl_diffusion_sdpo.data.collators import PreferenceCollator
from trl_diffusion_sdpo.data.formats import detect_format, ranked_pairs
from trl_diffusion_sdpo.data.preparation import prepare_preference_dataset
from trl_diffusion_sdpo.data.transforms import PairTransform, load_image
from trl_diffusion_sdpo.data.validation import resolve_columns


def pairs_of(dataset) -> list[tuple[str, tuple, tuple]]:
    return [(row["prompt"], colour(row["chosen"]), colour(row["rejected"])) for row in dataset]


# -- pair folders -------------------------------------------------------------------------------------------------


def test_kohya_w_l_folders_with_caption_files_beside_both_images(tmp_path):
    # kohya-ss/sd-scripts PR #1427: dataset/1_name/w/image.png + w/image.caption, l/image.png + l/image.caption.
    root = tmp_path / "1_name"
    for i, name in enumerate(["b_dog", "a_cat", "c_fox"]):
        png(root / "w" / f"{name}.png", COLOURS[i])
        png(root / "l" / f"{name}.png", COLOURS[i + 3])
        (root / "w" / f"{name}.caption").write_text(f"a photo of {name}\n")
        (root / "l" / f"{name}.caption").write_text(f"a photo of {name}\n")
    assert detect_format(str(root)) == "pair_folders"
    dataset = load(root)
    assert pairs_of(dataset) == [  # sorted by name; w/ is the chosen side
        ("a photo of a_cat", COLOURS[1], COLOURS[4]),
        ("a photo of b_dog", COLOURS[0], COLOURS[3]),
        ("a photo of c_fox", COLOURS[2], COLOURS[5]),
    ]


def test_win_lose_folders_pair_by_path_with_the_caption_beside_the_winner_only(tmp_path):
    # SimpleTuner's Flow-DPO: /data/win holds the preferred images (captions as text files), /data/lose the rejected.
    root = tmp_path / "data"
    png(root / "win" / "set1" / "x.png", COLOURS[0])
    png(root / "lose" / "set1" / "x.jpg", COLOURS[1])  # another extension: paired by the path without it
    (root / "win" / "set1" / "x.txt").write_text("  nested prompt  ")
    png(root / "win" / "y.webp", COLOURS[2])
    png(root / "lose" / "y.png", COLOURS[3])
    (root / "win" / "y.txt").write_text("top prompt")
    dataset = load(root)
    assert [row["prompt"] for row in dataset] == ["nested prompt", "top prompt"]
    assert colour(dataset[0]["chosen"]) == COLOURS[0]
    assert colour(dataset[1]["rejected"]) == COLOURS[3]


def test_one_folder_per_pair_and_a_test_split_folder(tmp_path):
    root = tmp_path / "pairs"
    for split, offset in (("train", 0), ("test", 1)):
        for i in range(2):
            folder = root / split / f"pair{i}"
            png(folder / "chosen.png", COLOURS[i + offset])
            png(folder / "rejected.jpg", COLOURS[i + offset + 3])
            (folder / "prompt.txt").write_text(f"{split} {i}")
    assert detect_format(str(root)) == "pair_folders"
    assert pairs_of(load(root)) == [("train 0", COLOURS[0], COLOURS[3]), ("train 1", COLOURS[1], COLOURS[4])]
    test = [("test 0", COLOURS[1], COLOURS[4]), ("test 1", COLOURS[2], COLOURS[5])]
    assert pairs_of(load(root, split="test")) == test
    # The evaluation split ``train`` loads beside a streamed, capped training split is read whole and not streamed.
    script_args = ScriptArguments(dataset_name=str(root), dataset_streaming=True, dataset_test_split="test")
    options = DiffusionScriptArguments(max_train_rows=1)
    assert [row["prompt"] for row in load_train_split(script_args, options)] == ["train 0"]
    evaluation = load_split(script_args, options, script_args.dataset_test_split)
    assert len(evaluation) == 2 and pairs_of(evaluation) == test


def test_pair_folder_bad_rows_are_named_by_row_column_and_file_and_skipped_and_counted(tmp_path, make_config):
    root = tmp_path / "1_name"
    for i, name in enumerate(["a", "b", "c"]):
        png(root / "w" / f"{name}.png", COLOURS[i])
        (root / "w" / f"{name}.txt").write_text(f"prompt {name}")
    png(root / "l" / "a.png", COLOURS[3])
    png(root / "l" / "c.png", COLOURS[5])  # b has no rejected image
    (root / "w" / "c.txt").unlink()  # c has no caption
    dataset = load(root)
    assert len(dataset) == 3  # nothing dropped by the reader
    expect_bad_row(dataset, make_config, 1, "rejected", "image is missing", "no image l/b.*", "skip_invalid_rows")
    kept, _, report = prepare_preference_dataset(dataset, make_config(skip_invalid_rows=True), "train")
    assert (len(kept), report.invalid_skipped) == (1, 2)
    assert any("row 2, column 'prompt'" in e and "no caption c.txt" in e for e in report.examples)
    assert colour(kept[0]["chosen"]) == COLOURS[0]


# -- JSONL / CSV tables -------------------------------------------------------------------------------------------


def test_jsonl_of_relative_absolute_and_file_url_paths_with_scores_for_smpo(tmp_path, make_config):
    images = tmp_path / "images"
    paths = [png(images / f"{i}.png", COLOURS[i]) for i in range(6)]
    rows = [
        {"prompt": "relative", "chosen": "images/0.png", "rejected": "images/1.png", "chosen_score": 2.0,
         "rejected_score": 1.0},
        {"prompt": "absolute", "chosen": str(paths[2]), "rejected": str(paths[3]), "chosen_score": 0.5,
         "rejected_score": 0.25},
        {"prompt": "file url", "chosen": paths[4].as_uri(), "rejected": paths[5].as_uri(), "chosen_score": 3.0,
         "rejected_score": -1.0},
    ]  # fmt: skip
    file = tmp_path / "pairs.jsonl"
    file.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert detect_format(str(file)) == "table"
    dataset = load(file)
    assert pairs_of(dataset) == [
        ("relative", COLOURS[0], COLOURS[1]),
        ("absolute", COLOURS[2], COLOURS[3]),
        ("file url", COLOURS[4], COLOURS[5]),
    ]
    # chosen_score / rejected_score reach SmPO as the score columns, and its batches carry them as pair scores.
    args = make_config(loss_type="smpo")
    prepared, columns, _ = prepare_preference_dataset(dataset, args, "train")
    assert columns.scored
    collator = PreferenceCollator(columns, lambda prompts: {}, PairTransform(8), train=False)
    batch = collator([prepared[i] for i in range(3)])
    assert batch["pair_scores"].tolist() == [[2.0, 1.0], [0.5, 0.25], [3.0, -1.0]]


def test_csv_with_aliases_caption_winner_loser_in_a_folder_with_train_and_test_files(tmp_path):
    png(tmp_path / "a.png", COLOURS[0])
    png(tmp_path / "b.png", COLOURS[1])
    for split, order in (("train", ("a.png", "b.png")), ("test", ("b.png", "a.png"))):
        with open(tmp_path / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["caption", "winner", "loser"])
            writer.writerow([f"{split} prompt", *order])
    assert detect_format(str(tmp_path)) == "table"
    assert pairs_of(load(tmp_path)) == [("train prompt", COLOURS[0], COLOURS[1])]
    assert pairs_of(load(tmp_path, split="test")) == [("test prompt", COLOURS[1], COLOURS[0])]


@pytest.mark.parametrize(
    ("change", "column", "fragment"),
    [
        ({"chosen": "https://example.com/x.png"}, "chosen", "is a URL"),
        ({"rejected": "images/missing.png"}, "rejected", "No such file"),
        ({"prompt": "   "}, "prompt", "prompt is missing"),
    ],
    ids=["url", "missing-file", "empty-prompt"],
)
def test_table_bad_row_is_named_by_row_and_column(tmp_path, make_config, change, column, fragment):
    png(tmp_path / "images" / "a.png", COLOURS[0])
    png(tmp_path / "images" / "b.png", COLOURS[1])
    rows = [{"prompt": f"p{i}", "chosen": "images/a.png", "rejected": "images/b.png"} for i in range(4)]
    rows[2].update(change)
    file = tmp_path / "pairs.jsonl"
    file.write_text("\n".join(json.dumps(r) for r in rows))
    expect_bad_row(load(file), make_config, 2, column, fragment)


# -- datasets image folder with metadata --------------------------------------------------------------------------


@pytest.mark.parametrize("metadata", ["metadata.jsonl", "metadata.csv"])
def test_imagefolder_with_chosen_and_rejected_file_names_in_its_metadata(tmp_path, make_config, metadata):
    folder = tmp_path / "folder" / "train"
    for i in range(4):
        png(folder / f"{i}.png", COLOURS[i])
    rows = [
        {"chosen_file_name": "0.png", "rejected_file_name": "1.png", "prompt": "first"},
        {"chosen_file_name": "3.png", "rejected_file_name": "2.png", "prompt": "second"},
        {"chosen_file_name": "0.png", "rejected_file_name": "gone.png", "prompt": "third"},
    ]
    if metadata.endswith(".jsonl"):
        (folder / metadata).write_text("\n".join(json.dumps(r) for r in rows))
    else:
        with open(folder / metadata, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    root = tmp_path / "folder"
    assert detect_format(str(root)) == "imagefolder"
    dataset = load(root)
    assert pairs_of(dataset.select([0, 1])) == [("first", COLOURS[0], COLOURS[1]), ("second", COLOURS[3], COLOURS[2])]
    expect_bad_row(dataset, make_config, 2, "rejected", "No such file", "gone.png")


# -- HPDv3 / HPDv2 annotations ------------------------------------------------------------------------------------


def write_hpdv3(root: Path) -> None:
    """A tiny copy in HPDv3's published layout: images/ and train.json / test.json arrays of pair records."""
    for i in range(6):
        png(root / "images" / f"uuid{i}.jpg", COLOURS[i])
    train = [
        {"prompt": "a cat", "choice_dist": [12, 7], "confidence": 0.9999907, "path1": "images/uuid0.jpg",
         "path2": "images/uuid1.jpg", "model1": "flux", "model2": "infinity"},
        {"prompt": "a dog", "choice_dist": None, "confidence": None, "path1": "images/uuid3.jpg",
         "path2": "images/uuid2.jpg", "model1": "midjourney", "model2": "midjourney"},
    ]  # fmt: skip
    test = [{"prompt": "a fox", "path1": "images/uuid4.jpg", "path2": "images/uuid5.jpg", "model1": "flux",
             "model2": "sd3"}]  # fmt: skip
    (root / "train.json").write_text(json.dumps(train, indent=2))
    (root / "test.json").write_text(json.dumps(test))


def test_hpdv3_pairs_path1_preferred_in_file_order_with_its_annotations_kept(tmp_path):
    write_hpdv3(tmp_path)
    assert detect_format(str(tmp_path)) == "hpd"
    dataset = load(tmp_path)
    assert pairs_of(dataset) == [("a cat", COLOURS[0], COLOURS[1]), ("a dog", COLOURS[3], COLOURS[2])]
    assert dataset["choice_dist"] == [[12, 7], None]
    assert dataset["model1"] == ["flux", "midjourney"]
    assert pairs_of(load(tmp_path, split="test")) == [("a fox", COLOURS[4], COLOURS[5])]
    assert pairs_of(load(tmp_path / "test.json", dataset_format="hpd")) == [("a fox", COLOURS[4], COLOURS[5])]


def test_hpdv3_json_lines_whose_first_block_has_no_votes_still_read(tmp_path):
    """datasets reads JSON Lines in 10 MB blocks and types a column from the first: a vote column null through the
    first block (Midjourney records first) and set later must not stop the read."""
    write_hpdv3(tmp_path)
    null = {"prompt": "x" * 600, "choice_dist": None, "confidence": None, "path1": "images/uuid3.jpg",
            "path2": "images/uuid2.jpg", "model1": "midjourney", "model2": "midjourney"}  # fmt: skip
    voted = {"prompt": "a cat", "choice_dist": [12, 7], "confidence": 0.75, "path1": "images/uuid0.jpg",
             "path2": "images/uuid1.jpg", "model1": "flux", "model2": "infinity"}  # fmt: skip
    lines = [json.dumps(null)] * 18_000 + [json.dumps(voted)] * 2  # 12 MB: the votes start after the first block
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    dataset = load(tmp_path)  # train.jsonl is read before train.json
    assert len(dataset) == 18_002
    assert dataset[0]["choice_dist"] is None and dataset[-1]["choice_dist"] == [12, 7]
    assert dataset[-1]["confidence"] == 0.75 and pairs_of(dataset.select([0, 18_001])) == [
        ("x" * 600, COLOURS[3], COLOURS[2]),
        ("a cat", COLOURS[0], COLOURS[1]),
    ]


def test_hpdv3_missing_image_is_named_by_row_column_and_record(tmp_path, make_config):
    write_hpdv3(tmp_path)
    (tmp_path / "images" / "uuid2.jpg").unlink()
    expect_bad_row(load(tmp_path), make_config, 1, "rejected", "No such file", "train.json record 1")


def write_hpdv2_ranked(root: Path) -> None:
    """HPDv2's ranked test layout: test.json beside a test/ image folder, rank[i] the rank of image_path[i]."""
    for i in range(6):
        png(root / "test" / f"{i:05d}.jpg", COLOURS[i])
    records = [
        {"prompt": "three", "image_path": ["00000.jpg", "00001.jpg", "00002.jpg"], "rank": [2, 0, 1]},
        {"prompt": "tied", "image_path": ["00003.jpg", "00004.jpg"], "rank": [1, 1]},
        {"prompt": "broken", "image_path": ["00003.jpg", "00004.jpg", "00005.jpg"], "rank": [0, 1]},
    ]
    (root / "test.json").write_text(json.dumps(records))


def test_ranked_records_become_every_pair_or_best_against_worst(tmp_path, make_config):
    write_hpdv2_ranked(tmp_path)
    every = load(tmp_path, split="test")
    # Ranks [2, 0, 1]: image 1 > image 2 > image 0. The tie gives nothing; the broken record one row without images.
    assert [(row["prompt"], row["chosen"] and colour(row["chosen"])) for row in every] == [
        ("three", COLOURS[1]),
        ("three", COLOURS[2]),
        ("three", COLOURS[1]),
        ("broken", None),
    ]
    assert pairs_of(every.select(range(3))) == [
        ("three", COLOURS[1], COLOURS[0]),
        ("three", COLOURS[2], COLOURS[0]),
        ("three", COLOURS[1], COLOURS[2]),
    ]
    expect_bad_row(every, make_config, 3, "chosen", "test.json record 2: image_path has 3 images but rank has 2")
    best_worst = load(tmp_path, split="test", ranking_pairs="best_worst")
    assert pairs_of(best_worst.select([0])) == [("three", COLOURS[1], COLOURS[0])]
    assert len(best_worst) == 2
    # Without the check an unknown name would silently pair as "all".
    with pytest.raises(
        ValueError, match=re.escape("ranking_pairs must be one of ['all', 'best_worst'], got 'best-worst'.")
    ):
        load(tmp_path, split="test", ranking_pairs="best-worst")


def test_ranked_pairs_against_a_brute_force_count():
    ranks = [3, 1, 1, 0, 2]
    pairs = ranked_pairs(ranks, "all")
    assert len(pairs) == sum(ranks[i] != ranks[j] for i in range(5) for j in range(i + 1, 5))
    assert all(ranks[better] < ranks[worse] for better, worse in pairs)
    assert ranked_pairs(ranks, "best_worst") == [(3, 0)]
    assert ranked_pairs([1, 1], "best_worst") == []


# -- detection and the rest ---------------------------------------------------------------------------------------


def test_other_names_fall_back_to_load_dataset(tmp_path):
    assert detect_format("some-user/some-dataset") == "hub"
    (tmp_path / "data").mkdir()
    assert detect_format(str(tmp_path / "data")) == "hub"  # a folder load_dataset reads (parquet, ...)
    formats = "['auto', 'pair_folders', 'table', 'imagefolder', 'hpd', 'disk', 'hub']"
    with pytest.raises(ValueError, match=re.escape(f"dataset_format must be one of {formats}, got 'parquet'.")):
        load(tmp_path, dataset_format="parquet")


def test_streaming_and_max_rows_apply_to_local_formats(tmp_path):
    write_hpdv3(tmp_path)
    streamed = load_train_split(
        ScriptArguments(dataset_name=str(tmp_path), dataset_streaming=True), DiffusionScriptArguments(max_train_rows=1)
    )
    assert [row["prompt"] for row in streamed] == ["a cat"]


def test_a_training_step_from_pair_folders_end_to_end(tmp_path, make_trainer):
    root = tmp_path / "pairs"
    for i in range(2):
        png(root / "w" / f"{i}.png", COLOURS[i], (40, 32))
        png(root / "l" / f"{i}.png", COLOURS[i + 3], (32, 48))
        (root / "w" / f"{i}.txt").write_text(f"prompt {i}")
    trainer = make_trainer(train_dataset=load(root), max_steps=1)
    assert resolve_columns(trainer.train_dataset.column_names, trainer.args).first == "chosen"
    assert trainer.train_data_report.num_kept == 2
    result = trainer.train()
    assert result.global_step == 1
    assert result.training_loss == result.training_loss  # finite, not NaN


# -- video pair folders -------------------------------------------------------------------------------------------


def mp4(path: Path, level: int, frames: int = 4) -> Path:
    """A tiny mp4 clip (MPEG-4 part 2, 16x16): grey ``level`` with a white bar of ``1 + i`` columns in frame ``i``."""
    av = pytest.importorskip("av")
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        for i in range(frames):
            array = np.full((16, 16, 3), level, np.uint8)
            array[:, : 1 + i] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_video_pair_folders_fill_the_video_columns_and_a_mixed_pair_is_named(tmp_path, make_config):
    """kohya w/l folders and one folder per pair holding .mp4 clips: the paths fill chosen/rejected, validated and
    read as clips with num_frames set (the Wan family's columns); a video paired with an image is a bad row."""
    from trl_diffusion_sdpo.data.video import VideoClip, read_video

    root = tmp_path / "1_clips"
    for i, name in enumerate(["a", "b", "c"]):
        mp4(root / "w" / f"{name}.mp4", 40 * i)
        (root / "w" / f"{name}.txt").write_text(f"clip {name}")
    mp4(root / "l" / "a.mp4", 200)
    mp4(root / "l" / "b.mp4", 210)
    png(root / "l" / "c.png", COLOURS[0])  # c: a video against an image
    dataset = load(root)
    assert detect_format(str(root)) == "pair_folders" and len(dataset) == 3
    assert [Path(p).name for p in dataset["chosen"][:2]] == ["a.mp4", "b.mp4"]
    config = make_config(resolution=16, num_frames=3)
    with pytest.raises(ValueError) as info:
        prepare_preference_dataset(dataset, config, "train")
    assert "row 2, column 'chosen'" in str(info.value) and "w is video, l image" in str(info.value)
    kept, columns, report = prepare_preference_dataset(
        dataset, make_config(resolution=16, num_frames=3, skip_invalid_rows=True), "train"
    )
    assert (len(kept), report.invalid_skipped, columns.clip) == (2, 1, VideoClip(3))
    frames = read_video(kept[1]["rejected"], columns.clip)
    bars = [sum(1 for x in range(16) if min(frame.getpixel((x, 8))) > 235) for frame in frames]
    assert bars == [1, 2, 3] and abs(frames[0].getpixel((12, 8))[0] - 210) <= 6  # frames 0..2 of b's loser

    per_pair = tmp_path / "pairs"
    mp4(per_pair / "p0" / "chosen.webm.mp4", 10)  # not named chosen.<ext>: ignored, so p0 has no chosen
    mp4(per_pair / "p0" / "rejected.mp4", 20)
    mp4(per_pair / "p1" / "chosen.mp4", 30)
    mp4(per_pair / "p1" / "rejected.mp4", 40)
    for folder in ("p0", "p1"):
        (per_pair / folder / "prompt.txt").write_text(folder)
    dataset = load(per_pair)
    assert dataset["prompt"] == ["p0", "p1"] and dataset["chosen"][0] is None
    assert dataset["__source__"][0].endswith("p0: no chosen.<ext>") and Path(dataset["chosen"][1]).name == "chosen.mp4"


def test_an_empty_data_folder_is_one_error_naming_the_layouts_read(tmp_path, capsys):
    """``train --dataset_name EMPTY`` ends with one line on stderr that lists what a data folder may hold, before any
    model is loaded (the model named does not exist)."""
    from trl_diffusion_sdpo.cli.main import main
    from trl_diffusion_sdpo.data.formats import load_preference_data

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError) as info:
        load_preference_data(str(empty))
    for layout in ("pair folders", "chosen/ and rejected/", "train.jsonl", "metadata.jsonl", "HPDv3", "save_to_disk"):
        assert layout in str(info.value), layout
    argv = ["--model_name_or_path", str(tmp_path / "no-model"), "--dataset_name", str(empty)]
    assert main(["train", *argv, "--output_dir", str(tmp_path / "out"), "--use_cpu"]) == 1  # a data error
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith(f"trl-diffusion-sdpo train: error: {empty} holds no preference data")
    assert "\n" not in message and "docs/data.md" in message


PICKAPIC_LABELS = [1.0, 0.0, 0.5, 1.0, 0.0, 1.0]
# What the trainer did with each label before the label form was mapped to TRL's, written out: the pair's image order
# (0: image 0 wins, 1: image 1 wins), or the reason the collator skipped the row, counted in data/skipped_rows.
OLD_READING = {
    1.0: 0, 0.0: 1, "leftvote": 0, "rightvote": 1, " LeftVote ": 0,
    0.5: "a tie (equal labels or scores)", "tie": "a tie (equal labels or scores)",
    0.3: "column 'label_0': label 0.3 is not one of 0, 0.5, 1",
    "maybe": "column 'label_0': label 'maybe' is not a number or one of ['leftvote', 'rightvote', 'tie']",
    None: "column 'label_0': label is missing (None)",
}  # fmt: skip
STREAMED_LABELS = {
    "numbers": [1.0, 0.5, 0.0, 0.3, 1.0, 0.0, 0.5, None, 0.0, 1.0],
    "vote words": [
        "leftvote", "tie", "rightvote", "maybe", " LeftVote ", "rightvote", "tie", None, "rightvote", "leftvote"
    ],
}  # fmt: skip


def expected_trl_rows(rows: list[dict]) -> list[tuple]:
    """Pick-a-Pic's rows as (prompt, chosen, rejected), computed from the labels: every row kept in its place, a tie
    or a bad label with image 0 as chosen (marked, not dropped)."""
    pairs = []
    for row in rows:
        second_wins = OLD_READING[row["label_0"]] == 1
        chosen, rejected = (row["jpg_1"], row["jpg_0"]) if second_wins else (row["jpg_0"], row["jpg_1"])
        pairs.append((row["caption"], chosen, rejected))
    return pairs


def as_tuples(dataset) -> list[tuple]:
    return [(row["prompt"], row["chosen"], row["rejected"]) for row in dataset]


@pytest.mark.parametrize("streamed", [False, True])
def test_pickapic_columns_map_onto_trls_with_every_row_kept_in_order_and_ties_marked(streamed):
    from datasets import Dataset, IterableDataset

    from tests.helpers.common import pickapic_rows
    from trl_diffusion_sdpo.data.columns import SKIP_COLUMN
    from trl_diffusion_sdpo.data.formats import pickapic_to_trl

    rows = pickapic_rows(6, PICKAPIC_LABELS)
    dataset = IterableDataset.from_generator(lambda: iter(rows)) if streamed else Dataset.from_list(rows)
    mapped = list(pickapic_to_trl(dataset))
    assert as_tuples(mapped) == expected_trl_rows(rows)
    assert [row[SKIP_COLUMN]["reason"] for row in mapped] == ["", "", OLD_READING[0.5], "", "", ""]
    assert {"prompt", "chosen", "rejected", "model_0"} <= set(mapped[0]) and "label_0" not in mapped[0]


@pytest.mark.parametrize("labels", list(STREAMED_LABELS), ids=list(STREAMED_LABELS))
@pytest.mark.parametrize("mapped_at", ["load", "trainer"])
def test_a_label_form_stream_gives_the_old_pairs_skips_and_reasons(labels, mapped_at, tmp_path, make_config, caplog):
    """A streamed label-form dataset with ties and bad labels, mapped at load (``dataset_columns="pickapic"``) or by
    the trainer's preparation, gives the pairs, skip count and reasons the label form gave when it was read
    directly: each row's winner from :data:`OLD_READING`, written out here, pixels from an independent transform."""
    import logging

    from datasets import Dataset

    from tests.helpers.common import pickapic_rows
    from trl_diffusion_sdpo.data.formats import load_preference_dataset

    labels = STREAMED_LABELS[labels]
    rows = pickapic_rows(len(labels))
    for row, label in zip(rows, labels):
        row["label_0"] = label
    rows[5]["jpg_1"] = b"not an image"  # a bad image in a pair still names its TRL column
    if mapped_at == "load":
        Dataset.from_list(rows).save_to_disk(str(tmp_path / "pickapic"))
        stream = load_preference_dataset(str(tmp_path / "pickapic"), streaming=True, dataset_columns="pickapic")
    else:
        stream = Dataset.from_list(rows).to_iterable_dataset()
    prepared, columns, report = prepare_preference_dataset(stream, make_config())
    assert report.streamed and (columns.prompt, columns.first, columns.second) == ("prompt", "chosen", "rejected")
    transform = PairTransform(32)
    collator = PreferenceCollator(columns, lambda prompts: {"n": torch.tensor([len(prompts)])}, transform, False)
    with caplog.at_level(logging.WARNING, logger="trl_diffusion_sdpo.data.collators"):
        read = list(prepared)
        batches = [collator(read[i : i + 4]) for i in range(0, len(read), 4)]

    expected_pixels, expected_reasons = [], []
    for index, row in enumerate(rows):
        reading = OLD_READING[row["label_0"]]
        if isinstance(reading, str):
            expected_reasons.append(reading if reading.startswith("a tie") else f"streamed row {index}: {reading}")
        elif index == 5:  # label 0: image 1 is the chosen one
            expected_reasons.append("streamed row 5: column 'chosen': cannot identify image file")  # then its repr
        else:
            images = [load_image(row["jpg_0"]), load_image(row["jpg_1"])]
            expected_pixels.append(transform(images[reading], images[1 - reading], train=False)[0])
    reasons = [reason for batch in batches for reason in batch["skip_reasons"]]
    assert sum(batch["num_skipped"].item() for batch in batches) == len(expected_reasons) == 5
    assert [reason.split(" <")[0] for reason in reasons] == expected_reasons
    assert torch.equal(torch.cat([batch["pixel_values"] for batch in batches]), torch.stack(expected_pixels))
    assert "Skipping streamed row 3: column 'label_0': label " in caplog.text


def test_the_train_commands_loader_maps_the_label_form_under_the_configs_column_names(tmp_path, make_config):
    """``dataset_columns: pickapic`` with EditReward-Data's names renamed (``--rename_columns``, as the editing configs
    do): the stream holds each row's voted image as ``chosen``, ties and bad votes marked, the source column kept."""
    from datasets import Dataset

    from tests.helpers.common import edit_rows
    from trl_diffusion_sdpo.data.columns import SKIP_COLUMN

    votes = ["rightvote", "tie", "leftvote", "sideways"]
    rows = [
        {"instruction": f"edit {i}", "left_output_image": r["chosen"], "right_output_image": r["rejected"],
         "source_img": r["source_image"], "vote_type": vote}
        for i, (r, vote) in enumerate(zip(edit_rows(4), votes))
    ]  # fmt: skip
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "votes"))
    renames = (
        "instruction:caption,left_output_image:jpg_0,right_output_image:jpg_1,vote_type:label_0,"
        "source_img:source_image"
    )
    script_args = ScriptArguments(dataset_name=str(tmp_path / "votes"), dataset_streaming=True)
    diffusion_args = DiffusionScriptArguments(dataset_columns="pickapic", rename_columns=renames)
    stream = load_train_split(script_args, diffusion_args, make_config())
    read = list(stream)
    sides = {"leftvote": ("left", "right"), "rightvote": ("right", "left")}
    for row, vote, source in zip(read, votes, rows):
        chosen, rejected = sides.get(vote, ("left", "right"))
        assert (row["prompt"], row["chosen"], row["rejected"], row["source_image"]) == (
            source["instruction"], source[f"{chosen}_output_image"], source[f"{rejected}_output_image"],
            source["source_img"],
        )  # fmt: skip
    assert [row[SKIP_COLUMN]["reason"] for row in read][:3] == ["", "a tie (equal labels or scores)", ""]
    assert read[3][SKIP_COLUMN]["column"] == "vote_type" and "'sideways'" in read[3][SKIP_COLUMN]["reason"]


def test_the_pickapic_option_on_trl_data_names_the_missing_columns_and_the_other_option():
    from datasets import Dataset

    from trl_diffusion_sdpo.data.pickapic import pickapic_to_trl

    trl = Dataset.from_list([{"prompt": "a", "chosen": b"x", "rejected": b"y"}])
    with pytest.raises(ValueError, match=r"lacks \['caption', 'jpg_0', 'jpg_1', 'label_0'\].*dataset_columns='trl'"):
        pickapic_to_trl(trl)
