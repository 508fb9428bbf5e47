"""Streamed data that is all bad: an optimizer step without one valid pair never reaches the weights (no weight
decay, no Adam moments), and a stream that keeps yielding none stops with an error counting the rows and why."""

from __future__ import annotations

import logging

import pytest
from datasets import Dataset

from tests.helpers.common import changed_keys, pickapic_rows, snapshot
from tests.helpers.rewind import Recorder, equal, states_equal, trained_weights
from trl_diffusion_sdpo.callbacks.interruptions import NoValidPairsError, stop_threshold
from trl_diffusion_sdpo.engines.base import trainable_parameters


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


def test_an_empty_step_among_good_ones_is_skipped_not_applied(make_trainer, caplog):
    rows = pickapic_rows(2) + bad_rows(2) + pickapic_rows(2)  # batch 2: step 2 has no valid pair
    trainer = make_trainer(train_dataset=stream(rows), skip_invalid_rows=True, max_steps=3)
    after = Recorder()  # the LoRA weights and the optimizer's state at the end of every step
    after.parameters = list(trainable_parameters(trainer.family.denoiser))
    before = trained_weights(trainer)
    trainer.add_callback(after)
    with caplog.at_level(logging.WARNING, logger="trl_diffusion_sdpo.callbacks.interruptions"):
        trainer.train()
    (one, one_optimizer), (two, two_optimizer), (three, _) = (after.at_end[step] for step in (1, 2, 3))
    assert "Optimizer step 2 has no valid pair (2 rows skipped): not applied" in caplog.text
    # Step 2 changed nothing: the weights and AdamW's state are those after step 1, bit for bit.
    assert not equal(before, one)
    assert equal(one, two) and states_equal(one_optimizer, two_optimizer)
    two_steps = [int(state["step"]) for state in two_optimizer["state"].values()]
    assert two_steps and all(step == 1 for step in two_steps)
    assert not equal(one, three)  # step 3 has pairs again: applied
