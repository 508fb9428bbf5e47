"""The update space's workspace, kept across optimizer steps, gives each step's ``D(lambda)`` from that step's
optimizer state, never the moments it copied in a step before.

``OptimizerUpdate`` copies a run's AdamW moments into a workspace its caller keeps across steps (the update-space
stage does), and within one step reads them from there again at every evaluation. Over several real optimizer steps,
``D(lambda) = -<g_w, Delta(lambda)>`` through one kept workspace must equal an independent computation: a copy of the
optimizer, in that step's state, stepping on the clipped ``g_w + lambda h_l``. What the workspace holds is keyed by
the run it copied, and a run of a new step may sit where a freed one sat: a new step's update must renew the
workspace, checked directly with a run read again after it.
"""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch

from trl_diffusion_sdpo.safeguards.update_runs import UpdateWorkspace
from trl_diffusion_sdpo.safeguards.update_space import OptimizerUpdate

SHAPES = [(12, 10), (10,), (6, 12), (6,)]
POINTS = [0.0, 0.25, 0.5, 1.0]
MAX_NORM = 1.0
STEPS = 6


def trial_decrease(optimizer: torch.optim.AdamW, params, g_w, h_l, lam: float) -> float:
    """``-<g_w, Delta>``, ``Delta`` the update a copy of ``optimizer`` (its moments and step counts) applies to a copy
    of ``params`` given ``c (g_w + lambda h_l)``, ``c = min(1, MAX_NORM / (|g_w + lambda h_l| + 1e-6))``."""
    clones = [p.detach().clone().requires_grad_(True) for p in params]
    trial = torch.optim.AdamW(
        clones, **{k: v for k, v in optimizer.defaults.items() if k in ("lr", "betas", "eps", "weight_decay")}
    )
    state = copy.deepcopy(optimizer.state_dict())
    state["param_groups"][0]["params"] = list(range(len(clones)))
    trial.load_state_dict(state)
    gradient = [w + lam * h for w, h in zip(g_w, h_l)]
    norm = float(torch.cat([g.reshape(-1) for g in gradient]).norm())
    for clone, g in zip(clones, gradient):
        clone.grad = min(1.0, MAX_NORM / (norm + 1e-6)) * g
    trial.step()
    return -sum(float((w * (c.detach() - p.detach())).sum()) for w, c, p in zip(g_w, clones, params))


def test_a_workspace_kept_across_steps_reads_each_steps_optimizer_state() -> None:
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=generator, dtype=torch.float64)) for s in SHAPES]
    optimizer = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05)
    workspace = UpdateWorkspace()  # one for the whole run, as the update-space stage keeps it
    for step in range(STEPS):
        g_w = [0.5 * torch.randn(s, generator=generator, dtype=torch.float64) for s in SHAPES]
        h_l = [-0.6 * w + 0.5 * torch.randn(w.shape, generator=generator, dtype=w.dtype) for w in g_w]
        want = [trial_decrease(optimizer, params, g_w, h_l, lam) for lam in POINTS]
        # the step's update, built as the stage builds it each step and dropped after it: only the workspace stays
        got = OptimizerUpdate(optimizer, params, g_w, h_l, MAX_NORM, workspace=workspace).decreases(POINTS)
        assert got == pytest.approx(want, rel=1e-9, abs=1e-15), f"step {step}"
        for p, w, h in zip(params, g_w, h_l):  # the optimizer steps: its moments change
            p.grad = w + 0.5 * h
        optimizer.step()


def test_a_new_step_reads_a_run_afresh_though_the_workspace_held_it() -> None:
    """The workspace keys what it holds by the run it copied; Python may give a freed run's address to the next
    step's run, which then looks like one it holds. A new step's ``OptimizerUpdate`` renews the workspace, so a run
    read again after it is copied afresh from the optimizer's moments as they are now (AdamW updates them in
    place), not returned as the previous step left them."""
    generator = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, generator=generator, dtype=torch.float64)) for s in SHAPES]
    optimizer = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05)

    def step() -> None:
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator, dtype=p.dtype)
        optimizer.step()

    def gradients() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        g_w = [0.5 * torch.randn(s, generator=generator, dtype=torch.float64) for s in SHAPES]
        return g_w, [-0.6 * w + 0.5 * torch.randn(w.shape, generator=generator, dtype=w.dtype) for w in g_w]

    step()  # the moments exist
    workspace = UpdateWorkspace()
    first = OptimizerUpdate(optimizer, params, *gradients(), MAX_NORM, workspace=workspace)
    first.decreases(POINTS)  # copies the run's moments into the workspace
    (segment,) = first.segments
    (run,) = segment.runs
    assert run.first is not None
    held = workspace.read("first", run, run.first, first.dtype).clone()
    step()  # the moments change, in place
    moments = torch.cat([m.reshape(-1) for m in run.first])
    assert not torch.equal(held, moments)
    second = OptimizerUpdate(optimizer, params, *gradients(), MAX_NORM, workspace=workspace)  # the next step
    torch.testing.assert_close(workspace.read("first", run, run.first, second.dtype), moments, rtol=0, atol=0)


def test_a_new_work_buffer_frees_the_old_one_whatever_run_sizes_viewed_it() -> None:
    """The pass's temporaries are views of one work buffer, kept per run size; when the buffer is replaced (a larger
    run or pass asks for more), the views of every size made on the old one are dropped, so the old buffer is freed
    instead of staying alive beside the new one until the next step."""
    workspace = UpdateWorkspace()
    old = torch.zeros(3, 64)
    workspace.work_views(10, 3, old)
    workspace.work_views(20, 3, old)  # a second run size on the same buffer
    freed = weakref.ref(old)
    new = torch.zeros(3, 96)
    gradient, numerator, denominator = workspace.work_views(30, 3, new)
    del old
    gc.collect()
    assert freed() is None, "views of the replaced work buffer keep it alive"
    assert gradient.untyped_storage().data_ptr() == new.untyped_storage().data_ptr()
    assert gradient.shape == numerator.shape == denominator.shape == (3, 30)
    again = workspace.work_views(30, 3, new)  # the same buffer: the views kept
    assert again[0] is gradient
