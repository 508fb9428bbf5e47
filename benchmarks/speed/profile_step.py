"""Where a trainer step's time goes: one ``trainer.train()`` with the safeguards alternating step by step (as
``engine_matrix.py`` runs them), the step times and peak memory of each, and a ``torch.profiler`` record of one step
of each. The result file holds, per safeguard, its median step time and its median step's peak memory against
Diffusion-DPO's (CUDA: ``torch.cuda.max_memory_allocated`` of the step; CPU: the process's resident memory sampled
during the step, best with ``MALLOC_MMAP_THRESHOLD_=131072`` as below), the operators that take the most time in its
profiled step, and the operators whose time differs most from Diffusion-DPO's profiled step: where a safeguard's
extra time goes.

    MALLOC_MMAP_THRESHOLD_=131072 python benchmarks/speed/profile_step.py --unet sd15 --resolution 256 \
        --batch-size 2 --safeguards dpo,pair
    python benchmarks/speed/profile_step.py --device cuda --unet sd15 --run cached-full
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: the package, benchmarks.harness

from benchmarks import harness  # noqa: E402


def operator_times(profile: torch.profiler.profile, device: str) -> dict[str, dict[str, float]]:
    """Self time (seconds) and calls of each operator in ``profile``: device time on CUDA, CPU time on a CPU."""
    attribute = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    return {
        event.key: {"self_s": getattr(event, attribute) / 1e6, "calls": event.count}
        for event in profile.key_averages()
    }


def differences(times: dict[str, dict[str, float]], base: dict[str, dict[str, float]], rows: int) -> list[dict]:
    """The ``rows`` operators whose self time differs most between ``times`` and ``base``, largest first."""
    keys = set(times) | set(base)
    zero = {"self_s": 0.0, "calls": 0}
    delta = [
        {
            "operator": key,
            "extra_s": times.get(key, zero)["self_s"] - base.get(key, zero)["self_s"],
            "calls": times.get(key, zero)["calls"],
            "dpo_calls": base.get(key, zero)["calls"],
        }
        for key in keys
    ]
    return sorted(delta, key=lambda row: abs(row["extra_s"]), reverse=True)[:rows]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = harness.add_setup_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--run", default="cached-lora", help="cached-lora, cached-full, uncached-lora, ...")
    parser.add_argument("--safeguards", default="dpo,parameter,pair", help=f"of {', '.join(harness.SAFEGUARDS)}")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per safeguard (besides the profiled one)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured first steps per safeguard")
    parser.add_argument("--rows", type=int, default=15, help="operators listed per table")
    parser.add_argument("--output", default=None, help="the result file (default: printed only)")
    opts = harness.resolve_setup(parser.parse_args(argv))
    if opts.threads:
        torch.set_num_threads(opts.threads)
    from transformers import TrainerCallback

    from trl_diffusion_sdpo.safeguards import safeguard_for

    names = opts.safeguards.split(",")
    if names[0] != "dpo":
        parser.error("--safeguards must start with dpo: the differences are taken against it")
    per_safeguard = opts.warmup + opts.steps + 1  # the last step of each is profiled
    with tempfile.TemporaryDirectory(prefix="profile-step-") as workdir:
        trainer, _ = harness.make_trainer(opts, opts.run, workdir, per_safeguard * len(names))
        safeguards = {}
        for name in names:
            args = copy.copy(trainer.args)
            for field, value in {
                "safeguard_space": "output",
                "safeguard_scope": "global",
                **harness.SAFEGUARDS[name],
            }.items():
                setattr(args, field, value)
            safeguards[name] = safeguard_for(args, trainer.engine, lora=opts.run.endswith("lora"))
        times: dict[str, list[float]] = {name: [] for name in names}
        peaks: dict[str, list[int]] = {name: [] for name in names}
        sampler = harness.MemorySampler(opts.device)
        profiles: dict[str, dict[str, dict[str, float]]] = {}
        state = {"clock": 0.0, "profile": None}

        class Schedule(TrainerCallback):
            def on_step_begin(self, args, state_, control, **kwargs):
                name = names[state_.global_step % len(names)]
                trainer.safeguard = safeguards[name]
                if state_.global_step >= (per_safeguard - 1) * len(names):  # each safeguard's last step
                    activities = [torch.profiler.ProfilerActivity.CPU]
                    if opts.device == "cuda":
                        activities.append(torch.profiler.ProfilerActivity.CUDA)
                    state["profile"] = torch.profiler.profile(activities=activities)
                    state["profile"].__enter__()
                sampler.start()  # CUDA: synchronised, its peak reset
                state["clock"] = time.perf_counter()

            def on_step_end(self, args, state_, control, **kwargs):
                harness.sync(opts.device)
                elapsed = time.perf_counter() - state["clock"]
                peak = sampler.stop()
                name = names[(state_.global_step - 1) % len(names)]
                if state["profile"] is not None:
                    state["profile"].__exit__(None, None, None)
                    profiles[name] = operator_times(state["profile"], opts.device)
                    state["profile"] = None
                else:
                    times[name].append(elapsed)
                    peaks[name].append(peak)

        trainer.add_callback(Schedule())
        trainer.train()
    dpo = statistics.median(times["dpo"][opts.warmup :])
    dpo_peak = statistics.median(peaks["dpo"][opts.warmup :])
    rows = {}
    for name in names:
        median = statistics.median(times[name][opts.warmup :])
        profiled = sum(op["self_s"] for op in profiles[name].values())
        rows[name] = {
            "median_step_s": median,
            "step_times_s": times[name][opts.warmup :],
            "step_ratio_to_dpo": median / dpo,
            "median_peak_memory_bytes": statistics.median(peaks[name][opts.warmup :]),
            "peak_memory_ratio_to_dpo": statistics.median(peaks[name][opts.warmup :]) / dpo_peak,
            "profiled_self_s": profiled,
            # why the exact rule ran per-branch passes (None: one pass, or no exact rule)
            "two_pass_reason": getattr(getattr(safeguards[name], "backward_stage", None), "two_pass_reason", None),
            "slowest_operators": sorted(
                ({"operator": k, **v} for k, v in profiles[name].items()), key=lambda r: -r["self_s"]
            )[: opts.rows],
        }
        if name != "dpo":
            rows[name]["profiled_extra_s"] = profiled - sum(op["self_s"] for op in profiles["dpo"].values())
            rows[name]["operators_against_dpo"] = differences(profiles[name], profiles["dpo"], opts.rows)
    result = {
        "machine": harness.machine_description(opts.device, opts.threads),
        "settings": {
            **{k: v for k, v in vars(opts).items() if k != "output"},
            "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        },
        "rows": rows,
    }
    for name, row in rows.items():
        print(
            f"{name:14s} {row['median_step_s']:8.3f} s  x{row['step_ratio_to_dpo']:.3f}"
            f"  peak {row['median_peak_memory_bytes'] / 2**30:.2f} GiB  x{row['peak_memory_ratio_to_dpo']:.4f}"
        )
        for op in row.get("operators_against_dpo", [])[:8]:
            print(f"    {op['operator']:40s} {op['extra_s']:+8.3f} s  ({op['dpo_calls']} -> {op['calls']} calls)")
    if opts.output:
        Path(opts.output).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
