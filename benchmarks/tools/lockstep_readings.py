"""Readings of a few step pairs from a lock-step result file, by two measures: main-thread CPU and wall time.

    python benchmarks/tools/lockstep_readings.py benchmarks/results/one-pass/cpu-sd15-lora-one-pass-lockstep.json \\
        --tuning lora_r4 --safeguard parameter --pairs 7

A lock-step file (``benchmarks/speed/host_time_lockstep.py``) keeps every round's Diffusion-DPO step and safeguard
step, each with its wall time (``step_times_s``) and its main-thread CPU time (``step_thread_cpu_s``). This cuts the
rounds into consecutive readings of ``--pairs`` pairs, as a short run would read them, and gives each reading by
both measures and two summaries: the median of the pairs' ratios (the script's own reading) and the mean of them
(what a ratio of average step times reads, less robust to one slow step). No step is run: it reads the stored steps
only, so it shows how far short readings of one machine's steps spread, not what another machine reads.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

MEASURES = {"thread_cpu": "step_thread_cpu_s", "wall": "step_times_s"}
SUMMARIES = {"median": statistics.median, "mean": statistics.fmean}


def readings(rows: dict, safeguard: str, pairs: int) -> dict[str, dict[str, list[float]]]:
    """Per measure and summary, the readings of consecutive blocks of ``pairs`` rounds (a last partial block is
    left out): each the summary of the block's ratios ``safeguard step / Diffusion-DPO step`` of the same round."""
    out: dict[str, dict[str, list[float]]] = {}
    for measure, field in MEASURES.items():
        ratios = [mine / dpo for mine, dpo in zip(rows[safeguard][field], rows["dpo"][field], strict=True)]
        blocks = [ratios[i : i + pairs] for i in range(0, len(ratios) - pairs + 1, pairs)]
        out[measure] = {name: [round(summary(block), 3) for block in blocks] for name, summary in SUMMARIES.items()}
    return out


def runs_of(result: dict, tuning: str) -> dict[str, dict]:
    """The file's runs (``before``, ``after``), each with its commit and its rows for ``tuning``."""
    return {
        label: {"commit": run["commit"][:7], "rows": run["rows"][tuning]["rows"]}
        for label, run in result["runs"].items()
    }


def table(result: dict, tuning: str, safeguard: str, pairs: int) -> str:
    """A markdown table: per run and measure, the readings' range under each summary."""
    lines = [
        f"| readings of {pairs} pairs | main-thread CPU, median | main-thread CPU, mean | wall, median | wall, mean |",
        "|---|---:|---:|---:|---:|",
    ]
    for run in runs_of(result, tuning).values():
        found = readings(run["rows"], safeguard, pairs)
        cells = [
            f"{min(found[measure][name]):.3f} to {max(found[measure][name]):.3f}"
            for measure in MEASURES
            for name in SUMMARIES
        ]
        lines.append(f"| {run['commit']} ({len(found['wall']['median'])} readings) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("result", type=Path, help="a lock-step result file")
    parser.add_argument("--tuning", default="lora_r4", help="the rows' tuning (full, lora_r4)")
    parser.add_argument("--safeguard", default="parameter", help="the safeguard row read against Diffusion-DPO's")
    parser.add_argument("--pairs", type=int, default=7, help="rounds per reading")
    parser.add_argument("--json", action="store_true", help="every reading, not the table")
    opts = parser.parse_args(argv)
    result = json.loads(opts.result.read_text())
    if opts.json:
        found = {
            label: readings(run["rows"], opts.safeguard, opts.pairs)
            for label, run in runs_of(result, opts.tuning).items()
        }
        print(json.dumps(found, indent=1))
    else:
        print(table(result, opts.tuning, opts.safeguard, opts.pairs))


if __name__ == "__main__":
    main()
