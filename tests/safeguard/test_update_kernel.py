"""The update space's compiled kernel: Adam's share of ``D`` for a run's ``lambda`` in one compiled function
(:class:`~trl_diffusion_sdpo.safeguards.update_space.CompiledShare`), used where :data:`KERNELS` names a backend (a
CUDA device: inductor) and here through dynamo's own ``"eager"`` backend, which captures the function as inductor does
but lowers nothing (inductor takes about 20 s a process on a CPU: its test is in the slow tier).

It must give the eager pieces' ``D`` within rounding, the search through it must keep its specification (the margin met
by a real optimizer step, a crossing within the resolution above), one compile must serve every later step, a backend
that cannot compile must leave the eager pieces in its place, and the step must read nothing back to the host."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator

import pytest
import torch
from torch._dynamo.utils import counters

from tests.helpers.host_reads import HostReadCounter, safeguard_host_reads
from tests.helpers.update_space_problems import _grouped_problem
from trl_diffusion_sdpo.safeguards import update_space
from trl_diffusion_sdpo.safeguards.crossing import RESOLUTION
from trl_diffusion_sdpo.safeguards.update_space import CompiledShare, OptimizerUpdate, update_space_lambda

BACKEND = "eager"  # dynamo's capture, nothing lowered: the kernel's graphs without a compiler's minutes
POINTS = torch.linspace(0.0, 1.0, 9, dtype=torch.float32)


@pytest.fixture(autouse=True)
def fresh_kernels(monkeypatch) -> Iterator[None]:
    """Each test compiles anew, within dynamo's budget of graphs per function (a process that trains compiles a few:
    with and without state, per-element ``eps`` or one), and with kernels of its own (none failed before it)."""
    monkeypatch.setattr(CompiledShare, "_by_backend", {})
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture
def many_runs(monkeypatch) -> None:
    """Runs of at most 16 elements: large weights alone, small ones joined, runs of one weight and of several (the
    per-element ``eps`` of weights a step apart)."""
    monkeypatch.setattr(update_space, "CPU_CHUNK", 16)


def _fresh_adamw(params: list[torch.nn.Parameter]) -> torch.optim.AdamW:
    return torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2, weight_decay=0.05)


@pytest.mark.parametrize("kind", ["adamw", "first-step"])
def test_the_compiled_kernel_gives_the_pieces_decreases_and_compiles_once(kind, many_runs):
    """``D`` at 9 ``lambda`` through the compiled kernel equals the eager pieces' within float64 rounding, with state
    (runs of one weight and of several, weights a step apart: per-element ``eps``) and without (the first step's
    ``G / (|G| + eps)``); with state, a second step (new moments, gradients and step counts, the same runs) compiles
    nothing."""
    params, optimizer, g_w, h_l = _grouped_problem("adamw", 4, 1.5)
    if kind == "first-step":
        optimizer = _fresh_adamw(params)
        params = optimizer.param_groups[0]["params"]
    for step in range(2 if kind == "adamw" else 1):
        pieces = OptimizerUpdate(optimizer, params, g_w, h_l, 2.0, unscale=0.5, kernel="pieces").decreases(POINTS)
        compiled = OptimizerUpdate(optimizer, params, g_w, h_l, 2.0, unscale=0.5, kernel=BACKEND)
        assert compiled.kernel is not None and compiled.kernel.backend == BACKEND
        fused = compiled.decreases(POINTS)
        assert CompiledShare.of(BACKEND).failure is None  # the kernel ran, not the eager pieces in its place
        torch.testing.assert_close(fused, pieces, rtol=1e-12, atol=1e-14)
        assert pieces.abs().min() > 1e-6  # values that tell a wrong share from a right one
        if step == 0:
            graphs = counters["stats"]["unique_graphs"]
            assert graphs >= 1
            for p in params:
                p.grad = torch.randn_like(p)
            optimizer.step()
            for w, h in zip(g_w, h_l):
                w.mul_(0.5)
                h.add_(w)
    if kind == "adamw":
        assert counters["stats"]["unique_graphs"] == graphs


def _real_decrease(optimizer, params, g_w, h_l, lam: float, max_grad_norm: float, unscale: float) -> float:
    """``-<g_w, Delta>`` (optimizer units) with ``Delta`` a float64 copy of ``optimizer``'s real step on the clipped
    ``unscale (g_w + lambda h_l)``: computed without the package."""
    opt = copy.deepcopy(optimizer)
    where = {id(p): (i, j) for i, group in enumerate(optimizer.param_groups) for j, p in enumerate(group["params"])}
    copies = [opt.param_groups[where[id(p)][0]]["params"][where[id(p)][1]] for p in params]
    for p, w, h in zip(copies, g_w, h_l):
        p.grad = unscale * (w.double() + lam * h.double())
    torch.nn.utils.clip_grad_norm_(copies, max_grad_norm)
    before = [p.detach().clone() for p in copies]
    opt.step()
    return -sum(float((unscale * w.double() * (p.detach() - b)).sum()) for w, p, b in zip(g_w, copies, before))


def test_the_search_through_the_kernel_meets_the_margin_within_its_resolution_reading_nothing(many_runs):
    """Adam (its L2 weight decay read from the weights): the ``lambda`` the search returns through the compiled kernel
    meets the margin under a real float64 optimizer step, a ``lambda`` at most ``RESOLUTION`` above it misses it (the
    search ran to its resolution), and nothing was read back to the host on the way."""
    mu, clip = 0.9, 2.0
    params, optimizer, g_w, h_l = _grouped_problem("adam", 2, 3.0)
    with HostReadCounter() as counter:
        unscale = torch.tensor(0.5, dtype=torch.float64)
        update = OptimizerUpdate(optimizer, params, g_w, h_l, clip, unscale=unscale, kernel=BACKEND)
        lam, infeasible = update_space_lambda(update, torch.tensor(mu))
    assert counter.reads == [] and CompiledShare.of(BACKEND).failure is None
    lam = lam.item()
    assert infeasible.item() == 0.0

    def real(x: float) -> float:
        return _real_decrease(optimizer, params, g_w, h_l, x, clip, 0.5)

    target = mu * max(real(0.0), 0.0)
    assert 0.0 < lam < 1.0 and real(lam) >= target * (1 - 1e-9)  # the margin binds, and holds
    above = [lam + RESOLUTION * k / 8 for k in range(1, 9)]
    assert min(real(x) for x in above) < target  # D falls below the target within the resolution above lam


def test_a_kernel_that_cannot_compile_leaves_the_eager_pieces_and_says_so_once(caplog):
    """A backend that raises: ``D`` is the eager pieces', one warning names why, and the kernel is not tried again."""
    tries = []

    def failing(graph, inputs):
        tries.append(graph)
        raise RuntimeError("no compiler on this machine")

    params, optimizer, g_w, h_l = _grouped_problem("adamw", 6, 1.5)
    pieces = OptimizerUpdate(optimizer, params, g_w, h_l, 2.0, kernel="pieces").decreases(POINTS)
    with caplog.at_level(logging.WARNING, logger=update_space.__name__):
        for _ in range(2):
            values = OptimizerUpdate(optimizer, params, g_w, h_l, 2.0, kernel=failing).decreases(POINTS)
            torch.testing.assert_close(values, pieces, rtol=0, atol=0)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "no compiler on this machine" in said[0] and "eager passes" in said[0], said
    assert len(tries) == 1 and CompiledShare.of(failing).failure is not None


def test_a_step_through_the_kernel_reads_no_more_values_back_than_diffusion_dpo(make_trainer, monkeypatch):
    """Full tuning's steady-state update-space step with the kernel on (as on a CUDA device) reads no more values
    back to the host than Diffusion-DPO's."""
    monkeypatch.setitem(update_space.KERNELS, "cpu", BACKEND)
    reads = safeguard_host_reads(make_trainer, ["none", "update"], lora=False)
    assert CompiledShare.of(BACKEND).failure is None and counters["stats"]["unique_graphs"] >= 1  # it ran
    assert len(reads["update"]) <= len(reads["none"]), reads


# slow: inductor's compile takes about 20 s a process on a CPU; the kernel's graphs and values are checked in the
# default tier through dynamo's eager backend (test_the_compiled_kernel_gives_the_pieces_decreases_and_compiles_once)
@pytest.mark.slow
def test_the_inductor_kernel_gives_the_pieces_decreases(many_runs):
    params, optimizer, g_w, h_l = _grouped_problem("adam", 7, 1.5)
    pieces = OptimizerUpdate(optimizer, params, g_w, h_l, 2.0, unscale=0.5, kernel="pieces").decreases(POINTS)
    fused = OptimizerUpdate(optimizer, params, g_w, h_l, 2.0, unscale=0.5, kernel="inductor").decreases(POINTS)
    assert CompiledShare.of("inductor").failure is None
    torch.testing.assert_close(fused, pieces, rtol=1e-10, atol=1e-12)
