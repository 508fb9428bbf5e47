"""The norm taps' backward: one statistics call per layer, and an NCHW GroupNorm's groups of rows laid side by side as
channels, so that one native backward call gives every group's affine gradients.

Checked against an independent computation: aten's native GroupNorm forward and backward called on each group's rows
alone (what each branch's own pass computes), bit for bit, in float32, in bf16 with float32 affine weights (CPU
autocast's norm inputs) and in float64, for two groups (the branches) and four (one per image), with the calls
counted by ``torch.profiler``.
"""

from __future__ import annotations

import collections

import pytest
import torch

from trl_diffusion_sdpo.safeguards.gradients.layer_taps import LayerTaps

GROUP_NORM = torch.ops.aten.native_group_norm.default
GROUP_NORM_BACKWARD = torch.ops.aten.native_group_norm_backward.default
LAYER_NORM = torch.ops.aten.native_layer_norm.default
LAYER_NORM_BACKWARD = torch.ops.aten.native_layer_norm_backward.default


def _tapped(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, groups: int):
    """The tap's input gradient and per-group affine gradients of ``layer`` on ``x`` with output gradient ``grad``,
    and the aten calls its backward made."""
    params = list(layer.parameters())
    got = {i: torch.full((groups, *p.shape), float("nan"), dtype=p.dtype) for i, p in enumerate(params)}
    taps = LayerTaps(layer, params)
    x = x.clone().requires_grad_(True)
    with taps.tapping(groups, destination=got.__getitem__):
        out = layer(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            out.backward(grad)
    assert not taps.failures
    calls = collections.Counter(event.name for event in profile.events())
    return x.grad, [got[i] for i in range(len(params))], calls


def _per_group_group_norm(layer: torch.nn.GroupNorm, x: torch.Tensor, grad: torch.Tensor, groups: int):
    """aten's native GroupNorm forward and backward on each group's rows alone: the input gradient (joined) and the
    per-group affine gradients (stacked)."""
    parts = []
    for xs, gs in zip(x.chunk(groups), grad.chunk(groups)):
        n, c = xs.shape[:2]
        hw = xs.numel() // (n * c)
        _, mean, rstd = GROUP_NORM(xs, layer.weight, layer.bias, n, c, hw, layer.num_groups, layer.eps)
        parts.append(
            GROUP_NORM_BACKWARD(gs, xs, mean, rstd, layer.weight, n, c, hw, layer.num_groups, (True, True, True))
        )
    return torch.cat([p[0] for p in parts]), [torch.stack([p[k] for p in parts]) for k in (1, 2)]


@pytest.mark.parametrize("groups", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["float32", "bf16", "float64"])
def test_group_norm_tap_equals_per_group_native_calls_bit_for_bit_in_one_backward_call(dtype, groups):
    """An NCHW GroupNorm's tap gives the input gradient and each group's affine gradients that aten's native calls on
    each group's rows alone give, bit for bit, with one statistics call and one backward call for the layer."""
    torch.manual_seed(0)
    weights = torch.float64 if dtype == torch.float64 else torch.float32  # bf16 input: float32 affine (autocast's)
    layer = torch.nn.GroupNorm(4, 16).to(weights)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p))
    x = (torch.randn(8, 16, 5, 6) * 3 + 1).to(dtype)
    grad = torch.randn(8, 16, 5, 6).to(dtype)
    grad_x, (grad_w, grad_b), calls = _tapped(layer, x, grad, groups)
    expected_x, (expected_w, expected_b) = _per_group_group_norm(layer, x, grad, groups)
    assert torch.equal(grad_x, expected_x)
    assert torch.equal(grad_w, expected_w)
    assert torch.equal(grad_b, expected_b)
    assert calls["aten::native_group_norm"] == 1 and calls["aten::native_group_norm_backward"] == 1


@pytest.mark.parametrize("groups", [2, 4])
def test_layer_norm_tap_recomputes_its_statistics_once(groups):
    """A LayerNorm's tap recomputes the statistics in one call over all rows and takes one backward call per group,
    each group's affine gradients equal to aten's native calls on that group's rows alone, bit for bit."""
    torch.manual_seed(0)
    layer = torch.nn.LayerNorm(12)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p))
    x = torch.randn(8, 7, 12) * 2 - 1
    grad = torch.randn(8, 7, 12)
    grad_x, (grad_w, grad_b), calls = _tapped(layer, x, grad, groups)
    parts = []
    for xs, gs in zip(x.chunk(groups), grad.chunk(groups)):
        _, mean, rstd = LAYER_NORM(xs, (12,), layer.weight, layer.bias, layer.eps)
        parts.append(LAYER_NORM_BACKWARD(gs, xs, (12,), mean, rstd, layer.weight, layer.bias, (True, True, True)))
    assert torch.equal(grad_x, torch.cat([p[0] for p in parts]))
    assert torch.equal(grad_w, torch.stack([p[1] for p in parts]))
    assert torch.equal(grad_b, torch.stack([p[2] for p in parts]))
    assert calls["aten::native_layer_norm"] == 1 and calls["aten::native_layer_norm_backward"] == groups
