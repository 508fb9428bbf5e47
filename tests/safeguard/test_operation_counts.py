"""The safeguards' extra work is a fixed number of operations per step, not a loop over the weights.

One trainer run per tuning (the tiny SD UNet: 208 trained tensors in full, 128 with LoRA) alternates Diffusion-DPO,
the one pass (``safeguard_space="parameter"``) and the update space step by step, and counts with ``torch.profiler``
the aten operations of one non-logging optimizer step of each, outside the backward pass
(:mod:`trl_diffusion_sdpo.testing.operations`): there Diffusion-DPO's step and a safeguard's differ only by the
safeguard's own work (the branches' cotangents, the inner products, ``lambda``, the combination, the update space's
search). A Python loop over the weights adds one operation or more per tensor, 11 % to 19 % of these counts.
"""

from __future__ import annotations

import copy

import pytest
import torch

from trl_diffusion_sdpo.engines.memory import pieces as memory_model
from trl_diffusion_sdpo.safeguards import safeguard_for
from trl_diffusion_sdpo.safeguards.gradients.one_pass import OnePassBranchGradients
from trl_diffusion_sdpo.testing.operations import StepOperations

# The most a safeguard's step may exceed Diffusion-DPO's, outside the backward: (full tuning, LoRA). The update
# space's search runs one to four passes of eight operations each (read on the host in between) after about twenty
# that prepare it: with LoRA that is 4.4 % of Diffusion-DPO's step.
LIMITS = {"parameter": (0.05, 0.03), "update": (0.10, 0.05)}
SAFEGUARDS = {"parameter": {"safeguard_space": "parameter"}, "update": {"safeguard_space": "update"}}


def _per_tensor_combination(self: OnePassBranchGradients, lam: torch.Tensor) -> list[torch.Tensor]:
    """The combination as a loop over the weights (the same values): what the test must catch."""
    winner, loser = self.row_views(0), self.row_views(1)
    for w, h in zip(winner, loser):
        w.add_(h * lam.to(h))
    return winner


def operation_counts(make_trainer, lora: bool, names: list[str], planted: set[str] = frozenset()) -> dict:
    """``{name: top-level operations outside the backward in one non-logging step}`` for Diffusion-DPO (``"dpo"``)
    and the safeguards ``names``, alternating in one run; a name in ``planted`` runs the per-tensor combination."""
    order = ["dpo", *names]
    trainer = make_trainer(lora=lora, max_steps=2 * len(order), logging_steps=1000)
    trainable = sum(p.numel() for p in trainer.family.denoiser.parameters() if p.requires_grad)
    safeguards = {"dpo": trainer.safeguard}
    for name in names:
        args = copy.copy(trainer.args)
        for field, value in SAFEGUARDS[name.split("-")[0]].items():
            setattr(args, field, value)
        safeguards[name] = safeguard_for(args, trainer.engine, lora=lora, trainable_elements=trainable)

    def before_step(step: int) -> None:
        name = order[step % len(order)]
        trainer.safeguard = safeguards[name]
        store = getattr(getattr(safeguards[name], "backward_stage", None), "one_pass", None)
        if name in planted and store is not None:
            store.combination = _per_tensor_combination.__get__(store)

    counter = StepOperations(lambda step: step >= len(order), before_step)  # the second step of each
    trainer.add_callback(counter)
    trainer.train()
    for name in names:
        assert safeguards[name].backward_stage.two_pass_reason is None  # the one pass ran
    return {order[step % len(order)]: sum(r["outside_backward"].values()) for step, r in counter.records.items()}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_the_safeguards_add_a_fixed_number_of_operations_per_step(make_trainer, lora):
    counts = operation_counts(make_trainer, lora, ["parameter", "update"])
    for name in ("parameter", "update"):
        limit = LIMITS[name][lora]
        assert counts[name] <= (1 + limit) * counts["dpo"], (name, counts)


# What a piece of the one pass's buffer adds outside the backward: its inner products and combination (about 18
# operations); the update space's runs stop at the pieces (a run's reads and search passes, about 100).
PER_PIECE = {"parameter": 25, "update": 120}


def test_a_buffer_in_pieces_adds_a_fixed_number_of_operations_per_piece(make_trainer, monkeypatch):
    """Full tuning with the one pass's buffer in one and in four pieces (a large model's layout, where the pieces bound
    what the pass adds to the activations' peak): each piece adds a fixed number of operations, not one per weight."""
    counts = {}
    for pieces in (1, 4):
        monkeypatch.setattr(memory_model, "PIECE_ELEMENTS", 1)  # as many pieces as MAX_PIECES allows
        monkeypatch.setattr(memory_model, "MAX_PIECES", pieces)
        counts[pieces] = operation_counts(make_trainer, False, ["parameter", "update"])
    for name in ("parameter", "update"):
        assert counts[4][name] - counts[1][name] <= 3 * PER_PIECE[name], (name, counts)
        assert counts[4][name] > counts[1][name], (name, counts)  # the pieces are there: they cost something


def test_a_per_tensor_loop_in_the_one_pass_is_caught(make_trainer):
    """Planted: the one pass's combination as a Python loop over the weights. The clean one pass in the same run
    stays within its limit; the planted one exceeds it."""
    counts = operation_counts(make_trainer, False, ["parameter", "parameter-planted"], planted={"parameter-planted"})
    assert counts["parameter"] <= (1 + LIMITS["parameter"][0]) * counts["dpo"], counts
    assert counts["parameter-planted"] > (1 + LIMITS["parameter"][0]) * counts["dpo"], counts
