"""Diffusion-DPO objective and metrics against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trl_diffusion_sdpo.objectives import (
    OBJECTIVES,
    DenoisingErrors,
    PreferencePredictions,
    build_objective,
    denoising_error,
    diffusion_dpo_logits,
    diffusion_dpo_loss,
    implicit_accuracy,
)
from trl_diffusion_sdpo.step.predictions import scale_gradient

# Policy and reference errors of 4 pairs, chosen so the logits have both signs and one is exactly zero.
E_W = [0.30, 0.50, 0.20, 0.40]
E_L = [0.40, 0.45, 0.20, 0.10]
R_W = [0.35, 0.48, 0.25, 0.41]
R_L = [0.35, 0.50, 0.25, 0.30]


def errors(requires_grad: bool = False) -> DenoisingErrors:
    t = {
        k: torch.tensor(v, dtype=torch.float64, requires_grad=requires_grad)
        for k, v in dict(w=E_W, l=E_L, rw=R_W, rl=R_L).items()
    }
    return DenoisingErrors(t["w"], t["l"], t["rw"], t["rl"])


def hand_logits(beta: float) -> list[float]:
    return [-0.5 * beta * ((w - lo) - (rw - rl)) for w, lo, rw, rl in zip(E_W, E_L, R_W, R_L)]


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def test_denoising_error_is_the_per_sample_mean_squared_error_in_float32():
    gen = torch.Generator().manual_seed(0)
    pred = torch.randn(3, 4, 5, 6, generator=gen).half()
    target = torch.randn(3, 4, 5, 6, generator=gen).half()
    got = denoising_error(pred, target)
    expected = ((pred.double().numpy() - target.double().numpy()) ** 2).mean(axis=(1, 2, 3))
    assert got.dtype == torch.float32 and got.shape == (3,)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)


def test_denoising_error_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        denoising_error(torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 4))


def test_logits_follow_u_equals_minus_half_beta_times_policy_minus_reference_difference():
    got = diffusion_dpo_logits(errors(), beta=10.0)
    np.testing.assert_allclose(got.numpy(), hand_logits(10.0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("beta", [1.0, 10.0, 5000.0])
def test_dpo_loss_is_the_mean_of_minus_logsigmoid_of_each_logit(beta):
    u = hand_logits(beta)
    expected = -sum(log_sigmoid(x) for x in u) / len(u)
    out = diffusion_dpo_loss(errors(), beta)
    assert out.loss.item() == pytest.approx(expected, rel=1e-10)
    np.testing.assert_allclose(out.logits.numpy(), u, rtol=1e-12, atol=1e-12)


def test_dpo_loss_takes_the_mean_after_the_logsigmoid_not_before():
    # The early public script averaged u before the log-sigmoid; with these logits that is a different number.
    u = hand_logits(10.0)
    buggy = -log_sigmoid(sum(u) / len(u))
    correct = -sum(log_sigmoid(x) for x in u) / len(u)
    assert abs(buggy - correct) > 0.02
    assert diffusion_dpo_loss(errors(), 10.0).loss.item() == pytest.approx(correct, rel=1e-10)


def test_pair_weights_multiply_each_logit_inside_the_logsigmoid():
    weights = [1.0, 0.0, 2.0, 0.5]
    u = hand_logits(10.0)
    expected = -sum(log_sigmoid(w * x) for w, x in zip(weights, u)) / len(u)
    out = diffusion_dpo_loss(errors(), 10.0, pair_weights=torch.tensor(weights))
    assert out.loss.item() == pytest.approx(expected, rel=1e-10)
    np.testing.assert_allclose(out.logits.numpy(), u, rtol=1e-12)  # logits are reported unweighted


def test_policy_equal_to_reference_gives_loss_log_two():
    e = torch.tensor([0.3, 0.7, 1.1])
    out = diffusion_dpo_loss(DenoisingErrors(e, e.flip(0), e, e.flip(0)), beta=5000.0)
    assert out.loss.item() == pytest.approx(math.log(2), rel=1e-6)
    assert implicit_accuracy(out.logits).item() == 0.5


def test_dpo_needs_the_reference_errors():
    e = torch.tensor([0.3, 0.7])
    with pytest.raises(ValueError, match="reference"):
        diffusion_dpo_loss(DenoisingErrors(e, e), beta=1.0)


def test_implicit_accuracy_counts_positive_logits_and_ties_as_half():
    assert implicit_accuracy(torch.tensor([1.0, -1.0, 0.0, 2.0])).item() == pytest.approx(2.5 / 4)
    assert implicit_accuracy(torch.tensor([-3.0, -1.0])).item() == 0.0
    assert implicit_accuracy(torch.zeros(5)).item() == 0.5
    u = hand_logits(10.0)  # [0.5, -0.35, 0.0, -0.95]
    expected = (sum(x > 0 for x in u) + 0.5 * sum(x == 0 for x in u)) / len(u)
    assert expected == pytest.approx(1.5 / 4)
    assert implicit_accuracy(torch.tensor(u)).item() == pytest.approx(expected)


def test_safeguard_scales_only_the_loser_error_gradient_of_the_loss():
    lam = 0.3
    plain, guarded = errors(requires_grad=True), errors(requires_grad=True)
    diffusion_dpo_loss(plain, 10.0).loss.backward()
    scaled = DenoisingErrors(
        guarded.policy_winner,
        scale_gradient(guarded.policy_loser, lam),
        guarded.reference_winner,
        guarded.reference_loser,
    )
    out = diffusion_dpo_loss(scaled, 10.0)
    assert out.loss.item() == pytest.approx(diffusion_dpo_loss(errors(), 10.0).loss.item(), rel=1e-12)
    out.loss.backward()
    torch.testing.assert_close(guarded.policy_winner.grad, plain.policy_winner.grad)
    torch.testing.assert_close(guarded.policy_loser.grad, lam * plain.policy_loser.grad)
    # Hand derivative: dL/de_w_i = 0.5 * beta * (1 - sigmoid(u_i)) / B, and minus that for the loser.
    u = torch.tensor(hand_logits(10.0), dtype=torch.float64)
    d_w = 0.5 * 10.0 * (1 - torch.sigmoid(u)) / 4
    torch.testing.assert_close(plain.policy_winner.grad, d_w)
    torch.testing.assert_close(plain.policy_loser.grad, -d_w)


def test_objective_registry_resolves_dpo_and_rejects_unknown_names():
    objective = build_objective("dpo", beta=10.0)
    assert "dpo" in OBJECTIVES and objective.name == "dpo" and objective.requires_reference
    preds = PreferencePredictions(*(torch.zeros(4, 1, 1, 1) for _ in range(4)))
    out = objective(preds, errors())
    assert out.loss.item() == pytest.approx(diffusion_dpo_loss(errors(), 10.0).loss.item())
    with pytest.raises(ValueError, match="dpo"):
        build_objective("not-a-loss", beta=10.0)
