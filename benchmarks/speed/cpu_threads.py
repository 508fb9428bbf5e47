"""CPU threads for a small run: the README's tiny ``train`` command and its Python example, timed with 1 thread, 2
threads and torch's default (no setting), on an idle machine and beside busy processes (one per core), alternating
the settings so that a drift in the machine's load hits them alike.

    python benchmarks/speed/cpu_threads.py --repeats 3 --output benchmarks/results/cli/cpu-threads-tiny.json

Each run is a fresh process: ``OMP_NUM_THREADS`` sets its threads (torch reads it at start, as ``--threads`` and
``torch.set_num_threads`` do), and the run's ``train_runtime`` (transformers' training time, model loading excluded)
is read from its output beside the whole command's wall time.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = {"1": "1", "2": "2", "default": None}
RUNTIME = re.compile(r"'train_runtime': '?([0-9.]+)")


def readme_python_example() -> str:
    """The README's first Python block, as a user would paste it."""
    text = (ROOT / "README.md").read_text()
    return text.split("```python\n", 1)[1].split("```", 1)[0]


def pair_folder(root: Path, n: int = 8) -> Path:
    from PIL import Image

    for i in range(n):
        folder = root / f"p{i}"
        folder.mkdir(parents=True)
        Image.new("RGB", (32, 32), "red").save(folder / "chosen.png")
        Image.new("RGB", (32, 32), "blue").save(folder / "rejected.png")
        (folder / "prompt.txt").write_text("red square on white")
    return root


def burners(count: int) -> list[subprocess.Popen]:
    """``count`` processes that keep a core busy each (another job sharing the machine)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def one_run(kind: str, threads: str | None, work: Path, pairs: Path, index: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if threads is not None:
        env["OMP_NUM_THREADS"] = threads
    out = work / f"{kind}-{index}"
    if kind == "train":
        command = [
            sys.executable,
            "-m",
            "trl_diffusion_sdpo",
            "train",
            "--config",
            "examples/configs/tiny_cpu.yaml",
            "--dataset_name",
            str(pairs),
            "--output_dir",
            str(out),
            "--disable_tqdm",
            "true",
        ]
    else:
        out.mkdir(parents=True)
        script = out / "example.py"
        script.write_text(readme_python_example().replace('"tiny-sdpo-python"', repr(str(out / "run"))))
        command = [sys.executable, str(script)]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT if kind == "train" else out, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{command} failed:\n{done.stderr[-3000:]}")
    found = RUNTIME.findall(done.stdout + done.stderr)
    return {
        "wall_s": round(wall, 2),
        "train_runtime_s": float(found[-1]) if found else None,
        "load_average_1min_at_start": round(load, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--busy", type=int, default=os.cpu_count() or 2, help="busy processes for the loaded rows")
    parser.add_argument("--conditions", nargs="+", default=["idle", "loaded"])
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/cli/cpu-threads-tiny.json")
    parser.add_argument(
        "--from-log", type=Path, help="write the result file from the lines an interrupted run printed"
    )
    parser.add_argument("--note", default="", help="what the result file should say about the run")
    args = parser.parse_args()
    results: dict = {}
    if args.from_log is not None:
        for line in args.from_log.read_text().splitlines():
            condition, kind, name, run = line.split(" ", 3)
            results.setdefault(condition, {}).setdefault(kind, {}).setdefault(name, []).append(ast.literal_eval(run))
    else:
        measure(args, results)
    write(args, results)


def measure(args: argparse.Namespace, results: dict) -> None:
    counter = 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pairs = pair_folder(work / "pairs")
        for condition in args.conditions:
            busy = burners(args.busy) if condition == "loaded" else []
            try:
                for _ in range(args.repeats):
                    for kind in ("train", "python"):
                        for name, threads in SETTINGS.items():
                            counter += 1
                            run = one_run(kind, threads, work, pairs, counter)
                            results.setdefault(condition, {}).setdefault(kind, {}).setdefault(name, []).append(run)
                            print(condition, kind, name, run, flush=True)
            finally:
                for process in busy:
                    process.kill()


def write(args: argparse.Namespace, results: dict) -> None:
    summary = {
        condition: {
            kind: {
                name: {
                    "median_wall_s": statistics.median(r["wall_s"] for r in runs),
                    "median_train_runtime_s": statistics.median(r["train_runtime_s"] or 0.0 for r in runs),
                    "runs": len(runs),
                }
                for name, runs in kinds.items()
            }
            for kind, kinds in by_kind.items()
        }
        for condition, by_kind in results.items()
    }
    import torch

    args.output.write_text(
        json.dumps(
            {
                "what": __doc__.strip(),
                "command": " ".join(sys.argv),
                "note": args.note,
                "busy_processes_when_loaded": args.busy,
                "environment": {
                    "cpu_count": os.cpu_count(),
                    "torch": torch.__version__,
                    "platform": platform.platform(),
                    "torch_default_threads": torch.get_num_threads(),
                },
                "summary": summary,
                "runs": results,
            },
            indent=2,
        )
        + "\n"
    )
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
