"""The convolution and norm taps' backward against aten's native calls on each group's rows alone (what each branch's
own pass computes), bit for bit, in float32, bf16 and float64, for two groups (the branches) and four (one per image),
with the calls counted by ``torch.profiler``: a convolution's input gradient comes from one call over all rows, its
per-group weight and bias gradients from one call per group.
"""

from __future__ import annotations

import collections

import pytest
import torch

from trl_diffusion_sdpo.safeguards.gradients.layer_taps import LayerTaps

CONV_BACKWARD = torch.ops.aten.convolution_backward.default
GROUP_NORM = torch.ops.aten.native_group_norm.default
GROUP_NORM_BACKWARD = torch.ops.aten.native_group_norm_backward.default
LAYER_NORM = torch.ops.aten.native_layer_norm.default
LAYER_NORM_BACKWARD = torch.ops.aten.native_layer_norm_backward.default


def _tapped(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, groups: int):
    """The tap's input gradient and per-group weight gradients of ``layer`` on ``x`` with output gradient ``grad``
    (in ``grad``'s dtype where it is lower than the weights', as autocast's products are), and the aten calls its
    backward made."""
    params = list(layer.parameters())
    dtypes = [grad.dtype if isinstance(layer, torch.nn.Conv2d) else p.dtype for p in params]
    got = {i: torch.full((groups, *p.shape), float("nan"), dtype=d) for i, (p, d) in enumerate(zip(params, dtypes))}
    taps = LayerTaps(layer, params)
    x = x.clone().requires_grad_(True)
    with taps.tapping(groups, destination=got.__getitem__):
        out = layer(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            out.backward(grad)
    assert not taps.failures
    calls = collections.Counter(event.name for event in profile.events())
    return x.grad, [got[i] for i in range(len(params))], calls


@pytest.mark.parametrize("groups", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["float32", "bf16", "float64"])
@pytest.mark.parametrize(
    "conv",
    [dict(kernel_size=3, padding=1), dict(kernel_size=1), dict(kernel_size=3, stride=2, padding=1, bias=False)],
    ids=["3x3", "1x1", "strided-no-bias"],
)
def test_conv_tap_equals_per_group_native_calls_bit_for_bit(conv, dtype, groups):
    """A convolution's tap gives the input gradient and each group's weight and bias gradients that one
    ``convolution_backward`` call per group of rows gives (each branch's own pass), bit for bit, with one call for the
    input gradient over all rows and one per group for the weights."""
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(12, 8, **conv).to(dtype)
    x = torch.randn(8, 12, 6, 6).to(dtype)
    with torch.no_grad():
        grad = torch.randn_like(layer(x))
    grad_x, per_group, calls = _tapped(layer, x, grad, groups)
    weight, bias = layer.weight, layer.bias
    args = (layer.stride, layer.padding, layer.dilation, False, (0, 0), layer.groups)
    sizes = [weight.shape[0]] if bias is not None else None
    parts = [
        CONV_BACKWARD(g, xs, weight, sizes, *args, (True, True, bias is not None))
        for g, xs in zip(grad.chunk(groups), x.chunk(groups))
    ]
    assert torch.equal(grad_x, torch.cat([p[0] for p in parts]))
    for k, got in enumerate(per_group):
        assert torch.equal(got, torch.stack([p[1 + k] for p in parts]))
    assert calls["aten::convolution_backward"] == 1 + groups


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
def test_group_norm_tap_equals_per_group_native_calls_bit_for_bit(dtype, groups):
    """A GroupNorm's tap gives the input gradient and each group's affine gradients that aten's native calls on each
    group's rows alone give, bit for bit."""
    torch.manual_seed(0)
    weights = torch.float64 if dtype == torch.float64 else torch.float32  # bf16 input: float32 affine (autocast's)
    layer = torch.nn.GroupNorm(4, 16).to(weights)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p))
    x = (torch.randn(8, 16, 5, 6) * 3 + 1).to(dtype)
    grad = torch.randn(8, 16, 5, 6).to(dtype)
    grad_x, (grad_w, grad_b), _ = _tapped(layer, x, grad, groups)
    expected_x, (expected_w, expected_b) = _per_group_group_norm(layer, x, grad, groups)
    assert torch.equal(grad_x, expected_x)
    assert torch.equal(grad_w, expected_w)
    assert torch.equal(grad_b, expected_b)


@pytest.mark.parametrize("groups", [2, 4])
def test_layer_norm_tap_equals_per_group_native_calls_bit_for_bit(groups):
    """A LayerNorm's tap gives the input gradient and each group's affine gradients that aten's native calls on each
    group's rows alone give, bit for bit."""
    torch.manual_seed(0)
    layer = torch.nn.LayerNorm(12)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p))
    x = torch.randn(8, 7, 12) * 2 - 1
    grad = torch.randn(8, 7, 12)
    grad_x, (grad_w, grad_b), _ = _tapped(layer, x, grad, groups)
    parts = []
    for xs, gs in zip(x.chunk(groups), grad.chunk(groups)):
        _, mean, rstd = LAYER_NORM(xs, (12,), layer.weight, layer.bias, layer.eps)
        parts.append(LAYER_NORM_BACKWARD(gs, xs, (12,), mean, rstd, layer.weight, layer.bias, (True, True, True)))
    assert torch.equal(grad_x, torch.cat([p[0] for p in parts]))
    assert torch.equal(grad_w, torch.stack([p[1] for p in parts]))
    assert torch.equal(grad_b, torch.stack([p[2] for p in parts]))
