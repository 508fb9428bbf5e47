"""The exact rule's step (the parameter and update spaces) is transformers' own ``Trainer.training_step`` too: the
passes' backward runs inside the engine's backward that Trainer's step calls, with the scale Trainer's step gave it
(the division by the accumulation window), and the safeguard's hook follows the call."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import transformers

from trl_diffusion_sdpo.safeguards.gradients.collectives import BranchCollectives
from trl_diffusion_sdpo.safeguards.parameter import OnePass, PerBranchPasses

CASES = {
    # name: (config overrides, accumulation window, the pass classes expected)
    "parameter-one-pass": ({"safeguard_space": "parameter"}, 2, {OnePass}),
    "parameter-two-passes": ({"safeguard_space": "parameter", "safeguard_passes": "two"}, 2, {PerBranchPasses}),
    "update": ({"safeguard_space": "update"}, 1, {OnePass}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_exact_rule_runs_inside_trainers_training_step_and_backward(make_trainer, name):
    overrides, accumulation, expected_passes = CASES[name]
    trainer = make_trainer(
        max_steps=2 // accumulation, gradient_accumulation_steps=accumulation, safeguard_mu=0.5, **overrides
    )
    trainer_step = transformers.Trainer.training_step
    engine_backward = trainer.accelerator.backward
    inside_engine_backward = [False]
    passes: list[tuple[type, bool, float]] = []  # (pass class, inside the engine's backward, scale it was given)
    combined: list[bool] = []  # the hook ran after Trainer's step returned (not inside it)
    in_trainer_step = [False]

    def spy_trainer_step(self, *args, **kwargs):
        in_trainer_step[0] = True
        try:
            return trainer_step(self, *args, **kwargs)
        finally:
            in_trainer_step[0] = False

    def spy_engine_backward(loss, **kwargs):
        inside_engine_backward[0] = True
        try:
            return engine_backward(loss, **kwargs)
        finally:
            inside_engine_backward[0] = False

    def spy_pass(cls):
        original = cls.backward

        def backward(self, loss, predictions, scale=None):
            passes.append((cls, inside_engine_backward[0], None if scale is None else float(scale)))
            return original(self, loss, predictions, scale)

        return mock.patch.object(cls, "backward", autospec=True, side_effect=backward)

    combine = type(trainer.safeguard).combine

    def spy_combine(self, *args, **kwargs):
        combined.append(in_trainer_step[0])
        return combine(self, *args, **kwargs)

    with (
        mock.patch.object(transformers.Trainer, "training_step", autospec=True, side_effect=spy_trainer_step) as steps,
        mock.patch.object(trainer.accelerator, "backward", side_effect=spy_engine_backward),
        mock.patch.object(type(trainer.safeguard), "combine", autospec=True, side_effect=spy_combine),
        spy_pass(OnePass),
        spy_pass(PerBranchPasses),
    ):
        trainer.train()

    assert trainer.state.global_step == 2 // accumulation
    assert steps.call_count == 2  # every micro-batch went through transformers' step
    assert {cls for cls, _, _ in passes} == expected_passes
    assert len(passes) == 2
    # Each pass's backward ran inside the engine's backward of Trainer's step, with Trainer's division by the window
    assert all(inside for _, inside, _ in passes)
    assert [scale for _, _, scale in passes] == [1.0 / accumulation] * 2
    # The hook chose lambda after Trainer's step returned, once per micro-batch
    assert combined == [False, False]


def _train_placed(
    make_trainer, placement: str, collectives: type | None = None, **overrides
) -> tuple[list[tuple[bool, bool]], set[str], dict, list[dict]]:
    """One optimizer step (a window of two) of the one pass with the engine's ``passes_placement`` set to
    ``placement`` (and the stage's ``collectives`` replaced, where given; ``overrides``: more config fields): per
    pass, (inside the engine's backward, its scale left to the stage); the placements ``PassesInStep`` was given;
    the trained weights; the training logs."""
    from trl_diffusion_sdpo.safeguards.passes import PassesInStep

    trainer = make_trainer(
        max_steps=1, gradient_accumulation_steps=2, safeguard_space="parameter", safeguard_mu=0.5, **overrides
    )
    if collectives is not None:
        trainer.safeguard.backward_stage.collectives = collectives(trainer.engine)
    engine_backward, pass_backward, passes_init = trainer.accelerator.backward, OnePass.backward, PassesInStep.__init__
    inside, seen, given = [False], [], set()

    def spy_engine_backward(loss, **kwargs):
        inside[0] = True
        try:
            return engine_backward(loss, **kwargs)
        finally:
            inside[0] = False

    def spy_pass_backward(self, loss, predictions, scale=None):
        seen.append((inside[0], scale is None))
        return pass_backward(self, loss, predictions, scale)

    def spy_init(self, *args, **kwargs):
        passes_init(self, *args, **kwargs)
        given.add(self.placement)

    with (
        mock.patch.object(type(trainer.engine), "passes_placement", placement),
        mock.patch.object(trainer.accelerator, "backward", side_effect=spy_engine_backward),
        mock.patch.object(OnePass, "backward", autospec=True, side_effect=spy_pass_backward),
        mock.patch.object(PassesInStep, "__init__", autospec=True, side_effect=spy_init),
    ):
        trainer.train()
    weights = {n: p.detach().clone() for n, p in trainer.policy.named_parameters() if p.requires_grad}
    assert weights and all(torch.isfinite(w).all() for w in weights.values())
    return seen, given, weights, [log for log in trainer.state.log_history if "loss" in log]


def test_the_engines_placement_of_the_passes_reaches_the_step(make_trainer):
    """Where the passes run is the engine's ``passes_placement``: told ``"in_compute_loss"`` (FSDP's), the passes run
    before Trainer's backward, with the stage's own scale, and train the same weights as inside it, bit for bit."""
    from trl_diffusion_sdpo.engines.base import PASS_PLACEMENTS

    seen_in, given_in, inside, _ = _train_placed(make_trainer, "in_backward")
    seen_before, given_before, before, _ = _train_placed(make_trainer, "in_compute_loss")
    assert {"in_backward", "in_compute_loss"} <= set(PASS_PLACEMENTS)
    assert (given_in, given_before) == ({"in_backward"}, {"in_compute_loss"})
    assert seen_in == [(True, False)] * 2  # inside Trainer's backward, with its scale
    assert seen_before == [(False, True)] * 2  # before it, with the stage's own
    assert inside.keys() == before.keys()
    for name, value in inside.items():
        assert torch.equal(value, before[name]), name


class _DeferredCombination(BranchCollectives):
    """One process's collectives handing the one pass's combination over as DeepSpeed ZeRO-1/2's do
    (``DeepSpeedCollectives.add_combined``): as the gradient of the surrogate ``sum_i <w_i, c_i>`` (``c`` already
    carrying the accumulation average), whose backward, the micro-batch's last engine backward, is deferred to
    Trainer's ``accelerator.backward``. Accelerate's backward stands in for DeepSpeed's: under transformers neither
    divides by the window again (Trainer's step divides the loss)."""

    deferred: list[torch.Tensor] | None = None

    def add_combined(self, store, combined, sync_gradients, *, reduced) -> None:
        terms = [
            torch.dot(p.reshape(-1), c.detach().reshape(-1).to(p.dtype))
            for p, c, reached in zip(store.parameters, combined, store.reached)
            if reached
        ]
        assert self.deferred is not None, "the combination reached the engine outside the deferred backward"
        self.deferred.append(torch.stack(terms).sum())


def test_a_deferred_engine_backward_keeps_the_accumulation_average_of_trainers_step(make_trainer):
    """The placement of an engine that steps inside its own backward (DeepSpeed's ``"with_combination"``): the
    passes and the combination run in compute_loss and the combination's engine backward is carried by the loss
    into Trainer's, which divides it by the window once more. Over a window of two, SGD without clipping (a lost or
    doubled factor shows in the weights; AdamW would hide a constant one) trains the weights of the passes run inside
    Trainer's backward, with the same gradient norm. One process and accelerate's backward: DeepSpeed's own engine
    under ZeRO-2 with accumulation is tests/distributed/test_distributed.py's."""
    plain = {"optim": "sgd", "max_grad_norm": 1e9}  # the norm is logged, nothing is clipped
    seen, given, deferred, deferred_logs = _train_placed(
        make_trainer, "with_combination", _DeferredCombination, **plain
    )
    _, _, inside, inside_logs = _train_placed(make_trainer, "in_backward", **plain)
    assert given == {"with_combination"}
    assert seen == [(False, True)] * 2  # in compute_loss, with the stage's own scale
    assert deferred.keys() == inside.keys()
    for name, value in inside.items():
        torch.testing.assert_close(deferred[name], value, rtol=1e-6, atol=1e-9, msg=name)
    norms = [log["grad_norm"] for log in deferred_logs], [log["grad_norm"] for log in inside_logs]
    assert len(norms[0]) == 1 and norms[0] == pytest.approx(norms[1], rel=1e-6)


def test_a_placement_and_its_hook_are_checked():
    from trl_diffusion_sdpo.safeguards.passes import BackwardWindow, PassesInStep

    with pytest.raises(ValueError, match="placement must be one of"):
        PassesInStep(None, None, BackwardWindow(), placement="inside")
    with pytest.raises(ValueError, match="with_combination"):
        PassesInStep(None, None, BackwardWindow(), placement="with_combination")
    with pytest.raises(ValueError, match="with_combination"):
        PassesInStep(None, None, BackwardWindow(), placement="in_backward", combine=lambda branches: {})
