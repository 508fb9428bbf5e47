"""The safeguards' extra work is a fixed number of operations per step, not a loop over the weights.

One trainer run per tuning (the tiny SD UNet: 208 trained tensors in full, 128 with LoRA; 4 pairs, the same four
rows every step) alternates Diffusion-DPO, the one pass (``safeguard_space="parameter"``) and the update space step
by step, and counts with ``torch.profiler`` the aten operations of one whole optimizer step of each, from the
previous step's ``on_step_end`` to its own (:mod:`trl_diffusion_sdpo.testing.operations`): the batch, the forward,
the backward with the per-layer taps, the safeguard's own work (the branches' cotangents, the inner products,
``lambda``, the combination, the update space's search) and the optimizer. Each count is checked in all and outside
the backward pass. A Python loop over the weights, or one operation more per weight in the taps, adds 208 operations
to full tuning's step of about 2,600: 8 %; full tuning's run alternates two such planted one passes too, each checked
against the same Diffusion-DPO step as the clean ones. Diffusion-DPO's row is plain Diffusion-DPO
(``safeguard_space="none"``), not the offline default's output space.
"""

from __future__ import annotations

import copy

import pytest
import torch

from trl_diffusion_sdpo.engines.memory import pieces as memory_model
from trl_diffusion_sdpo.safeguards import safeguard_for
from trl_diffusion_sdpo.safeguards.gradients import layer_taps
from trl_diffusion_sdpo.safeguards.gradients.one_pass import OnePassBranchGradients
from trl_diffusion_sdpo.testing.operations import StepOperations

# The most a safeguard's whole step may exceed plain Diffusion-DPO's: (full tuning, LoRA). The update space's search
# runs a schedule fixed on the device, four passes (9, 7, 7 and 7 lambdas) of about 35 operations each (the clip
# coefficient, the pass over the runs, the bracket's update), after about thirty that prepare it: nothing is read on
# the host in between. Clean, the one pass adds 5.0 % in full; the update space adds 12.4 % outside full tuning's
# backward and 12.0 % outside LoRA's; a loop over the weights adds one operation per trained tensor or more: 8 % and
# more (208 tensors of about 2,600 in full, 128 of 1,540).
LIMITS = {"parameter": (0.06, 0.03), "update": (0.14, 0.14)}
SAFEGUARDS = {"parameter": {"safeguard_space": "parameter"}, "update": {"safeguard_space": "update"}}
PAIRS = 4
PARTS = {"step": "all", "outside_backward": "outside_backward"}  # what is counted -> StepOperations' record


def _per_tensor_combination(self: OnePassBranchGradients, lam: torch.Tensor) -> list[torch.Tensor]:
    """The combination as a loop over the weights (the same values, new tensors as the store's own, since the rows are
    given back once assigned): what the test must catch."""
    winner, loser = self.row_views(0), self.row_views(1)
    return [w.float() + h.float() * lam.float() for w, h in zip(winner, loser)]


def _always_via_deliver(self, index: int, dtype: torch.dtype, layer) -> None:
    """Each tapped layer's per-group gradients formed apart and copied into the pieces' rows (one copy per weight in
    the backward, as the taps did before they wrote in place): what the test must catch."""
    return None


# The planted safeguards a run may alternate with the clean ones: the one pass's combination as a loop over the
# weights, and the taps' per-weight copy (``_Pass.target`` in place while that safeguard's steps run).
PLANTED = ("parameter-loop", "parameter-copy")


def operation_counts(make_trainer, make_pickapic, lora: bool, names: list[str]) -> dict[str, dict[str, int]]:
    """``{name: {"step": ..., "outside_backward": ...}}``: the aten operations of one whole non-logging optimizer step
    for Diffusion-DPO (``"dpo"``) and the safeguards ``names``, alternating in one run; a name in :data:`PLANTED` runs
    the one pass with its bug."""
    order = ["dpo", *names]
    trainer = make_trainer(
        lora=lora,
        safeguard_space="none",  # the "dpo" row: plain Diffusion-DPO, not the offline default's output space
        max_steps=2 * len(order),
        logging_steps=1000,
        per_device_train_batch_size=PAIRS,
        train_dataset=make_pickapic(PAIRS),  # one batch per epoch: every step reads the same rows
    )
    trainable = sum(p.numel() for p in trainer.family.denoiser.parameters() if p.requires_grad)
    safeguards = {"dpo": trainer.safeguard}
    for name in names:
        args = copy.copy(trainer.args)
        for field, value in SAFEGUARDS[name.split("-")[0]].items():
            setattr(args, field, value)
        safeguards[name] = safeguard_for(args, trainer.engine, lora=lora, trainable_elements=trainable)
    target = layer_taps._Pass.target

    def before_step(step: int) -> None:
        name = order[step % len(order)]
        trainer.safeguard = safeguards[name]
        layer_taps._Pass.target = _always_via_deliver if name == "parameter-copy" else target
        store = getattr(getattr(safeguards[name], "backward_stage", None), "one_pass", None)
        if name == "parameter-loop" and store is not None:
            store.combination = _per_tensor_combination.__get__(store)

    counter = StepOperations(lambda step: step >= len(order), before_step, whole_step=True)  # each one's second
    trainer.add_callback(counter)
    try:
        trainer.train()
    finally:
        layer_taps._Pass.target = target
    for name in names:
        assert safeguards[name].backward_stage.two_pass_reason is None  # the one pass ran
    return {
        order[step % len(order)]: {part: sum(record[key].values()) for part, key in PARTS.items()}
        for step, record in counter.records.items()
    }


def _within(counts: dict, name: str, limit: float) -> bool:
    return all(counts[name][part] <= (1 + limit) * counts["dpo"][part] for part in PARTS)


@pytest.fixture(scope="module")
def runs() -> dict[bool, dict[str, dict[str, int]]]:
    """The counts of one run by tuning (``lora``), made once per module by the first test that asks (:func:`counts`):
    full tuning's run alternates the planted safeguards with the clean ones, so the planted tests below check the
    clean step and the planted one against the same Diffusion-DPO step."""
    return {}


def counts(runs: dict, make_trainer, make_pickapic, lora: bool) -> dict[str, dict[str, int]]:
    if lora not in runs:
        names = ["parameter", "update"] if lora else ["parameter", "update", *PLANTED]
        runs[lora] = operation_counts(make_trainer, make_pickapic, lora, names)
    return runs[lora]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_the_safeguards_add_a_fixed_number_of_operations_per_step(make_trainer, make_pickapic, runs, lora):
    step = counts(runs, make_trainer, make_pickapic, lora)
    for name in ("parameter", "update"):
        assert _within(step, name, LIMITS[name][lora]), (name, step)


# What a piece of the one pass's buffer adds: its inner products and combination (about 18 operations); the update
# space's runs stop at the pieces (a run's reads and search passes, about 100).
PER_PIECE = {"parameter": 25, "update": 120}


@pytest.mark.slow  # the default tier counts the whole step's operations in test_the_safeguards_add_a_fixed_number_...
def test_a_buffer_in_pieces_adds_a_fixed_number_of_operations_per_piece(make_trainer, make_pickapic, monkeypatch):
    """Full tuning with the one pass's buffer in one and in four pieces (a large model's layout, where the pieces bound
    what the pass adds to the activations' peak): each piece adds a fixed number of operations, not one per weight."""
    counts = {}
    for pieces in (1, 4):
        monkeypatch.setattr(memory_model, "PIECE_ELEMENTS", 1)  # as many pieces as MAX_PIECES allows
        monkeypatch.setattr(memory_model, "MAX_PIECES", pieces)
        counts[pieces] = operation_counts(make_trainer, make_pickapic, False, ["parameter", "update"])
    for name in ("parameter", "update"):
        added = counts[4][name]["step"] - counts[1][name]["step"]
        assert 0 < added <= 3 * PER_PIECE[name], (name, counts)  # the pieces are there: they cost something


def test_a_per_tensor_loop_in_the_one_pass_is_caught(make_trainer, make_pickapic, runs):
    """Planted: the one pass's combination as a Python loop over the weights. The clean one pass in the same run
    stays within its limit; the planted one exceeds it."""
    step = counts(runs, make_trainer, make_pickapic, False)
    assert _within(step, "parameter", LIMITS["parameter"][0]), step
    assert not _within(step, "parameter-loop", LIMITS["parameter"][0]), step


def test_a_per_weight_copy_in_the_taps_is_caught(make_trainer, make_pickapic, runs):
    """Planted: each tapped layer's per-group gradients formed apart and copied into the pieces' rows (one copy per
    weight in the backward, as the taps did before they wrote in place). The clean one pass in the same run stays
    within its limit; the planted one's whole step exceeds it."""
    step = counts(runs, make_trainer, make_pickapic, False)
    assert _within(step, "parameter", LIMITS["parameter"][0]), step
    assert not _within(step, "parameter-copy", LIMITS["parameter"][0]), step
