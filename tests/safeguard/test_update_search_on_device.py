"""The update space's lambda search reads nothing back to the host between its passes.

With every way a tensor's value reaches Python (``Tensor.item``, ``tolist``, ``__float__``, ``__bool__``,
``__int__``, ``__index__``) made to raise and none of aten's host reads recorded by the profiler, the search
completes, and its lambda equals an independent
reference: a bisection on the host over the same float32 lattice, of ``D`` computed separately in float64 from the
optimizer's update rule."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.update_space_problems import _grouped_problem
from trl_diffusion_sdpo.safeguards.update_space import OptimizerUpdate, update_space_lambda

READS = ("item", "tolist", "__float__", "__bool__", "__int__", "__index__")
HOST_READS = ("aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal")


def _adamw_decrease(optimizer, params, g_w, h_l, max_norm: float, unscale: float):
    """``D(lambda) = -<g_w, Delta(lambda)>`` in float64 for ``torch.optim.AdamW`` with its state as it is: the
    clipped, unscaled gradient, then AdamW's update written out elementwise (decoupled weight decay)."""
    winner = torch.cat([w.reshape(-1) for w in g_w]) * unscale
    loser = torch.cat([h.reshape(-1) for h in h_l]) * unscale
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    group = optimizer.param_groups[0]
    beta1, beta2 = group["betas"]
    state = [optimizer.state[p] for p in params]
    m = torch.cat([s["exp_avg"].reshape(-1) for s in state])
    v = torch.cat([s["exp_avg_sq"].reshape(-1) for s in state])
    step = float(state[0]["step"]) + 1

    def decrease(lam: float) -> float:
        gradient = winner + lam * loser
        gradient = gradient * min(1.0, max_norm / (float(gradient.norm()) + 1e-6))
        m2 = beta1 * m + (1 - beta1) * gradient
        v2 = beta2 * v + (1 - beta2) * gradient * gradient
        update = -group["lr"] / (1 - beta1**step) * m2 / ((v2 / (1 - beta2**step)).sqrt() + group["eps"])
        update = update - group["lr"] * group["weight_decay"] * theta
        return -float((winner * update).sum())

    return decrease


def _reference_lambda(decrease, mu: float) -> float:
    """The largest lattice point meeting the target found by bisection on the host: ``max_lambda = 1`` where it
    meets it, else bisect between the largest of the nine grid points meeting it and the next, down to 1/2048."""
    lattice = [float(torch.tensor(k / 2048, dtype=torch.float32)) for k in range(2049)]
    target = mu * max(decrease(0.0), 0.0)
    grid = [decrease(lattice[256 * k]) >= target for k in range(9)]
    assert any(grid)
    if grid[-1]:
        return 1.0
    lo = 256 * max(k for k in range(9) if grid[k])
    hi = lo + 256
    while hi - lo > 1:
        middle = (lo + hi) // 2
        lo, hi = (middle, hi) if decrease(lattice[middle]) >= target else (lo, middle)
    return lattice[lo]


@pytest.mark.parametrize("seed,conflict", [(0, 1.5), (2, 3.0)])
def test_the_search_completes_with_every_host_read_refused_and_equals_a_host_bisection(seed, conflict, monkeypatch):
    params, optimizer, g_w, h_l = _grouped_problem("adamw", seed, conflict)
    optimizer = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)
    for _ in range(2):  # warmed moments, one optimizer group, one step count
        for p in params:
            p.grad = torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(seed))
        optimizer.step()
    mu, max_norm, unscale = 0.9, 2.0, 0.5
    reference = _reference_lambda(_adamw_decrease(optimizer, params, g_w, h_l, max_norm, unscale), mu)
    assert 0 < reference < 1  # the margin binds: the refinement decides the answer
    update = OptimizerUpdate(optimizer, params, g_w, h_l, max_norm, unscale=unscale)

    def refused(*args, **kwargs):
        raise AssertionError("a tensor's value was read back to the host during the search")

    with monkeypatch.context() as patched, torch.profiler.profile() as profile:
        for name in READS:
            patched.setattr(torch.Tensor, name, refused)
        lam, infeasible = update_space_lambda(update, mu)
    # nor inside torch: indexing with a tensor, for one, reads the index back without Python's __index__
    assert not [e.name for e in profile.events() if e.name in HOST_READS]
    assert lam.dtype == torch.float32 and lam.dim() == 0
    assert lam.item() == reference and infeasible.item() == 0.0


def test_gradients_in_two_interleaved_buffers_are_read_in_one_run_per_buffer():
    """The one pass's rows in two buffers (one per dtype of the layers' products) hold alternate weights: the update
    reads each buffer's weights as one run (not one run per change of buffer in weight order), and ``D`` equals that
    of the same gradients as tensors of their own."""
    shapes = [(40, 30), (7,), (3, 2, 2), (300,), (5,), (64, 9)]
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in shapes]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
    optimizer.step()
    own_w = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    own_h = [-w + 0.3 * torch.randn(w.shape, generator=gen, dtype=w.dtype) for w in own_w]
    buffers = [[k for k in range(len(shapes)) if k % 2 == b] for b in (0, 1)]  # alternate weights
    g_w, h_l = [None] * len(shapes), [None] * len(shapes)
    for members in buffers:
        sizes = [own_w[k].numel() for k in members]
        flat = torch.empty(2, sum(sizes), dtype=torch.float64)
        for k, w, h in zip(members, flat[0].split(sizes), flat[1].split(sizes)):
            g_w[k], h_l[k] = w.view(shapes[k]), h.view(shapes[k])
            g_w[k].copy_(own_w[k])
            h_l[k].copy_(own_h[k])
    lambdas = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    interleaved = OptimizerUpdate(optimizer, params, g_w, h_l, 0.0)
    assert [len(segment.runs) for segment in interleaved.segments] == [2]
    expected = OptimizerUpdate(optimizer, params, own_w, own_h, 0.0).winner_decreases(lambdas)
    torch.testing.assert_close(interleaved.winner_decreases(lambdas), expected, rtol=1e-12, atol=0)
