"""A weight the backward does not reach in a one-pass micro-batch (a block skipped for this input) counts as a zero
gradient in the branches' inner products (against autograd's per-branch gradients), keeps an empty ``.grad`` as after
a plain backward, and adds nothing to an accumulation window's ``.grad``, whatever its rows' memory held before."""

from __future__ import annotations

import torch
from torch import nn

from trl_diffusion_sdpo.safeguards.gradients.one_pass import OnePassBranchGradients

ROWS = 6


class _TwoPaths(nn.Module):
    """``first``, then ``second`` only where asked: a micro-batch that skips ``second`` gives it no gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, through_second: bool) -> torch.Tensor:
        x = torch.tanh(self.first(x))
        return self.second(x) if through_second else x


def _branch_gradients(module: _TwoPaths, x, cotangent, through_second: bool) -> tuple[list, list]:
    """Autograd's winner and loser gradients per weight, each branch's rows alone (zeros where none reaches)."""
    params = list(module.parameters())
    half = ROWS // 2
    found = []
    for rows in (slice(0, half), slice(half, ROWS)):
        grads = torch.autograd.grad(module(x[rows], through_second), params, cotangent[rows], allow_unused=True)
        found.append([torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)])
    return found[0], found[1]


def _expected_sums(winner: list[torch.Tensor], loser: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return sum((w * w).sum() for w in winner), sum((w * h).sum() for w, h in zip(winner, loser))


def _micro_batch(store, module, gen, through_second: bool, lam: float) -> tuple[list, list]:
    """One tapped micro-batch, its sums checked against autograd's, combined into ``.grad``; autograd's gradients."""
    x = torch.randn(ROWS, 4, generator=gen, dtype=torch.float64)
    cotangent = torch.randn(ROWS, 4, generator=gen, dtype=torch.float64)
    with store.split(2):
        module(x, through_second).backward(cotangent)
    winner, loser = _branch_gradients(module, x, cotangent, through_second)
    expected_sq, expected_cross = _expected_sums(winner, loser)
    winner_sq, cross = store.branch_sums()
    torch.testing.assert_close(winner_sq.double(), expected_sq, rtol=1e-6, atol=0)
    torch.testing.assert_close(cross.double(), expected_cross, rtol=1e-6, atol=0)
    store.combine(torch.tensor(lam))
    assert store.reached == ([True] * 4 if through_second else [True, True, False, False])
    return winner, loser


def test_a_weight_no_gradient_reaches_keeps_an_empty_grad():
    torch.manual_seed(0)
    module = _TwoPaths().double()
    params = list(module.parameters())
    store = OnePassBranchGradients(module, params)
    gen = torch.Generator().manual_seed(1)
    for through_second in (True, False):  # the second micro-batch skips `second`
        for p in params:
            p.grad = None  # each micro-batch its own window
        winner, loser = _micro_batch(store, module, gen, through_second, 0.4)
        for p, w, h in zip(params, winner, loser):
            if through_second or p is module.first.weight or p is module.first.bias:
                torch.testing.assert_close(p.grad, w + 0.4 * h)
            else:
                assert p.grad is None  # as a plain backward leaves it: an optimizer skips the weight


def test_a_weight_no_gradient_reaches_adds_nothing_to_the_window(monkeypatch):
    """Within an accumulation window the second micro-batch's rows are fresh memory (the first's are ``.grad``
    now); fresh memory is filled with NaN here, as an allocator may leave anything in it: the unreached weight's rows
    must still read as zeros, and its ``.grad`` is the first micro-batch's alone."""
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: empty(*args, **kwargs).fill_(float("nan")))
    torch.manual_seed(0)
    module = _TwoPaths().double()
    params = list(module.parameters())
    store = OnePassBranchGradients(module, params)
    gen = torch.Generator().manual_seed(1)
    first_w, first_l = _micro_batch(store, module, gen, True, 0.4)
    second_w, second_l = _micro_batch(store, module, gen, False, 0.7)
    for p, w1, h1, w2, h2 in zip(params, first_w, first_l, second_w, second_l):
        torch.testing.assert_close(p.grad, w1 + 0.4 * h1 + w2 + 0.7 * h2)
