"""Paired A/B timing of the levers that change the compute itself (and hence the floor as much as the trainer).

Each lever is measured on the floor step of ``step_time.py`` (policy forward + backward over 2B samples, reference
forward over 2B samples without autograd, optimizer step), with two copies of the same model: one without the
lever (A), one with it (B). Steps of A and B alternate in one process, so a shared machine's drifts hit both
alike; the report is the median step time of each and the ratio B/A (below 1: the lever helps).

Levers: ``fused`` (torch's fused AdamW against its foreach implementation), ``channels_last`` (UNet weights and
activations in channels-last memory format), ``checkpointing`` (gradient checkpointing: slower, but less memory;
its memory effect is measured by ``step_time.py --gradient-checkpointing``), ``compile`` (``torch.compile`` of the
policy UNet; the first steps, which compile, are discarded as warm-up).

    python benchmarks/speed/levers.py                            # CPU, small UNet, every lever, full and LoRA
    python benchmarks/speed/levers.py --device cuda --unet sd15 --levers channels_last,compile
    python benchmarks/speed/levers.py --device cuda --unet sdxl --tunings lora   # two full-tuning SDXLs do not fit

Both copies live in one process: for full tuning that is twice the policy, reference and optimizer state.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: the package, benchmarks.harness
from benchmarks import harness  # noqa: E402

LEVERS = ["fused", "channels_last", "checkpointing", "compile"]


def measure(opts: argparse.Namespace, lever: str, tuning: str) -> dict[str, float]:
    variants = {}
    with tempfile.TemporaryDirectory(prefix="levers-") as workdir:
        for variant in ("A", "B"):
            with_lever = variant == "B"
            bench_opts = harness.parse_setup_args(opts.step_time_args)
            bench_opts.optim = "adamw_torch_fused" if (lever != "fused" or with_lever) else "adamw_torch"
            bench_opts.channels_last = lever == "channels_last" and with_lever
            bench_opts.gradient_checkpointing = lever == "checkpointing" and with_lever
            bench_opts.torch_compile = lever == "compile" and with_lever
            trainer, _ = harness.make_trainer(bench_opts, f"floor-{tuning}", os.path.join(workdir, variant), 1)
            for module in trainer.family.frozen_modules().values():
                module.to("cpu")
            trainer.model.train()
            policy = torch.compile(trainer.model) if bench_opts.torch_compile else trainer.model
            variants[variant] = harness.make_floor_step(trainer, bench_opts, trainer.create_optimizer(), policy)
    clock = harness.Clock(opts.device)
    times: dict[str, list[float]] = {"A": [], "B": []}
    for index in range(opts.warmup + opts.steps):
        for variant in ("A", "B") if index % 2 == 0 else ("B", "A"):
            clock.reset()
            variants[variant]()
            times[variant].append(clock.lap()[0])
    a = statistics.median(times["A"][opts.warmup :])
    b = statistics.median(times["B"][opts.warmup :])
    return {"without_ms": 1000 * a, "with_ms": 1000 * b, "ratio": b / a}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levers", default=",".join(LEVERS), help=f"comma-separated subset of {LEVERS}")
    parser.add_argument("--tunings", default="full,lora")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--output", default=None, help="JSON path (default benchmarks/results/step-time/<device>-levers-<unet>.json)"
    )
    opts, rest = parser.parse_known_args()
    opts.step_time_args = rest  # --device, --unet, --dtype, --batch-size, --threads, ... (harness.add_setup_arguments)
    bench = harness.parse_setup_args(rest)
    opts.device = bench.device
    if bench.threads:
        torch.set_num_threads(bench.threads)
    results = {}
    for lever in opts.levers.split(","):
        for tuning in opts.tunings.split(","):
            result = measure(opts, lever, tuning)
            results[f"{lever}-{tuning}"] = result
            print(
                f"{lever:<14} {tuning:<5} without {result['without_ms']:8.1f} ms  with {result['with_ms']:8.1f} ms  "
                f"ratio {result['ratio']:.3f}",
                flush=True,
            )
    report = {
        "machine": harness.machine_description(bench.device, bench.threads),
        "settings": vars(bench) | vars(opts),
        "levers": results,
        "date": time.strftime("%Y-%m-%d"),
    }
    output = opts.output or harness.result_path(bench.device, "levers", bench.unet, study="step-time")
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output, "w") as f:
        json.dump(report, f, indent=2, default=str)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
