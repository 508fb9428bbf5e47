"""The compiled cell: the exact rule under Trainer's ``torch_compile`` against compiled Diffusion-DPO, and the eager
one pass, on one model in one command, each setting compiled once in a process of its own.

In this order, on SD1.5's UNet with full tuning and cached latents (``--model sdxl`` for SDXL; the GPU matrix's
models, ``benchmarks/speed/gpu_matrix.py``, whose cell runs each setting): Diffusion-DPO, the parameter space and
the update space under ``torch_compile_mode=--mode`` (``reduce-overhead`` on CUDA: CUDA graphs), then the eager one
pass (``safeguard_space="parameter"``) and eager Diffusion-DPO. Each cell runs ``--warmup`` steps (the compiling ones:
reduce-overhead's first step compiles, its second records the graphs), then ``--steps`` measured steps; its compile
time is the warm-up steps' time less as many measured steps. Every setting is one process that compiles once;
inductor's caches (``TORCHINDUCTOR_CACHE_DIR``: ``--cache-dir``, or a folder made for the command) are kept
between the settings' processes, so that a later setting reuses the graphs an earlier one compiled (the denoiser's
forward is the same in all three). A time guard (``--budget-s``, 540 s by default: one command of at most 9 minutes)
starts no cell it cannot end and records the rest as "not measured".

Ratios: each compiled safeguard over the compiled Diffusion-DPO step, the eager one pass over eager Diffusion-DPO's,
against :data:`TARGETS`. ``--tiny`` runs the same cells on the package's tiny pipelines on a CPU (seconds), with
dynamo's ``aot_eager`` backend and Trainer's default mode as the stand-in for inductor and CUDA graphs::

    python benchmarks/speed/compiled_cell.py                        # CUDA, SD1.5
    python benchmarks/speed/compiled_cell.py --model sdxl           # CUDA, SDXL
    python benchmarks/speed/compiled_cell.py --tiny --device cpu --mode default --backend aot_eager
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
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.speed import gpu_matrix  # noqa: E402

#: the cells in the order they run: (setting, compiled or not)
CELLS = (("dpo", True), ("sdpo_param", True), ("sdpo_update", True), ("sdpo_param", False), ("dpo", False))
#: the step over Diffusion-DPO's of the same mode, at most
TARGETS = {"sdpo_param+compiled": 1.05, "sdpo_update+compiled": 1.10, "sdpo_param": 1.3}


def cell_key(setting: str, mode: str) -> str:
    """The GPU matrix's key: ``setting`` eager, ``setting+mode`` compiled."""
    return setting if mode == "none" else f"{setting}+{mode}"


def compile_seconds(cell: dict[str, Any]) -> float | None:
    """The warm-up steps' time less as many measured steps: what compiling (and recording the graphs) cost."""
    warmups = cell.get("warmup_step_times_s") or []
    if cell.get("status") != "measured" or not warmups:
        return None
    return sum(warmups) - len(warmups) * statistics.median(cell["step_times_s"])


def run(opts: argparse.Namespace) -> dict[str, Any]:
    if opts.cache_dir:
        return cells_in(opts, opts.cache_dir, opts.cache_dir)
    with tempfile.TemporaryDirectory(prefix="compiled-cell-inductor-") as cache_dir:
        return cells_in(opts, cache_dir, "a folder made for this command, removed after it")


def cells_in(opts: argparse.Namespace, cache_dir: str, cache_said: str) -> dict[str, Any]:
    """The cells in order, each setting's process compiling with inductor's caches in ``cache_dir``."""
    start = time.time()
    deadline = start + opts.budget_s
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir  # inherited by this command's processes, kept between them
    cells: dict[str, dict[str, Any]] = {}
    device = None
    for setting, compiled in CELLS:
        mode = opts.mode if compiled else "none"
        key = cell_key(setting, mode)
        argv = ["--device", opts.device, "--models", opts.model, "--settings", setting, "--compile-modes", mode]
        argv += ["--warmup", str(opts.warmup), "--steps", str(opts.steps), "--cache-latents", "--profile-steps", "0"]
        argv += ["--threads", str(opts.threads), "--grace-s", str(opts.grace_s), "--optim", opts.optim]
        argv += ["--first-cell-s", str(opts.first_cell_s)] + (["--tiny"] if opts.tiny else [])
        argv += ["--compile-backend", opts.backend] if compiled and opts.backend else []
        matrix_opts = gpu_matrix.parse_args(argv)
        spec = gpu_matrix.model_specs(matrix_opts)[0]
        if time.time() + opts.first_cell_s > deadline:
            cells[key] = {"status": "not measured", "reason": "time guard: the command's budget is spent"}
            continue
        found = gpu_matrix.run_worker(spec, matrix_opts, argv, deadline)
        device = device or found["device"]
        cell = found["cells"][key]
        cell["compile_s"] = compile_seconds(cell) if compiled else None
        cell["process_exit_code"] = found["exit_code"]
        cells[key] = cell
        print(key, {k: cell.get(k) for k in ("status", "step_s", "compile_s", "reason", "error")}, flush=True)
    gpu_matrix.add_ratios({opts.model: cells})
    targets = {}
    for name, limit in TARGETS.items():
        key = name.replace("+compiled", f"+{opts.mode}")
        ratio = cells.get(key, {}).get("ratio_to_dpo")
        targets[key] = {"limit": limit, "ratio_to_dpo": ratio, "met": None if ratio is None else ratio <= limit}
    return {
        "what": __doc__.split("\n\n")[0].replace("\n", " "),
        "command": "python benchmarks/speed/compiled_cell.py " + " ".join(opts.argv),
        "device": device,
        "settings": {
            "model": opts.model,
            "tiny": opts.tiny,
            "mode": opts.mode,
            "backend": opts.backend or "inductor (Trainer's default)",
            "warmup": opts.warmup,
            "steps": opts.steps,
            "optim": opts.optim,
            "latents": "cached (cache_latents=True)",
            "tuning": "full",
            "inductor_cache_dir": cache_said,
            "compilation": "one process per setting, each compiling once; inductor's caches kept between them",
        },
        "cells": cells,
        "targets": targets,
        "not_measured": [key for key, cell in cells.items() if cell["status"] != "measured"],
        "wall_time_s": time.time() - start,
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--model", choices=["sd15", "sdxl"], default="sd15")
    parser.add_argument("--tiny", action="store_true", help="the package's tiny pipelines (seconds on a CPU)")
    parser.add_argument(
        "--mode", default="reduce-overhead", choices=[m for m in gpu_matrix.COMPILE_MODES if m != "none"]
    )
    parser.add_argument("--backend", default=None, help="Trainer's torch_compile_backend (default: inductor)")
    parser.add_argument("--warmup", type=int, default=2, help="the compiling steps of each cell, not measured")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per cell (at least 3)")
    parser.add_argument("--optim", default="adamw_torch_fused")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--budget-s", type=float, default=540, help="no cell starts after this many seconds")
    parser.add_argument("--grace-s", type=float, default=20, help="a cell's process is stopped this long after")
    parser.add_argument("--first-cell-s", type=float, default=None, help="a cell is not started with less left")
    parser.add_argument("--cache-dir", default=None, help="TORCHINDUCTOR_CACHE_DIR (default: one for the command)")
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/gpu/<device>-...)")
    opts = parser.parse_args(argv)
    opts.argv = argv
    if opts.first_cell_s is None:
        opts.first_cell_s = 5.0 if opts.tiny else 60.0
    if opts.output is None:
        size = "tiny" if opts.tiny else "real"
        opts.output = str(
            ROOT / "benchmarks" / "results" / "gpu" / f"{opts.device}-compiled-cell-{opts.model}-{size}.json"
        )
    return opts


def main(argv: list[str] | None = None) -> dict[str, Any]:
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    report = run(opts)
    Path(opts.output).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.output).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {opts.output} ({report['wall_time_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
