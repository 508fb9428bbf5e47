"""Step time and peak memory of ``DiffusionSDPOTrainer`` against the compute floor.

Runs (each in its own fresh process, so memory peaks and allocator state never leak from one to the next):

* ``floor-full`` / ``floor-lora``: the compute floor alone, a bare loop on the trainer's own UNet, reference and
  optimizer (same model, batch, dtype): policy forward + backward over 2B samples, reference forward over 2B samples
  without autograd (a frozen copy for full tuning, the adapter-disabled policy for LoRA), ``optimizer.step()``,
  ``zero_grad``. Inputs are fixed tensors already on the device: no data loading, no encoding, a plain MSE loss.
  These rows give the floor's own step time and peak memory.
* ``{uncached,cached}-{full,lora}``: ``DiffusionSDPOTrainer.train()`` on a synthetic Pick-a-Pic-style dataset (JPEG
  bytes at the training resolution) with the config's defaults (gradient clipping 1.0 included), with or without
  ``cache_latents``. Diffusion-DPO (``safeguard_space="none"``) and Diffusion-SDPO steps alternate on the same
  trainer, and after every trainer step one floor step runs on the same objects: the safeguard's overhead and the
  trainer-to-floor ratio are measured paired, in the same process and the same seconds, so a shared machine's
  drifts cancel out. Each run yields the rows ``dpo-<run>`` and ``sdpo-<run>``.

Reported per row: median step time after warm-up (wall clock between consecutive step ends, the device synchronised
there; also the process CPU time, which on a loaded CPU counts our work rather than our waiting),
the ratio to the paired floor, peak memory of the run (CUDA: ``torch.cuda.max_memory_allocated``; CPU: the process
RSS sampled every 5 ms), and the trainer's construction time (with the cache: building it, on a fresh cache folder).
The losses of a trainer run share its process and so its peak memory; ``--memory-per-loss`` runs each loss in a
process of its own instead, for a peak per row (its times are then not paired). Derived: safeguard overhead, each
row's ratio to the Diffusion-DPO row (of the medians, and step by step paired: the median over a row's steps of the
step's time over the Diffusion-DPO step of the same cycle, which the targets use), the cache's speed-up
(floor-normalised), LoRA's memory saving in units of one UNet's float32 weights, and the step-time targets.

The UNets (and VAEs, text encoders) of ``--unet sd15`` and ``--unet sdxl`` are built from the real model configs
embedded below, with random weights: step time and memory do not depend on the weights' values. Nothing is
downloaded. Examples::

    python benchmarks/speed/step_time.py                                    # CPU, small UNet, everything
    python benchmarks/speed/step_time.py --device cuda --unet sd15          # bf16 mixed precision by default on CUDA
    python benchmarks/speed/step_time.py --device cuda --unet sdxl --batch-size 1
    python benchmarks/speed/step_time.py --runs floor-full,cached-full --steps 10 --repeats 3   # a subset
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: the package, benchmarks.harness


import torch  # noqa: E402

from benchmarks.harness import (  # noqa: E402
    Clock,
    MemorySampler,
    add_setup_arguments,
    machine_description,
    make_floor_step,
    make_trainer,
    resolve_setup,
    result_path,
    unet_params,
)

# One process per run; a trainer run yields a Diffusion-DPO and a Diffusion-SDPO row (alternating steps).
RUNS = ["floor-full", "floor-lora", "uncached-full", "cached-full", "uncached-lora", "cached-lora"]
# The losses a trainer run can alternate: Diffusion-DPO, the output space, the parameter space in one pass (default)
# and in two (the reference implementation), the update space likewise, and the per-pair scope (LoRA).
LOSSES = ("dpo", "sdpo", "sdpo_param", "sdpo_param_two", "sdpo_update", "sdpo_update_two", "sdpo_pair")
# Each loss's safeguard settings (the trainer is built with Diffusion-DPO's; the safeguards are swapped in per step).
SAFEGUARD_SETTINGS = {
    "dpo": {"safeguard_space": "none"},
    "sdpo": {"safeguard_space": "output"},
    "sdpo_param": {"safeguard_space": "parameter"},
    "sdpo_param_two": {"safeguard_space": "parameter", "safeguard_passes": "two"},
    "sdpo_update": {"safeguard_space": "update"},
    "sdpo_update_two": {"safeguard_space": "update", "safeguard_passes": "two"},
    "sdpo_pair": {"safeguard_space": "parameter", "safeguard_scope": "pair"},
}
ALL_ROWS = ["floor-full", "floor-lora"] + [
    f"{loss}-{cache}-{tuning}" for tuning in ("full", "lora") for cache in ("uncached", "cached") for loss in LOSSES
]


def run_floor(opts: argparse.Namespace, run: str, workdir: str) -> dict[str, Any]:
    """The bare loop alone: its step time and, above all, its peak memory."""
    num_steps = opts.warmup + opts.steps
    trainer, _ = make_trainer(opts, run, workdir, num_steps)
    # The floor keeps only what a training step cannot avoid: the frozen encoders leave the device.
    for module in trainer.family.frozen_modules().values():
        module.to("cpu")
    trainer.model.train()
    policy = torch.compile(trainer.model) if opts.torch_compile else trainer.model
    step = make_floor_step(trainer, opts, trainer.create_optimizer(), policy)
    memory, clock, times = MemorySampler(opts.device), Clock(opts.device), []
    memory.start()
    clock.reset()
    for _ in range(num_steps):
        step()
        times.append(clock.lap())
    peak = memory.stop()
    return {
        "run": run,
        "rows": {run: _timing(times[opts.warmup :])},
        "peak_memory_bytes": peak,
        "unet_params": unet_params(trainer.model),
    }


def run_trainer(opts: argparse.Namespace, run: str, workdir: str) -> dict[str, Any]:
    """``trainer.train()`` with the losses alternating step by step and, paired, a floor step after each step."""
    from transformers import TrainerCallback

    losses = opts.losses.split(",")
    num_steps = (opts.warmup + opts.steps) * len(losses)
    trainer, init_s = make_trainer(opts, run, workdir, num_steps)
    # The safeguards, swapped in step by step (the trainer builds only the configured one).
    import copy

    from trl_diffusion_sdpo.safeguards import safeguard_for

    def settings(loss: str):
        args = copy.copy(trainer.args)
        for name, value in {"safeguard_space": "output", **SAFEGUARD_SETTINGS[loss]}.items():
            setattr(args, name, value)
        return args

    safeguards = {loss: safeguard_for(settings(loss), trainer.engine, lora=run.endswith("lora")) for loss in losses}
    memory, clock = MemorySampler(opts.device), Clock(opts.device)
    times: dict[str, list[tuple[float, float]]] = {loss: [] for loss in losses}
    times["floor"] = []
    floor_step = []

    class Schedule(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if opts.paired_floor:
                floor_step.append(make_floor_step(trainer, opts, trainer.optimizer, trainer.model_wrapped))
            memory.start()
            clock.reset()

        def on_step_begin(self, args, state, control, **kwargs):
            # Diffusion-DPO and Diffusion-SDPO (output and parameter space) alternate on the same trainer: the
            # safeguards' costs are paired.
            trainer.safeguard = safeguards[losses[state.global_step % len(losses)]]

        def on_step_end(self, args, state, control, **kwargs):
            times[losses[(state.global_step - 1) % len(losses)]].append(clock.lap())
            if floor_step:
                floor_step[0]()
                times["floor"].append(clock.lap())

    trainer.add_callback(Schedule())
    trainer.train()
    peak = memory.stop()
    cache, tuning = run.split("-")
    rows = {f"{loss}-{run}": _timing(times[loss][opts.warmup :]) for loss in losses}
    paired = _timing(times["floor"][opts.warmup * len(losses) :]) if times["floor"] else None
    for row in rows.values():
        row["paired_floor"] = paired
        row["trainer_init_s"] = init_s  # with the cache: includes building it
    return {"run": run, "rows": rows, "peak_memory_bytes": peak, "unet_params": unet_params(trainer.model)}


def _timing(intervals: list[tuple[float, float]]) -> dict[str, Any]:
    return {
        "median_step_s": statistics.median(wall for wall, _ in intervals),
        # Process CPU time per step: on a shared CPU it counts our work, not our waiting.
        "median_step_cpu_s": statistics.median(cpu for _, cpu in intervals),
        "step_times_s": [wall for wall, _ in intervals],
        "step_cpu_s": [cpu for _, cpu in intervals],
    }


# --------------------------------------------------------------------------------------------------- driver


def worker(opts: argparse.Namespace) -> None:
    if opts.threads:
        torch.set_num_threads(opts.threads)
    with tempfile.TemporaryDirectory(prefix="bench-") as workdir:
        run = run_floor if opts.worker.startswith("floor") else run_trainer
        result = run(opts, opts.worker, workdir)
    print("RESULT " + json.dumps(result), flush=True)


TIME_METRICS = {"wall": "median_step_s", "cpu": "median_step_cpu_s"}


def merge_repeats(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Rows over all runs and repeats: medians of the per-repeat medians and of the per-repeat paired ratios."""
    per_row: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        for name, row in result["rows"].items():
            row = dict(row, peak_memory_bytes=result["peak_memory_bytes"], unet_params=result["unet_params"])
            per_row.setdefault(name, []).append(row)
    merged: dict[str, dict[str, Any]] = {}
    for name, repeats in per_row.items():
        row: dict[str, Any] = {
            "peak_memory_bytes": max(r["peak_memory_bytes"] for r in repeats),
            "unet_params": repeats[0]["unet_params"],
            "trainer_init_s": repeats[0].get("trainer_init_s"),
            "step_times_s": [t for r in repeats for t in r["step_times_s"]],
            "step_cpu_s": [t for r in repeats for t in r.get("step_cpu_s", [])],
            "separate_process": repeats[0].get("separate_process", False),
        }
        for metric, key in TIME_METRICS.items():
            row[key] = statistics.median(r[key] for r in repeats)
            if repeats[0].get("paired_floor"):
                row[f"paired_floor_{key}"] = statistics.median(r["paired_floor"][key] for r in repeats)
                row[f"ratio_to_floor_{metric}"] = statistics.median(r[key] / r["paired_floor"][key] for r in repeats)
        merged[name] = row
    return merged


def derive(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Safeguard overhead (paired: same process), cache speed-up (floor-normalised), LoRA's memory saving."""
    derived: dict[str, Any] = {}
    for metric in TIME_METRICS:
        overhead, parameter_overhead, update_overhead, speedup = {}, {}, {}, {}
        for tuning in ("full", "lora"):
            for cache in ("uncached", "cached"):
                dpo = rows.get(f"dpo-{cache}-{tuning}")
                sdpo, exact = rows.get(f"sdpo-{cache}-{tuning}"), rows.get(f"sdpo_param-{cache}-{tuning}")
                if dpo and sdpo:
                    overhead[f"{cache}-{tuning}"] = sdpo[TIME_METRICS[metric]] / dpo[TIME_METRICS[metric]] - 1
                if dpo and exact:
                    parameter_overhead[f"{cache}-{tuning}"] = exact[TIME_METRICS[metric]] / dpo[TIME_METRICS[metric]]
                update = rows.get(f"sdpo_update-{cache}-{tuning}")
                if dpo and update:
                    update_overhead[f"{cache}-{tuning}"] = update[TIME_METRICS[metric]] / dpo[TIME_METRICS[metric]]
            for loss in ("dpo", "sdpo"):
                uncached, cached = rows.get(f"{loss}-uncached-{tuning}"), rows.get(f"{loss}-cached-{tuning}")
                key = f"ratio_to_floor_{metric}"
                if uncached and cached and key in uncached and key in cached:
                    speedup[f"{loss}-{tuning}"] = uncached[key] / cached[key]
        derived[f"safeguard_overhead_{metric}"] = overhead
        derived[f"parameter_safeguard_ratio_to_dpo_{metric}"] = parameter_overhead
        derived[f"update_safeguard_ratio_to_dpo_{metric}"] = update_overhead
        derived[f"cache_speedup_{metric}"] = speedup
        derived[f"ratio_to_dpo_{metric}"] = {
            name: row[TIME_METRICS[metric]] / rows[f"dpo-{name.split('-', 1)[1]}"][TIME_METRICS[metric]]
            for name, row in rows.items()
            if not name.startswith(("floor", "dpo-")) and f"dpo-{name.split('-', 1)[1]}" in rows
        }
        derived[f"paired_ratio_to_dpo_{metric}"] = paired_ratios_to_dpo(rows, metric)
    saving = {}
    for prefix in ("floor", "dpo-uncached", "dpo-cached"):
        full, lora = rows.get(f"{prefix}-full"), rows.get(f"{prefix}-lora")
        if full and lora:
            saving[prefix] = (full["peak_memory_bytes"] - lora["peak_memory_bytes"]) / (4 * full["unet_params"])
    derived["lora_memory_saving_in_unet_weights"] = saving
    return derived


STEP_LISTS = {"wall": "step_times_s", "cpu": "step_cpu_s"}


def paired_ratios_to_dpo(rows: dict[str, dict[str, Any]], metric: str) -> dict[str, float]:
    """Per row, the median over its steps of the step's time over the Diffusion-DPO step of the same cycle (the
    losses alternate step by step, so the k-th step of each row of a run falls in the same seconds): a shared
    machine's drifts cancel step by step, not only run by run. Empty where the rows do not hold per-step times
    (older result files, or --memory-per-loss, whose losses ran in different processes)."""
    key, out = STEP_LISTS[metric], {}
    for name, row in rows.items():
        dpo = rows.get(f"dpo-{name.split('-', 1)[1]}")
        if name.startswith(("floor", "dpo-")) or dpo is None or row.get("separate_process"):
            continue
        steps, reference = row.get(key, []), dpo.get(key, [])
        if steps and len(steps) == len(reference):
            out[name] = statistics.median(a / b for a, b in zip(steps, reference))
    return out


def check_targets(rows: dict[str, dict[str, Any]], derived: dict[str, Any], metric: str) -> dict[str, Any]:
    """The step-time targets, each with the worst measured value."""
    targets: dict[str, dict[str, Any]] = {}
    overheads = list(derived[f"safeguard_overhead_{metric}"].values())
    if overheads:
        targets["safeguard overhead <= 2%"] = {"worst": max(overheads), "met": max(overheads) <= 0.02}
    # the step-by-step paired ratios where the file has them (the losses alternated in one process)
    ratios = derived.get(f"paired_ratio_to_dpo_{metric}") or derived.get(f"ratio_to_dpo_{metric}", {})
    for loss, bound in (("sdpo_param", 1.05), ("sdpo_update", 1.10), ("sdpo_pair", 1.10)):
        measured = [v for k, v in ratios.items() if k.startswith(f"{loss}-")]
        if measured:
            targets[f"{loss} step <= {bound:.2f}x DPO"] = {"worst": max(measured), "met": max(measured) <= bound}
    for tuning in ("full", "lora"):
        ratios = [
            row[f"ratio_to_floor_{metric}"]
            for name, row in rows.items()
            if "-cached-" in name and name.endswith(tuning) and f"ratio_to_floor_{metric}" in row
        ]
        if ratios:
            targets[f"cached {tuning} step <= 1.05x floor"] = {"worst": max(ratios), "met": max(ratios) <= 1.05}
    saving = derived["lora_memory_saving_in_unet_weights"]
    if saving:
        worst = min(saving.values())
        targets["LoRA peak memory below full by >= 1 UNet (fp32)"] = {"worst": worst, "met": worst >= 1.0}
    return targets


def print_table(rows: dict[str, dict[str, Any]], report: dict[str, Any], opts: argparse.Namespace) -> None:
    unit, scale = ("GiB", 2**30) if opts.device == "cuda" else ("MiB", 2**20)
    print(
        f"\n{opts.unet} UNet, {opts.device}, {opts.dtype}, {opts.batch_size} pairs/step, {opts.resolution} px, "
        f"median of {opts.steps} steps after {opts.warmup} warm-up, {opts.repeats} repeat(s)"
    )
    columns = [
        "row",
        "ms/step",
        "paired floor ms",
        "x floor",
        "CPU ms/step",
        "x floor (CPU)",
        f"peak mem {unit}",
        "trainer init s",
    ]
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|")
    for name in ALL_ROWS:
        if name not in rows:
            continue
        row = rows[name]
        floor = name.startswith("floor")
        build = row.get("trainer_init_s")
        paired = row.get("paired_floor_median_step_s")
        cells = [
            name,
            f"{1000 * row['median_step_s']:.1f}",
            "" if paired is None else f"{1000 * paired:.1f}",
            "1" if floor else f"{row.get('ratio_to_floor_wall', float('nan')):.3f}",
            f"{1000 * row['median_step_cpu_s']:.1f}",
            "1" if floor else f"{row.get('ratio_to_floor_cpu', float('nan')):.3f}",
            f"{row['peak_memory_bytes'] / scale:.2f}",
            "" if build is None else f"{build:.1f}",
        ]
        print("| " + " | ".join(cells) + " |")
    print()
    derived = report["derived"]
    for metric in TIME_METRICS:
        text = ", ".join(f"{k} {v:+.1%}" for k, v in derived[f"safeguard_overhead_{metric}"].items())
        print(f"safeguard overhead ({metric}): {text}")
        text = ", ".join(f"{k} {v:.3f}x" for k, v in derived[f"parameter_safeguard_ratio_to_dpo_{metric}"].items())
        print(f"parameter-space step / DPO step ({metric}): {text}")
        text = ", ".join(f"{k} {v:.3f}x" for k, v in derived[f"update_safeguard_ratio_to_dpo_{metric}"].items())
        print(f"update-space step / DPO step ({metric}): {text}")
        text = ", ".join(f"{k} {v:.3f}x" for k, v in derived.get(f"ratio_to_dpo_{metric}", {}).items())
        print(f"every safeguard step / DPO step ({metric}): {text}")
        text = ", ".join(f"{k} {v:.3f}x" for k, v in derived.get(f"paired_ratio_to_dpo_{metric}", {}).items())
        print(f"  the same, step by step paired ({metric}): {text}")
        text = ", ".join(f"{k} {v:.2f}x" for k, v in derived[f"cache_speedup_{metric}"].items())
        print(f"cache speed-up ({metric}): {text}")
    text = ", ".join(f"{k} {v:.2f}" for k, v in derived["lora_memory_saving_in_unet_weights"].items())
    print(f"LoRA memory saving, in UNets of fp32 weights: {text}")
    print(f"targets (time metric: {opts.metric}):")
    for name, target in report["targets"].items():
        print(f"  {name}: worst {target['worst']:.3f} -> {'met' if target['met'] else 'NOT met'}")


def driver(opts: argparse.Namespace, argv: list[str]) -> None:
    runs = opts.runs.split(",") if opts.runs else RUNS
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        raise SystemExit(f"unknown runs {unknown}; choose from {RUNS}")
    # --memory-per-loss: each loss of a trainer run in a process of its own, so that each row has its own peak
    jobs = [
        (run, loss)
        for run in runs
        for loss in (opts.losses.split(",") if opts.memory_per_loss and not run.startswith("floor") else [None])
    ]
    results = []
    for repeat in range(opts.repeats):
        # Interleaved repeats: slow drifts of a shared machine hit every run alike.
        for run, loss in jobs:
            command = [sys.executable, os.path.abspath(__file__), *argv, "--worker", run]
            command += ["--losses", loss] if loss else []
            start = time.perf_counter()
            completed = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
            if completed.returncode != 0 or not lines:
                sys.stderr.write(completed.stderr[-4000:])
                raise SystemExit(f"run {run} failed (exit {completed.returncode})")
            result = json.loads(lines[-1][len("RESULT ") :])
            for row in result["rows"].values() if loss else []:
                row["separate_process"] = True  # not paired with the other losses' steps
            results.append(result)
            summary = ", ".join(f"{name} {1000 * row['median_step_s']:.1f} ms" for name, row in result["rows"].items())
            print(
                f"[{repeat + 1}/{opts.repeats}] {run:<14} {summary} ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    rows = merge_repeats(results)
    derived = derive(rows)
    report: dict[str, Any] = {
        "machine": machine_description(opts.device, opts.threads),
        "settings": {k: v for k, v in vars(opts).items() if k not in ("worker", "output")},
        "rows": rows,
        "derived": derived,
        "targets": check_targets(rows, derived, opts.metric),
    }
    print_table(rows, report, opts)
    output = opts.output or result_path(opts.device, "step-time", opts.unet, study="step-time")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nwrote {output}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_setup_arguments(parser)  # --device, --dtype, --unet, --batch-size, --resolution, trainer settings
    parser.add_argument("--steps", type=int, default=20, help="measured steps per row")
    parser.add_argument("--warmup", type=int, default=3, help="steps per row discarded before measuring")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved runs of everything; median of medians")
    parser.add_argument("--runs", default=None, help=f"comma-separated subset of {RUNS}")
    parser.add_argument(
        "--losses",
        default="dpo,sdpo,sdpo_param",
        help="alternated within a trainer run: dpo, sdpo (output space), sdpo_param / sdpo_param_two (parameter "
        "space in one pass / two), sdpo_update / sdpo_update_two (update space), sdpo_pair (per-pair scope, LoRA)",
    )
    parser.add_argument(
        "--memory-per-loss",
        action="store_true",
        help="run each of --losses in a process of its own, so that each row's peak memory is its own (the rows' "
        "times then come from different processes: compare their memory, not their ratios)",
    )
    parser.add_argument(
        "--no-paired-floor",
        dest="paired_floor",
        action="store_false",
        help="do not interleave floor steps with the trainer's steps",
    )
    parser.add_argument(
        "--metric",
        choices=sorted(TIME_METRICS),
        default="wall",
        help="time metric the targets are checked on: wall clock, or process CPU time (for a loaded CPU)",
    )
    parser.add_argument(
        "--output",
        default=None,
        help="JSON path (default benchmarks/results/step-time/<device>-step-time-<unet>.json)",
    )
    parser.add_argument("--render", default=None, help="print the table of a results JSON instead of measuring")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return resolve_setup(parser.parse_args(argv))


def main() -> None:
    argv = sys.argv[1:]
    opts = parse_args(argv)
    if opts.render:
        with open(opts.render) as f:
            report = json.load(f)
        print_table(report["rows"], report, argparse.Namespace(**{**report["settings"], "metric": opts.metric}))
        return
    if opts.worker:
        worker(opts)
    else:
        driver(opts, argv)


if __name__ == "__main__":
    main()
