"""Every GPU figure the package quotes, in one command that ends within ``--budget-s`` on one GPU, one result file.

Each section is a :mod:`gpu_matrix` run (its own model processes, its own time guard), in this order:

* ``encode``: the matrix (SD1.5 full, SDXL full with checkpointing, FLUX.2 [klein] LoRA; Diffusion-DPO and the
  output, one-pass, two-pass and update-space safeguards), images and prompts encoded every step;
* ``cache``: Diffusion-DPO, the one pass and the update space with the latents and prompt embeddings cached
  (``--cache-latents``): the trainer's step against the compute floor without the encoders;
* ``quantized`` and ``quantized-flux2``: LoRA (rank 8) on a bf16 base and on weight-only int8 (torchao, quanto)
  bases, and on SD1.5 bitsandbytes NF4 and int8, Diffusion-DPO: the peak beside ``estimate-memory``'s total;
* ``before``: the one pass and the update space of the code at ``--before`` (a checkout of an earlier commit, with
  its own ``benchmarks/speed/gpu_matrix.py``) on SD1.5, beside Diffusion-DPO: step ratios and peaks before and after,
  on the same machine in the same run;
* ``rerun``: SD1.5's Diffusion-DPO and one-pass cells once more: the noise to quote beside a ratio;
* ``workers``: SD1.5's Diffusion-DPO cell, images encoded, with four data-loading worker processes (every other
  section loads in the training process): what overlapping the reading and decoding with the step gains.

Every measured cell carries ``estimate-memory``'s total for its run shape beside its peak (``gpu_matrix``). Sections
share the budget (470 s by default: within 8 minutes with the processes' start) in proportion to the seconds each took
on an H200 (:data:`SECTIONS`); time a section leaves passes to the next, and what the budget does not reach is
recorded as not measured. ``--tiny`` runs everything on the package's tiny
pipelines (the test suite's slow tier runs it on the CPU)::

    python benchmarks/speed/gpu_suite.py --before .before          # benchmarks/results/gpu/cuda-gpu-suite-real.json
    python benchmarks/speed/gpu_suite.py --device cpu --tiny --before . --budget-s 600
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import result_path  # noqa: E402

MATRIX = "benchmarks/speed/gpu_matrix.py"
ALL_SETTINGS = "dpo,sdpo,sdpo_param,sdpo_param_two,sdpo_update,sdpo_pair"


@dataclass(frozen=True)
class Section:
    """One :mod:`gpu_matrix` run of the suite: its models, settings and extra arguments, its share of the budget."""

    name: str
    models: str
    settings: str
    weight: float
    arguments: tuple[str, ...] = ()
    before: bool = False  # run the checkout at --before instead of this one


# weights: the seconds each section took on one H200 (benchmarks/results/gpu/cuda-h200-gpu-suite-real.json: a model
# process starts in about 16 s; an SD1.5 cell takes 4-6 s, an SDXL one 10-20 s, a FLUX.2 [klein] one 7-15 s), and
# for ``workers`` (not run there yet) the rerun's less one cell
SECTIONS = (
    Section("encode", "sd15,sdxl,flux2-klein", "dpo,sdpo,sdpo_param,sdpo_param_two,sdpo_update", 165),
    Section("cache", "sd15,sdxl,flux2-klein", "dpo,sdpo_param,sdpo_update", 128, ("--cache-latents",)),
    Section("quantized", "sd15", "dpo", 56,
            ("--lora-all", "--base", "none,torchao-int8,quanto-int8,bnb-nf4,bnb-int8")),
    Section("quantized-flux2", "flux2-klein", "dpo", 50, ("--lora-all", "--base", "none,torchao-int8,quanto-int8")),
    Section("before", "sd15", "dpo,sdpo_param,sdpo_update", 43, before=True),
    Section("rerun", "sd15", "dpo,sdpo_param", 35),
    Section("workers", "sd15", "dpo", 25, ("--dataloader-workers", "4")),
)  # fmt: skip


def section_argv(section: Section, opts: argparse.Namespace, budget_s: float, output: str) -> list[str]:
    argv = ["--device", opts.device, "--models", section.models, "--settings", section.settings]
    argv += ["--steps", str(opts.steps), "--warmup", str(opts.warmup), "--budget-s", f"{budget_s:.0f}"]
    argv += ["--grace-s", str(opts.grace_s), "--first-cell-s", str(opts.first_cell_s)]
    argv += ["--output", output, *section.arguments]
    if opts.tiny:
        argv += ["--tiny", "--threads", "1"]
    return argv


def run_section(section: Section, opts: argparse.Namespace, budget_s: float) -> dict[str, Any]:
    """The section's :mod:`gpu_matrix` report, or a record of why it has none (not reached, no ``--before`` tree,
    the run failed)."""
    if budget_s <= 0:
        return {"status": "not measured", "reason": "time guard: the suite's budget was spent before this section"}
    tree = Path(opts.before or ".").resolve() if section.before else ROOT
    if section.before and (opts.before is None or not (tree / MATRIX).is_file()):
        return {"status": "not measured", "reason": f"no earlier checkout with {MATRIX} at --before {opts.before}"}
    with tempfile.TemporaryDirectory(prefix="gpu-suite-") as folder:
        output = os.path.join(folder, "report.json")
        argv = section_argv(section, opts, budget_s, output)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]))
        # the matrix stops its own model processes; this bound only catches a driver that hangs
        done = subprocess.run(
            [sys.executable, str(tree / MATRIX), *argv], cwd=tree, env=env, text=True, capture_output=True,
            timeout=budget_s + 4 * opts.grace_s + 120,
        )  # fmt: skip
        print(done.stdout[-4000:], end="", flush=True)
        if done.returncode != 0 or not os.path.isfile(output):
            return {"status": "error", "exit_code": done.returncode, "error": done.stderr[-3000:]}
        report = json.loads(Path(output).read_text())
    report["status"] = "measured"
    report["command"] = shlex.join(["python", MATRIX, *(a for a in argv if a != output)])
    report["tree"] = "this checkout" if not section.before else f"--before {opts.before}"
    return report


def _cells(report: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    cells = report.get("cells", {}) if report.get("status") == "measured" else {}
    return {(model, key): cell for model, row in cells.items() for key, cell in row.items()}


def _measured(cell: dict[str, Any] | None) -> bool:
    return bool(cell) and cell.get("status") == "measured"


def compare(reports: dict[str, dict[str, Any]], name: str, against: str = "encode") -> dict[str, Any]:
    """Each cell of section ``name`` beside the same cell of section ``against``: step times, their ratio, the ratio to
    Diffusion-DPO in each, and the peaks (``None`` where either cell is not measured)."""
    theirs = _cells(reports.get(against, {}))
    rows = {}
    for (model, key), cell in _cells(reports.get(name, {})).items():
        other = theirs.get((model, key))
        both = _measured(cell) and _measured(other)
        rows[f"{model}/{key}"] = {
            f"{name}_step_s": cell.get("step_s"),
            f"{against}_step_s": other.get("step_s") if other else None,
            "step_ratio": cell["step_s"] / other["step_s"] if both else None,
            f"{name}_ratio_to_dpo": cell.get("ratio_to_dpo"),
            f"{against}_ratio_to_dpo": other.get("ratio_to_dpo") if other else None,
            f"{name}_peak_bytes": cell.get("peak_memory_bytes"),
            f"{against}_peak_bytes": other.get("peak_memory_bytes") if other else None,
        }
    return rows


def suite(opts: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    start = time.time()
    deadline = start + opts.budget_s
    reports: dict[str, dict[str, Any]] = {}
    for index, section in enumerate(SECTIONS):
        weights = sum(s.weight for s in SECTIONS[index:])
        budget = (deadline - time.time()) * section.weight / weights
        began = time.time()
        reports[section.name] = run_section(section, opts, budget)
        reports[section.name]["section_budget_s"] = budget
        reports[section.name]["section_wall_s"] = time.time() - began
        print(f"section {section.name}: {reports[section.name]['status']} in {time.time() - began:.0f} s", flush=True)
    device = next((r["device"] for r in reports.values() if r.get("device")), None)
    return {
        "what": "the GPU matrix with encoding and with cached latents, LoRA on quantized bases, the one pass and the "
        "update space before and after, a rerun for the noise, and the encoded step with data-loading workers; "
        "estimate-memory beside every peak",
        "command": shlex.join(["python", "benchmarks/speed/gpu_suite.py", *argv]),
        "device": device,
        "tiny": opts.tiny,
        "sections": {
            s.name: {"models": s.models, "settings": s.settings, "arguments": list(s.arguments)} for s in SECTIONS
        },  # fmt: skip
        "reports": reports,
        "cache_against_encode": compare(reports, "cache"),
        "before_against_after": compare(reports, "before"),
        "rerun_against_first": compare(reports, "rerun"),
        "workers_against_encode": compare(reports, "workers"),
        "cells_measured": cell_rows(reports),
        "wall_time_s": time.time() - start,
    }


def cell_rows(reports: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per measured cell of every report: the step against the floor and Diffusion-DPO, the peak beside the
    estimate (GiB)."""
    rows = []
    for name, report in reports.items():
        for (model, key), cell in _cells(report).items():
            if not _measured(cell):
                continue
            estimate = cell.get("estimate_bytes")
            rows.append({
                "run": name, "model": model, "cell": key, "cache_latents": report["settings"]["cache_latents"],
                "step_ms": round(1000 * cell["step_s"], 1), "floor_ms": round(1000 * cell["floor_s"], 1),
                "ratio_to_floor": round(cell["ratio_to_floor"], 3),
                "ratio_to_dpo": None if cell.get("ratio_to_dpo") is None else round(cell["ratio_to_dpo"], 3),
                "peak_gib": round(cell["peak_memory_bytes"] / 2**30, 2),
                "estimate_gib": None if estimate is None else round(estimate / 2**30, 2),
                "estimate_relative_error": None if estimate is None or report.get("device_type") != "cuda"
                else round(estimate / cell["peak_memory_bytes"] - 1, 3),
            })  # fmt: skip
    return rows


# the real models' ids in estimate-memory's table of known models
MODEL_IDS = {
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "flux2-klein": "black-forest-labs/FLUX.2-klein-4B",
}


def estimate_now(rows: list[dict[str, Any]], reports: dict[str, dict[str, Any]]) -> None:
    """Each real-size row's estimate recomputed by today's ``estimate-memory`` from the shape its cell recorded
    (``estimate_now_gib``, ``estimate_now_relative_error``): the estimator checked against peaks measured before."""
    from trl_diffusion_sdpo.engines.memory import RunShape, estimate_memory, model_sizes

    sizes: dict[str, Any] = {}
    for row in rows:
        cell = reports[row["run"]]["cells"][row["model"]][row["cell"]]
        shape = cell.get("estimate_shape")
        if shape is None or row["model"] not in MODEL_IDS or reports[row["run"]].get("tiny"):
            continue
        shape = RunShape(**{k: tuple(v) if isinstance(v, list) else v for k, v in shape.items()})
        model = sizes.setdefault(row["model"], model_sizes(MODEL_IDS[row["model"]]))
        total = estimate_memory(model, shape).total_bytes
        row["estimate_now_gib"] = round(total / 2**30, 2)
        row["estimate_now_relative_error"] = round(total / cell["peak_memory_bytes"] - 1, 3)


def assemble(paths: list[str]) -> dict[str, Any]:
    """Reports written by separate runs (``NAME=PATH``: a :mod:`gpu_matrix` report or this script's), under their
    names, with one row per measured cell, its estimate recomputed by today's estimator beside."""
    reports: dict[str, dict[str, Any]] = {}
    for item in paths:
        name, _, path = item.partition("=")
        report = json.loads(Path(path).read_text())
        if "reports" in report:  # a suite: its sections
            reports.update({f"{name}/{key}": section for key, section in report["reports"].items()})
        else:
            reports[name] = {**report, "status": "measured"}
    rows = cell_rows(reports)
    estimate_now(rows, reports)
    return {"reports": reports, "cells": rows}


def print_summary(result: dict[str, Any]) -> None:
    for name, title in (("cache_against_encode", "cached / encoded"), ("before_against_after", "before / after"),
                        ("rerun_against_first", "rerun / first"),
                        ("workers_against_encode", "4 workers / none")):  # fmt: skip
        print(f"\n{title}: step ratio, ratio to Diffusion-DPO (each side)")
        for cell, row in result[name].items():
            ratios = [v for k, v in row.items() if k.endswith("ratio_to_dpo")]
            shown = ", ".join("-" if v is None else f"{v:.3f}" for v in ratios)
            step = "-" if row["step_ratio"] is None else f"{row['step_ratio']:.3f}"
            print(f"  {cell}: {step} ({shown})")
    print("\nestimate-memory against the peak:")
    for row in result["cells_measured"]:
        error = row["estimate_relative_error"]
        shown = "peak is the process's RSS" if error is None else f"{error:+.1%}"
        print(f"  {row['run']} {row['model']}/{row['cell']}: {shown}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the package's tiny pipelines (on a CPU: minutes)")
    parser.add_argument("--before", default=None, help="a checkout of earlier code for the 'before' section")
    parser.add_argument("--budget-s", type=float, default=470, help="no cell starts after this many seconds")
    parser.add_argument(
        "--first-cell-s", type=float, default=None, help="time a model's first cell is expected to take (25; tiny 5)"
    )
    parser.add_argument("--steps", type=int, default=3, help="measured steps per cell (at least 3)")
    parser.add_argument("--warmup", type=int, default=1, help="steps per cell discarded before measuring")
    parser.add_argument("--grace-s", type=float, default=20, help="a model's process is stopped this long after")
    parser.add_argument(
        "--output", default=None, help="JSON path (default benchmarks/results/gpu/<device>-gpu-suite-*)"
    )
    parser.add_argument(
        "--assemble", nargs="+", metavar="NAME=PATH", help="write reports of separate runs into --output, run nothing"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    opts = parse_args(argv)
    if opts.first_cell_s is None:
        opts.first_cell_s = 5.0 if opts.tiny else 25.0
    if opts.assemble:
        result = assemble(opts.assemble)
        Path(opts.output).write_text(json.dumps(result, indent=1) + "\n")
        for row in result["cells"]:
            print(" | ".join(str(v) for v in row.values()))
        return 0
    result = suite(opts, argv)
    print_summary(result)
    output = opts.output or result_path(opts.device, "gpu-suite", "tiny" if opts.tiny else "real", study="gpu")
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {output} ({result['wall_time_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
