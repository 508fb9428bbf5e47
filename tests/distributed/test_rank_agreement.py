"""Decisions a process takes from its own data are reduced before they act (the table in docs/design.md).

Each piece is tested here alone with a stand-in for the other process; the two-process launches of
``test_distributed.py`` run them together (streamed ties, and random streams under DDP, ZeRO-2 and FSDP2)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from trl_diffusion_sdpo.callbacks.interruptions import NonFiniteTracker, StreamGuard
from trl_diffusion_sdpo.objectives import PreferencePredictions
from trl_diffusion_sdpo.safeguards.output import output_space_lambda
from trl_diffusion_sdpo.step.stages import UsableBatches


def _batch(rows: int) -> dict[str, torch.Tensor]:
    return {"time_ids": torch.zeros(rows, 2, 6), "pixel_values": torch.zeros(rows, 2, 3, 4, 4)}


# ------------------------------------------------------------------------------------------- empty micro-batches


def test_a_first_empty_micro_batch_of_several_processes_is_a_zero_weighted_placeholder():
    blank = _batch(1)
    batches = UsableBatches(lambda mode: blank)
    assert batches(_batch(0), "train", num_processes=2) == (blank, True)
    good = _batch(2)
    assert batches(good, "train", num_processes=2) == (good, False)
    assert batches(_batch(0), "train", num_processes=2)[0] is good  # later: the last good one, replayed
    assert batches(_batch(0), "train", num_processes=1) == (None, False)  # one process: left out


def test_without_a_placeholder_a_first_empty_micro_batch_still_raises():
    with pytest.raises(RuntimeError, match="Every row of the first train micro-batch on process 1 was invalid"):
        UsableBatches(lambda mode: None)(_batch(0), "train", num_processes=2, process_index=1)


@pytest.mark.parametrize(
    "options",
    [{}, {"random_crop": True, "resolution": 32}, {"random_flip": True}],
    ids=["plain", "random-crop", "flip"],
)
def test_the_placeholder_pair_has_a_real_batchs_keys_and_shapes_and_a_finite_loss(make_trainer, options):
    trainer = make_trainer(max_steps=1, **options)
    real = trainer.data_collator([trainer.train_dataset[0]])
    blank = trainer.data_collator.blank_batch()
    assert blank.keys() == real.keys()
    for key, value in real.items():
        if isinstance(value, torch.Tensor):
            # a random crop's pixels are padded to the batch's largest resized image: only its size may differ
            same = slice(None, -2) if key == "pixel_values" and "crop_sizes" in real else slice(None)
            assert blank[key].shape[same] == value.shape[same] and blank[key].dtype == value.dtype, key
    assert torch.equal(blank["input_ids"], trainer.data_collator.tokenize([""])["input_ids"])
    loss = trainer.compute_loss(trainer.model, trainer._blank_batch("train"))
    assert torch.isfinite(loss)


# ------------------------------------------------------------------------------------------------- the counts


class _TwoProcesses:
    """An accelerator stand-in for process 0 of two: ``reduce`` adds the other process's values."""

    num_processes = 2
    device = "cpu"
    scaler = None

    def __init__(self, other: list[float]) -> None:
        self.other = torch.tensor(other)
        self.calls = 0

    def reduce(self, tensor: torch.Tensor, reduction: str) -> torch.Tensor:
        self.calls += 1
        return tensor + self.other.to(tensor)


_ENGINE = SimpleNamespace(skips_nonfinite_steps=False, manages_gradients=False)  # plain DDP


@pytest.mark.parametrize("skip_invalid_rows", [False, True])
def test_the_stream_guard_sums_its_counts_over_processes_whatever_skip_invalid_rows(skip_invalid_rows):
    """This process's step held only a tie; the other process's held a pair: the step is not empty, and this process
    keeps its (zero-weighted) gradients as the other keeps its own (it used to drop them alone without
    skip_invalid_rows)."""
    zeroed = []
    accelerator = _TwoProcesses([1.0, 0.0])
    trainer = SimpleNamespace(
        accelerator=accelerator,
        args=SimpleNamespace(skip_invalid_rows=skip_invalid_rows),
        model=SimpleNamespace(zero_grad=lambda set_to_none: zeroed.append(set_to_none)),
        engine=SimpleNamespace(steps_in_backward=False),  # DDP's: the optimizer steps after the backward
    )
    guard = StreamGuard(trainer)
    guard.observe({"time_ids": torch.zeros(0, 2, 6), "skip_reasons": ["a tie (equal labels or scores)"]})
    args = SimpleNamespace(per_device_train_batch_size=1, gradient_accumulation_steps=1, world_size=2)
    guard.on_pre_optimizer_step(args, SimpleNamespace(global_step=0), None)
    assert accelerator.calls == 1 and zeroed == [] and guard.empty_steps == 0


def test_the_non_finite_flag_is_reduced_on_a_process_that_flagged_nothing():
    """A process whose micro-batches were all replays flags no loss; the other process flagged a NaN. Both must enter
    the reduction (a process that skipped it left the other's unmatched) and both skip."""
    accelerator = _TwoProcesses([1.0])
    zeroed = []
    tracker = NonFiniteTracker("skip", _ENGINE, accelerator, checkpoints=None)
    # not fused; no gradients of its own (its non-finite value is the flag the other process sent)
    tracker.optimizer = SimpleNamespace(param_groups=[], zero_grad=lambda set_to_none: zeroed.append(set_to_none))
    tracker.before_optimizer_step(0, "out")
    assert accelerator.calls == 1 and zeroed == [True] and tracker.skipped == 1


def test_one_process_with_nothing_flagged_reduces_nothing():
    one_process = SimpleNamespace(num_processes=1, device="cpu", scaler=None)
    tracker = NonFiniteTracker("skip", _ENGINE, one_process, checkpoints=None)
    tracker.optimizer = SimpleNamespace(
        param_groups=[{"params": [torch.nn.Parameter(torch.ones(2))]}],  # finite gradients (none yet)
        zero_grad=lambda set_to_none: pytest.fail("nothing was flagged"),
    )
    tracker.before_optimizer_step(0, "out")
    assert tracker.skipped == 0


def _predictions(seed: int) -> PreferencePredictions:
    """Residuals whose loser part follows the winner's (``sum(r_l r_w) > 0``: the safeguard's case), by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    target, winner = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    loser = winner + (1 + seed) * torch.randn(2, 4, 4, 4, generator=g)
    return PreferencePredictions(policy_winner=winner, policy_loser=loser, target_winner=target, target_loser=target)


def test_a_replayed_micro_batch_adds_nothing_to_the_global_output_space_lambda():
    """Process 0 replays a stale micro-batch (weight zero) while process 1 trains on ``fresh``: the global lambda is
    ``fresh``'s alone, as one process computes it."""
    stale, fresh = _predictions(0), _predictions(1)
    other: dict[str, torch.Tensor] = {}

    def record(sums: torch.Tensor) -> torch.Tensor:
        other["sums"] = sums
        return sums

    output_space_lambda(fresh, 0.5, 10.0, record)  # what process 1 contributes
    with_other = lambda sums: sums + other["sums"]  # noqa: E731
    replayed = output_space_lambda(stale, 0.5, 10.0, with_other, contributes=False)
    torch.testing.assert_close(replayed, output_space_lambda(fresh, 0.5, 10.0))
    counted = output_space_lambda(stale, 0.5, 10.0, with_other)  # the stale batch counted: another lambda
    assert not torch.allclose(counted, replayed)
