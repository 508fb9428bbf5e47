"""What the per-layer taps promise beyond one call of one layer: a weight used twice in a pass sums both gradients,
a layer under ``no_grad`` records nothing, the taps' hooks run in their documented place among other libraries'
hooks, and a convolution with string padding splits its gradient like autograd.

Each tapped per-group gradient is compared with autograd's on that group's rows alone (an independent computation)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from trl_diffusion_sdpo.safeguards.gradients.layer_taps import LayerTaps
from trl_diffusion_sdpo.safeguards.gradients.one_pass import OnePassBranchGradients

ROWS = 8


def _perturbed(layer: nn.Module) -> nn.Module:
    """``layer`` in float64 with every weight moved off its initial value (a norm's affine starts at ones/zeros)."""
    layer = layer.double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return layer


def _tapped(
    layer: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, groups: int, handed: str
) -> tuple[dict[int, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Per-group gradients of ``layer``'s weights from one tapped pass of ``forward`` (into a destination's views or
    summed from a sink), the input gradient, and the output gradient used."""
    params = list(layer.parameters())
    taps = LayerTaps(layer, params)
    got: dict[int, torch.Tensor] = {}
    destination = None
    if handed == "destination":
        got = {i: torch.full((groups, *p.shape), float("nan"), dtype=p.dtype) for i, p in enumerate(params)}
        destination = got.__getitem__

    def sink(index: int, per_group: torch.Tensor) -> None:  # a weight may reach the sink more than once: sum
        got[index] = got[index] + per_group if index in got else per_group.clone()

    x = x.detach().requires_grad_(True)
    with taps.tapping(groups, sink, destination):
        out = forward(x)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
        out.backward(grad)
    assert not taps.failures, taps.failures
    assert all(p.grad is None for p in params)  # the taps hand autograd nothing for the weights
    return got, x.grad, grad


def _assert_like_autograd(
    layer: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, groups: int, handed: str
) -> None:
    got, x_grad, grad = _tapped(layer, forward, x, groups, handed)
    params = list(layer.parameters())
    plain = x.detach().requires_grad_(True)
    forward(plain).backward(grad)
    torch.testing.assert_close(x_grad, plain.grad, rtol=1e-12, atol=1e-12)
    assert sorted(got) == list(range(len(params)))
    size = x.shape[0] // groups
    for k in range(groups):
        rows = slice(k * size, (k + 1) * size)
        expected = torch.autograd.grad(forward(x[rows]), params, grad[rows])
        for i, e in enumerate(expected):
            torch.testing.assert_close(got[i][k], e, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------ a weight used twice

# (layer, input shape): each layer's output has its input's shape, so it can be applied to its own output
REUSED = {
    "linear": (lambda: nn.Linear(5, 5), (ROWS, 3, 5)),
    "conv": (lambda: nn.Conv2d(3, 3, 3, padding=1), (ROWS, 3, 5, 5)),
    "groupnorm": (lambda: nn.GroupNorm(1, 3), (ROWS, 3, 4, 4)),
    "layernorm": (lambda: nn.LayerNorm(5), (ROWS, 3, 5)),
    "rmsnorm": (lambda: nn.RMSNorm(5), (ROWS, 3, 5)),
}


@pytest.mark.parametrize("handed", ["destination", "sink"])
@pytest.mark.parametrize("groups", [2, 4])
@pytest.mark.parametrize("kind", list(REUSED))
def test_a_layer_called_twice_in_one_pass_sums_both_calls_gradients(kind, groups, handed):
    """A module applied twice in one forward (a shared block, a weight-tied layer): its per-group gradient is the sum
    of both calls' contributions, as autograd's on the group's rows."""
    make, shape = REUSED[kind]
    layer = _perturbed(make())
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    _assert_like_autograd(layer, lambda t: layer(torch.tanh(layer(t))), x, groups, handed)


@pytest.mark.parametrize("kind", list(REUSED))
def test_the_one_pass_store_keeps_both_calls_of_a_shared_layer_in_each_branch_from_its_first_pass(kind):
    """The exact rule's store through a layer applied twice in one forward: its first pass (which learns the rows'
    dtypes, the taps handing it each call's gradient) and the next (the taps writing into its rows) both hold, per
    branch, the gradient of both calls: what two separate backward passes give, one on the winners' rows, one on the
    losers'."""
    make, shape = REUSED[kind]
    layer = _perturbed(make())
    params = list(layer.parameters())
    store = OnePassBranchGradients(layer, params)

    def forward(t: torch.Tensor) -> torch.Tensor:
        return layer(torch.tanh(layer(t)))

    half = ROWS // 2
    for seed in (0, 1):  # the learning pass, then a pass into the rows
        x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        grad = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 10), dtype=torch.float64)
        with store.split(2):
            forward(x.requires_grad_(True)).backward(grad)
        assert not store.failures and all(p.grad is None for p in params)
        g_w, h_l = store.branch_gradients()
        expected_w = torch.autograd.grad(forward(x[:half]), params, grad[:half])
        expected_l = torch.autograd.grad(forward(x[half:]), params, grad[half:])
        for got, expected in ((g_w, expected_w), (h_l, expected_l)):
            for g, e in zip(got, expected):
                torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------ no_grad


@pytest.mark.parametrize("kind", list(REUSED))
def test_a_tapped_layer_under_no_grad_records_no_graph_and_keeps_no_grad_mode(kind):
    """A forward under ``no_grad`` inside a tapped pass (an EMA or reference forward beside the policy's): the layer
    computes its usual output, autograd records nothing of it, grad mode stays off after the layer, and no input is
    saved by the tap."""
    make, shape = REUSED[kind]
    layer = _perturbed(make())
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        expected = layer(x)
    taps = LayerTaps(layer, list(layer.parameters()))
    saved: list[torch.Tensor] = []
    with taps.tapping(2, lambda i, g: pytest.fail("no backward ran")):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            with torch.no_grad():
                out = layer(x)
                assert not torch.is_grad_enabled()  # the layer left grad mode as the caller set it
                again = layer(out)
        assert torch.is_grad_enabled()
    assert out.grad_fn is None and not out.requires_grad and again.grad_fn is None
    assert saved == []
    assert not taps.failures
    assert torch.equal(out, expected)


# ------------------------------------------------------------------------------------ hook order


def test_the_tap_runs_between_other_libraries_hooks():
    """The taps are installed after a sharding library's hooks (DeepSpeed ZeRO-3 and FSDP2 register theirs when the
    model is wrapped): that library's forward pre-hooks, prepended or not, still run before the tap's pre-hook (they
    gather the weights the layer reads), and its forward hooks, prepended or not, run after the tap's hook: they see
    the output autograd records through the tap (they hook the backward on it)."""
    layer = _perturbed(nn.Linear(4, 3))
    seen: list[tuple[str, bool, str | None]] = []

    def pre(name: str):
        def hook(module, args):
            seen.append((name, torch.is_grad_enabled(), None))

        return hook

    def post(name: str):
        def hook(module, args, output):
            seen.append((name, torch.is_grad_enabled(), type(output.grad_fn).__name__ if output.grad_fn else None))

        return hook

    handles = [
        layer.register_forward_pre_hook(pre("pre"), prepend=False),
        layer.register_forward_pre_hook(pre("pre-prepended"), prepend=True),
        layer.register_forward_hook(post("post"), prepend=False),
        layer.register_forward_hook(post("post-prepended"), prepend=True),
    ]
    params = list(layer.parameters())
    taps = LayerTaps(layer, params)
    x = torch.randn(ROWS, 4, dtype=torch.float64, requires_grad=True)
    got: dict[int, torch.Tensor] = {}
    with taps.tapping(2, lambda i, g: got.__setitem__(i, g)):
        out = layer(x)
        out.sum().backward()
    for handle in handles:
        handle.remove()
    # the pre-hooks saw grad mode on (the tap's pre-hook turns it off until its own hook), the hooks the tap's output
    assert [name for name, *_ in seen] == ["pre-prepended", "pre", "post-prepended", "post"]
    assert all(enabled for _, enabled, _ in seen)
    assert [fn for name, _, fn in seen if name.startswith("post")] == ["_LinearTapBackward"] * 2
    assert sorted(got) == [0, 1] and all(p.grad is None for p in params)  # the gradients went through the tap


# ------------------------------------------------------------------------------------ string padding


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("groups", [2, 4])
@pytest.mark.parametrize(
    "conv",
    [
        lambda: nn.Conv2d(3, 4, 3, padding="same"),
        lambda: nn.Conv2d(3, 4, 4, padding="same"),  # an even kernel: "same" pads one side more than the other
        lambda: nn.Conv2d(3, 4, (3, 2), padding="same", dilation=(2, 1), bias=False),
        lambda: nn.Conv2d(3, 4, 3, padding="valid"),
        lambda: nn.Conv1d(3, 4, 4, padding="same"),
    ],
    ids=["same-3", "same-4", "same-dilated-no-bias", "valid", "conv1d-same-4"],
)
def test_a_convolution_with_string_padding_splits_like_autograd(conv, groups):
    layer = _perturbed(conv())
    spatial = (5, 6) if isinstance(layer, nn.Conv2d) else (7,)
    x = torch.randn(ROWS, 3, *spatial, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    _assert_like_autograd(layer, layer, x, groups, "destination")


# ------------------------------------------------------------------------------------ the pass's edges


def test_a_layer_whose_forward_raises_leaves_grad_mode_on():
    """A tapped layer's own forward that raises (here on an input of the wrong width) between the tap's hooks: the
    error reaches the caller and grad mode is back on after the block, as it was before the layer."""
    layer = nn.Linear(3, 3)
    taps = LayerTaps(layer, list(layer.parameters()))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        with taps.tapping(2, lambda i, g: None):
            layer(torch.randn(4, 5))
    assert torch.is_grad_enabled()
    out = layer(torch.randn(4, 3))  # and the next forward, untapped, records its graph
    assert out.grad_fn is not None


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_float64_input_under_autocast_computes_as_the_untapped_layer(kind):
    """Autocast leaves float64 alone: a tapped float64 layer under CPU autocast gives the untapped layer's output
    (float64, bit for bit) and per-group gradients equal to autograd's on each group's rows under the same autocast."""
    make, shape = REUSED[kind]
    layer = _perturbed(make())
    params = list(layer.parameters())
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grad = torch.randn_like(layer(x))
    got = {i: torch.full((2, *p.shape), float("nan"), dtype=p.dtype) for i, p in enumerate(params)}
    taps = LayerTaps(layer, params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = layer(x)
        with taps.tapping(2, destination=got.__getitem__):
            output = layer(x.clone().requires_grad_(True))
            output.backward(grad)
        halves = zip(x.split(ROWS // 2), grad.split(ROWS // 2))
        want = [torch.autograd.grad(layer(rows), params, g) for rows, g in halves]
    assert expected.dtype == output.dtype == torch.float64
    assert torch.equal(output.detach(), expected.detach())
    for k, per_weight in enumerate(want):
        for i, w in enumerate(per_weight):
            torch.testing.assert_close(got[i][k], w, rtol=1e-12, atol=1e-12)
