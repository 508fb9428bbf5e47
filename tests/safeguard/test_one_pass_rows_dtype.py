"""The one pass's rows under bf16 autocast hold what the taps form, in the dtype they form it: a linear or convolution
layer's weight gradient is a bf16 matmul's output, so its rows are bf16; a norm's affine gradient is formed in
float32 (CPU autocast hands the norm a bf16 input and float32 weights), so its rows stay float32.

Against the per-branch passes (``per_branch.py``: one forward and one autograd backward per branch, the reference
implementation of the split), on a small network of convolutions, a GroupNorm, a LayerNorm and linear layers under
CPU bf16 autocast with fixed output cotangents: every bf16 row equals the per-branch gradient bit for bit (the same
bf16 products, stored in the dtype they were made in, then widened exactly). The float32 rows of the norms' affines
are checked to float32 rounding only: a GroupNorm's affine gradient over the loser's rows can differ from autograd's
in its last bits, although the forward outputs are bitwise equal and the tap alone on a group's rows is exact (the
norm's backward is aten's over the same rows in either pass; the operands reaching it through the batched pass are
laid out differently).
"""

from __future__ import annotations

import torch
from torch import nn

from trl_diffusion_sdpo.safeguards.gradients.one_pass import OnePassBranchGradients
from trl_diffusion_sdpo.safeguards.gradients.per_branch import BranchGradientSplitter

PAIRS = 4


def network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1),
        nn.GroupNorm(2, 8),
        nn.SiLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 16),
        nn.LayerNorm(16),
        nn.Linear(16, 8),
    )


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """``PAIRS`` winners then ``PAIRS`` losers, and fixed cotangents for the network's outputs."""
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2 * PAIRS, 4, 6, 6, generator=generator), torch.randn(2 * PAIRS, 8, generator=generator)


def one_pass_rows(model: nn.Module, store: OnePassBranchGradients, x, cotangents):
    """One tapped bf16 pass over both branches: ``(g_w, h_l)`` per weight, views of the store's rows."""
    with store.split(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        cot = cotangents.to(out.dtype)
        torch.autograd.backward((out[:PAIRS], out[PAIRS:]), (cot[:PAIRS], cot[PAIRS:]))
    return store.branch_gradients()


def per_branch_gradients(model: nn.Module, x, cotangents):
    """The per-branch passes' ``(g_w, h_l)`` under the same autocast (``BranchGradientSplitter``)."""
    params = list(model.parameters())
    for p in params:
        p.grad = None
    reference = BranchGradientSplitter(params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        winner, loser = model(x[:PAIRS]), model(x[PAIRS:])
    reference.backward_winner(winner, cotangents[:PAIRS].to(winner.dtype))
    reference.backward_loser(loser, cotangents[PAIRS:].to(loser.dtype))
    g_w, h_l = reference.branch_gradients()
    return [g.clone() for g in g_w], [h.clone() for h in h_l]


def _is_norm(name: str, model: nn.Module) -> bool:
    return isinstance(model.get_submodule(name.rsplit(".", 1)[0]), (nn.GroupNorm, nn.LayerNorm))


def test_under_bf16_autocast_the_rows_are_bf16_products_equal_to_the_per_branch_passes():
    """The store's first pass notes each weight's products' dtype (its rows still float32, holding the bf16 products
    exactly); from the second pass the linear and convolution weights' rows are bf16 and the norms' float32, and
    every bf16 row equals the per-branch passes' gradient bit for bit, in both passes."""
    model = network()
    x, cotangents = batch()
    names = [name for name, _ in model.named_parameters()]
    store = OnePassBranchGradients(model, list(model.parameters()))
    g_ref, h_ref = per_branch_gradients(model, x, cotangents)
    for step in range(2):
        g_w, h_l = one_pass_rows(model, store, x, cotangents)
        dtypes = {name: row.dtype for name, row in zip(names, g_w)}
        if step == 0:
            assert set(dtypes.values()) == {torch.float32}  # the first pass: the default dtype
        else:
            assert {name: d for name, d in dtypes.items() if _is_norm(name, model)} == dict.fromkeys(
                [name for name in names if _is_norm(name, model)], torch.float32
            )
            assert {d for name, d in dtypes.items() if not _is_norm(name, model)} == {torch.bfloat16}, dtypes
        for name, mine_w, mine_h, ref_w, ref_h in zip(names, g_w, h_l, g_ref, h_ref):
            if _is_norm(name, model):  # formed in float32: float32 rounding (see the module docstring)
                torch.testing.assert_close(mine_w.float(), ref_w, rtol=1e-5, atol=1e-6 * float(ref_w.abs().max()))
                torch.testing.assert_close(mine_h.float(), ref_h, rtol=1e-5, atol=1e-6 * float(ref_h.abs().max()))
            else:
                assert torch.equal(mine_w.float(), ref_w), name
                assert torch.equal(mine_h.float(), ref_h), name
        store.release()


def test_the_per_pair_combination_of_bf16_rows_is_formed_in_float32():
    """By image (the per-pair scope) under bf16 autocast, from the second pass: the combination
    ``sum_i (g_w,i + lambda_i h_l,i)`` of the bf16 rows, in the weights' float32, equals the same sum of the rows
    widened and added in float64 to float32 rounding; the rows' memory is given back as it is read."""
    model = network()
    x, cotangents = batch()
    params = list(model.parameters())
    store = OnePassBranchGradients(model, params)
    lam = torch.linspace(0.2, 0.9, PAIRS)
    for _ in range(2):
        store.release()
        with store.split(2 * PAIRS):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
            out.backward(cotangents.to(out.dtype))
    images = [store.row_views(k) for k in range(2 * PAIRS)]  # per image, per weight: before the combination
    rows = [torch.stack([image[i] for image in images]).double() for i in range(len(params))]
    assert torch.bfloat16 in {piece.dtype for piece in store.pieces}
    combined = store.pair_combination(lam)
    assert all(piece.untyped_storage().nbytes() == 0 for piece in store.pieces)
    weights = torch.cat([torch.ones(PAIRS), lam.double()])
    for c, r in zip(combined, rows):
        expected = torch.einsum("k,k...->...", weights, r)
        assert c.dtype == torch.float32
        torch.testing.assert_close(c.double(), expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))
