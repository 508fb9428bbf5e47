"""A non-finite gradient skips a fused optimizer's update through the flag torch's gradient scaler hands it; the
flag lasts one step, so the optimizer applies the steps that come after, also once the run is over."""

from __future__ import annotations

import torch
from transformers import TrainerCallback


class InfGradientAt(TrainerCallback):
    """An inf in one gradient element just before the optimizer step ``step`` (1-based), with a finite loss."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            grad = next(p.grad for p in model.parameters() if p.grad is not None)
            grad.view(-1)[0] = float("inf")


def test_a_skipped_last_step_leaves_the_optimizer_applying_its_next_step(make_trainer):
    trainer = make_trainer(
        max_steps=2,
        on_nonfinite_loss="skip",
        optim="adamw_torch_fused",
        max_grad_norm=0.0,
        callbacks=[InfGradientAt(2)],
    )
    trainer.train()
    assert trainer.nonfinite.skipped == 1
    inner = trainer.optimizer.optimizer  # the torch optimizer accelerate wraps
    assert inner.defaults["fused"]
    params = [p for group in inner.param_groups for p in group["params"]]
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    inner.step()
    # A step with gradient 1 moves every weight by about the learning rate (Adam's update is lr * m / sqrt(v)).
    assert all(not torch.equal(b, p.detach()) for b, p in zip(before, params))
