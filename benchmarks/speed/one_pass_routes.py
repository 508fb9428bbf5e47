"""Two routes to the exact safeguard's per-branch gradients in one forward pass, timed against a plain backward.

Not part of the test suite. On the benchmarks' small UNet (``--unet small``, random weights) or the tiny test UNet
(``--unet tiny``), one batch of ``2B`` rows (winners, then losers) with random latents, timesteps and prompts, it
times, side by side in one process, interleaved step by step (median over ``--steps``):

* ``dpo``: one forward and one backward pass (the cost to match);
* ``two_pass``: one forward and one backward pass per branch (the reference implementation);
* ``taps``: one forward and one backward pass with per-layer taps
(:mod:`trl_diffusion_sdpo.safeguards.gradients.layer_taps`), the
  gradients split by branch and combined (the default since this benchmark);
* ``vmap_vjp``: ``torch.func``: one forward pass under ``vjp`` over the trainable weights, then ``vmap`` of the
  vector-Jacobian product over the two branches' cotangents (``[c_w; 0]`` and ``[0; c_l]``).

Full tuning and LoRA (rank 8 on the attention projections). Process CPU time per step is what is compared (on a
shared CPU it counts our work, not our waiting), as medians and, step by step, as paired ratios.

    python benchmarks/speed/one_pass_routes.py --json benchmarks/results/one-pass/cpu-one-pass-routes-small-2pairs.json

``--unet sd15`` builds Stable Diffusion 1.5's UNet from its real config (860M weights, random) with 77 prompt
tokens; ``--sample-size`` sets the latent side (32: 256 px), ``--routes`` and ``--tuning`` pick rows:

    python benchmarks/speed/one_pass_routes.py --unet sd15 --sample-size 32 --pairs 2 --steps 5 --threads 2 \
        --routes dpo,taps,two_pass --json benchmarks/results/one-pass/cpu-one-pass-routes-sd15-2pairs.json

``--ablate`` adds ``pass[kinds]`` rows: the tapped forward and backward alone, with only the layers of those kinds
tapped (``pass[none]``: none, ``pass[conv+linear+norm]``: all), each paired step by step with ``dpo``; the
difference between ``pass[...]`` of all kinds and ``taps`` is the inner products and the combination:

    python benchmarks/speed/one_pass_routes.py --ablate --routes dpo,taps --tuning full --steps 30 --threads 1 \
        --json benchmarks/results/one-pass/cpu-one-pass-ablation-small-2pairs.json

``--layers`` instead times each tapped layer alone (:mod:`one_pass_layers`):

    python benchmarks/speed/one_pass_routes.py --layers --pairs 2 --steps 30 --threads 1 \\
        --json benchmarks/results/one-pass/cpu-one-pass-layers-small-2pairs.json

``--profile`` instead profiles ``dpo`` and ``taps`` with full tuning (``torch.profiler``, ``--steps`` steps each after
warm-up) and writes each operator's and each tap function's self CPU time per step, to find where the taps' extra
time goes:

    python benchmarks/speed/one_pass_routes.py --profile --threads 1 \\
        --json benchmarks/results/one-pass/cpu-one-pass-profile-small-2pairs.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: the package, benchmarks.harness

import torch  # noqa: E402

from benchmarks.harness import machine_description, process_step  # noqa: E402
from benchmarks.speed.one_pass_layers import layer_rows  # noqa: E402
from benchmarks.speed.one_pass_model import PRESETS, build, cotangents  # noqa: E402
from trl_diffusion_sdpo.safeguards.gradients.layer_taps import LayerTaps  # noqa: E402
from trl_diffusion_sdpo.safeguards.gradients.one_pass import OnePassBranchGradients  # noqa: E402


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
                with restricted.tapping(2, destination=store._destination):
                    out = unet(*inputs, return_dict=False)[0]
                    out.backward(cotangents(out, target))
                restricted.close()  # its hooks off the shared UNet: the other routes run without them

            return route

        every = frozenset(layer.kind for layer in store.taps.layers)
        for kinds in [frozenset(), *(frozenset({kind}) for kind in sorted(every)), every]:
            routes[f"pass[{'+'.join(sorted(kinds)) or 'none'}]"] = tapped_pass(kinds)
    return routes


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
