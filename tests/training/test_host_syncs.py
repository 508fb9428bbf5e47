"""A non-logging Diffusion-DPO step reads nothing back to the host.

On the tiny SD pipeline with cached latents, one whole non-logging optimizer step (from one ``on_step_end`` to the
next, so the previous step's logging is in the window when there is one) is profiled with ``torch.profiler`` and its
host reads counted (:func:`trl_diffusion_sdpo.testing.operations.host_reads`: ``aten::_local_scalar_dense`` under
``.item()``, ``float()``, ``bool()``, ``.tolist()``, outside ``Optimizer.step``, whose CPU fused AdamW reads its step
counter per tensor where the accelerator kernel reads nothing). None is needed: the losses and metrics stay tensors
until a logging step reads them all in one ``.tolist()``. A logging step reads them there, and only there.
"""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

from trl_diffusion_sdpo.testing.operations import host_reads

# Host reads a non-logging step needs: none.
NON_LOGGING_LIMIT = 0


class ProfileSecondStep(TrainerCallback):
    """Profiles from the first step's end to the second's."""

    def __init__(self) -> None:
        self.profile: torch.profiler.profile | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            self.profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.profile.__enter__()
        elif state.global_step == 2:
            self.profile.__exit__(None, None, None)


def step_host_reads(make_trainer, logging_steps: int, planted: bool = False) -> int:
    trainer = make_trainer(lora=False, max_steps=2, logging_steps=logging_steps, cache_latents=True)
    if planted:  # a per-step read of the loss, as a metric taken with .item() every step would be
        training_step = trainer.training_step

        def reading(*args, **kwargs):
            loss = training_step(*args, **kwargs)
            loss.item()
            return loss

        trainer.training_step = reading
    profiler = ProfileSecondStep()
    trainer.add_callback(profiler)
    trainer.train()
    return host_reads(profiler.profile)


def test_a_non_logging_step_reads_nothing_back(make_trainer):
    assert step_host_reads(make_trainer, logging_steps=1000) <= NON_LOGGING_LIMIT


def test_a_logging_step_reads_its_metrics_back(make_trainer):
    """The counter sees the reads a logging step makes (the window holds the first step's logging)."""
    assert step_host_reads(make_trainer, logging_steps=1) > NON_LOGGING_LIMIT


@pytest.mark.parametrize(  # the clean run by default: test_a_non_logging_step_reads_nothing_back (the same run)
    "planted", [pytest.param(False, marks=pytest.mark.slow), True], ids=["clean", "planted"]
)
def test_a_per_step_item_is_caught(make_trainer, planted):
    """Planted: the loss read with ``.item()`` in every step."""
    reads = step_host_reads(make_trainer, logging_steps=1000, planted=planted)
    assert (reads > NON_LOGGING_LIMIT) == planted, reads
