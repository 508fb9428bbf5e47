"""docs/safeguard.md's table of the rewind's outcome (between ``<!-- rewind-outcome:begin -->`` and
``<!-- rewind-outcome:end -->``) says what ``benchmarks/results/probe/cpu-rewind-outcome.json``'s runs say.

The table is written by the study (``benchmarks/studies/rewind_outcome.py table --page``); the suite imports nothing
from ``benchmarks/``, so this test renders it again on its own from the result file's raw runs (each run's final
held-out reward, Diffusion-DPO's rewards at its evaluation steps, the rewinds and the probe's readings, the weights'
digest (online: the held-out measures' digest) and the loss), with the definitions the result file states, and compares
it line by line with the page."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import scipy.stats

ROOT = Path(__file__).resolve().parents[2]
RESULT = ROOT / "benchmarks" / "results" / "probe" / "cpu-rewind-outcome.json"
PAGE = ROOT / "docs" / "safeguard.md"
START, END = "<!-- rewind-outcome:begin -->", "<!-- rewind-outcome:end -->"
SETTINGS = ("dpo", "rewind", "safeguard")
GROUPS = {
    "calibration": "the benchmark's base, data seed 0",
    "held-out dataset": "data seed 1",
    "held-out model": "the wide UNet at 64 px",
    "online": "the stability benchmark's online regimes; a rewind stops the run at its first alarm",
}


def mean_ci(values: list[float]) -> tuple[float, tuple[float, float]]:
    """The mean and its 95% t interval, ``mean +- t_0.975(n-1) * sd / sqrt(n)``."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = scipy.stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return mean, (mean - half, mean + half)


def ci_text(values: list[float], signed: bool = False) -> str:
    mean, (low, high) = mean_ci(values)
    sign = "+" if signed else ""
    return f"{mean:{sign}.3f} [{low:{sign}.3f}, {high:{sign}.3f}]"


def group_of(cell: dict[str, Any]) -> str:
    if "regime" in cell:
        return "online"
    if cell["model"] != "benchmark":
        return "held-out model"
    return "held-out dataset" if cell["data"] != 0 else "calibration"


def fall_start(dpo: dict[str, Any], tolerance: float) -> int | None:
    """The first evaluation step from which every later evaluation is more than ``tolerance`` below the base."""
    changes = sorted((int(s), r - dpo["base_reward"]) for s, r in dpo["reward_at"].items())
    for i, (step, _) in enumerate(changes):
        if all(change < -tolerance for _, change in changes[i:]):
            return step
    return None


def cell_rows(
    result: dict[str, Any],
) -> tuple[dict[str, list[str]], dict[str, dict[str, int]], dict[str, list[float]]]:
    """Per group, the table's rows rendered from the raw runs; per group the targets' counts; and per group what
    each false alarm cost (the rewind's final reward minus Diffusion-DPO's, where Diffusion-DPO held)."""
    tolerance, restore_z = result["protocol"]["tolerance"], result["protocol"]["restore_z"]
    max_steps = result["protocol"]["max_steps"]
    cells: dict[str, dict[str, dict[int, dict[str, Any]]]] = defaultdict(lambda: defaultdict(dict))
    labels: dict[str, dict[str, Any]] = {}
    for run in result["runs"].values():
        key = json.dumps(run["cell"], sort_keys=True)
        cells[key][run["setting"]][run["seed"]] = run
        labels[key] = run["cell"]
    rows: dict[str, list[str]] = defaultdict(list)
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    costs: dict[str, list[float]] = defaultdict(list)
    fields = {"offline": ("model", "data", "lr", "tuning", "order", "probe", "steps"), "online": ("regime", "lr")}
    order = [
        json.dumps({k: e[k] for k in fields["online" if "regime" in e else "offline"]}, sort_keys=True)
        for e in result["cells"].values()
    ]
    for key in order:
        if key not in cells:
            continue
        runs, cell = cells[key], labels[key]
        seeds = sorted(set.intersection(*(set(runs[s]) for s in SETTINGS)))
        if len(seeds) < 2:
            continue
        final = {s: [runs[s][k]["final_reward"] for k in seeds] for s in SETTINGS}
        alarms, delays, quiet_runs, healthy, quiet_healthy, false_alarms = [], [], [], 0, 0, []
        for k in seeds:
            rewind, dpo = runs["rewind"][k], runs["dpo"][k]
            z_at = {p["step"]: p["winner_rise_z"] for p in rewind["probe"]}
            if rewind["rewinds"]:
                steps = "; ".join(
                    f"{fired}->{back}"
                    + ("" if back == 0 or z_at.get(back, math.inf) <= restore_z else " (not a restore point)")
                    for fired, back in rewind["rewinds"]
                )
                stopped = rewind["last_step"] < rewind.get("max_steps", max_steps)
                stop = f", stopped at {rewind['last_step']}" if stopped else ""
                alarms.append(f"s{k}: {steps}{stop}")
                start = fall_start(dpo, tolerance)
                if start is not None:
                    delays.append(rewind["rewinds"][0][0] - start)
            else:
                alarms.append(f"s{k}: none")
                digest = "weights_sha256" if "weights_sha256" in rewind else "measures_sha256"
                quiet_runs.append(
                    rewind[digest] == dpo[digest]
                    and rewind["loss"] == dpo["loss"]
                    and rewind["final_reward"] == dpo["final_reward"]
                )
            if min(dpo["reward_at"].values()) >= dpo["base_reward"] - tolerance:
                healthy += 1
                quiet_healthy += not rewind["rewinds"]
                if rewind["rewinds"]:
                    false_alarms.append(rewind["final_reward"] - dpo["final_reward"])
        diffs = [d - g for d, g in zip(final["dpo"], final["safeguard"], strict=True)]
        breaks = mean_ci(diffs)[1][1] < 0
        gains = [r - d for r, d in zip(final["rewind"], final["dpo"], strict=True)]
        head = f"DPO - safeguard {ci_text(diffs, True)}, rewind - DPO {ci_text(gains, True)}"
        quiet = f"quiet on {quiet_healthy} of {healthy} healthy" if healthy else "no healthy run"
        if breaks:
            means = {s: sum(v) / len(v) for s, v in final.items()}
            recovered = (means["rewind"] - means["dpo"]) / (means["safeguard"] - means["dpo"])
            worse = [k for k, r, d in zip(seeds, final["rewind"], final["dpo"], strict=True) if r - d < -tolerance]
            met = recovered >= 0.75 and not worse
            verdict = f"{head}: breaks; recovers {recovered:.0%} of the gap"
            if met:
                verdict += f" (met); {quiet}"
            else:
                misses = [f"short of 75% by {0.75 - recovered:.0%}"] if recovered < 0.75 else []
                if worse:
                    misses.append(f"below Diffusion-DPO beyond noise in seed {', '.join(map(str, worse))}")
                verdict += f" (not met: {'; '.join(misses)}); {quiet}"
        else:
            met, verdict = False, f"{head}: does not break; {quiet}"
        group = group_of(cell)
        for name in (group, "all"):
            counts[name]["breaking"] += breaks
            counts[name]["met"] += breaks and met
            counts[name]["healthy"] += healthy
            counts[name]["quiet"] += quiet_healthy
            costs[name] += false_alarms
        if "regime" in cell:
            label = f"{cell['regime']}, lr {cell['lr']:g}, LoRA"
        else:
            longer = f", {cell['steps']} steps" if cell["steps"] != max_steps else ""
            label = (
                f"{cell['model']}, data {cell['data']}, lr {cell['lr']:g}, {cell['tuning']}, {cell['order']}, "
                f"{'eval split' if cell['probe'] == 'eval-split' else 'rows held back'}{longer}"
            )
        identity = f"{sum(quiet_runs)} of {len(quiet_runs)}" if quiet_runs else "no quiet run"
        rows[group].append(
            f"| {label} | {len(seeds)} | {runs['dpo'][seeds[0]]['base_reward']:.3f} | {ci_text(final['dpo'])} | "
            f"{ci_text(final['rewind'])} | {ci_text(final['safeguard'])} | {', '.join(alarms)} | "
            f"{', '.join(f'{d:+d}' for d in delays) if delays else 'n/a'} | {identity} | {verdict} |"
        )
    return rows, counts, costs


def cost_text(values: list[float]) -> str:
    if not values:
        return "no false alarm"
    if len(values) == 1:
        return f"{values[0]:+.3f} (1 run)"
    return f"{ci_text(values, True)} ({len(values)} runs)"


def rendered(result: dict[str, Any]) -> list[str]:
    rows, counts, costs = cell_rows(result)
    lines = []
    for group, what in GROUPS.items():
        if not rows[group]:
            continue
        lines += [f"**{group}** ({what}):", "", *rows[group], ""]
    present = {group_of(e) for e in result["cells"].values()}
    for group in ("all", *(g for g in GROUPS if g in present)):
        c = counts[group]
        share = f"{c['quiet'] / c['healthy']:.0%}" if c["healthy"] else "n/a"
        met = ("met" if c["quiet"] / c["healthy"] >= 0.95 else "not met") if c["healthy"] else "n/a"
        lines.append(
            f"| {group} | {c['breaking']} | {c['met']} of {c['breaking']} | {c['healthy']} "
            f"| {c['quiet']} ({share}) | {met} | {cost_text(costs[group])} |"
        )
    return lines


def page_lines() -> list[str]:
    """The page's block without its table headers and separators (the rendered rows carry the figures)."""
    block = PAGE.read_text().split(START, 1)[1].split(END, 1)[0]
    return [line for line in block.strip().splitlines() if not line.startswith(("| regime ", "| runs ", "|---"))]


@pytest.fixture(scope="module")
def result() -> dict[str, Any]:
    return json.loads(RESULT.read_text())


def test_the_page_block_states_every_regime_and_target_of_the_result_file(result):
    mine = rendered(result)
    page = page_lines()
    assert [line for line in page if line.startswith(("|", "**"))] == [line for line in mine if line], (
        "docs/safeguard.md's rewind-outcome block differs from its result file: regenerate it with "
        "`python benchmarks/studies/rewind_outcome.py table --page`"
    )


def test_the_page_states_how_many_runs_and_what_is_not_measured(result):
    text = " ".join(page_lines())
    assert f"{result['runs_done']} of {result['runs_planned']} planned runs" in text
    assert f"Not measured: {'; '.join(result['not_measured'])}." in text


def test_the_render_reads_the_runs_not_the_summary(result):
    """A run's final reward moved by 0.01 moves the rendered figures: the check reads the raw runs."""
    first = next(iter(result["runs"]))
    edited = json.loads(json.dumps(result))
    edited["runs"][first]["final_reward"] += 0.01
    assert rendered(edited) != rendered(result)
