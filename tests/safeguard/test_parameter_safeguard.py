"""The exact (parameter-space) safeguard: the pure rule, the streaming per-branch backward, and the trainer's step,
each against explicit per-branch ``torch.autograd.grad`` computations."""

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
from trl_diffusion_sdpo.safeguards.gradients.per_branch import BranchGradientSplitter, EngineBranchGradients
from trl_diffusion_sdpo.safeguards.parameter import (
    branch_cotangents,
    gradient_dots,
    parameter_space_lambda,
    safeguarded_gradients,
)


def random_grads(seed: int, correlation: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (5,), (2, 2, 3)]
    g_w = [torch.randn(s, generator=gen) for s in shapes]
    h_l = [-correlation * g + 0.5 * torch.randn(g.shape, generator=gen) for g in g_w]
    return g_w, h_l


@pytest.mark.parametrize("mu", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("correlation", [-1.0, 0.3, 1.0, 4.0])
def test_parameter_space_lambda_matches_the_float64_rule(mu, correlation):
    g_w, h_l = random_grads(int(10 * mu + correlation + 10), correlation)
    combined, lam = safeguarded_gradients(g_w, h_l, mu)
    assert lam.item() == pytest.approx(float64_lambda(g_w, h_l, mu), rel=1e-5, abs=1e-7)
    assert lam.dtype == torch.float32 and not lam.requires_grad
    for c, w, h in zip(combined, g_w, h_l):
        torch.testing.assert_close(c, w + lam * h)


def test_lambda_one_is_plain_dpo_and_no_conflict_gives_max_lambda():
    g_w, h_l = random_grads(3, correlation=-2.0)  # the loser's descent also lowers the winner's error
    combined, lam = safeguarded_gradients(g_w, h_l, mu=0.9, max_lambda=1.0)
    assert lam.item() == 1.0
    for c, w, h in zip(combined, g_w, h_l):
        torch.testing.assert_close(c, w + h)
    _, lam = safeguarded_gradients(g_w, h_l, mu=0.9, max_lambda=2.5)
    assert lam.item() == 2.5
    zeros = [torch.zeros_like(g) for g in g_w]
    assert safeguarded_gradients(zeros, zeros, mu=0.5)[1].item() == 1.0


def test_the_combined_gradient_keeps_the_first_order_guarantee():
    for seed in range(20):
        g_w, h_l = random_grads(seed, correlation=1.0 + seed / 5)
        mu = 0.3
        combined, lam = safeguarded_gradients(g_w, h_l, mu)
        sq = sum(float((w.double() ** 2).sum()) for w in g_w)
        first_order = sum(float((w.double() * c.double()).sum()) for w, c in zip(g_w, combined))
        assert first_order >= mu * sq * (1 - 1e-5)  # <g_w, g> >= mu |g_w|^2


def test_dot_products_accumulate_in_float32_for_half_gradients():
    g = [torch.full((4096,), 200.0, dtype=torch.float16)]
    sq, cross = gradient_dots(g, g)
    assert sq.dtype == torch.float32 and torch.isfinite(sq)  # 4096 * 200^2 overflows fp16
    assert sq.item() == pytest.approx(4096 * 200.0**2)


class TwoLayer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(6, 8)
        self.b = torch.nn.Linear(8, 6)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def two_branch_problem(seed: int):
    """A small model, a winner and a loser input, a DPO-like loss, and the explicit per-branch gradients ``g_w`` and
    ``h_l`` from two ``torch.autograd.grad`` calls."""
    model = TwoLayer()
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    x_w, x_l, t = (torch.randn(4, 6, generator=gen) for _ in range(3))

    def loss_of(pred_w, pred_l):
        e_w = (pred_w - t).pow(2).mean(1)
        e_l = (pred_l - t).pow(2).mean(1)
        return -torch.nn.functional.logsigmoid(-50.0 * (e_w - e_l)).mean()

    g_w = torch.autograd.grad(loss_of(model(x_w), model(x_l).detach()), params)
    h_l = torch.autograd.grad(loss_of(model(x_w).detach(), model(x_l)), params)
    return model, params, gen, (x_w, x_l), loss_of, g_w, h_l


@pytest.mark.parametrize("accumulating", [True, False], ids=["streaming-hooks", "fresh-grads"])
def test_splitter_matches_explicit_per_branch_gradients(accumulating):
    model, params, gen, (x_w, x_l), loss_of, g_w, h_l = two_branch_problem(seed=1)
    accumulated = [torch.randn(p.shape, generator=gen) if accumulating else torch.zeros(p.shape) for p in params]
    for p, a in zip(params, accumulated):
        p.grad = a.clone() if accumulating else None

    pred_w, pred_l = model(x_w), model(x_l)
    _, cot_w, cot_l = branch_cotangents(loss_of, pred_w, pred_l)
    splitter = BranchGradientSplitter(params)
    sq = splitter.backward_winner(pred_w, cot_w)
    cross = splitter.backward_loser(pred_l, cot_l)
    lam = parameter_space_lambda(sq, cross, mu=0.5)
    splitter.combine(lam)

    assert lam.item() == pytest.approx(float64_lambda(list(g_w), list(h_l), 0.5), rel=1e-5)
    for p, a, w, h in zip(params, accumulated, g_w, h_l):
        torch.testing.assert_close(p.grad, a + w + lam * h, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss_scale", [1.0, 1024.0], ids=["bf16-fp32", "fp16-loss-scale"])
def test_engine_branches_hand_the_engine_winner_plus_lambda_times_loser(loss_scale):
    """A stand-in for DeepSpeed ZeRO-1/2: an engine that keeps its own gradient sum (as ZeRO-2 keeps partitions and
    frees ``.grad``) and multiplies every loss by its loss scale before backpropagating it."""
    model, params, gen, (x_w, x_l), loss_of, g_w, h_l = two_branch_problem(seed=2)
    earlier = [torch.randn(p.shape, generator=gen) for p in params]  # the engine's sum of earlier micro-batches
    engine_sum = [e.clone() for e in earlier]
    boundaries: list[bool | None] = []

    def engine_backward(scalar: torch.Tensor, boundary: bool | None) -> None:
        boundaries.append(boundary)
        for total, grad in zip(engine_sum, torch.autograd.grad(scalar * loss_scale, params)):
            total.add_(grad)

    pred_w, pred_l = model(x_w), model(x_l)
    _, cot_w, cot_l = branch_cotangents(loss_of, pred_w, pred_l)
    branches = EngineBranchGradients(params, engine_backward, lambda: torch.tensor(loss_scale))
    sq = branches.backward_winner(pred_w, cot_w)
    cross = branches.backward_loser(pred_l, cot_l)
    lam = parameter_space_lambda(sq, cross, mu=0.5)
    branches.combine(lam)

    assert boundaries == [False, None]  # inside the micro-batch, then the caller's boundary and step
    assert all(p.grad is None for p in params)  # everything went through the engine
    assert lam.item() == pytest.approx(float64_lambda(list(g_w), list(h_l), 0.5), rel=1e-5)
    for total, e, w, h in zip(engine_sum, earlier, g_w, h_l):
        torch.testing.assert_close(total, e + loss_scale * (w + lam * h), rtol=1e-5, atol=1e-6 * loss_scale)


def test_splitter_refuses_a_loser_gradient_delivered_in_pieces():
    weight = torch.nn.Parameter(torch.ones(3))
    weight.grad = torch.zeros(3)  # an earlier micro-batch's gradient: the streaming path
    splitter = BranchGradientSplitter([weight])
    splitter.backward_winner(weight * 2.0, torch.ones(3))
    # Two separate backward graphs through the same leaf, run from inside one hooked backward (what reentrant
    # checkpointing does), deliver the gradient twice.
    inner = torch.autograd.Function

    class Reentrant(inner):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            with torch.enable_grad():
                torch.autograd.backward(weight * 3.0, grad)
            return grad

    out = Reentrant.apply(weight * 1.0)
    with pytest.raises(RuntimeError, match="several pieces"):
        splitter.backward_loser(out, torch.ones(3))


# ---------------------------------------------------------------------------------------------- the trainer's step


# By default a half of the grid in which every pair of levels meets (two passes exactly where one of checkpointing
# and full tuning is on); the rest: slow
@pytest.mark.parametrize(
    "checkpointing,lora,passes",
    [
        pytest.param(
            checkpointing,
            not full,
            passes,
            marks=() if (passes == "two") == (checkpointing != full) else pytest.mark.slow,
            id=f"{'checkpointed' if checkpointing else 'plain'}-{'full' if full else 'lora'}-{passes}",
        )
        for checkpointing in (False, True)
        for full in (False, True)
        for passes in ("one", "two")
    ],
)
def test_trainer_gradient_is_winner_plus_lambda_times_loser_from_explicit_autograd(
    make_trainer, lora, checkpointing, passes
):
    trainer = make_trainer(
        lora=lora,
        safeguard_space="parameter",
        safeguard_mu=0.5,
        proportion_empty_prompts=0.0,
        gradient_checkpointing=checkpointing,
        safeguard_passes=passes,
    )
    model = trainer.model
    _drift(model)
    model.train()
    inputs = _trainer_inputs(trainer)
    params, g_w, h_l = _explicit_branch_gradients(trainer, inputs, separate_branches=passes == "two")
    expected_lambda = float64_lambda(g_w, h_l, mu=0.5)
    assert 0.0 < expected_lambda < 1.0  # the constraint binds: the case that tells the rules apart

    gen = torch.Generator().manual_seed(3)
    accumulated = [torch.randn(p.shape, generator=gen) for p in params]  # an earlier micro-batch's gradient
    for p, a in zip(params, accumulated):
        p.grad = a.clone()
    trainer.current_gradient_accumulation_steps = 1
    replay_draws(trainer)
    loss = trainer.training_step(model, inputs)
    assert torch.isfinite(loss)
    lam = trainer._metrics["train"]["safeguard/lambda"][-1].item()
    assert lam == pytest.approx(expected_lambda, rel=1e-4)
    # float32 summation-order noise, relative to the summands: where the winner's and the scaled loser's gradients
    # nearly cancel, another CPU's order moves their sum by a share of the summands, not of the sum (measured on an
    # AVX2-only CPU, full tuning in one pass: 0.0087 apart where 1e-4 of the sum and 1e-5 of the scale allowed 0.0012)
    scale = max(float((w + lam * h).abs().max()) for w, h in zip(g_w, h_l))
    for p, a, w, h in zip(params, accumulated, g_w, h_l):
        expected = a + w + lam * h
        bound = 1e-4 * (a.abs() + w.abs() + lam * h.abs()) + 1e-5 * scale
        assert ((p.grad - expected).abs() <= bound).all(), float(((p.grad - expected).abs() - bound).max())
    # the authors' rule on the same micro-batch is logged only when asked for (ParameterSpace.log_output_lambda)
    assert "safeguard/output_lambda" not in trainer._metrics["train"]


def test_gradient_accumulation_divides_each_micro_batch_like_transformers(make_trainer):
    trainer = make_trainer(lora=True, safeguard_space="parameter", proportion_empty_prompts=0.0)
    model = trainer.model
    _drift(model)
    model.train()
    inputs = _trainer_inputs(trainer)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = {}
    for steps in (1, 4):
        model.zero_grad(set_to_none=True)
        trainer.current_gradient_accumulation_steps = steps
        replay_draws(trainer)
        trainer.training_step(model, inputs)
        grads[steps] = [p.grad.clone() for p in params]
    for one, four in zip(grads[1], grads[4]):
        torch.testing.assert_close(four * 4, one, rtol=1e-5, atol=1e-9)


# By default: test_step_reference.py's unet-epsilon-parameter-lora (the adapters and the frozen base against the
# loop) and test_flow_families.py's test_both_safeguard_spaces_train_and_log_lambda[parameter] (both lambdas logged)
@pytest.mark.slow
def test_parameter_space_training_changes_only_trainable_weights_and_logs_both_lambdas(make_trainer):
    trainer = make_trainer(lora=True, safeguard_space="parameter", max_steps=3)
    trainer.safeguard.log_output_lambda(trainer.args)
    frozen_before = {k: v.clone() for k, v in trainer.model.state_dict().items() if "lora" not in k}
    lora_before = {k: v.clone() for k, v in trainer.model.state_dict().items() if "lora_B" in k}
    trainer.train()
    after = trainer.model.state_dict()
    assert all(torch.equal(frozen_before[k], after[k]) for k in frozen_before)
    assert any(not torch.equal(lora_before[k], after[k]) for k in lora_before)
    logs = [entry for entry in trainer.state.log_history if "safeguard/lambda_mean" in entry]
    assert logs and all("safeguard/output_lambda_mean" in entry for entry in logs)
    assert all(0.0 <= entry["safeguard/lambda_min"] <= entry["safeguard/lambda_max"] <= 1.0 for entry in logs)


def test_bf16_autocast_runs_and_keeps_float32_gradients(make_trainer):
    trainer = make_trainer(lora=True, safeguard_space="parameter", bf16=True, max_steps=2)
    trainer.train()
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values())
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------- objectives x spaces


@pytest.mark.parametrize(
    "loss_type, overrides",
    [
        ("dspo", {"beta": 0.001, "dspo_form": "sd15"}),
        # DSPO's SDXL form by default: the sd15 form's case (the same objective through the same step) and
        # test_objectives.py's test_config_fields_reach_dspo (the form's loss)
        pytest.param("dspo", {"beta": 5000.0, "dspo_form": "sdxl"}, marks=pytest.mark.slow),
        ("dmpo", {"beta": 2000.0}),
        ("mapo", {}),
    ],
    ids=["dspo-sd15", "dspo-sdxl", "dmpo", "mapo"],
)
# The output space in the slow tier; by default: test_objectives.py's test_the_safeguard_scales_exactly_the_loser_...
# (its lambda on each objective's loser error) and test_step_reference.py's unet-epsilon-output-full (the step)
@pytest.mark.parametrize("space", [pytest.param("output", marks=pytest.mark.slow), "parameter"])
def test_every_pairwise_objective_trains_under_both_safeguard_spaces(make_trainer, loss_type, overrides, space):
    trainer = make_trainer(lora=True, loss_type=loss_type, safeguard_space=space, max_steps=2, **overrides)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items() if "lora_A" in k}
    trainer.train()
    logged = trainer.state.log_history[-2]
    assert np.isfinite(logged["loss"])
    assert "safeguard/lambda_mean" in logged
    for name in trainer.objective.metric_names:
        assert name in logged
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_reference_free_objectives_build_and_run_no_reference(make_trainer, monkeypatch):
    import trl_diffusion_sdpo.step.frozen_reference as reference_module

    calls = []
    monkeypatch.setattr(reference_module.FrozenCopyReference, "predict", lambda *a, **k: calls.append(1))
    for loss_type, space in (("mapo", "output"), ("sft", "none")):
        trainer = make_trainer(lora=False, loss_type=loss_type, safeguard_space=space, max_steps=1)
        assert trainer.reference is None  # no frozen copy of the UNet in memory
        trainer.train()
        assert "mse/ref_winner" not in trainer.state.log_history[-2]
    assert calls == []


def test_sft_with_the_safeguard_is_refused_at_configuration(make_config):
    from trl_diffusion_sdpo.objectives import check_objective_config

    with pytest.raises(ValueError, match="sft.*no loser gradient.*safeguard_space='none'"):
        check_objective_config(make_config(loss_type="sft", safeguard_space="output"))


def test_lora_at_initialisation_gives_loss_log_2_exactly_with_per_branch_passes(make_trainer):
    trainer = make_trainer(lora=True, safeguard_space="parameter", proportion_empty_prompts=0.0)
    model = trainer.model
    model.train()
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer.training_step(model, _trainer_inputs(trainer))
    assert loss.item() == pytest.approx(np.log(2), abs=1e-7)  # the reference ran in the same per-branch shapes
