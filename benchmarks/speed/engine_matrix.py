"""Every safeguard on every engine: step time and peak memory against the same engine's Diffusion-DPO, two processes.

Each engine (DDP, DeepSpeed ZeRO-2 and ZeRO-3, FSDP2, from ``examples/accelerate_configs``) runs one ``accelerate
launch`` of two processes (gloo on a CPU, one thread each). In it one trainer is built (the model's real config with
random weights, LoRA, cached latents, one pair per process) and ``trainer.train()`` runs with the safeguards
alternating step by step, Diffusion-DPO among them, so that their costs are paired on the same weights, data and
machine state. Per safeguard: the median step time over its measured steps (after ``--warmup`` of its own) and the
median over its steps of the peak resident memory during the step, sampled on every process (the larger process's
figure is kept). ``MALLOC_MMAP_THRESHOLD_`` is fixed at 128 KiB in the workers so that freed tensors leave the
resident set at once and a step's peak is its own, not an earlier step's high-water mark. A safeguard the engine
refuses is recorded with the trainer's error. accelerate engages FSDP on accelerators only: on CPU processes the
FSDP2 worker lifts that gate (``tests/helpers/fsdp_on_cpu.py``, as the tests' worker does), so
``fully_shard`` really shards the model over gloo.

    python benchmarks/speed/engine_matrix.py                        # SD1.5 at 256 px, 2 pairs, LoRA, all engines
    python benchmarks/speed/engine_matrix.py --engines multi_gpu --unet small --resolution 64 --steps 2
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: the package, benchmarks.harness

from benchmarks.harness import (  # noqa: E402
    SAFEGUARDS,
    MemorySampler,
    add_setup_arguments,
    machine_description,
    make_trainer,
    resolve_setup,
)
from tests.helpers.fsdp_on_cpu import lift_fsdp_cpu_gate  # noqa: E402  # FSDP on CPU processes, as the tests run it

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "examples" / "accelerate_configs"
ENGINES = ("multi_gpu", "deepspeed_zero2", "deepspeed_zero3", "fsdp2")


def worker(opts: argparse.Namespace) -> None:
    """One engine's two processes: the safeguards alternating on one trainer."""
    import copy

    from transformers import TrainerCallback

    from trl_diffusion_sdpo.safeguards import safeguard_for

    torch.set_num_threads(1)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not torch.cuda.is_available():
        lift_fsdp_cpu_gate()  # accelerate engages FSDP on accelerators only
    names = opts.safeguards.split(",")
    with tempfile.TemporaryDirectory(prefix="engine-matrix-") as workdir:
        trainer, init_s = make_trainer(opts, "cached-lora", workdir, (opts.warmup + opts.steps) * len(names))
        refused: dict[str, str] = {}
        safeguards = {}
        for name in names:
            args = copy.copy(trainer.args)
            for field, value in {"safeguard_space": "output", "safeguard_scope": "global", **SAFEGUARDS[name]}.items():
                setattr(args, field, value)
            try:
                safeguards[name] = safeguard_for(args, trainer.engine, lora=True)
            except ValueError as error:
                refused[name] = str(error)
        running = [name for name in names if name in safeguards]
        times: dict[str, list[float]] = {name: [] for name in running}
        peaks: dict[str, list[int]] = {name: [] for name in running}
        sampler = MemorySampler("cpu")
        clock = [0.0]

        class Schedule(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                trainer.safeguard = safeguards[running[state.global_step % len(running)]]
                clock[0] = time.perf_counter()
                sampler.start()

            def on_step_end(self, args, state, control, **kwargs):
                name = running[(state.global_step - 1) % len(running)]
                times[name].append(time.perf_counter() - clock[0])
                peaks[name].append(sampler.stop())

        trainer.add_callback(Schedule())
        trainer.args.max_steps = (opts.warmup + opts.steps) * len(running)
        trainer.train()
        rows = {}
        for name in running:
            # every process's peaks, step by step
            every = trainer.accelerator.gather(torch.tensor(peaks[name], dtype=torch.float64)[None]).tolist()
            measured = slice(opts.warmup, None)
            rows[name] = {
                "median_step_s": statistics.median(times[name][measured]),
                "step_times_s": times[name][measured],
                "median_peak_memory_bytes": max(statistics.median(r[measured]) for r in every),
                "peak_memory_bytes_by_process": [statistics.median(r[measured]) for r in every],
                "two_pass_reason": getattr(getattr(safeguards[name], "backward_stage", None), "two_pass_reason", None),
            }
        if trainer.accelerator.is_main_process:
            result = {
                "engine": trainer.engine.name,
                "engine_repr": repr(trainer.engine),
                "num_processes": trainer.accelerator.num_processes,
                "trainer_init_s": init_s,
                "rows": rows,
                "refused": refused,
            }
            Path(opts.out).write_text(json.dumps(result, indent=1))


def launch(opts: argparse.Namespace, engine: str, out: Path) -> dict[str, Any]:
    """One engine's ``accelerate launch`` of this script as its worker."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / f"{engine}.yaml"),
        "--num_processes", str(opts.processes), "--mixed_precision", "no", __file__, "--worker",
        "--out", str(out), "--unet", opts.unet, "--batch-size", str(opts.batch_size),
        "--resolution", str(opts.resolution), "--steps", str(opts.steps), "--warmup", str(opts.warmup),
        "--safeguards", opts.safeguards, "--dataset-batches", str(opts.dataset_batches), "--optim", opts.optim,
        "--lora-rank", str(opts.lora_rank),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="131072", TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stdout[-2000:] + proc.stderr[-4000:]).strip()}
    result = json.loads(out.read_text())
    result["launch_s"] = time.perf_counter() - start
    return result


def main(argv: list[str] | None = None) -> None:
    parser = add_setup_arguments(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, of {', '.join(ENGINES)}")
    parser.add_argument("--safeguards", default=",".join(SAFEGUARDS), help=f"of {', '.join(SAFEGUARDS)}")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="measured steps per safeguard")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured first steps per safeguard")
    parser.add_argument("--output", default=None)
    parser.add_argument(
        "--update", action="store_true", help="keep the other engines' entries of an existing output file"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.set_defaults(unet="sd15", resolution=256)
    opts = resolve_setup(parser.parse_args(argv))
    if opts.worker:
        worker(opts)
        return
    opts.batch_size = opts.batch_size or 1
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="engine-matrix-") as tmp:
        for engine in opts.engines.split(","):
            print(f"{engine} ...", flush=True)
            results[engine] = launch(opts, engine, Path(tmp) / f"{engine}.json")
            for name, row in results[engine].get("rows", {}).items():
                dpo = results[engine]["rows"].get("dpo")
                if dpo is not None:
                    row["step_ratio_to_dpo"] = row["median_step_s"] / dpo["median_step_s"]
                    row["peak_memory_ratio_to_dpo"] = row["median_peak_memory_bytes"] / dpo["median_peak_memory_bytes"]
                print(f"  {name:14s} {row['median_step_s']:7.2f} s  x{row.get('step_ratio_to_dpo', float('nan')):.3f}"
                      f"  peak {row['median_peak_memory_bytes'] / 2**30:.2f} GiB", flush=True)  # fmt: skip
            for name, why in results[engine].get("refused", {}).items():
                print(f"  {name:14s} refused: {why[:100]}", flush=True)
            if "error" in results[engine]:
                print(results[engine]["error"][-1500:], flush=True)
    settings = {k: v for k, v in vars(opts).items() if k not in ("worker", "out", "output", "update")}
    size = f"{opts.unet}-{opts.resolution}px-{opts.batch_size * opts.processes}pairs-lora"
    output = Path(opts.output or ROOT / "benchmarks" / "results" / "step-time" / f"cpu-engine-matrix-{size}.json")
    record = {"machine": machine_description("cpu", 1), "settings": settings, "engines": results}
    if opts.update and output.exists():  # the engines measured now replace theirs; each keeps its own settings
        earlier = json.loads(output.read_text())
        for engine in results:
            earlier["engines"][engine] = {**results[engine], "machine": record["machine"], "settings": settings}
        earlier["settings"]["engines"] = ",".join(earlier["engines"])  # the file's engines, each run's in its entry
        record = earlier
    output.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
