"""The update-space safeguard: lambda chosen on the optimizer's actual step, checked against real torch optimizer
steps in float64 over a fine grid of lambda (computed here, independently of the implementation)."""

from __future__ import annotations

import copy
import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

from tests.helpers.host_reads import HostReadCounter
from tests.helpers.update_space_problems import _counted, _grouped_problem
from trl_diffusion_sdpo.engines import DeepSpeedEngine, FSDP1Engine, FSDP2Engine
from trl_diffusion_sdpo.safeguards.crossing import RESOLUTION, last_crossing, schedule
from trl_diffusion_sdpo.safeguards.gradients import collectives_for
from trl_diffusion_sdpo.safeguards.update_space import OptimizerUpdate, UpdateSpaceRule, update_space_lambda

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
    copy of ``optimizer``'s state, the gradient ``g_w + lambda h_l`` clipped by ``clip_grad_norm_``. One copy of the
    optimizer (its own weights and state, promoted to float64) steps once per lambda, its weights and state put back
    to the copy's before each step."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    where = {id(p): (i, j) for i, group in enumerate(optimizer.param_groups) for j, p in enumerate(group["params"])}
    opt = copy.deepcopy(optimizer)
    params64 = [opt.param_groups[where[id(p)][0]]["params"][where[id(p)][1]] for p in params]
    for p in params64:
        p.data = p.data.double()
        for key, value in opt.state.get(p, {}).items():
            if key != "step" and torch.is_tensor(value):
                opt.state[p][key] = value.double()
    start = [
        (p.detach().clone(), {key: value.clone() if torch.is_tensor(value) else value for key, value in state.items()})
        for p, state in ((p, opt.state.get(p, {})) for p in params64)
    ]
    w64, h64 = [w.double() for w in g_w], [h.double() for h in h_l]
    out = []
    for lam in lambdas:
        for p, (before, state) in zip(params64, start):  # the copy's weights and state, as a fresh copy has them
            p.data.copy_(before)
            opt.state[p] = {key: value.clone() if torch.is_tensor(value) else value for key, value in state.items()}
        for p, w, h in zip(params64, w64, h64):
            p.grad = w + lam * h
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params64, max_grad_norm)
        opt.step()
        out.append(-sum(float((w * (p.detach() - b)).sum()) for w, p, (b, _) in zip(w64, params64, start)))
    return out


def _brute_force(params, optimizer, g_w, h_l, mu, max_grad_norm, points: int = 401):
    lambdas = torch.linspace(0, 1, points, dtype=torch.float64).tolist()
    decreases = _real_decreases(params, optimizer, g_w, h_l, lambdas, max_grad_norm)
    target = mu * max(decreases[0], 0.0)
    feasible = [lam for lam, d in zip(lambdas, decreases) if d >= target]
    return (max(feasible) if feasible else None), target, decreases


@pytest.mark.parametrize("kind", ["adamw", "adam", "sgd-momentum", "sgd-nesterov", "sgd"])
# every optimizer at mu 0.5, clipped and not, by default; mu 0 and 0.9 in the slow tier
@pytest.mark.parametrize(
    "mu", [pytest.param(0.0, marks=pytest.mark.slow), 0.5, pytest.param(0.9, marks=pytest.mark.slow)]
)
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


def _reference_decreases(optimizer, params, g_w, h_l, max_grad_norm, lambdas, unscale=1.0) -> torch.Tensor:
    """``D`` at each of ``lambdas``, written out plainly and independently of the implementation: per weight tensor in
    float64 from the optimizer's formulas (torch's Adam/AdamW/SGD step, the clip coefficient from the combined
    gradient's norm), all ``lambdas`` at once by broadcasting."""
    optimizer = getattr(optimizer, "optimizer", optimizer)
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    lam = torch.as_tensor(lambdas, dtype=torch.float64).reshape(-1, 1)
    w = [unscale * x.double().reshape(1, -1) for x in g_w]
    h = [unscale * x.double().reshape(1, -1) for x in h_l]
    norm = sum(((a + lam * b) ** 2).sum(1) for a, b in zip(w, h)).sqrt()
    c = (max_grad_norm / (norm + 1e-6)).clamp(max=1.0) if max_grad_norm > 0 else torch.ones_like(norm)
    total = torch.zeros(lam.shape[0], dtype=torch.float64)
    for p, a, b in zip(params, w, h):
        group, state = group_of[id(p)], optimizer.state.get(p, {})
        theta = p.detach().double().reshape(1, -1)
        grad = c.unsqueeze(1) * (a + lam * b)
        if isinstance(optimizer, torch.optim.SGD):
            grad = grad + group["weight_decay"] * theta
            if group["momentum"]:
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = grad
                else:
                    buf = group["momentum"] * buf.double().reshape(1, -1) + (1 - group["dampening"]) * grad
                grad = grad + group["momentum"] * buf if group["nesterov"] else buf
            step = -group["lr"] * grad
        else:
            if not isinstance(optimizer, torch.optim.AdamW):
                grad = grad + group["weight_decay"] * theta
            beta1, beta2 = group["betas"]
            t = float(state.get("step", 0.0)) + 1
            m, v = (1 - beta1) * grad, (1 - beta2) * grad**2
            if "exp_avg" in state:
                m = m + beta1 * state["exp_avg"].double().reshape(1, -1)
                v = v + beta2 * state["exp_avg_sq"].double().reshape(1, -1)
            step = -group["lr"] / (1 - beta1**t) * m / (v.sqrt() / (1 - beta2**t) ** 0.5 + group["eps"])
            if isinstance(optimizer, torch.optim.AdamW):
                step = step - group["lr"] * group["weight_decay"] * theta
        total -= (a * step).sum(1)
    return total


def _check_specification(decreases, lam: float, infeasible: bool, mu: float, max_lambda: float = 1.0) -> str:
    """``lam`` and ``infeasible`` against the search's specification, with ``decreases`` the reference ``D`` (a
    function of a list of lambdas); returns which case applied. Brute force over a fine float64 grid:

    * ``D(max) >= target``: ``lam = max``;
    * ``D(0) >= target > D(max)``: ``D(lam) >= target``, and ``D < target`` somewhere in ``(lam, lam + resolution]``
      (``lam`` lies within the resolution below a crossing); where the grid shows one crossing, ``lam`` is within the
      resolution below it (the crossing located by 60 bisections of the reference);
    * ``D(0) < target``: the 9-point grid; no point meets the target: ``infeasible`` and ``lam`` its best point; else
      the same crossing property between the largest grid point that meets it and the next.
    """
    resolution, tol = max_lambda / 2048, 1e-9
    first, last = decreases([0.0, max_lambda]).tolist()
    target = mu * max(first, 0.0)
    slack = tol * max(abs(target), 1e-12)
    if last >= target:
        assert lam == pytest.approx(max_lambda, abs=1e-7) and not infeasible
        return "unrestricted"
    lo, hi = 0.0, max_lambda
    if first < target:
        grid = [max_lambda * k / 8 for k in range(9)]
        values = decreases(grid).tolist()
        feasible = [k for k in range(9) if values[k] >= target]
        if not feasible:
            assert infeasible and lam == pytest.approx(grid[max(range(9), key=values.__getitem__)], abs=1e-7)
            return "infeasible"
        lo, hi = grid[feasible[-1]], grid[feasible[-1] + 1]
    assert not infeasible
    assert lo <= lam < hi
    assert float(decreases([lam])[0]) >= target - slack  # lam meets the margin
    beyond = decreases(torch.linspace(lam, lam + resolution, 65, dtype=torch.float64)[1:])
    assert bool((beyond < target + slack).any())  # and D misses it within the resolution above lam
    dense = torch.linspace(lo, hi, 2049, dtype=torch.float64)
    signs = decreases(dense) >= target
    if int((signs[1:] != signs[:-1]).sum()) == 1:  # one crossing: lam lies within the resolution below it
        k = int(torch.nonzero(signs[:-1] & ~signs[1:])[0])
        a, b = float(dense[k]), float(dense[k + 1])
        for _ in range(60):
            middle = (a + b) / 2
            a, b = (middle, b) if float(decreases([middle])[0]) >= target else (a, middle)
        assert a - resolution - 1e-9 <= lam <= a + 1e-9
    return "binding" if first >= target else "grid"


# Two corners of the grid by default (one slice, unclipped, mu 0.3; many slices, clipped, mu 0.9): each value of each
# axis once, each corner with an Adam and an SGD kind, each optimizer in one corner (and every optimizer clipped and
# unclipped in test_lambda_is_the_largest_meeting_the_margin_under_the_real_optimizer_step); the rest: slow.
SEARCH_DEFAULT = {
    (None, 0.0, 0.3): {"adam", "sgd-momentum"},
    (16, 2.0, 0.9): {"adamw", "sgd-nesterov"},
}
SEARCH_GRID = [
    pytest.param(
        kind,
        mu,
        clip,
        slices,
        marks=() if kind in SEARCH_DEFAULT.get((slices, clip, mu), ()) else pytest.mark.slow,
        id=f"{'many-runs' if slices else 'one-run'}-{'clipped' if clip else 'unclipped'}-{mu}-{kind}",
    )
    for slices in (None, 16)
    for clip in (0.0, 2.0)
    for mu in (0.3, 0.9)
    for kind in ("adamw", "adam", "sgd-momentum", "sgd-nesterov")
]


@pytest.mark.parametrize("kind,mu,max_grad_norm,slice_size", SEARCH_GRID)
def test_the_search_meets_its_specification_against_a_plain_float64_reference(
    kind, mu, max_grad_norm, slice_size, monkeypatch
):
    """The vectorised search (segments of equal hyperparameters, slices that are views of the flat buffer or copies
    of small tensors, a pass's lambdas together, SGD's closed form) returns a lambda that meets the margin and lies
    within max_lambda/2048 below a crossing of the plain reference ``D`` (brute force over a fine grid), for
    gradients in the backward's units (``unscale``), in the search's fixed schedule of passes."""
    from trl_diffusion_sdpo.safeguards import update_space

    if slice_size:  # many runs: large tensors alone, small ones joined, in every optimizer group
        monkeypatch.setattr(update_space, "CPU_CHUNK", slice_size)
    cases = []
    for seed, conflict in ((0, 1.5), (1, 0.8), (2, 3.0), (3, -0.5)):
        params, optimizer, g_w, h_l = _grouped_problem(kind, seed, conflict)
        update = OptimizerUpdate(optimizer, params, g_w, h_l, max_grad_norm, unscale=0.5)
        passes = _counted(update)
        lam, infeasible = update_space_lambda(update, mu)

        def decreases(lambdas, optimizer=optimizer, params=params, g_w=g_w, h_l=h_l):
            return _reference_decreases(optimizer, params, g_w, h_l, max_grad_norm, lambdas, unscale=0.5)

        cases.append(_check_specification(decreases, lam.item(), bool(infeasible.item()), mu))
        assert passes == schedule()  # fixed: the host never waits for D to choose the next pass
    assert cases.count("binding") >= 2  # the margin binds in most of these: the search itself is checked


def test_the_grid_finds_the_largest_feasible_region_where_the_winners_own_update_raises_its_term():
    """SGD with a momentum buffer that raises the winner's term (``D(0) < 0``, so the target is 0), a loser gradient
    along the winner's with a large orthogonal part, and clipping that starts halfway: ``D`` rises above 0, then
    falls below it again before ``max_lambda``. The 9-point grid finds the feasible region and the search the
    crossing at its right end (between 0.75 and 0.875), not the one at its left end."""
    param = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    optimizer = torch.optim.SGD([param], lr=1.0, momentum=0.9)
    optimizer.state[param]["momentum_buffer"] = torch.tensor([-1.2 / 0.9, 0.0], dtype=torch.float64)
    g_w, h_l = [torch.tensor([1.0, 0.0], dtype=torch.float64)], [torch.tensor([1.0, 3.0], dtype=torch.float64)]
    update = OptimizerUpdate(optimizer, [param], g_w, h_l, 2.0)
    lam, infeasible = update_space_lambda(update, 0.5)

    def decreases(lambdas):
        return _reference_decreases(optimizer, [param], g_w, h_l, 2.0, lambdas)

    assert decreases([0.0]).item() < 0 < decreases([0.5]).item() and decreases([1.0]).item() < 0
    assert _check_specification(decreases, lam.item(), bool(infeasible.item()), 0.5) == "grid"
    assert 0.75 <= lam.item() < 0.875


def _float32_exact(x: float) -> bool:
    return float(torch.tensor(x, dtype=torch.float32)) == x


SHAPES_OF_F = {  # f decreasing through 0 (or not monotone), on [0, 1]
    "linear": lambda x: 0.3 - x,
    "sigmoid": lambda x: 1 / (1 + math.exp(12 * (x - 0.6))) - 0.5,
    "sqrt": lambda x: 0.5 - math.sqrt(x),
    "exponential": lambda x: math.exp(-8 * x) - 0.1,
    "step": lambda x: 1.0 if x < 0.3 else -1.0,
    "steep": lambda x: math.atan(200 * (0.37 - x)),
    "two crossings": lambda x: math.cos(9 * x),
    "flat then down": lambda x: 1e-3 if x < 0.9 else -1.0,
}


def _tensor_f(f, passes: list[list[float]]):
    """``f`` over a tensor of float32 points, the points of each pass recorded."""

    def evaluate(points: torch.Tensor) -> torch.Tensor:
        xs = points.tolist()
        passes.append(xs)
        return torch.tensor([f(x) for x in xs], dtype=torch.float64)

    return evaluate


@pytest.mark.parametrize("shape", list(SHAPES_OF_F))
@pytest.mark.parametrize("top", [1.0, 4.0])
def test_the_last_crossing_is_certified_within_the_resolution(shape, top):
    """Whatever the shape, the answer ``x`` meets the target (0), and the next point evaluated above it, at most
    ``top * RESOLUTION`` above, misses it; ``x`` lies in the bracket of the largest grid point meeting the target;
    every point is a float32 number; the passes are the fixed schedule (9, then 7, 7, 7 points)."""
    f = lambda x: SHAPES_OF_F[shape](x / top)  # noqa: E731
    passes: list[list[float]] = []
    x, infeasible = last_crossing(_tensor_f(f, passes), top, lambda first: first * 0, torch.device("cpu"))
    x = x.item()
    evaluated = sorted({p for points in passes for p in points})
    grid = [top * k / 8 for k in range(9)]
    assert [len(points) for points in passes] == schedule() and passes[0] == grid
    assert infeasible.item() == 0.0 and all(_float32_exact(p) for p in evaluated)
    k = max(i for i in range(8) if f(grid[i]) >= 0)
    assert x in evaluated and f(x) >= 0 and grid[k] <= x < grid[k + 1]
    above = min([p for p in evaluated if p > x] + [grid[k + 1]])
    assert f(above) < 0 and above - x <= top * RESOLUTION


def test_the_grid_alone_answers_where_the_top_meets_the_target_or_no_grid_point_does():
    """``f(top) >= target``: ``top``; no grid point meets it: the grid point with the largest ``f``, counted as
    infeasible, even where a point between grid points would meet it (the later passes leave the answer)."""
    passes: list[list[float]] = []
    x, infeasible = last_crossing(_tensor_f(lambda v: 1 - v, passes), 1.0, lambda first: first * 0, "cpu")
    assert x.item() == 1.0 and infeasible.item() == 0.0 and len(passes) == len(schedule())
    dip = lambda v: -1.0 + 2.1 * math.exp(-((v - 0.3) ** 2) / 1e-4) - 0.2 * abs(v - 0.625)  # noqa: E731
    assert dip(0.3) > 0 and max(dip(k / 8) for k in range(9)) < 0
    x, infeasible = last_crossing(_tensor_f(dip, []), 1.0, lambda first: first * 0, "cpu")
    assert x.item() == 0.625 and infeasible.item() == 1.0


@pytest.mark.parametrize("kind", ["adamw", "sgd-momentum"])
def test_the_search_reads_nothing_back_to_the_host(kind):
    """The rule from the branches' gradients to ``lambda``, with a device ``mu`` (``safeguard_mu="auto"``'s): no
    ``.item()``, ``.tolist()``, ``bool()``, ``float()`` or ``.cpu()`` of a tensor, in the update's preparation (the
    clip coefficient's sums, Adam's step counts) or between the search's passes."""
    params, optimizer, g_w, h_l = _grouped_problem(kind, 2, 3.0)
    with HostReadCounter() as counter:
        update = OptimizerUpdate(optimizer, params, g_w, h_l, 2.0, unscale=torch.tensor(0.5, dtype=torch.float64))
        lam, infeasible = update_space_lambda(update, torch.tensor(0.9))
    assert counter.reads == []
    assert 0 < lam.item() < 1 and infeasible.item() == 0.0  # the search ran: the margin binds


def test_an_affine_update_under_clipping_meets_the_specification():
    """Plain SGD with momentum state and clipping that binds: ``D(lambda) = a + c(lambda) (b + d lambda)``, the clip
    coefficient formed on the device from the three sums; the search's lambda meets its specification against the
    reference (a clip coefficient left out, or taken at lambda 0 only, moves the crossing)."""
    params, optimizer, g_w, h_l = _grouped_problem("sgd-momentum", 2, 3.0)
    update = OptimizerUpdate(optimizer, params, g_w, h_l, 2.0, unscale=0.5)
    assert float(update.clip_coefficient(torch.tensor(0.0))) < 1  # clipping binds
    lam, infeasible = update_space_lambda(update, 0.9)

    def decreases(lambdas):
        return _reference_decreases(optimizer, params, g_w, h_l, 2.0, lambdas, unscale=0.5)

    assert _check_specification(decreases, lam.item(), bool(infeasible.item()), 0.9) == "binding"


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
    """The update space's rule on ParameterSpaceBackward(update_space=True)'s branches on one process: lambda is
    update_space_lambda of the optimizer's update built from the branch gradients computed here by autograd, under the
    rule's max_grad_norm (a fraction of the gradient's norm, so clipping binds: a rule that dropped the threshold picks
    another lambda), and
    ``.grad`` is ``scale * (g_w + lambda * h_l)``."""
    from trl_diffusion_sdpo.engines import PlainEngine
    from trl_diffusion_sdpo.safeguards.parameter import ParameterSpaceBackward

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

    stage = ParameterSpaceBackward(PlainEngine(SimpleNamespace(num_processes=1)), 0.95, 1.0, False, update_space=True)
    rule = UpdateSpaceRule(stage.collectives, stage.margin, 1.0, max_grad_norm)
    # scale 0.25 (an accumulation average): lambda is read in the optimizer's units, .grad stays in the backward's
    _, lam, _ = stage(policy, predict, objective_loss, torch.tensor(0.25), optimizer=optimizer, rule=rule)
    assert lam.item() == pytest.approx(expected[max_grad_norm], abs=1e-6)
    assert rule.infeasible.item() == 0.0
    for p, w, h in zip(params, g_w, h_l):
        torch.testing.assert_close(p.grad, 0.25 * (w + lam * h))
    with pytest.raises(ValueError, match="needs the optimizer"):
        stage(policy, predict, objective_loss, torch.tensor(1.0), rule=rule)


def test_the_search_and_the_backward_stage_reach_safeguard_max_lambda_above_1():
    """``safeguard_max_lambda=4``: where the margin binds between 1 and 4, the search's lambda meets its specification
    against the real optimizer's ``D`` over ``[0, 4]``, and the rule on the backward stage's branches searches up to
    its own max_lambda (a search capped at 1, or a rule that left the default, returns 1)."""
    from trl_diffusion_sdpo.engines import PlainEngine
    from trl_diffusion_sdpo.safeguards.parameter import ParameterSpaceBackward

    params, optimizer, g_w, h_l = _problem("adamw", seed=1, warm_steps=2, conflict=0.2)
    lam, infeasible = update_space_lambda(OptimizerUpdate(optimizer, params, g_w, h_l, 0.0), 0.5, 4.0)

    def decreases(lambdas):
        return torch.tensor(_real_decreases(params, optimizer, g_w, h_l, list(lambdas), 0.0), dtype=torch.float64)

    assert _check_specification(decreases, lam.item(), bool(infeasible.item()), 0.5, max_lambda=4.0) == "binding"
    assert 1.5 < lam.item() < 4.0

    policy, optimizer, predict, objective_loss = _stage_problem()
    stage = ParameterSpaceBackward(PlainEngine(SimpleNamespace(num_processes=1)), 0.5, 4.0, False, update_space=True)
    rule = UpdateSpaceRule(stage.collectives, stage.margin, 4.0, 0.0)
    _, lam, _ = stage(policy, predict, objective_loss, torch.tensor(1.0), optimizer=optimizer, rule=rule)
    assert 2.0 < lam.item() < 4.0  # 2.34: the margin binds above 1


def test_fsdp1_refuses_and_the_config_refuses_accumulation(make_config):
    with pytest.raises(ValueError, match="update.*not supported under FSDP1.*FSDP2.*DDP.*DeepSpeed ZeRO"):
        collectives_for(FSDP1Engine(None)).check_update_space()
    # on its shards (test_update_space_sharded.py) and on ZeRO's partitions (test_one_pass_engines.py)
    collectives_for(FSDP2Engine(None)).check_update_space()
    for stage in (1, 2, 3):
        collectives_for(DeepSpeedEngine(SimpleNamespace(num_processes=2), stage)).check_update_space()
    with pytest.raises(ValueError, match="gradient_accumulation_steps=1"):
        make_config(safeguard_space="update", gradient_accumulation_steps=2)


# ---------------------------------------------------------------------------------------------- through the trainer


def test_trainer_lambda_matches_the_brute_force_over_its_own_optimizer(make_trainer):
    from tests.helpers.parameter_safeguard import _drift, _explicit_branch_gradients, _trainer_inputs, replay_draws

    trainer = make_trainer(
        lora=True,
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
    replay_draws(trainer)
    trainer.training_step(model, inputs)
    lam = trainer._metrics["train"]["safeguard/lambda"][-1].item()
    assert lam == pytest.approx(expected, abs=4e-3)
    for p, w, h in zip(params, g_w, h_l):  # the gradient handed to the optimizer
        torch.testing.assert_close(p.grad, w + lam * h, rtol=1e-4, atol=1e-6)


def test_update_space_training_moves_the_weights_and_logs_lambda(make_trainer):
    trainer = make_trainer(lora=True, safeguard_space="update", safeguard_mu=0.9, max_steps=3)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items() if "lora_B" in k}
    trainer.train()
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    logs = [entry for entry in trainer.state.log_history if "safeguard/lambda_mean" in entry]
    assert len(logs) == 3
    for entry in logs:
        assert 0.0 <= entry["safeguard/lambda_min"] <= entry["safeguard/lambda_max"] <= 1.0
        assert entry["safeguard/update_infeasible"] in (0.0, 1.0)
        assert "safeguard/output_lambda_mean" not in entry  # logged only with log_output_lambda


# ---------------------------------------------------------------------------------------------- DSPO in each space


def test_dspo_sd15_loser_branch_is_negligible_so_both_spaces_leave_the_update_unchanged(make_trainer):
    """At the authors' DSPO settings (sd15 form, beta 0.001, mu 0.2) the loser enters only through the margin ``u``,
    scaled by beta: its branch gradient is a tiny fraction of the winner's, the parameter-space (and update-space)
    rule finds nothing to restrict (lambda = 1), and whatever lambda a rule picks, the step changes by less than
    that fraction. docs/objectives.md: "DSPO and the safeguard"."""
    from tests.helpers.parameter_safeguard import _drift, _explicit_branch_gradients, _trainer_inputs
    from trl_diffusion_sdpo.safeguards.parameter import gradient_dots, parameter_space_lambda

    trainer = make_trainer(
        lora=True,
        loss_type="dspo",
        dspo_form="sd15",
        beta=0.001,
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
    assert parameter_space_lambda(sq, cross, 0.2).item() == 1.0
    # any lambda in [0, 1] moves the combined gradient by at most |h_l|: below 1e-4 of it
    for lam in (0.0, 0.8):
        diff = sum(float((((1 - lam) * h.double()) ** 2).sum()) for h in h_l) ** 0.5
        total = sum(float(((w.double() + h.double()) ** 2).sum()) for w, h in zip(g_w, h_l)) ** 0.5
        assert diff / total < 1e-4


@pytest.mark.parametrize("kind", ["adamw", "sgd-momentum"])
def test_separate_partitions_give_the_sums_of_one_buffer(kind):
    """Gradients handed as separate tensors (ZeRO's flat partitions, one per parameter group) give the clipping sums
    (and SGD's) bit for bit as the same gradients in one ``[2, total]`` buffer (the one pass's): both are summed the
    same way (float32 blocks added in float64). A float32 dot over a partition would round otherwise, and two
    processes' partitions would then pick another clip coefficient, hence another ``lambda``, than one process's
    buffer. The sums are those of the gradients (float64, within float32 blocks' rounding)."""
    gen = torch.Generator().manual_seed(3)
    sizes = (400_000, 100_000)
    total = sum(sizes)
    buffer = torch.randn(2, total, generator=gen)
    buffer[1] = -buffer[0] * (0.2 + torch.randn(total, generator=gen))  # <g_w, h_l> a fifth of its terms' size
    views = [buffer[:, a : a + n] for a, n in zip((0, sizes[0]), sizes)]
    sums = {}
    for layout in ("buffer", "partitions"):
        params = [torch.nn.Parameter(torch.zeros(n)) for n in sizes]
        if layout == "buffer":
            g_w, h_l = [v[0] for v in views], [v[1] for v in views]
        else:
            g_w, h_l = [v[0].clone() for v in views], [v[1].clone() for v in views]
        update = OptimizerUpdate(_optimizer(kind, params), params, g_w, h_l, max_grad_norm=1.0)
        sums[layout] = [float(update.ww), float(update.wl), float(update.ll)]
        if kind.startswith("sgd"):
            sums[layout] += [float(v) for segment in update.segments for v in segment.sums.values()]
    assert sums["partitions"] == sums["buffer"]
    exact = buffer.double()
    expected = [float(exact[0] @ exact[0]), float(exact[0] @ exact[1]), float(exact[1] @ exact[1])]
    assert sums["buffer"][:3] == pytest.approx(expected, rel=1e-5)
