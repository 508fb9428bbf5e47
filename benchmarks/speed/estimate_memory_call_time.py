"""Whole-process time of ``trl-diffusion-sdpo estimate-memory`` calls, one version of the package against another.

    OMP_NUM_THREADS=1 python benchmarks/speed/estimate_memory_call_time.py --before 5d519bc --runs 3 \
        --configs sd15_lora,sdxl_full,flux_lora --keep-earlier \
        --out benchmarks/results/memory/cpu-estimate-memory-call-time.json

Each version runs from its own copy of the package (``git archive`` of each commit), as ``python -m
trl_diffusion_sdpo estimate-memory --config <copy>/examples/configs/<config>.yaml --gpu 24`` with ``PYTHONPATH`` on
the copy; the two are interleaved (after, before, after, ...) after one warm-up call each, so both see the same
load. Each call's wall seconds, CPU seconds (user + sys of the child, from ``os.wait4``) and peak resident memory
are kept; the result gives min, median and max, and the after/before ratio run pair by run pair. The outputs of the
two versions are compared: ``same_output`` says whether they agree.
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

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the repository root: benchmarks.harness


def call(copy: Path, config: str) -> dict[str, Any]:
    """One call of the command from ``copy``: wall and CPU seconds, peak MiB, and what it printed."""
    command = [sys.executable, "-m", "trl_diffusion_sdpo", "estimate-memory"]
    command += ["--config", str(copy / "examples" / "configs" / f"{config}.yaml"), "--gpu", "24"]
    env = {**os.environ, "PYTHONPATH": str(copy), "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryFile() as out:
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=copy, env=env, stdout=out, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        printed = out.read().decode().replace(str(copy), "<copy>")
    if process.returncode:
        raise RuntimeError(f"{' '.join(command)} exited {process.returncode}")
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_mib": usage.ru_maxrss / 1024,
        "output": printed,
    }


def spread(values: list[float], digits: int = 3) -> dict[str, float]:
    return {
        "min": round(min(values), digits),
        "median": round(statistics.median(values), digits),
        "max": round(max(values), digits),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="the commit to compare with (its copy: git archive)")
    parser.add_argument("--after", default="HEAD", help="the commit measured (its copy: git archive)")
    parser.add_argument("--configs", default="sd15_lora,sdxl_full,flux_lora")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", default=None, help="result JSON (default: print only)")
    parser.add_argument(
        "--keep-earlier", action="store_true", help="keep the runs --out holds, under the new result's 'earlier'"
    )
    args = parser.parse_args(argv)
    from benchmarks.harness import machine_description

    with tempfile.TemporaryDirectory(prefix="estimate-memory-calls-") as folder:
        copies = {}
        for name in ("after", "before"):
            copies[name] = Path(folder) / name
            copies[name].mkdir()
            commit = getattr(args, name)
            archive = subprocess.run(["git", "archive", commit], cwd=ROOT, check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(copies[name])], input=archive, check=True)
        after = subprocess.run(["git", "rev-parse", "--short", args.after], cwd=ROOT, capture_output=True, text=True)
        load_before = os.getloadavg()
        calls: dict[str, Any] = {}
        for config in args.configs.split(","):
            versions = copies
            for copy in versions.values():
                call(copy, config)  # warm-up: the file cache
            runs: dict[str, list[dict[str, Any]]] = {"after": [], "before": []}
            for _ in range(args.runs):
                for name, copy in versions.items():
                    runs[name].append(call(copy, config))
            row: dict[str, Any] = {"runs_each": args.runs}
            for name in versions:
                row[name] = {key: spread([run[key] for run in runs[name]]) for key in ("wall_s", "cpu_s", "peak_mib")}
            row["after_over_before_pairwise"] = {
                key: spread([a[f"{key}_s"] / b[f"{key}_s"] for a, b in zip(runs["after"], runs["before"])], 4)
                for key in ("wall", "cpu")
            }
            row["same_output"] = all(run["output"] == runs["before"][0]["output"] for run in runs["after"])
            calls[config] = row
            print(config, json.dumps({k: v for k, v in row.items() if k != "runs_each"}), flush=True)
    result = {
        "description": __doc__.split("\n\n")[0],
        "command": " ".join(["python", "benchmarks/speed/estimate_memory_call_time.py", *(argv or sys.argv[1:])]),
        "commits": {"before": args.before, "after": after.stdout.strip()},
        "machine": machine_description("cpu"),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "calls": calls,
    }
    if args.out and args.keep_earlier and Path(args.out).is_file():
        result["earlier"] = json.loads(Path(args.out).read_text())
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
