"""Streamed data that is all bad: an optimizer step without one valid pair never reaches the weights (no weight
decay, no Adam moments), and a stream that keeps yielding none stops with an error counting the rows and why."""

from __future__ import annotations

import logging

import pytest
from datasets import Dataset
from transformers import TrainerCallback

from tests.helpers.common import changed_keys, pickapic_rows, snapshot
from trl_diffusion_sdpo.callbacks.interruptions import NoValidPairsError, stop_threshold


def stream(rows: list[dict]):
    return Dataset.from_list(rows).to_iterable_dataset()


def bad_rows(n: int) -> list[dict]:
    rows = pickapic_rows(n)
    for row in rows:
        row["label_0"] = 0.3  # not a preference: refused by the collator, row by row
    return rows


def trainable(trainer) -> dict:
    return {k: v for k, v in snapshot(trainer.model).items() if "lora" in k}


def test_a_stream_of_only_bad_rows_stops_with_the_count_and_the_reason_and_never_steps(make_trainer):
    trainer = make_trainer(train_dataset=stream(bad_rows(40)), skip_invalid_rows=True, max_steps=30)
    before = trainable(trainer)
    with pytest.raises(NoValidPairsError) as info:
        trainer.train()
    threshold = stop_threshold(2)
    assert f"the last {threshold} rows of the training stream were invalid" in str(info.value)
    assert f"{threshold} x column 'label_0': label 0.3 is not one of 0, 0.5, 1" in str(info.value)
    # Weight decay (0.01) would have shrunk the random LoRA A matrices if an empty step had reached the optimizer.
    assert not changed_keys(before, trainable(trainer))
    assert not trainer.optimizer.state  # AdamW never stepped: no moments


def test_a_run_that_ends_without_a_valid_pair_is_an_error(make_trainer):
    # 3 steps of 2 rows: fewer than the 32 bad rows in a row that stop a run early, all of them invalid.
    trainer = make_trainer(train_dataset=stream(bad_rows(6)), skip_invalid_rows=True, max_steps=3)
    with pytest.raises(NoValidPairsError, match="all 6 rows of the training stream were invalid"):
        trainer.train()


class AfterEachStep(TrainerCallback):
    """The LoRA weights and AdamW's step counts at the end of every optimizer step, by step."""

    def __init__(self, trainer) -> None:
        self.trainer, self.seen = trainer, {}

    def on_step_end(self, args, state, control, **kwargs):
        steps = [int(s["step"]) for s in self.trainer.optimizer.state.values()]
        self.seen[state.global_step] = (trainable(self.trainer), steps)


def test_an_empty_step_among_good_ones_is_skipped_not_applied(make_trainer, caplog):
    rows = pickapic_rows(2) + bad_rows(2) + pickapic_rows(2)  # batch 2: step 2 has no valid pair
    trainer = make_trainer(train_dataset=stream(rows), skip_invalid_rows=True, max_steps=3)
    before, after = trainable(trainer), AfterEachStep(trainer)
    trainer.add_callback(after)
    with caplog.at_level(logging.WARNING, logger="trl_diffusion_sdpo.callbacks.interruptions"):
        trainer.train()
    (one, _), (two, two_steps), (three, _) = (after.seen[step] for step in (1, 2, 3))
    assert "Optimizer step 2 has no valid pair (2 rows skipped): not applied" in caplog.text
    # Step 2 changed nothing: the weights and AdamW's state are those after step 1, bit for bit.
    assert changed_keys(before, one)
    assert not changed_keys(one, two)
    assert two_steps and all(step == 1 for step in two_steps)
    assert changed_keys(one, three)  # step 3 has pairs again: applied
