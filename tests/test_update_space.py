"""The update-space safeguard: lambda chosen on the optimizer's actual step, checked against real torch optimizer
steps in float64 over a fine grid of lambda (computed here, independently of the implementation)."""

from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace

import pytest
import torch

from trl_diffusion_sdpo.engines import DeepSpeedEngine, FSDP2Engine
from trl_diffusion_sdpo.step.update_space import OptimizerUpdate, update_space_lambda

SHAPES = [(4, 3), (5,), (2, 2, 2)]


def _optimizer(kind: str, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1)
    if kind == "adam":
        return torch.optim.Adam(params, lr=1e-2, weight_decay=0.05)
    if kind == "sgd-momentum":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01)
    if kind == "sgd-nesterov":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1)
    raise ValueError(kind)


def _problem(kind: str, seed: int, warm_steps: int, conflict: float = 1.5):
    """Weights, an optimizer with ``warm_steps`` real steps of state, and ``(g_w, h_l)`` with ``h_l`` partly
    opposed to ``g_w`` (the case the safeguard restricts)."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    optimizer = _optimizer(kind, params)
    for _ in range(warm_steps):
        for p in params:
            p.grad = 0.3 * torch.randn(p.shape, generator=gen)
        optimizer.step()
    g_w = [0.5 * torch.randn(s, generator=gen) for s in SHAPES]
    h_l = [-conflict * w + 0.5 * torch.randn(w.shape, generator=gen) for w in g_w]
    return params, optimizer, g_w, h_l


def _real_decreases(params, optimizer, g_w, h_l, lambdas, max_grad_norm: float) -> list[float]:
    """``-<g_w, Delta(lambda)>`` with ``Delta`` the change of the weights under a real float64 optimizer step from a
    copy of ``optimizer``'s state, the gradient ``g_w + lambda h_l`` clipped by ``clip_grad_norm_``."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    where = {id(p): (i, j) for i, group in enumerate(optimizer.param_groups) for j, p in enumerate(group["params"])}
    out = []
    for lam in lambdas:
        opt = copy.deepcopy(optimizer)  # its own copies of the weights and state, promoted to float64
        params64 = [opt.param_groups[where[id(p)][0]]["params"][where[id(p)][1]] for p in params]
        for p in params64:
            p.data = p.data.double()
            for key, value in opt.state.get(p, {}).items():
                if key != "step" and torch.is_tensor(value):
                    opt.state[p][key] = value.double()
        for p, w, h in zip(params64, g_w, h_l):
            p.grad = w.double() + lam * h.double()
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params64, max_grad_norm)
        before = [p.detach().clone() for p in params64]
        opt.step()
        delta = [p.detach() - b for p, b in zip(params64, before)]
        out.append(-sum(float((w.double() * d).sum()) for w, d in zip(g_w, delta)))
    return out


def _brute_force(params, optimizer, g_w, h_l, mu, max_grad_norm, points: int = 401):
    lambdas = torch.linspace(0, 1, points, dtype=torch.float64).tolist()
    decreases = _real_decreases(params, optimizer, g_w, h_l, lambdas, max_grad_norm)
    target = mu * max(decreases[0], 0.0)
    feasible = [lam for lam, d in zip(lambdas, decreases) if d >= target]
    return (max(feasible) if feasible else None), target, decreases


@pytest.mark.parametrize("kind", ["adamw", "adam", "sgd-momentum", "sgd-nesterov", "sgd"])
@pytest.mark.parametrize("mu", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0], ids=["unclipped", "clipped"])
def test_lambda_is_the_largest_meeting_the_margin_under_the_real_optimizer_step(kind, mu, max_grad_norm):
    params, optimizer, g_w, h_l = _problem(kind, seed=1, warm_steps=3)
    update = OptimizerUpdate(optimizer, params, g_w, h_l, max_grad_norm)
    lam, infeasible = update_space_lambda(update, mu)
    expected, target, _ = _brute_force(params, optimizer, g_w, h_l, mu, max_grad_norm)
    assert expected is not None and infeasible.item() == 0.0
    assert 0.0 < expected < 1.0  # the margin binds: the case that tells a right lambda from a wrong one
    assert lam.item() == pytest.approx(expected, abs=3e-3)  # grid 1/400 here, search resolution 5e-4
    # the chosen lambda itself, under the real float64 step: the winner term falls by at least the margin
    (chosen,) = _real_decreases(params, optimizer, g_w, h_l, [lam.item()], max_grad_norm)
    assert chosen >= target - 1e-5 * abs(target) - 1e-9


def test_first_adamw_step_from_empty_state_and_no_conflict_gives_max_lambda():
    params, optimizer, g_w, h_l = _problem("adamw", seed=2, warm_steps=0)
    lam, _ = update_space_lambda(OptimizerUpdate(optimizer, params, g_w, h_l, 1.0), 0.5)
    expected, _, _ = _brute_force(params, optimizer, g_w, h_l, 0.5, 1.0)
    assert lam.item() == pytest.approx(expected, abs=3e-3)
    # h_l along g_w: the loser's term helps the winner, nothing to restrict
    aligned = [w.clone() for w in g_w]
    lam, infeasible = update_space_lambda(OptimizerUpdate(optimizer, params, g_w, aligned, 1.0), 0.9)
    assert lam.item() == 1.0 and infeasible.item() == 0.0


def test_plain_sgd_update_space_is_the_parameter_space_rule():
    params, optimizer, g_w, h_l = _problem("sgd", seed=3, warm_steps=0)
    lam, _ = update_space_lambda(OptimizerUpdate(optimizer, params, g_w, h_l, 0.0), 0.5)
    ww = sum(float((w * w).sum()) for w in g_w)
    wl = sum(float((w * h).sum()) for w, h in zip(g_w, h_l))
    assert lam.item() == pytest.approx((1 - 0.5) * ww / -wl, abs=1e-3)


def test_momentum_that_already_raises_the_winner_is_counted_infeasible_with_the_best_lambda():
    params, optimizer, g_w, h_l = _problem("sgd-momentum", seed=4, warm_steps=0)
    for p, w in zip(params, g_w):  # a momentum buffer pointing up the winner's term
        optimizer.state[p]["momentum_buffer"] = -20.0 * w
    lam, infeasible = update_space_lambda(OptimizerUpdate(optimizer, params, g_w, h_l, 0.0), 0.5)
    lambdas = torch.linspace(0, 1, 9, dtype=torch.float64).tolist()
    decreases = _real_decreases(params, optimizer, g_w, h_l, lambdas, 0.0)
    assert max(decreases) < 0  # no lambda keeps the winner's term from rising
    assert infeasible.item() == 1.0
    assert lam.item() == pytest.approx(lambdas[max(range(9), key=decreases.__getitem__)])


def _reference_lambda(optimizer, params, g_w, h_l, mu, max_grad_norm, unscale=1.0, max_lambda=1.0):
    """The search of ``update_space_lambda`` written out plainly, independently of the implementation: ``D`` per
    weight tensor in float64 from the optimizer's formulas (torch's Adam/AdamW/SGD step, the clip coefficient from
    the combined gradient's norm), all 9 grid points, then 8 bisection steps from the largest satisfying one."""
    optimizer = getattr(optimizer, "optimizer", optimizer)
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    w = [unscale * x.double() for x in g_w]
    h = [unscale * x.double() for x in h_l]

    def decrease(lam: float) -> float:
        norm = sum(float(((a + lam * b) ** 2).sum()) for a, b in zip(w, h)) ** 0.5
        c = min(1.0, max_grad_norm / (norm + 1e-6)) if max_grad_norm > 0 else 1.0
        total = 0.0
        for p, a, b in zip(params, w, h):
            group, state = group_of[id(p)], optimizer.state.get(p, {})
            theta = p.detach().double()
            grad = c * (a + lam * b)
            if isinstance(optimizer, torch.optim.SGD):
                grad = grad + group["weight_decay"] * theta
                if group["momentum"]:
                    buf = state.get("momentum_buffer")
                    buf = grad if buf is None else group["momentum"] * buf.double() + (1 - group["dampening"]) * grad
                    grad = grad + group["momentum"] * buf if group["nesterov"] else buf
                step = -group["lr"] * grad
            else:
                if not isinstance(optimizer, torch.optim.AdamW):
                    grad = grad + group["weight_decay"] * theta
                beta1, beta2 = group["betas"]
                t = float(state.get("step", 0.0)) + 1
                m, v = (1 - beta1) * grad, (1 - beta2) * grad**2
                if "exp_avg" in state:
                    m, v = m + beta1 * state["exp_avg"].double(), v + beta2 * state["exp_avg_sq"].double()
                step = -group["lr"] / (1 - beta1**t) * m / (v.sqrt() / (1 - beta2**t) ** 0.5 + group["eps"])
                if isinstance(optimizer, torch.optim.AdamW):
                    step = step - group["lr"] * group["weight_decay"] * theta
            total -= float((a * step).sum())
        return total

    grid = [max_lambda * k / 8 for k in range(9)]
    values = [decrease(lam) for lam in grid]
    target = mu * max(values[0], 0.0)
    feasible = [k for k in range(9) if values[k] >= target]
    if not feasible:
        return grid[max(range(9), key=values.__getitem__)], True
    lo = grid[feasible[-1]]
    hi = grid[min(feasible[-1] + 1, 8)]
    if feasible[-1] == 8:
        return lo, False
    for _ in range(8):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if decrease(mid) >= target else (lo, mid)
    return lo, False


def _grouped_problem(kind: str, seed: int, conflict: float):
    """Weights of many sizes in two optimizer groups (another learning rate and weight decay), one weight a step
    behind the others (another bias correction), warmed state; ``g_w``, ``h_l`` in float64 as views of one flat
    buffer ``[2, total]``, as the one pass hands them over."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(40, 30), (7,), (3, 2, 2), (300,), (5,), (1,), (64, 9)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in shapes]
    groups = [{"params": params[::2]}, {"params": params[1::2], "lr": 3e-3, "weight_decay": 0.0}]
    if kind.startswith("sgd"):
        optimizer = torch.optim.SGD(groups, lr=0.05, momentum=0.9, nesterov=kind == "sgd-nesterov", weight_decay=0.01)
    else:
        cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
        optimizer = cls(groups, lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05)
    for step in range(3):
        for i, p in enumerate(params):
            p.grad = None if (i == 3 and step == 0) else 0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype)
        optimizer.step()
    sizes = [p.numel() for p in params]
    flat = torch.empty(2, sum(sizes), dtype=torch.float64)
    g_w = [v.view(s) for v, s in zip(flat[0].split(sizes), shapes)]
    h_l = [v.view(s) for v, s in zip(flat[1].split(sizes), shapes)]
    for w, h in zip(g_w, h_l):
        w.copy_(0.5 * torch.randn(w.shape, generator=gen, dtype=w.dtype))
        h.copy_(-conflict * w + 0.5 * torch.randn(w.shape, generator=gen, dtype=w.dtype))
    return params, optimizer, g_w, h_l


@pytest.mark.parametrize("kind", ["adamw", "adam", "sgd-momentum", "sgd-nesterov"])
@pytest.mark.parametrize("mu", [0.3, 0.9])
@pytest.mark.parametrize("max_grad_norm", [0.0, 2.0], ids=["unclipped", "clipped"])
@pytest.mark.parametrize("slice_size", [None, 16], ids=["one-slice", "many-slices"])
def test_the_search_equals_the_plain_reference_search_in_float64(kind, mu, max_grad_norm, slice_size, monkeypatch):
    """The vectorised search (segments of equal hyperparameters, slices that are views of the flat buffer or copies
    of small tensors, all lambdas of a grid in one pass, SGD's closed form) returns the lambda of the plain search
    above, within 1e-6 relative, for gradients in the backward's units (``unscale``)."""
    from trl_diffusion_sdpo.step import update_space

    if slice_size:  # large tensors split, small ones joined, runs that cross optimizer groups
        monkeypatch.setattr(update_space, "CPU_SLICE", slice_size)
    checked_binding = 0
    for seed, conflict in ((0, 1.5), (1, 0.8), (2, 3.0), (3, -0.5)):
        params, optimizer, g_w, h_l = _grouped_problem(kind, seed, conflict)
        update = OptimizerUpdate(optimizer, params, g_w, h_l, max_grad_norm, unscale=0.5)
        lam, infeasible = update_space_lambda(update, mu)
        expected, expected_infeasible = _reference_lambda(optimizer, params, g_w, h_l, mu, max_grad_norm, 0.5)
        assert lam.item() == pytest.approx(expected, rel=1e-6, abs=1e-12)
        assert bool(infeasible.item()) == expected_infeasible
        checked_binding += 0.0 < expected < 1.0
    assert checked_binding >= 2  # the margin binds in most of these: the bisection itself is compared


def test_unsupported_optimizers_are_refused_naming_the_supported_ones():
    params = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="Supported: torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD.*RMSprop"):
        OptimizerUpdate(torch.optim.RMSprop(params), params, [torch.ones(3)], [torch.ones(3)], 1.0)
    with pytest.raises(ValueError, match="amsgrad"):
        OptimizerUpdate(torch.optim.AdamW(params, amsgrad=True), params, [torch.ones(3)], [torch.ones(3)], 1.0)


def _stage_problem(seed: int = 5):
    """A linear "denoiser", a warmed SGD-momentum optimizer and a Diffusion-DPO loss over one pair batch."""
    from trl_diffusion_sdpo.objectives import PreferencePredictions, build_objective, denoising_error
    from trl_diffusion_sdpo.objectives.base import DenoisingErrors

    gen = torch.Generator().manual_seed(seed)
    policy = torch.nn.Linear(6, 5)
    with torch.no_grad():
        for p in policy.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        for p in policy.parameters():
            p.grad = 0.05 * torch.randn(p.shape, generator=gen)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # a micro-batch starts from empty gradients
    x_w, x_l, t_w, t_l = (torch.randn(3, *shape, generator=gen) for shape in [(6,), (6,), (5,), (5,)])
    ref_w, ref_l = t_w + 0.3 * torch.randn(3, 5, generator=gen), t_l + 0.3 * torch.randn(3, 5, generator=gen)
    objective = build_objective("dpo", beta=2.0)

    def predict(separate_branches: bool = True) -> PreferencePredictions:
        if separate_branches:
            return PreferencePredictions(policy(x_w), policy(x_l), t_w, t_l, ref_w, ref_l)
        both = policy(torch.cat([x_w, x_l]))
        return PreferencePredictions(both[:3], both[3:], t_w, t_l, ref_w, ref_l)

    def objective_loss(p: PreferencePredictions) -> torch.Tensor:
        errors = DenoisingErrors(*(denoising_error(a, b) for a, b in [(p.policy_winner, t_w), (p.policy_loser, t_l)]))
        errors.reference_winner, errors.reference_loser = denoising_error(ref_w, t_w), denoising_error(ref_l, t_l)
        return objective(p, errors).loss

    return policy, optimizer, predict, objective_loss


@pytest.mark.parametrize("clip", [0.0, 0.3], ids=["unclipped", "clipped"])
def test_the_backward_stage_takes_the_lambda_of_the_update_under_its_own_clipping_threshold(clip):
    """ParameterSpaceBackward(update_space=True) on one process: lambda is update_space_lambda of the optimizer's
    update built from the branch gradients computed here by autograd, under the stage's max_grad_norm (a fraction
    of the gradient's norm, so clipping binds: a stage that dropped the threshold picks another lambda), and
    ``.grad`` is ``scale * (g_w + lambda * h_l)``."""
    from trl_diffusion_sdpo.engines import PlainEngine
    from trl_diffusion_sdpo.step.parameter_space import ParameterSpaceBackward

    policy, optimizer, predict, objective_loss = _stage_problem()
    params = list(policy.parameters())
    out = predict()
    g_w = torch.autograd.grad(objective_loss(dataclasses.replace(out, policy_loser=out.policy_loser.detach())), params)
    h_l = torch.autograd.grad(
        objective_loss(dataclasses.replace(out, policy_winner=out.policy_winner.detach())), params
    )
    norm = sum(float(((w + h) ** 2).sum()) for w, h in zip(g_w, h_l)) ** 0.5
    max_grad_norm = clip * norm
    expected = {
        threshold: update_space_lambda(OptimizerUpdate(optimizer, params, g_w, h_l, threshold), 0.95)[0].item()
        for threshold in (0.0, max_grad_norm)
    }
    assert 0.0 < expected[max_grad_norm] < 1.0  # the margin binds
    if clip:
        assert abs(expected[max_grad_norm] - expected[0.0]) > 0.1  # and the threshold moves lambda (0.23 -> 0.44)

    stage = ParameterSpaceBackward(
        PlainEngine(SimpleNamespace(num_processes=1)), 0.95, 1.0, False, update_space=True, max_grad_norm=max_grad_norm
    )
    # scale 0.25 (an accumulation average): lambda is read in the optimizer's units, .grad stays in the backward's
    _, lam, _ = stage(policy, predict, objective_loss, torch.tensor(0.25), optimizer=optimizer)
    assert lam.item() == pytest.approx(expected[max_grad_norm], abs=1e-6)
    assert stage.infeasible.item() == 0.0
    for p, w, h in zip(params, g_w, h_l):
        torch.testing.assert_close(p.grad, 0.25 * (w + lam * h))
    with pytest.raises(ValueError, match="needs the optimizer"):
        stage(policy, predict, objective_loss, torch.tensor(1.0))


def test_sharding_engines_refuse_and_the_config_refuses_accumulation(make_config):
    with pytest.raises(ValueError, match="update.*not supported under deepspeed.*DDP"):
        DeepSpeedEngine(None, 2).check_update_space()
    with pytest.raises(ValueError, match="update.*not supported under fsdp2"):
        FSDP2Engine(None).check_update_space()
    with pytest.raises(ValueError, match="gradient_accumulation_steps=1"):
        make_config(safeguard_space="update", gradient_accumulation_steps=2)


# ---------------------------------------------------------------------------------------------- through the trainer


def test_trainer_lambda_matches_the_brute_force_over_its_own_optimizer(make_trainer):
    from test_parameter_safeguard import _drift, _explicit_branch_gradients, _trainer_inputs

    trainer = make_trainer(
        lora=True,
        safeguard=True,
        safeguard_space="update",
        safeguard_mu=0.5,
        proportion_empty_prompts=0.0,
        max_grad_norm=1.0,
    )
    model = trainer.model
    _drift(model)
    model.train()
    trainer.create_optimizer()
    inputs = _trainer_inputs(trainer)
    params, g_w, h_l = _explicit_branch_gradients(trainer, inputs)
    expected, _, _ = _brute_force(params, trainer.optimizer, g_w, h_l, 0.5, 1.0, points=401)
    assert expected is not None and 0.0 < expected < 1.0
    model.zero_grad(set_to_none=True)
    trainer.current_gradient_accumulation_steps = 1
    trainer.stages.draws.replay_step()
    trainer.training_step(model, inputs)
    lam = trainer._metrics["train"]["safeguard/lambda"][-1].item()
    assert lam == pytest.approx(expected, abs=4e-3)
    for p, w, h in zip(params, g_w, h_l):  # the gradient handed to the optimizer
        torch.testing.assert_close(p.grad, w + lam * h, rtol=1e-4, atol=1e-6)


def test_update_space_training_moves_the_weights_and_logs_lambda(make_trainer):
    trainer = make_trainer(lora=True, safeguard=True, safeguard_space="update", safeguard_mu=0.9, max_steps=3)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items() if "lora_B" in k}
    trainer.train()
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    logs = [entry for entry in trainer.state.log_history if "safeguard/lambda_mean" in entry]
    assert len(logs) == 3
    for entry in logs:
        assert 0.0 <= entry["safeguard/lambda_min"] <= entry["safeguard/lambda_max"] <= 1.0
        assert entry["safeguard/update_infeasible"] in (0.0, 1.0)
        assert "safeguard/output_lambda_mean" in entry


# ---------------------------------------------------------------------------------------------- DSPO in each space


def test_dspo_sd15_loser_branch_is_negligible_so_both_spaces_leave_the_update_unchanged(make_trainer):
    """At the authors' DSPO settings (sd15 form, beta 0.001, mu 0.2) the loser enters only through the margin ``u``,
    scaled by beta: its branch gradient is a tiny fraction of the winner's, the parameter-space (and update-space)
    rule finds nothing to restrict (lambda = 1), and whatever lambda a rule picks, the step changes by less than
    that fraction. docs/objectives.md: "DSPO and the safeguard"."""
    from test_parameter_safeguard import _drift, _explicit_branch_gradients, _trainer_inputs

    from trl_diffusion_sdpo.step.safeguard import gradient_dots, parameter_space_lambda

    trainer = make_trainer(
        lora=True,
        loss_type="dspo",
        dspo_form="sd15",
        beta=0.001,
        safeguard=True,
        safeguard_space="parameter",
        safeguard_mu=0.2,
        proportion_empty_prompts=0.0,
    )
    model = trainer.model
    _drift(model)
    model.train()
    params, g_w, h_l = _explicit_branch_gradients(trainer, _trainer_inputs(trainer))
    sq, cross = gradient_dots(g_w, h_l)
    loser_sq = sum(float((h.double() ** 2).sum()) for h in h_l)
    ratio = (loser_sq / float(sq)) ** 0.5
    assert ratio < 1e-4  # |h_l| / |g_w|
    assert parameter_space_lambda(sq, -cross, 0.2).item() == 1.0
    # any lambda in [0, 1] moves the combined gradient by at most |h_l|: below 1e-4 of it
    for lam in (0.0, 0.8):
        diff = sum(float((((1 - lam) * h.double()) ** 2).sum()) for h in h_l) ** 0.5
        total = sum(float(((w.double() + h.double()) ** 2).sum()) for w, h in zip(g_w, h_l)) ** 0.5
        assert diff / total < 1e-4
