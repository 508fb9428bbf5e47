"""The demo's wall time as a user meets it: ``trl-diffusion-sdpo demo`` run twice in a row, cold then warm.

The first run (``cold``) is the first after the install in that environment: it pays for Python compiling the
package's and its libraries' bytecode where no cache is left, and for reading torch's and the other libraries' files
from disk where the OS has not cached them. The second (``warm``) runs the same command at once into a second
folder. Each runs under ``/usr/bin/time -v`` (wall clock, user and system CPU seconds, peak resident memory); the
load average is read before and after each run and sampled every ``--sample-s`` seconds during it, since the demo
computes with one thread and waits for a core on a machine shared with other work. The demo's own ``timings`` (its
``summary.json``: the work it times itself, without Python's start and the imports) are kept beside each, with the
work it planned (``plan``: runs, optimizer steps, pairs through the denoiser, sampled images), which ties the figure to
the demo's size.

This script imports nothing heavy (no torch), so the cold run is the first to load the libraries::

    python benchmarks/smoke/demo_time.py --workdir /tmp/demo-time --output benchmarks/results/demo/cpu-demo-time.json

``--from-dir DIR`` writes the file from the records of an earlier run in ``DIR`` (the files this script's runs
write there: ``time-<run>.txt``, ``load-<run>-before.txt``, ``load-<run>-after.txt``, ``start-<run>.txt``,
``loadsamples.txt``), without running the demo again.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RUNS = ("cold", "warm")
# /usr/bin/time -v's lines this file keeps, and the names it keeps them under
TIME_FIELDS = {
    "User time (seconds)": "user_s",
    "System time (seconds)": "system_s",
    "Percent of CPU this job got": "cpu_percent",
    "Maximum resident set size (kbytes)": "max_rss_kib",
    "Elapsed (wall clock) time (h:mm:ss or m:ss)": "wall_s",
    "Exit status": "exit_status",
}


def demo_command(output_dir: Path) -> list[str]:
    return ["trl-diffusion-sdpo", "demo", "--output-dir", str(output_dir)]


def clock_seconds(text: str) -> float:
    """``/usr/bin/time``'s elapsed time, ``h:mm:ss`` or ``m:ss.ss``, in seconds."""
    seconds = 0.0
    for part in text.split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


def parse_time_v(text: str) -> dict[str, float]:
    """The fields of ``TIME_FIELDS`` from ``/usr/bin/time -v``'s report."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        label, _, value = line.strip().rpartition(": ")
        if label not in TIME_FIELDS:
            continue
        key = TIME_FIELDS[label]
        if key == "wall_s":
            found[key] = round(clock_seconds(value), 2)
        else:
            found[key] = float(value.rstrip("%"))
    missing = set(TIME_FIELDS.values()) - set(found)
    if missing:
        raise ValueError(f"/usr/bin/time -v's report lacks {sorted(missing)}")
    return found


def loadavg(text: str) -> list[float]:
    """The 1-, 5- and 15-minute load averages of a ``/proc/loadavg`` line."""
    return [float(v) for v in text.split()[:3]]


def load_during(samples: list[tuple[float, float]], start: float, end: float) -> dict[str, Any]:
    """The 1-minute load averages sampled between ``start`` and ``end`` (Unix seconds): their spread."""
    inside = [load for stamp, load in samples if start <= stamp <= end]
    if not inside:
        raise ValueError(f"no load sample between {start} and {end}")
    return {
        "samples": len(inside),
        "min": min(inside),
        "median": round(statistics.median(inside), 2),
        "max": max(inside),
    }


def unix_seconds(text: str) -> float:
    """A run's start as written: Unix seconds, or an ISO 8601 time in UTC (``date -u +%Y-%m-%dT%H:%M:%SZ``)."""
    text = text.strip()
    if "T" in text:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    return float(text)


def read_samples(path: Path) -> list[tuple[float, float]]:
    """``loadsamples.txt``: a line per sample, Unix seconds then the ``/proc/loadavg`` line."""
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    return [(float(row[0]), float(row[1])) for row in rows]


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    memory_kib = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if "MemTotal" in line
    )
    return {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "memory_gib": round(memory_kib / 2**20, 1),
        "os": platform.platform(),
    }


def run_once(workdir: Path, name: str, sample_s: float) -> None:
    """One timed demo run, its records written into ``workdir`` as ``--from-dir`` reads them."""
    samples = workdir / "loadsamples.txt"
    done = threading.Event()

    def sample() -> None:
        with samples.open("a") as f:
            while not done.wait(sample_s):
                f.write(f"{time.time():.0f} {Path('/proc/loadavg').read_text()}")
                f.flush()

    (workdir / f"load-{name}-before.txt").write_text(Path("/proc/loadavg").read_text())
    (workdir / f"start-{name}.txt").write_text(f"{time.time():.0f}\n")
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = workdir / f"demo-{name}"
    with (workdir / f"out-{name}.txt").open("w") as log:
        subprocess.run(
            ["/usr/bin/time", "-v", "-o", str(workdir / f"time-{name}.txt"), *demo_command(output)],
            stdout=log,
            stderr=subprocess.STDOUT,
            check=True,
        )
    (workdir / f"end-{name}.txt").write_text(f"{time.time():.0f}\n")
    done.set()
    sampler.join()
    (workdir / f"load-{name}-after.txt").write_text(Path("/proc/loadavg").read_text())


def assemble(workdir: Path, outputs: dict[str, Path], note: str, command: str = "") -> dict[str, Any]:
    """The result file's record from the runs' files in ``workdir`` (``command``: how the runs were taken)."""
    samples = read_samples(workdir / "loadsamples.txt")
    steps = []
    for name in RUNS:
        timed = parse_time_v((workdir / f"time-{name}.txt").read_text())
        if timed["exit_status"] != 0:
            raise ValueError(f"the {name} run exited with status {timed['exit_status']:.0f}")
        start = unix_seconds((workdir / f"start-{name}.txt").read_text())
        summary = json.loads((outputs[name] / "summary.json").read_text())
        steps.append(
            {
                "step": name,
                "command": " ".join(demo_command(outputs[name])),
                "wall_s": timed["wall_s"],
                "user_s": timed["user_s"],
                "system_s": timed["system_s"],
                "cpu_s": round(timed["user_s"] + timed["system_s"], 2),  # the work, whatever the wait for a core
                "cpu_percent": timed["cpu_percent"],
                "max_rss_mib": round(timed["max_rss_kib"] / 1024, 1),
                "load_average_before": loadavg((workdir / f"load-{name}-before.txt").read_text()),
                "load_average_after": loadavg((workdir / f"load-{name}-after.txt").read_text()),
                "load_1min_during": load_during(samples, start, start + timed["wall_s"]),
                "demo_timings": summary["timings"],
                "demo_environment": summary["environment"],
                "demo_plan": summary.get("plan"),  # what the run trained and sampled (DemoRecipe.planned_work)
            }
        )
    loads = [s["load_1min_during"] for s in steps]
    stamps = [stamp for stamp, _ in samples]
    interval = statistics.median(b - a for a, b in zip(stamps, stamps[1:]))
    return {
        "what": (
            "The demo's wall time from the command's start to its end, run twice in a row under /usr/bin/time -v: "
            "cold (the first run after the install in this environment) and warm (the same command at once again), "
            "with the machine's load average read before, after and every few seconds during each run."
        ),
        "command": command or f"python benchmarks/smoke/demo_time.py --from-dir {workdir}",
        "machine": machine(),
        "load": (
            f"1-minute load average {min(x['min'] for x in loads):g} to {max(x['max'] for x in loads):g} during the "
            f"runs on {os.cpu_count()} cores (the demo computes with one thread)"
        ),
        "load_sample_interval_s": interval,
        "note": note,
        "steps": steps,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/demo-time"), help="the runs' records and outputs")
    parser.add_argument("--from-dir", type=Path, default=None, help="write the file from an earlier run's records")
    parser.add_argument(
        "--output-dirs",
        nargs=2,
        type=Path,
        default=None,
        metavar=("COLD", "WARM"),
        help="with --from-dir: the demo's output folders, where they are not DIR/demo-<run>",
    )
    parser.add_argument("--sample-s", type=float, default=10.0, help="seconds between load samples")
    parser.add_argument("--note", default="", help="what the file should say about the machine or the runs")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/demo/cpu-demo-time.json")
    opts = parser.parse_args(argv)
    workdir = opts.from_dir or opts.workdir
    if opts.from_dir is None:
        workdir.mkdir(parents=True, exist_ok=False)  # a fresh folder: the demo refuses a non-empty output
        for name in RUNS:
            run_once(workdir, name, opts.sample_s)
    outputs = dict(zip(RUNS, opts.output_dirs or [workdir / f"demo-{name}" for name in RUNS]))
    if opts.from_dir is None:
        command = f"python benchmarks/smoke/demo_time.py --workdir {workdir}"
    else:  # the records of runs taken by hand, in this script's layout
        command = (
            f"python benchmarks/smoke/demo_time.py --from-dir {workdir} "
            f"--output-dirs {outputs['cold']} {outputs['warm']}"
        )
    record = assemble(workdir, outputs, opts.note, command)
    opts.output.write_text(json.dumps(record, indent=1) + "\n")
    for step in record["steps"]:
        print(
            f"{step['step']}: {step['wall_s']:.0f} s wall, {step['user_s']:.0f} s user, "
            f"load {step['load_1min_during']}"
        )
    print(f"wrote {opts.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
