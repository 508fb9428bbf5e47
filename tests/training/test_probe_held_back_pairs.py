"""The probe's pairs held back from the training data represent it (docs/safeguard.md, "The held-out probe and the
rewind"): drawn at random with a seed (``probe_pairs_seed``, else the run's ``seed``), each prompt group holding its
proportional share, the same rows for the same seed; a stream gives its first rows and says so; the start summary
states how the pairs were drawn."""

from __future__ import annotations

import math
from collections import Counter
from types import SimpleNamespace

import pytest
from datasets import Dataset

from tests.helpers.common import pickapic_rows
from trl_diffusion_sdpo.callbacks.probe import hold_back_pairs

SIZES = {"red square": 16, "blue circle": 8, "green star": 4, "grey cross": 4}  # sorted by prompt, as a folder is


def _sorted_by_prompt(sizes: dict[str, int] = SIZES) -> Dataset:
    captions = [prompt for prompt, size in sizes.items() for _ in range(size)]
    return Dataset.from_dict({"caption": captions, "row": list(range(len(captions)))})


def _held(data: Dataset, make_config, pairs: int, **fields) -> tuple[Dataset, Dataset]:
    return hold_back_pairs(data, None, make_config(probe_steps=1, probe_pairs=pairs, **fields))


@pytest.mark.parametrize("pairs", [8, 6, 3])
def test_the_held_back_pairs_cover_the_prompt_groups_in_proportion(make_config, pairs):
    data = _sorted_by_prompt()
    kept, held = _held(data, make_config, pairs)
    # each group holds its share of the pairs, rounded down or up (8 pairs: exactly 4, 2, 1, 1)
    counts = Counter(held["caption"])
    for prompt, size in SIZES.items():
        share = pairs * size / len(data)
        assert math.floor(share) <= counts[prompt] <= math.ceil(share), (prompt, counts)
    assert sum(counts.values()) == pairs
    if pairs == 8:
        assert counts == {"red square": 4, "blue circle": 2, "green star": 1, "grey cross": 1}
    # the rest trains, in the dataset's order, and no row is both
    assert sorted([*kept["row"], *held["row"]]) == list(range(len(data)))
    assert list(kept["row"]) == sorted(kept["row"])


def test_the_same_seed_draws_the_same_pairs_and_another_seed_others(make_config):
    data = _sorted_by_prompt()
    rows = {seed: list(_held(data, make_config, 8, seed=seed)[1]["row"]) for seed in (0, 1)}
    assert list(_held(data, make_config, 8, seed=0)[1]["row"]) == rows[0]
    assert rows[0] != rows[1]
    # probe_pairs_seed draws them in place of the run's seed
    assert list(_held(data, make_config, 8, seed=1, probe_pairs_seed=0)[1]["row"]) == rows[0]
    # prompts that never repeat: a plain draw at random, not the last rows
    unique = Dataset.from_dict({"prompt": [f"prompt {i}" for i in range(32)], "row": list(range(32))})
    kept, held = _held(unique, make_config, 4)
    assert list(held["row"]) != list(range(28, 32))
    assert held.info.description == "held back from the training data (drawn at random with seed 0)"


def test_the_command_line_sets_the_seed_of_the_held_back_pairs(tmp_path):
    from trl_diffusion_sdpo.cli.train_options import make_parser

    parsed = make_parser().parse_args_into_dataclasses(
        args=["--output_dir", str(tmp_path), "--probe_steps", "5", "--probe_pairs_seed", "3", "--use_cpu", "true"],
        return_remaining_strings=True,
    )
    config = next(part for part in parsed if hasattr(part, "probe_pairs_seed"))
    assert config.probe_pairs_seed == 3 and config.seed != 3
    data = _sorted_by_prompt()
    by_seed = SimpleNamespace(probe_steps=5, probe_pairs=config.probe_pairs, seed=3)
    assert list(hold_back_pairs(data, None, config)[1]["row"]) == list(hold_back_pairs(data, None, by_seed)[1]["row"])


def test_a_stream_gives_its_first_rows_and_says_it_was_not_drawn_at_random(make_config):
    stream = _sorted_by_prompt().to_iterable_dataset()
    _, held = _held(stream, make_config, 2)
    assert list(held["row"]) == [0, 1]
    assert "the stream's first 2 rows" in held.info.description and "not drawn at random" in held.info.description


def test_the_start_summary_says_how_the_pairs_were_drawn(make_trainer, caplog):
    rows = pickapic_rows(8)
    for i, row in enumerate(rows):  # four prompts, two rows each, sorted by prompt
        row["caption"] = f"prompt {i // 2}"
    trainer = make_trainer(
        train_dataset=Dataset.from_list(rows), max_steps=1, probe_steps=1, probe_pairs=4, safeguard_space="none"
    )
    with caplog.at_level("INFO", logger="trl_diffusion_sdpo.io.run_summary"):
        trainer.train()
    summary = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Training "))
    assert (
        "held-out probe every 1 optimizer steps on 4 pairs held back from the training data (drawn at random with "
        "seed 0, stratified over 4 prompts)" in summary
    )
    # what the probe reads: one pair of each prompt, the training the other
    assert sorted(trainer.train_dataset["prompt"]) == [f"prompt {i}" for i in range(4)]
    tokens = trainer.family.prompt_tokenizer()([f"prompt {i}" for i in range(4)])
    probed = trainer.probe.probe.batch["input_ids"].cpu()
    assert sorted(map(tuple, probed.tolist())) == sorted(map(tuple, tokens["input_ids"].tolist()))
