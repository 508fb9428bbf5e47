"""Editing rows from every format into the trainer's columns: a source image (or a list of them) beside the
instruction and the two edits, read from tables, pair folders, image folders and datasets; every bad source named by
row and column; the collator's source pixels; and the latent cache's source latents, mirrored with their pair.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image

from tests.helpers.common import COLOURS, edit_rows, encode_image
from tests.helpers.data_formats import colour, expect_bad_row, load, png
from trl_diffusion_sdpo import DiffusionSDPOTrainer
from trl_diffusion_sdpo.data.collators import PreferenceCollator
from trl_diffusion_sdpo.data.columns import SOURCE_COLUMN
from trl_diffusion_sdpo.data.pickapic import LABEL_WORDS
from trl_diffusion_sdpo.data.preparation import prepare_preference_dataset
from trl_diffusion_sdpo.data.transforms import PairTransform
from trl_diffusion_sdpo.data.validation import resolve_columns, row_problem
from trl_diffusion_sdpo.testing import build_tiny_flux_kontext_pipeline


def sources_of(dataset, column: str = "source_image") -> list:
    values = [row[column] for row in dataset]
    return [[colour(v) for v in value] if isinstance(value, list) else colour(value) for value in values]


# -- formats ------------------------------------------------------------------------------------------------------


def test_a_jsonl_table_reads_source_paths_and_aliases_and_lists(tmp_path):
    for i in range(2):
        png(tmp_path / "img" / f"src{i}.png", COLOURS[i])
        png(tmp_path / "img" / f"a{i}.png", COLOURS[2])
        png(tmp_path / "img" / f"b{i}.png", COLOURS[3])
    rows = [{"instruction": "x", "prompt": f"edit {i}", "chosen": f"img/a{i}.png", "rejected": f"img/b{i}.png",
             "input_image": f"img/src{i}.png"} for i in range(2)]  # fmt: skip
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    dataset = load(tmp_path / "train.jsonl")
    assert "source_image" in dataset.column_names  # the alias input_image
    assert sources_of(dataset) == [COLOURS[0], COLOURS[1]]
    multi = [dict(r, input_image=None, source_images=["img/src1.png", "img/src0.png"]) for r in rows]
    for r in multi:
        del r["input_image"]
    (tmp_path / "multi.jsonl").write_text("\n".join(json.dumps(r) for r in multi))
    assert sources_of(load(tmp_path / "multi.jsonl"), "source_images") == [[COLOURS[1], COLOURS[0]]] * 2


def test_a_csv_cell_holding_a_json_array_is_a_list_of_sources(tmp_path):
    png(tmp_path / "s0.png", COLOURS[0])
    png(tmp_path / "s1.png", COLOURS[1])
    png(tmp_path / "a.png", COLOURS[2])
    png(tmp_path / "b.png", COLOURS[3])
    (tmp_path / "train.csv").write_text(
        'prompt,chosen,rejected,source_images\nedit,a.png,b.png,"[""s0.png"", ""s1.png""]"\n'
    )
    assert sources_of(load(tmp_path / "train.csv"), "source_images") == [[COLOURS[0], COLOURS[1]]]


def test_pair_folders_read_source_files_and_a_source_folder_beside_the_sides(tmp_path):
    one = tmp_path / "one"
    for i in range(2):
        png(one / f"p{i}" / "chosen.png", COLOURS[2])
        png(one / f"p{i}" / "rejected.png", COLOURS[3])
        png(one / f"p{i}" / "source.png", COLOURS[i])
        (one / f"p{i}" / "prompt.txt").write_text(f"edit {i}")
    assert sources_of(load(one)) == [COLOURS[0], COLOURS[1]]
    many = tmp_path / "many"
    png(many / "p0" / "chosen.png", COLOURS[2])
    png(many / "p0" / "rejected.png", COLOURS[3])
    png(many / "p0" / "source_1.png", COLOURS[1])
    png(many / "p0" / "source_0.png", COLOURS[0])
    (many / "p0" / "prompt.txt").write_text("edit")
    assert sources_of(load(many), "source_images") == [[COLOURS[0], COLOURS[1]]]
    sides = tmp_path / "sides"
    for key in ("a", "b"):
        png(sides / "w" / f"{key}.png", COLOURS[2])
        png(sides / "l" / f"{key}.png", COLOURS[3])
        (sides / "w" / f"{key}.txt").write_text(f"edit {key}")
    png(sides / "source" / "a.png", COLOURS[4])
    assert [r["source_image"] is None for r in load(sides)] == [False, True]  # b has no source: kept, then named


def test_side_folders_name_a_missing_or_doubled_source_or_mask_and_keep_the_single_ones(tmp_path):
    root = tmp_path / "sides"
    for key in ("a", "b", "c"):
        png(root / "w" / f"{key}.png", COLOURS[2])
        png(root / "l" / f"{key}.png", COLOURS[3])
        (root / "w" / f"{key}.txt").write_text(f"edit {key}")
    png(root / "source" / "a.png", COLOURS[4])
    png(root / "source" / "c.png", COLOURS[4])
    png(root / "source" / "c.jpg", COLOURS[4])
    png(root / "mask" / "a.png", COLOURS[0])
    png(root / "mask" / "b.png", COLOURS[0])
    png(root / "mask" / "b.jpg", COLOURS[0])
    rows = {row["prompt"]: row for row in load(root)}
    assert rows["edit a"]["source_image"] is not None and rows["edit a"]["mask"] is not None
    assert rows["edit a"][SOURCE_COLUMN].endswith("sides")  # "pair 'a' in .../sides": no note after the folder
    assert [rows[f"edit {k}"][column] is None for k in "bc" for column in ("source_image", "mask")] == [
        True, True, True, True
    ]  # fmt: skip
    assert (
        "no image source/b.*" in rows["edit b"][SOURCE_COLUMN] and "2 masks mask/b.*" in rows["edit b"][SOURCE_COLUMN]
    )
    assert "2 source images source/c.*" in rows["edit c"][SOURCE_COLUMN]
    assert "no mask mask/c.*" in rows["edit c"][SOURCE_COLUMN]


def test_a_pair_folder_without_its_source_or_with_a_gap_is_named(tmp_path, make_config):
    root = tmp_path / "pairs"
    for i in range(3):
        png(root / f"p{i}" / "chosen.png", COLOURS[2])
        png(root / f"p{i}" / "rejected.png", COLOURS[3])
        (root / f"p{i}" / "prompt.txt").write_text("edit")
    png(root / "p0" / "source_0.png", COLOURS[0])
    png(root / "p2" / "source_0.png", COLOURS[0])
    png(root / "p2" / "source_2.png", COLOURS[0])
    dataset = load(root)
    expect_bad_row(dataset, make_config, 1, "source_images", "no source.<ext> or source_<i>.<ext>")
    kept, _, report = prepare_preference_dataset(dataset, make_config(skip_invalid_rows=True), "train")
    assert len(kept) == 1 and report.invalid_skipped == 2
    assert any("number them from 0 without gaps" in e for e in report.examples)


def test_an_image_folder_metadata_names_the_source_file(tmp_path):
    root = tmp_path / "folder" / "train"
    records = []
    for i in range(2):
        png(root / f"c{i}.png", COLOURS[2])
        png(root / f"r{i}.png", COLOURS[3])
        png(root / f"s{i}.png", COLOURS[i])
        records.append({"prompt": "edit", "chosen_file_name": f"c{i}.png", "rejected_file_name": f"r{i}.png",
                        "source_image_file_name": f"s{i}.png"})  # fmt: skip
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    assert sources_of(load(tmp_path / "folder")) == [COLOURS[0], COLOURS[1]]


# -- validation ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"source_image": None}, "source image: image is missing"),
        ({"source_image": b"not an image"}, "cannot decode"),
        ({"source_image": encode_image(COLOURS[0], (64, 32))}, "the source is 64x32 and 'chosen' is 32x48"),
    ],
)
def test_a_bad_source_is_named_by_row_and_column(make_config, change, fragment):
    rows = edit_rows(3)
    rows[1].update(change)
    expect_bad_row(Dataset.from_list(rows), make_config, 1, "source_image", fragment)


def test_a_source_within_the_aspect_tolerance_is_accepted_and_lists_take_any_shape(make_config):
    rows = edit_rows(2)
    rows[0]["source_image"] = encode_image(COLOURS[0], (80, 64))  # 40x32 scaled: the same aspect ratio
    kept, columns, _ = prepare_preference_dataset(Dataset.from_list(rows), make_config(), "train")
    assert len(kept) == 2 and columns.source == "source_image" and not columns.source_list
    multi = edit_rows(2, sources=2)  # references of other shapes than the edit: not checked against it
    _, columns, _ = prepare_preference_dataset(Dataset.from_list(multi), make_config(), "train")
    assert columns.source == "source_images" and columns.source_list
    # one image where a list belongs (a streamed or hand-made row: arrow cannot mix the two in one column)
    single = dict(multi[1], source_images=encode_image(COLOURS[0], (8, 8)))
    assert row_problem(single, columns) == ("source_images", "expected a list of source images, got bytes (one "
                                            "image per row goes in a `source_image` column)")  # fmt: skip
    multi[1]["source_images"] = []
    expect_bad_row(Dataset.from_list(multi), make_config, 1, "source_images", "the list of source images is empty")


def test_both_source_columns_at_once_are_refused(make_config):
    rows = [dict(r, source_images=[r["source_image"]]) for r in edit_rows(2)]
    with pytest.raises(ValueError, match="has both 'source_image'.*and 'source_images'"):
        resolve_columns(Dataset.from_list(rows).column_names, make_config())


def test_editreward_votes_are_labels_and_its_source_column_is_renamed(make_config):
    from trl_diffusion_sdpo.cli.data_options import column_renames

    rows = [
        {"instruction": f"edit {i}", "left_output_image": r["chosen"], "right_output_image": r["rejected"],
         "source_img": r["source_image"], "vote_type": vote}
        for i, (r, vote) in enumerate(zip(edit_rows(3), ["leftvote", "rightvote", "tie"]))
    ]  # fmt: skip
    args = make_config()
    renames = column_renames(
        "instruction:caption,left_output_image:jpg_0,right_output_image:jpg_1,vote_type:label_0,source_img:source_image"
    )  # as examples/configs/flux_kontext_lora.yaml renames EditReward-Data's columns
    kept, columns, report = prepare_preference_dataset(Dataset.from_list(rows).rename_columns(renames), args, "train")
    assert columns.source == "source_image" and len(kept) == 2 and report.ties_dropped == 1
    transform = PairTransform(32)
    collator = PreferenceCollator(columns, lambda prompts: {"input_ids": torch.zeros(len(prompts), 1)}, transform)
    batch = collator(list(kept))
    # leftvote: the left output wins; rightvote: the right one, which the rows hold as "rejected"
    winners = batch["pixel_values"][:, 0]
    expected = torch.stack(
        [transform.source(Image.open(io.BytesIO(edit_rows(3)[i][k]))) for i, k in ((0, "chosen"), (1, "rejected"))]
    )
    torch.testing.assert_close(winners, expected)
    assert set(LABEL_WORDS) == {"leftvote", "rightvote", "tie"}
    rows[0]["vote_type"] = "maybe"
    with pytest.raises(ValueError, match="label 'maybe' is not a number or one of"):
        prepare_preference_dataset(Dataset.from_list(rows).rename_columns(renames), args, "train")


# -- collator and cache ---------------------------------------------------------------------------------------------


def test_the_collator_stacks_each_rows_sources_center_cropped_like_the_edits(make_config):
    rows = edit_rows(2, sources=2)
    kept, columns, _ = prepare_preference_dataset(Dataset.from_list(rows), make_config(), "train")
    transform = PairTransform(32)
    seen = []

    def tokenize(prompts, sources=None):
        seen.append(sources)
        return {"input_ids": torch.zeros(len(prompts), 1)}

    batch = PreferenceCollator(columns, tokenize, transform)(list(kept))
    assert batch["source_pixel_values"].shape == (2, 2, 3, 32, 32)
    for i, row in enumerate(rows):
        for k, value in enumerate(row["source_images"]):
            expected = transform.source(Image.open(io.BytesIO(value)).convert("RGB"))
            torch.testing.assert_close(batch["source_pixel_values"][i, k], expected)
    assert seen == [None]  # a tokenizer that does not read the sources is called with the prompts only
    tokenize.reads_sources = True
    PreferenceCollator(columns, tokenize, transform)(list(kept))
    assert [[image.size for image in row] for row in seen[-1]] == [[(40, 32), (32, 48)], [(32, 48), (64, 64)]]
    mixed = list(kept)
    mixed[1] = dict(mixed[1], source_images=mixed[1]["source_images"][:1])
    batch = PreferenceCollator(columns, tokenize, transform)(mixed)
    assert batch["source_pixel_values"].shape[0] == 1 and batch["num_skipped"] == 1
    assert "1 source images where the batch's first row has 2" in batch["skip_reasons"][0]


def test_a_blank_placeholder_batch_has_a_source(make_config):
    _, columns, _ = prepare_preference_dataset(Dataset.from_list(edit_rows(2)), make_config(), "train")
    collator = PreferenceCollator(
        columns, lambda prompts: {"input_ids": torch.zeros(len(prompts), 1)}, PairTransform(32)
    )
    blank = collator.blank_batch()
    assert blank["source_pixel_values"].shape == (1, 1, 3, 32, 32)


def _asymmetric(size: tuple[int, int], seed: int) -> bytes:
    array = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_cache_stores_source_latents_and_their_mirror_and_trains_as_without_it(make_config, tmp_path):
    """random_flip on: cached and uncached runs draw the same flips, and a mirrored pair uses its mirrored source, so
    their losses agree; the cache holds the sources' latents as the family encodes them."""
    rows = edit_rows(4)
    for i, row in enumerate(rows):
        row["source_image"] = _asymmetric(Image.open(io.BytesIO(row["chosen"])).size, i)
    pairs = Dataset.from_list(rows)
    losses = []
    for cache in (False, True):
        pipe = build_tiny_flux_kontext_pipeline(seed=0, tokenizer_dir=str(tmp_path / f"tok{cache}"), max_length=16)
        args = make_config(
            beta=100.0, max_sequence_length=16, max_steps=3, random_flip=True, cache_latents=cache,
            latent_cache_dir=str(tmp_path / "cache"),
        )  # fmt: skip
        trainer = DiffusionSDPOTrainer(pipe, args=args, train_dataset=pairs)
        if cache:
            stored = trainer.train_dataset
            assert {"source_latents", "source_latents_flipped"} <= set(stored.column_names)
            first = trainer.data_collator([stored[0]])
            torch.testing.assert_close(
                first["source_latents_flipped"][0, 0], trainer.family.encode_sources(
                    PairTransform(32).source(Image.open(io.BytesIO(rows[0]["source_image"])).convert("RGB"))
                    .flip(-1)[None, None])[0, 0],
                rtol=1e-5, atol=1e-5,
            )  # fmt: skip
        trainer.train()
        losses.append([h["mse/policy_winner"] for h in trainer.state.log_history if "mse/policy_winner" in h])
    assert len(losses[0]) == 3
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_the_sharded_cache_refuses_editing_data(make_config, tmp_path):
    from trl_diffusion_sdpo.data.sharded_cache import build_sharded_latent_cache

    pipe = build_tiny_flux_kontext_pipeline(seed=0, tokenizer_dir=str(tmp_path / "tok"), max_length=16)
    from trl_diffusion_sdpo.families import family_for_pipeline

    with pytest.raises(ValueError, match="sharded cache does not store editing data yet"):
        build_sharded_latent_cache(
            Dataset.from_list(edit_rows(2)), make_config(), family_for_pipeline(pipe), str(tmp_path / "shards")
        )
