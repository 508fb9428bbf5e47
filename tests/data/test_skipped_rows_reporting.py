"""Rows dropped before training are never silent: ``skip_invalid_rows`` logs a WARNING with the count and the first
rows and reasons, and the logged ``data/skipped_rows`` counts the rows dropped when the dataset was prepared (ties
and invalid rows) as it counts those a stream drops."""

from __future__ import annotations

import json
import logging

from datasets import Dataset

from tests.helpers.common import encode_image, pickapic_rows
from trl_diffusion_sdpo.data.formats import load_preference_dataset


def write_jsonl_pairs(folder, n: int, missing: set[int]) -> str:
    """A JSONL of image paths, as a user writes one; the rows in ``missing`` name a file that does not exist."""
    lines = []
    for i in range(n):
        chosen, rejected = folder / f"{i}_chosen.png", folder / f"{i}_rejected.png"
        chosen.write_bytes(encode_image((200, 20 * i, 0), (32, 32)))
        rejected.write_bytes(encode_image((0, 20 * i, 200), (32, 32)))
        if i in missing:
            rejected = folder / f"{i}_gone.png"
        lines.append(json.dumps({"prompt": f"a picture {i}", "chosen": str(chosen), "rejected": str(rejected)}))
    path = folder / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def summed_skipped_rows(trainer) -> float:
    return sum(h.get("data/skipped_rows", 0.0) for h in trainer.state.log_history if "loss" in h)


def test_a_missing_image_skipped_at_validation_warns_and_is_counted_in_the_metric(make_trainer, tmp_path, caplog):
    dataset = load_preference_dataset(write_jsonl_pairs(tmp_path, 6, missing={3}))
    with caplog.at_level(logging.WARNING, logger="trl_diffusion_sdpo.data.preparation"):
        trainer = make_trainer(train_dataset=dataset, skip_invalid_rows=True, max_steps=2)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "Skipped 1 invalid train row(s) of 6" in warnings[0]
    assert "row 3, column 'rejected'" in warnings[0] and "3_gone.png" in warnings[0]
    trainer.train()
    assert trainer.train_data_report.invalid_skipped == 1
    assert summed_skipped_rows(trainer) == 1


def test_ties_and_invalid_rows_dropped_before_training_are_counted_once(make_trainer, make_pickapic):
    rows = pickapic_rows(8, labels=[1, 0, 0.5, 1, 0, 0.5, 1, 0])
    rows[4]["jpg_0"] = b""  # undecodable
    trainer = make_trainer(train_dataset=Dataset.from_list(rows), skip_invalid_rows=True, max_steps=3)
    trainer.train()
    report = trainer.train_data_report
    assert (report.ties_dropped, report.invalid_skipped) == (2, 1)
    first = [h["data/skipped_rows"] for h in trainer.state.log_history if "loss" in h]
    assert first == [3.0, 0.0, 0.0]  # in the first logged step, not again


def test_a_clean_dataset_logs_no_skip_warning_and_counts_zero(make_trainer, caplog):
    with caplog.at_level(logging.WARNING, logger="trl_diffusion_sdpo.data.preparation"):
        trainer = make_trainer(skip_invalid_rows=True, max_steps=1)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    trainer.train()
    assert summed_skipped_rows(trainer) == 0


def test_a_latent_cache_names_the_rows_it_skips_and_training_from_it_counts_them(tmp_path, make_config, caplog):
    from tests.helpers.latent_cache import _rows
    from trl_diffusion_sdpo import DiffusionSDPOTrainer
    from trl_diffusion_sdpo.data.sharded_cache import build_sharded_latent_cache
    from trl_diffusion_sdpo.families import family_for_pipeline
    from trl_diffusion_sdpo.testing import build_tiny_sd_pipeline

    rows = _rows(6)
    rows[1]["jpg_1"] = b"not an image"
    rows[4]["label_0"] = 0.5  # a tie
    args = make_config(skip_invalid_rows=True, max_steps=2, per_device_train_batch_size=1)
    pipe = build_tiny_sd_pipeline(seed=0)
    with caplog.at_level(logging.WARNING, logger="trl_diffusion_sdpo.data.sharded_cache"):
        cache = build_sharded_latent_cache(
            Dataset.from_list(rows), args, family_for_pipeline(pipe), str(tmp_path / "c")
        )
    named = [r.getMessage() for r in caplog.records if r.name == "trl_diffusion_sdpo.data.sharded_cache"]
    # label_0 of row 1 is 1: its image 1 is the rejected one
    assert len(named) == 1 and "row 1 of this process's shard" in named[0] and "'rejected'" in named[0]
    trainer = DiffusionSDPOTrainer(pipe, None, args, cache)
    trainer.train()
    assert summed_skipped_rows(trainer) == 2  # the invalid row and the tie, dropped when the cache was built
