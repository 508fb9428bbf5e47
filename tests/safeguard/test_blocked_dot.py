"""``blocked_dot``: the safeguard's inner products over the flat per-branch gradient buffer."""

from __future__ import annotations

import pytest
import torch

from trl_diffusion_sdpo.safeguards.gradients import one_pass
from trl_diffusion_sdpo.safeguards.gradients.one_pass import blocked_dot


@pytest.mark.parametrize("long_rows", [False, True])
@pytest.mark.parametrize("n", [5, 1000, 70_001])
def test_blocked_dot_equals_the_float64_dot_on_both_routes(n, long_rows, monkeypatch):
    """Both routes (the batched view, and the per-row route rows longer than a 32-bit leading dimension take on CUDA)
    give the float64 dot products, per row and for a flat vector."""
    if long_rows:  # rows of n elements count as "longer than 2^31" here
        monkeypatch.setattr(one_pass, "LONG_ROWS", n - 1)
    generator = torch.Generator().manual_seed(n)
    a = torch.randn(n, generator=generator)
    rows = torch.randn(3, n, generator=generator)
    expected = rows.double() @ a.double()
    # float32 products summed per block: an error of order eps * |a| |row|, far below a wrong or missing block
    scale = 1e-6 * a.double().norm() * rows.double().norm(dim=1)
    got = blocked_dot(a, rows, block=64)
    assert got.dtype == torch.float64 and got.shape == (3,)
    assert ((got - expected).abs() <= scale).all(), (got, expected)
    assert (blocked_dot(a, rows[1], block=64) - expected[1]).abs() <= scale[1]


def test_bfloat16_rows_are_multiplied_and_summed_in_float32(monkeypatch):
    """bfloat16 rows (the one pass's rows for bfloat16 weights) are widened in pieces: the inner products equal the
    float64 ones of the same bfloat16 values within float32's precision, where a bfloat16 product would round each
    block's sum to 8 bits."""
    from trl_diffusion_sdpo.safeguards.gradients import one_pass

    monkeypatch.setattr(one_pass, "WIDENED_PIECE", 1000)  # several pieces, the last one short
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4321, generator=gen).bfloat16()
    rows = torch.randn(2, 4321, generator=gen).bfloat16()
    exact = rows.double() @ a.double()
    got = one_pass.blocked_dot(a, rows)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, exact, rtol=1e-6, atol=1e-6 * float(exact.abs().max()))
    assert (torch.bmm(rows.view(2, 1, -1), a.view(1, -1, 1).expand(2, -1, 1)).double().view(2) - exact).abs().max() > 0


def test_bfloat16_rows_cost_a_bounded_number_of_operations_at_sd15_size():
    """The host work of the one pass's inner products (``branch_sums``: one ``blocked_dot`` per piece of rows) does
    not grow with the element count when the rows are bfloat16 (bf16 autocast): on SD1.5's 860M trained weights, cut
    into the store's pieces, at most four times the operations float32 rows take (widening in 1M-element pieces made
    it 55 times: about 10,000 operations a step, each a kernel launch on a GPU). Meta tensors: the operations are
    dispatched, nothing is computed."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from trl_diffusion_sdpo.engines.memory.pieces import piece_count
    from trl_diffusion_sdpo.safeguards.gradients.one_pass import blocked_dot

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.operations = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.operations += 1
            return func(*args, **(kwargs or {}))

    elements = 859_520_964  # SD1.5's UNet
    count = piece_count(elements)
    operations = {}
    for dtype in (torch.float32, torch.bfloat16):
        pieces = [torch.empty(2, elements // count, dtype=dtype, device="meta") for _ in range(count)]
        with Count() as counter:
            for piece in pieces:
                blocked_dot(piece[0], piece)
        operations[dtype] = counter.operations
    assert operations[torch.float32] <= 20 * count, operations
    assert operations[torch.bfloat16] <= 4 * operations[torch.float32], operations
