"""A weight neither branch's pass reaches in a micro-batch (a block skipped for this input) keeps an empty ``.grad`` on
the per-branch route, as after a plain backward, also where an earlier micro-batch reached it: an optimizer then skips
the weight (a zero gradient would still move it through AdamW's moments and weight decay)."""

from __future__ import annotations

import torch
from torch import nn

from trl_diffusion_sdpo.safeguards.gradients.per_branch import BranchGradientSplitter

ROWS = 6


class _TwoPaths(nn.Module):
    """``first``, then ``second`` only where asked: a micro-batch that skips ``second`` gives it no gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, through_second: bool) -> torch.Tensor:
        x = torch.tanh(self.first(x))
        return self.second(x) if through_second else x


def _autograd_branches(module: _TwoPaths, x, cotangent, through_second: bool) -> list[list[torch.Tensor | None]]:
    """Autograd's winner and loser gradients per weight, each branch's rows alone (``None`` where none reaches)."""
    params = list(module.parameters())
    half = ROWS // 2
    return [
        list(torch.autograd.grad(module(x[rows], through_second), params, cotangent[rows], allow_unused=True))
        for rows in (slice(0, half), slice(half, ROWS))
    ]


def test_a_weight_no_branch_reaches_keeps_an_empty_grad_on_the_per_branch_route():
    torch.manual_seed(0)
    module = _TwoPaths().double()
    params = list(module.parameters())
    store = BranchGradientSplitter(params)
    gen = torch.Generator().manual_seed(1)
    lam, half = 0.4, ROWS // 2
    for through_second in (True, False, True):  # the second micro-batch skips `second`, the third reaches it again
        for p in params:
            p.grad = None  # each micro-batch its own window: the per-branch passes start from empty gradients
        x = torch.randn(ROWS, 4, generator=gen, dtype=torch.float64)
        cotangent = torch.randn(ROWS, 4, generator=gen, dtype=torch.float64)
        winner_sq = store.backward_winner(module(x[:half], through_second), cotangent[:half])
        cross = store.backward_loser(module(x[half:], through_second), cotangent[half:])
        store.combine(torch.tensor(lam, dtype=torch.float64))
        winner, loser = _autograd_branches(module, x, cotangent, through_second)
        expected_sq = sum((w * w).sum() for w in winner if w is not None)
        expected_cross = sum((w * h).sum() for w, h in zip(winner, loser) if w is not None)
        torch.testing.assert_close(winner_sq.double(), expected_sq, rtol=1e-6, atol=0)
        torch.testing.assert_close(cross.double(), expected_cross, rtol=1e-6, atol=0)
        for p, w, h in zip(params, winner, loser):
            if w is None and h is None:
                assert p.grad is None  # as a plain backward leaves it: an optimizer skips the weight
            else:
                torch.testing.assert_close(p.grad, w + lam * h)
