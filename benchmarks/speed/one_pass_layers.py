"""Each layer the one pass taps, timed alone at the shapes it sees in the pass (full tuning): its forward and backward
natively and under its tap, totalled per kind of layer and convolution shape. Run at two batch sizes, the taps' extra
time splits into a part fixed per layer and one growing with the rows. Run through ``one_pass_routes.py``:

    python benchmarks/speed/one_pass_routes.py --layers --pairs 2 --steps 30 --threads 1 \\
        --json benchmarks/results/one-pass/cpu-one-pass-layers-small-2pairs.json
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: the package, benchmarks.harness

import torch  # noqa: E402

from benchmarks.speed.one_pass_model import build, cotangents  # noqa: E402
from trl_diffusion_sdpo.safeguards.gradients import layer_taps  # noqa: E402
from trl_diffusion_sdpo.safeguards.gradients.layer_taps import LayerTaps  # noqa: E402
from trl_diffusion_sdpo.safeguards.gradients.one_pass import OnePassBranchGradients  # noqa: E402


class _Context:
    """What a tap's ``forward`` and ``backward`` read and write on autograd's context, as a plain object: the
    backward can then run as a function, without autograd's engine around it."""

    def __init__(self, needs_x: bool) -> None:
        self.needs_input_grad = (needs_x, False, False, False, False, False)
        self.saved_tensors: tuple[torch.Tensor, ...] = ()

    def save_for_backward(self, *tensors: torch.Tensor) -> None:
        self.saved_tensors = tensors


def _native_backward(layer: Any, x: torch.Tensor, g: torch.Tensor, needs_x: bool) -> Callable[[], Any] | None:
    """The kernels autograd's backward node of ``layer`` calls (its input, weight and bias gradients over all rows),
    as one call; None for a kind without one (a recomputed layer)."""
    module = layer.module
    weight, bias = module.weight, getattr(module, "bias", None)
    if layer.kind == "conv":
        bias_sizes = None if bias is None else list(bias.shape)
        mask = (needs_x, True, bias is not None)
        return lambda: layer_taps._CONV_BACKWARD(g, x, weight, bias_sizes, *layer.conv_args, mask)
    if layer.kind == "linear":
        flat_g, flat_x = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])

        def linear() -> Any:
            grad_x = g.matmul(weight) if needs_x else None
            return grad_x, flat_g.t().mm(flat_x), flat_g.sum(0) if bias is not None else None

        return linear
    if layer.kind == "norm":
        mask = (needs_x, True, bias is not None)
        if isinstance(module, torch.nn.GroupNorm):
            n, c = x.shape[:2]
            hw = x.numel() // (n * c)
            _, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, hw, module.num_groups, module.eps)
            return lambda: layer_taps._GROUP_NORM_BACKWARD(g, x, mean, rstd, weight, n, c, hw, module.num_groups, mask)
        _, mean, rstd = torch.native_layer_norm(x, module.normalized_shape, weight, bias, module.eps)
        return lambda: layer_taps._LAYER_NORM_BACKWARD(g, x, module.normalized_shape, mean, rstd, weight, bias, mask)
    return None


def _tap_backward(
    layer: Any, x: torch.Tensor, g: torch.Tensor, needs_x: bool, destination: Any
) -> tuple[Callable[[], Any], Any] | tuple[None, None]:
    """The tap's own ``backward`` of ``layer`` (the library's code: its kernels, its writes into the buffer's views
    and its Python) in a pass split by branch, called as a function on a plain context its ``forward`` filled; None
    for a recomputed layer. Also the pass it writes in (start a new one with ``tap.views.clear()`` and
    ``tap.written.clear()``)."""
    function = layer_taps._FUNCTIONS.get(layer.kind)
    if function is None:
        return None, None
    module = layer.module
    ctx = _Context(needs_x)
    tap = layer_taps._Pass(2, None, destination)
    with torch.no_grad():
        # the layer's own output is what the forward hands on; only what it saves matters here
        function.forward(ctx, x, module.weight, getattr(module, "bias", None), layer, tap, (x,))

    def backward() -> Any:
        with torch.no_grad():  # as autograd's engine runs a backward
            return function.backward(ctx, g)

    return backward, tap


def _layer_row(single: LayerTaps, destination: Any, x: torch.Tensor, g: torch.Tensor, repeats: int) -> dict[str, Any]:
    """One layer's row of :func:`layer_rows`, the one layer ``single`` taps: its forward and backward on ``x`` with
    output gradient ``g``, natively and under its tap, interleaved, the median of ``repeats`` after a warm-up; and
    the backward's kernels alone: autograd's (``native_backward_us``) against the tap's ``backward`` called as a
    function (``tap_backward_us``). What the tapped layer costs beyond its backward's difference is the rest: the
    tapped forward, ``autograd.Function``'s machinery and the engine's call into Python."""
    layer = single.layers[0]
    module = layer.module
    weights = [getattr(module, name) for name, _ in layer.slots]
    needs_x = x.is_floating_point()

    def native() -> None:
        xs = x.detach().requires_grad_(needs_x)
        for w in weights:
            w.grad = None
        module(xs).backward(g)

    indices = [index for _, index in layer.slots]

    def tapped() -> None:
        module(x.detach().requires_grad_(needs_x)).backward(g)

    native_backward = _native_backward(layer, x, g, needs_x)
    tap_backward, tap = _tap_backward(layer, x, g, needs_x, destination)
    times: dict[str, list[float]] = {"native": [], "tapped": [], "native_backward": [], "tap_backward": []}
    wrote = called_wrote = True
    for repeat in range(repeats + 1):  # the first warms up
        measured = {}
        start = time.process_time()
        native()
        measured["native"] = time.process_time() - start
        with single.tapping(2, destination=destination):  # installed outside the timed call, as once per pass
            start = time.process_time()
            tapped()
            measured["tapped"] = time.process_time() - start
        wrote = wrote and all(i in single.written() for i in indices)
        if native_backward is not None and tap_backward is not None:
            start = time.process_time()
            native_backward()
            measured["native_backward"] = time.process_time() - start
            tap.views.clear()  # a new pass: the views asked again, none written yet
            tap.written.clear()
            start = time.process_time()
            tap_backward()
            measured["tap_backward"] = time.process_time() - start
            called_wrote = called_wrote and all(i in tap.written for i in indices)
        if repeat:
            for key, value in measured.items():
                times[key].append(value)
    side = x.shape[-1]
    row = {
        "name": layer.name,
        "kind": layer.kind,
        "conv": f"{module.kernel_size[0]}x{module.kernel_size[0]} on {side}x{side}" if layer.kind == "conv" else None,
        "input_shape": list(x.shape),
        # each tapped call wrote every weight's split gradient (the replay ran the tap, not autograd's path), and so
        # did each call of its backward as a function (None: not called, a recomputed layer)
        "tap_wrote": wrote,
        "tap_backward_wrote": called_wrote if tap_backward is not None else None,
    }
    for key, values in times.items():
        row[f"{key}_us"] = statistics.median(values) * 1e6 if values else None
    return row


def layer_rows(preset: str, pairs: int, repeats: int) -> dict[str, Any]:
    """Each tapped layer alone, at the shapes it sees in a pass over ``2 * pairs`` rows (full tuning): its forward and
    backward as autograd computes them (``native``) and under its tap alone (``tapped``, the weights' gradients split
    by branch into the buffer's views), interleaved, median of ``repeats`` process CPU times. Totals per kind of
    layer and, for convolutions, per kernel size and feature map. The taps' extra time at one batch size against
    another tells fixed cost (the same at every batch) from the split kernels' (growing with the rows)."""
    unet, inputs, target = build(preset, False, pairs)
    params = [p for p in unet.parameters() if p.requires_grad]
    store = OnePassBranchGradients(unet, params)
    store._prepare(2)  # the split buffer: the tapped calls write into its views
    single = LayerTaps(unet, params)
    layers = single.layers
    seen: dict[int, torch.Tensor] = {}  # each layer's input in the pass
    grads: dict[int, torch.Tensor] = {}

    def capture(k: int):
        def hook(module, args, output):
            if k not in seen:  # a layer called twice keeps its first call
                seen[k] = args[0].detach().clone()
                output.register_hook(lambda g: grads.setdefault(k, g.detach().clone()))

        return hook

    handles = [layer.module.register_forward_hook(capture(k)) for k, layer in enumerate(layers)]
    out = unet(*inputs, return_dict=False)[0]
    out.backward(cotangents(out, target))
    for handle in handles:
        handle.remove()
    rows = []
    for k, layer in enumerate(layers):
        if k in grads:
            single.layers = [layer]
            rows.append(_layer_row(single, store._destination, seen[k], grads[k], repeats))
            single.close()  # the next layer's taps installed afresh

    def totals(selected: list[dict[str, Any]]) -> dict[str, float | None]:
        native = sum(r["native_us"] for r in selected) / 1000
        tapped = sum(r["tapped_us"] for r in selected) / 1000
        out: dict[str, float | None] = {
            "layers": len(selected),
            "native_ms": native,
            "tapped_ms": tapped,
            "extra_ms": tapped - native,
        }
        # the extra split in two, over the layers whose backward was also called as a function: the backward's own
        # (kernels, writes into the views, its Python) and the rest (forward, Function machinery, engine)
        split = [r for r in selected if r["tap_backward_us"] is not None]
        if split:
            backward = sum(r["tap_backward_us"] - r["native_backward_us"] for r in split) / 1000
            whole = sum(r["tapped_us"] - r["native_us"] for r in split) / 1000
            out.update(backward_extra_ms=backward, rest_extra_ms=whole - backward)
        else:
            out.update(backward_extra_ms=None, rest_extra_ms=None)
        return out

    kinds = sorted({r["kind"] for r in rows})
    convs = sorted({r["conv"] for r in rows if r["conv"]})
    return {
        "per_kind": {kind: totals([r for r in rows if r["kind"] == kind]) for kind in kinds},
        "per_conv_shape": {shape: totals([r for r in rows if r["conv"] == shape]) for shape in convs},
        "all": totals(rows),
        "layers": rows,
    }
