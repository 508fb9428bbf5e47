"""A plain Diffusion-DPO step is transformers' own ``Trainer.training_step`` running the trainer's ``compute_loss``:
the loss it backpropagates, its division by the accumulation window and the backward are Trainer's."""

from __future__ import annotations

import traceback
from unittest import mock

import pytest
import torch
import transformers

from trl_diffusion_sdpo import DiffusionSDPOTrainer

_ACCUMULATION = 2


def _caller() -> tuple[str, str]:
    """The file and function that called the spied function (the mock's frames, autospec's generated ones and this
    file's skipped)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        filename = frame.filename.replace("\\", "/")
        if "unittest/mock" not in filename and filename != "<string>" and frame.filename != __file__:
            return frame.filename.replace("\\", "/"), frame.name
    raise AssertionError("no caller outside the spies")


@pytest.mark.parametrize("space", ["none", "output"])
def test_a_plain_step_is_trainers_own_training_step_running_compute_loss(make_trainer, space):
    trainer = make_trainer(
        max_steps=1, gradient_accumulation_steps=_ACCUMULATION, safeguard_space=space, safeguard_mu=0.5
    )
    trainer_step, compute_loss = transformers.Trainer.training_step, DiffusionSDPOTrainer.compute_loss
    backward = trainer.accelerator.backward
    losses: list[torch.Tensor] = []  # what compute_loss returned
    backpropagated: list[torch.Tensor] = []  # what the engine's backward received
    callers: dict[str, set[tuple[str, str]]] = {"compute_loss": set(), "backward": set()}

    def spy_compute_loss(self, *args, **kwargs):
        callers["compute_loss"].add(_caller())
        loss = compute_loss(self, *args, **kwargs)
        losses.append(loss.detach().clone())
        return loss

    def spy_backward(loss, **kwargs):
        callers["backward"].add(_caller())
        backpropagated.append(loss.detach().clone())
        return backward(loss, **kwargs)

    with (
        mock.patch.object(transformers.Trainer, "training_step", autospec=True, side_effect=trainer_step) as steps,
        mock.patch.object(DiffusionSDPOTrainer, "compute_loss", autospec=True, side_effect=spy_compute_loss),
        mock.patch.object(trainer.accelerator, "backward", side_effect=spy_backward),
    ):
        trainer.train()

    assert steps.call_count == _ACCUMULATION  # every micro-batch of the optimizer step
    # The loss and the backward are run by transformers' step itself, not by a copy of its lines.
    trainers_file = transformers.trainer.__file__.replace("\\", "/")
    assert callers["compute_loss"] == {(trainers_file, "training_step")}
    assert callers["backward"] == {(trainers_file, "training_step")}
    # Trainer's scaling: each micro-batch's loss divided by the accumulation window, one backward each.
    assert len(losses) == len(backpropagated) == _ACCUMULATION
    for loss, scaled in zip(losses, backpropagated):
        torch.testing.assert_close(scaled, loss / _ACCUMULATION, rtol=0, atol=0)
