"""Checks that need a CUDA device (skipped elsewhere, so CI never runs them): the parameter-space safeguard under the
fp16 grad scaler and bf16 autocast, against explicit per-branch gradients."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers.parameter_safeguard import (
    _drift,
    _explicit_branch_gradients,
    _trainer_inputs,
    float64_lambda,
    replay_draws,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_parameter_space_gradient_under_mixed_precision_matches_explicit_branches(make_trainer, precision):
    trainer = make_trainer(
        lora=True,
        safeguard_space="parameter",
        safeguard_mu=0.5,
        proportion_empty_prompts=0.0,
        use_cpu=False,
        fp16=precision == "fp16",
        bf16=precision == "bf16",
        max_steps=12,
        logging_steps=1,
    )
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if "lora_B" in k}
    trainer.train()  # through the scaler / autocast: the grad scaler's first steps overflow and are skipped
    history = [h for h in trainer.state.log_history if "loss" in h]
    assert history and all(np.isfinite(h["loss"]) for h in history)
    assert all(0.0 <= h["safeguard/lambda_mean"] <= 1.0 for h in history)
    assert any(np.isfinite(h["grad_norm"]) for h in history)  # the scaler found a scale that does not overflow
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.named_parameters() if k in before)
    if precision == "fp16":
        assert trainer.accelerator.scaler is not None
        trainer.accelerator.scaler.update(new_scale=64.0)  # a scale at which this model's gradients fit in fp16

    model = trainer.model_wrapped
    _drift(trainer.model)
    model.train()
    inputs = _trainer_inputs(trainer)
    with trainer.compute_loss_context_manager(), trainer.accelerator.autocast():
        params, g_w, h_l = _explicit_branch_gradients(trainer, inputs)
    expected_lambda = float64_lambda(g_w, h_l, mu=0.5)
    for p in params:
        p.grad = None
    trainer.current_gradient_accumulation_steps = 1
    replay_draws(trainer)
    with trainer.accelerator.autocast():
        trainer.training_step(model, inputs)
    scale = trainer.accelerator.scaler.get_scale() if precision == "fp16" else 1.0
    lam = trainer._metrics["train"]["safeguard/lambda"][-1].item()
    assert lam == pytest.approx(expected_lambda, rel=1e-2)
    assert 0.0 < lam < 1.0
    for p, w, h in zip(params, g_w, h_l):
        expected = (w + lam * h).float()
        torch.testing.assert_close(p.grad.float() / scale, expected, rtol=2e-2, atol=2e-2 * expected.abs().max())
