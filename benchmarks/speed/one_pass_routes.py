"""Two routes to the exact safeguard's per-branch gradients in one forward pass, timed against a plain backward.

Not part of the test suite. On the benchmarks' small UNet (``--unet small``, random weights) or the tiny test UNet
(``--unet tiny``), one batch of ``2B`` rows (winners, then losers) with random latents, timesteps and prompts, it
times, side by side in one process, interleaved step by step (median over ``--steps``):

* ``dpo``: one forward and one backward pass (the cost to match);
* ``two_pass``: one forward and one backward pass per branch (the reference implementation);
* ``taps``: one forward and one backward pass with per-layer taps (:mod:`trl_diffusion_sdpo.step.layer_taps`), the
  gradients split by branch and combined (the default since this benchmark);
* ``vmap_vjp``: ``torch.func``: one forward pass under ``vjp`` over the trainable weights, then ``vmap`` of the
  vector-Jacobian product over the two branches' cotangents (``[c_w; 0]`` and ``[0; c_l]``).

Full tuning and LoRA (rank 8 on the attention projections). Process CPU time per step is what is compared (on a
shared CPU it counts our work, not our waiting), as medians and, step by step, as paired ratios.

    python benchmarks/speed/one_pass_routes.py --json benchmarks/results/cpu-one-pass-routes-small-2pairs.json

``--unet sd15`` builds Stable Diffusion 1.5's UNet from its real config (860M weights, random) with 77 prompt
tokens; ``--sample-size`` sets the latent side (32: 256 px), ``--routes`` and ``--tuning`` pick rows:

    python benchmarks/speed/one_pass_routes.py --unet sd15 --sample-size 32 --pairs 2 --steps 5 --threads 2 \
        --routes dpo,taps,two_pass --json benchmarks/results/cpu-one-pass-routes-sd15-2pairs.json

``--ablate`` adds ``pass[kinds]`` rows: the tapped forward and backward alone, with only the layers of those kinds
tapped (``pass[none]``: none, ``pass[conv+linear+norm]``: all), each paired step by step with ``dpo``; the
difference between ``pass[...]`` of all kinds and ``taps`` is the inner products and the combination:

    python benchmarks/speed/one_pass_routes.py --ablate --routes dpo,taps --tuning full --steps 30 --threads 1 \
        --json benchmarks/results/cpu-one-pass-ablation-small-2pairs.json

``--layers`` instead times each tapped layer alone at the shapes it sees in the pass (full tuning), its forward and
backward natively and under its tap, and totals them per kind of layer and convolution shape: run at two batch sizes,
the taps' extra time splits into a part fixed per layer and one growing with the rows:

    python benchmarks/speed/one_pass_routes.py --layers --pairs 2 --steps 30 --threads 1 \
        --json benchmarks/results/cpu-one-pass-layers-small-2pairs.json

``--profile`` instead profiles ``dpo`` and ``taps`` with full tuning (``torch.profiler``, ``--steps`` steps each after
warm-up) and writes each operator's and each tap function's self CPU time per step, to find where the taps' extra
time goes:

    python benchmarks/speed/one_pass_routes.py --profile --threads 1 \\
        --json benchmarks/results/cpu-one-pass-profile-small-2pairs.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: the package, benchmarks.harness

import torch  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from peft import LoraConfig  # noqa: E402

from benchmarks.harness import SD15_UNET, SMALL_UNET, machine_description, process_step  # noqa: E402
from trl_diffusion_sdpo.step import layer_taps  # noqa: E402
from trl_diffusion_sdpo.step.layer_taps import LayerTaps  # noqa: E402
from trl_diffusion_sdpo.step.one_pass import OnePassBranchGradients  # noqa: E402

TINY_UNET: dict[str, Any] = {
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
}


PRESETS: dict[str, dict[str, Any]] = {"small": SMALL_UNET, "tiny": TINY_UNET, "sd15": SD15_UNET}


def build(preset: str, lora: bool, pairs: int, seed: int = 0, sample_size: int | None = None):
    """The preset's UNet (random weights; ``sample_size`` overrides the latent side), one batch of ``2 * pairs`` rows
    and a target. SD1.5 gets CLIP's 77 prompt tokens, the others 8."""
    config = {**PRESETS[preset], **({"sample_size": sample_size} if sample_size else {})}
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**config)
    if lora:
        unet.requires_grad_(False)
        unet.add_adapter(
            LoraConfig(
                r=8, lora_alpha=8, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]
            )
        )
    unet.train()
    side = config["sample_size"]
    gen = torch.Generator().manual_seed(seed + 1)
    rows = 2 * pairs
    sample = torch.randn(rows, config["in_channels"], side, side, generator=gen)
    timesteps = torch.randint(0, 1000, (pairs,), generator=gen).repeat(2)
    tokens = 77 if preset == "sd15" else 8
    context = torch.randn(pairs, tokens, config["cross_attention_dim"], generator=gen).repeat(2, 1, 1)
    target = torch.randn(rows, config["out_channels"], side, side, generator=gen)
    return unet, (sample, timesteps, context), target


def cotangents(prediction: torch.Tensor, target: torch.Tensor, sign: float | None = None) -> torch.Tensor:
    """A preference-loss-like cotangent per row: a squared-error gradient, of opposite sign on the losers (what the
    DPO loss hands its predictions); ``sign`` for one branch's rows alone (``None``: winners then losers)."""
    rows = prediction.shape[0]
    if sign is None:
        sign = torch.cat([torch.ones(rows // 2), -torch.ones(rows // 2)]).view(-1, 1, 1, 1)
    return (2 * sign * (prediction.detach() - target) / prediction[0].numel()).to(prediction)


def make_routes(
    preset: str, lora: bool, pairs: int, sample_size: int | None = None, ablate: bool = False
) -> dict[str, Any]:
    """The routes on one model and batch, as callables of no arguments. ``ablate`` adds ``pass[kinds]``: the tapped
    forward and backward alone (no inner products, no combination) with only the layers of those kinds tapped (the
    others' weights get autograd's gradient), to attribute the one pass's cost to the layers' kinds."""
    unet, inputs, target = build(preset, lora, pairs, sample_size=sample_size)
    params = [p for p in unet.parameters() if p.requires_grad]
    names = [n for n, p in unet.named_parameters() if p.requires_grad]
    store = OnePassBranchGradients(unet, params)
    assert not store.uncovered, store.uncovered
    half = inputs[0].shape[0] // 2

    def zero() -> None:
        for p in params:
            p.grad = None

    def dpo() -> None:
        zero()
        out = unet(*inputs, return_dict=False)[0]
        out.backward(cotangents(out, target))

    def two_pass() -> None:
        zero()
        for rows in (slice(0, half), slice(half, None)):
            out = unet(*(t[rows] for t in inputs), return_dict=False)[0]
            sign = 1.0 if rows.start == 0 else -1.0
            grads = torch.autograd.grad(out, params, cotangents(out, target[rows], sign), allow_unused=True)
            del grads

    def taps() -> None:
        zero()
        with store.split(2):
            out = unet(*inputs, return_dict=False)[0]
            out.backward(cotangents(out, target))
        sq, cross = store.branch_sums()
        store.combine(torch.clamp(0.5 * sq / cross.clamp(min=1e-12), 0, 1))

    def vmap_vjp() -> None:
        zero()
        weights = {n: p for n, p in zip(names, params)}

        def run(w):
            return torch.func.functional_call(unet, w, inputs, {"return_dict": False})[0]

        out, vjp_fn = torch.func.vjp(run, weights)
        cot = cotangents(out, target)
        mask = torch.zeros(2, *cot.shape, dtype=cot.dtype)
        mask[0, :half], mask[1, half:] = 1, 1
        (per_branch,) = torch.func.vmap(vjp_fn)(mask * cot)
        del per_branch

    routes = {"dpo": dpo, "two_pass": two_pass, "taps": taps, "vmap_vjp": vmap_vjp}
    if ablate:
        store._prepare(2)  # the split buffer, as split() makes it: the restricted taps write into its views

        def tapped_pass(kinds: frozenset[str]) -> Any:
            restricted = LayerTaps(unet, params)
            restricted.layers = [layer for layer in restricted.layers if layer.kind in kinds]

            def route() -> None:
                zero()
                with restricted.tapping(2, destination=store._views.__getitem__):
                    out = unet(*inputs, return_dict=False)[0]
                    out.backward(cotangents(out, target))

            return route

        every = frozenset(layer.kind for layer in store.taps.layers)
        for kinds in [frozenset(), *(frozenset({kind}) for kind in sorted(every)), every]:
            routes[f"pass[{'+'.join(sorted(kinds)) or 'none'}]"] = tapped_pass(kinds)
    return routes


class _Context:
    """What a tap's ``forward`` and ``backward`` read and write on autograd's context, as a plain object: the
    backward can then run as a function, without autograd's engine around it."""

    def __init__(self, needs_x: bool) -> None:
        self.needs_input_grad = (needs_x, False, False, False, False)
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


def _tap_backward(layer: Any, x: torch.Tensor, g: torch.Tensor, needs_x: bool) -> Callable[[], Any] | None:
    """The tap's own ``backward`` of ``layer`` (the library's code: its kernels, its writes into the buffer's views
    and its Python) in a pass split by branch, called as a function on a plain context its ``forward`` filled; None
    for a recomputed layer."""
    function = layer_taps._FUNCTIONS.get(layer.kind)
    if function is None:
        return None
    module = layer.module
    ctx = _Context(needs_x)
    with torch.no_grad():
        function.forward(ctx, x, module.weight, getattr(module, "bias", None), layer, layer_taps._Pass(2, None))

    def backward() -> Any:
        with torch.no_grad():  # as autograd's engine runs a backward
            return function.backward(ctx, g)

    return backward


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

    def tapped() -> None:
        layer.start(destination, None)  # a pass starts each layer once (its views, none written yet)
        module(x.detach().requires_grad_(needs_x)).backward(g)

    native_backward = _native_backward(layer, x, g, needs_x)
    tap_backward = _tap_backward(layer, x, g, needs_x)
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
        wrote = wrote and all(layer.written.values())
        if native_backward is not None and tap_backward is not None:
            start = time.process_time()
            native_backward()
            measured["native_backward"] = time.process_time() - start
            layer.start(destination, None)
            start = time.process_time()
            tap_backward()
            measured["tap_backward"] = time.process_time() - start
            called_wrote = called_wrote and all(layer.written.values())
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
            rows.append(_layer_row(single, store._views.__getitem__, seen[k], grads[k], repeats))

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


def profile_routes(preset: str, pairs: int, steps: int, rows: int = 30) -> dict[str, Any]:
    """Self CPU time per step (ms) of each operator and Python function, for ``dpo`` and ``taps`` (full tuning); the
    ``rows`` largest differences first."""
    from torch.profiler import ProfilerActivity, profile

    routes = make_routes(preset, False, pairs)
    per_step: dict[str, dict[str, float]] = {}
    counts: dict[str, dict[str, float]] = {}
    for name in ("dpo", "taps"):
        for _ in range(2):  # warm-up
            routes[name]()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                routes[name]()
        events = prof.key_averages()
        per_step[name] = {e.key: e.self_cpu_time_total / 1000 / steps for e in events}
        counts[name] = {e.key: e.count / steps for e in events}
    keys = set(per_step["dpo"]) | set(per_step["taps"])
    difference = {k: per_step["taps"].get(k, 0.0) - per_step["dpo"].get(k, 0.0) for k in keys}
    ranked = sorted(keys, key=lambda k: -abs(difference[k]))[:rows]
    return {
        "total_self_cpu_ms_per_step": {name: sum(values.values()) for name, values in per_step.items()},
        "tap_functions_self_cpu_ms_per_step": sum(v for k, v in per_step["taps"].items() if "Tap" in k),
        "largest_differences": [
            {
                "key": k,
                "dpo_ms": per_step["dpo"].get(k, 0.0),
                "taps_ms": per_step["taps"].get(k, 0.0),
                "taps_minus_dpo_ms": difference[k],
                "calls_per_step": {"dpo": counts["dpo"].get(k, 0.0), "taps": counts["taps"].get(k, 0.0)},
            }
            for k in ranked
        ],
    }


def write_report(report: dict[str, Any], path: str | None) -> None:
    """The report as JSON at ``path`` (None: not written)."""
    if path:
        Path(path).write_text(json.dumps(report, indent=2))
        print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unet", choices=sorted(PRESETS), default="small")
    parser.add_argument("--sample-size", type=int, default=None, help="latent side (default: the preset's)")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument(
        "--routes",
        default="dpo,two_pass,taps,vmap_vjp",
        help="comma-separated subset of dpo, two_pass, taps, vmap_vjp (dpo is always timed)",
    )
    parser.add_argument("--tuning", default="full,lora", help="comma-separated: full, lora")
    parser.add_argument(
        "--ablate",
        action="store_true",
        help="add pass[kinds] rows: the tapped pass alone with only those kinds of layers tapped (see make_routes)",
    )
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", default=None)
    parser.add_argument("--profile", action="store_true", help="profile dpo and taps (full tuning) instead")
    parser.add_argument(
        "--layers",
        action="store_true",
        help="instead time each tapped layer alone, natively and under its tap, at its shapes (see layer_rows)",
    )
    opts = parser.parse_args()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    report: dict[str, Any] = {"machine": machine_description("cpu", opts.threads), "settings": vars(opts), "rows": {}}
    report["machine"]["load_average_at_start"] = os.getloadavg()  # a shared machine: how busy it was
    if opts.profile:
        del report["rows"]
        report["profile"] = profile_routes(opts.unet, opts.pairs, opts.steps)
        for row in report["profile"]["largest_differences"]:
            print(f"{row['key'][:60]:60s} dpo {row['dpo_ms']:7.2f}  taps {row['taps_ms']:7.2f}  ms/step")
        totals = report["profile"]["total_self_cpu_ms_per_step"]
        print(f"total self CPU ms/step: dpo {totals['dpo']:.1f}, taps {totals['taps']:.1f}")
        write_report(report, opts.json)
        return
    if opts.layers:
        del report["rows"]
        report["layers"] = layer_rows(opts.unet, opts.pairs, opts.steps)
        for group in ("per_kind", "per_conv_shape"):
            for key, row in report["layers"][group].items():
                split = ""
                if row["backward_extra_ms"] is not None:
                    split = f" (backward {row['backward_extra_ms']:6.2f}, rest {row['rest_extra_ms']:6.2f})"
                print(
                    f"{key:16s} {row['layers']:4d} layers: native {row['native_ms']:7.2f} ms, tapped "
                    f"{row['tapped_ms']:7.2f} ms, extra {row['extra_ms']:6.2f} ms{split}"
                )
        row = report["layers"]["all"]
        print(f"all {row['layers']} layers: native {row['native_ms']:.2f} ms, tapped {row['tapped_ms']:.2f} ms")
        write_report(report, opts.json)
        return
    wanted = {"dpo", *opts.routes.split(",")}
    for lora in [t == "lora" for t in opts.tuning.split(",")]:
        built = make_routes(opts.unet, lora, opts.pairs, opts.sample_size, ablate=opts.ablate)
        routes = {k: v for k, v in built.items() if k in wanted or k.startswith("pass[")}  # pass[...]: --ablate
        failed: dict[str, str] = {}
        times: dict[str, list[float]] = {k: [] for k in routes}
        # minor page faults: on a CPU a fresh gradient-sized allocation per step (dpo's .grad, freed by zero_grad as
        # a trainer frees it) costs page faults that the taps' reused buffer does not; a GPU's caching allocator
        # hides both
        faults: dict[str, list[int]] = {k: [] for k in routes}
        for step in range(opts.steps + 1):
            for name, route in routes.items():
                if name in failed:
                    continue
                try:
                    seconds, faulted = process_step(route)
                except Exception as error:  # a route that cannot run on this model is reported, not fatal
                    failed[name] = f"{type(error).__name__}: {error}"[:300]
                    continue
                if step:  # the first step warms up
                    times[name].append(seconds)
                    faults[name].append(faulted)
        tuning = "lora" if lora else "full"
        for name in routes:
            row: dict[str, Any] = {"failed": failed[name]} if name in failed else {}
            if times[name]:
                median = statistics.median(times[name])
                row.update(median_step_cpu_s=median, step_cpu_s=times[name])
                row["ratio_to_dpo"] = median / statistics.median(times["dpo"])
                if len(times[name]) == len(times["dpo"]):  # step by step against the dpo step just before
                    row["paired_ratio_to_dpo"] = statistics.median(t / d for t, d in zip(times[name], times["dpo"]))
                row["minor_page_faults_per_step"] = statistics.median(faults[name])
            report["rows"][f"{name}-{tuning}"] = row
            shown = f"{row['median_step_cpu_s'] * 1000:.1f} ms ({row['ratio_to_dpo']:.3f}x)" if times[name] else ""
            if "paired_ratio_to_dpo" in row:
                shown += f", paired {row['paired_ratio_to_dpo']:.3f}x"
            print(f"{tuning:5s} {name:24s} {shown} {row.get('failed', '')}", flush=True)
    write_report(report, opts.json)


if __name__ == "__main__":
    main()
