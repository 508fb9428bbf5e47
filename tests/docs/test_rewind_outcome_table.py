"""docs/safeguard.md's table of the rewind's outcome (between ``<!-- rewind-outcome:begin -->`` and
``<!-- rewind-outcome:end -->``) says what ``benchmarks/results/probe/cpu-rewind-outcome.json``'s runs say.

The table is written by the study (``benchmarks/studies/rewind_outcome.py table --page``); the suite imports nothing
from ``benchmarks/``, so this test renders it again on its own from the result file's raw runs (each run's final
held-out reward, Diffusion-DPO's rewards at its evaluation steps, the rewinds, the ladder's last factor and whether a
run ended on its starting weights, the probe's readings, the weights' digest and the loss), with the definitions the
result file states, and compares it line by line with the page. The record is the four-arm study's (Diffusion-DPO,
the safeguard from step 0, the rewind with its ladder, Diffusion-DPO at the rate the ladder ended on)."""

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


# ------------------------------------------------------------------------------- the four-arm study's record

ARMS = ("dpo", "safeguard", "rewind", "dpo_lower")
ARM_LABELS = {
    "dpo": "Diffusion-DPO",
    "safeguard": "safeguard from step 0",
    "dpo_lower": "Diffusion-DPO at the rewind's last rate",
}
FOUR_GROUPS = {
    "calibration": "the benchmark's base, data seed 0",
    "held-out dataset": "the benchmark's base, data seed 1",
    "held-out model": "the wide UNet at 64 px, data seed 0",
}


def share_text(count: int, runs: int, target: float, at_least: bool, what: str) -> str:
    if not runs:
        return "n/a (no run)"
    share = count / runs
    short = target - share if at_least else share - target
    verdict = "met" if short <= 0 else f"not met, short by {short:.0%}"
    return f"{count} of {runs} {what} ({share:.0%}; {verdict})"


def four_arm_lines(result: dict[str, Any]) -> list[str]:
    """The four-arm block's rows and targets, from the raw runs: per judged regime (every arm at two seeds or more)
    each arm's final reward, the rewinds per seed, the healthy runs that stayed quiet and Diffusion-DPO bit for bit,
    and where Diffusion-DPO breaks the alarm's runs, the rewind against the better of the safeguard from step 0 and
    the lower rate, and the runs ended on their starting weights where the lower rate ends above the base; then the
    targets per group and tuning (95 % quiet, 90 % fired, within 0.02, at most 10 %)."""
    tolerance, restore_z = result["protocol"]["tolerance"], result["protocol"]["restore_z"]
    cells: dict[str, dict[str, dict[int, dict[str, Any]]]] = defaultdict(lambda: defaultdict(dict))
    for run in result["runs"].values():
        cells[json.dumps(run["cell"], sort_keys=True)][run["setting"]][run["seed"]] = run
    rows: dict[str, list[str]] = defaultdict(list)
    counts: dict[str, dict[str, Any]] = {}
    for entry in result["cells"].values():
        cell = {k: entry[k] for k in ("model", "data", "lr", "tuning", "order", "probe", "steps", "pairs")}
        runs = cells.get(json.dumps(cell, sort_keys=True), {})
        seeds = sorted(set.intersection(*(set(runs.get(a, {})) for a in ARMS)))
        if len(seeds) < 2:
            continue
        final = {a: [runs[a][k]["final_reward"] for k in seeds] for a in ARMS}
        base = runs["dpo"][seeds[0]]["base_reward"]
        rewinds, healthy, quiet = [], 0, 0
        for k in seeds:
            rewind, dpo = runs["rewind"][k], runs["dpo"][k]
            z_at = {p["step"]: p["winner_rise_z"] for p in rewind["probe"]}
            if rewind["rewinds"]:
                steps = "; ".join(
                    f"{fired}->{back}"
                    + ("" if back == 0 or z_at.get(back, math.inf) <= restore_z else " (not a restore point)")
                    for fired, back in rewind["rewinds"]
                )
                factor = f", x{rewind['lr_factor']:g}" if rewind["lr_factor"] is not None else ""
                stop = f", stopped at {rewind['last_step']}" if rewind["last_step"] < rewind["max_steps"] else ""
                start = ", start weights" if rewind["ended_at_start"] else ""
                rewinds.append(f"s{k}: {steps}{factor}{stop}{start}")
            else:
                rewinds.append(f"s{k}: none")
            if min(dpo["reward_at"].values()) >= base - tolerance:
                healthy += 1
                quiet += (
                    not rewind["rewinds"]
                    and rewind["weights_sha256"] == dpo["weights_sha256"]
                    and rewind["loss"] == dpo["loss"]
                    and rewind["final_reward"] == dpo["final_reward"]
                )
        diffs = [d - g for d, g in zip(final["dpo"], final["safeguard"], strict=True)]
        breaks = mean_ci(diffs)[1][1] < 0
        group = f"{group_of(cell)}, {'LoRA' if cell['tuning'] == 'lora' else 'full'}"
        c = counts.setdefault(group, defaultdict(int, gaps=[]))
        c["healthy"] += healthy
        c["quiet"] += quiet
        verdict = f"DPO - safeguard {ci_text(diffs, True)}"
        if breaks:
            means = {a: sum(v) / len(v) for a, v in final.items()}
            by_hand = "safeguard" if means["safeguard"] >= means["dpo_lower"] else "dpo_lower"
            gap = means["rewind"] - means[by_hand]
            fired = sum(bool(runs["rewind"][k]["rewinds"]) for k in seeds)
            above = [k for k, v in zip(seeds, final["dpo_lower"], strict=True) if v > base]
            at_start = sum(bool(runs["rewind"][k]["ended_at_start"]) for k in above)
            met = "met" if gap >= -tolerance else f"not met, short by {-tolerance - gap:.3f}"
            verdict += (
                f": breaks; alarm in {fired} of {len(seeds)}; rewind - {ARM_LABELS[by_hand]} {gap:+.3f} ({met}); "
                f"start weights in {at_start} of the {len(above)} where the lower rate ends above the base"
            )
            c["runs"] += len(seeds)
            c["fired"] += fired
            c["above"] += len(above)
            c["at_start"] += at_start
            c["gaps"].append(gap)
        else:
            verdict += ": does not break"
        rates = ", ".join(
            "= DPO" if runs["dpo_lower"][k].get("reused_dpo") else f"{runs['dpo_lower'][k]['learning_rate']:.3g}"
            for k in seeds
        )
        pairs = f"{cell['pairs']}-pair folder" if cell["pairs"] else "all pairs"
        source = "eval split" if cell["probe"] == "eval-split" else "4 held back"
        label = (
            f"{cell['model']}, data {cell['data']}, lr {cell['lr']:g}, "
            f"{'LoRA' if cell['tuning'] == 'lora' else 'full'}, {pairs} {cell['order']}, probe {source}, "
            f"{cell['steps']} steps"
        )
        quiet_text = f"{quiet} of {healthy}" if healthy else "no healthy run"
        rows[group_of(cell)].append(
            f"| {label} | {len(seeds)} | {base:.3f} | {ci_text(final['dpo'])} | {ci_text(final['safeguard'])} | "
            f"{ci_text(final['rewind'])} | {ci_text(final['dpo_lower'])} (lr {rates}) | {', '.join(rewinds)} | "
            f"{quiet_text} | {verdict} |"
        )
    lines = []
    for group, what in FOUR_GROUPS.items():
        if rows[group]:
            lines += [f"**{group}** ({what}):", *rows[group]]
    order = [f"{g}, {t}" for g in FOUR_GROUPS for t in ("LoRA", "full")]
    for group in sorted(counts, key=order.index):
        c = counts[group]
        if c["gaps"]:
            worst = min(c["gaps"])
            met_in = sum(g >= -tolerance for g in c["gaps"])
            verdict = "met" if met_in == len(c["gaps"]) else f"not met, short by {max(0.0, -tolerance - worst):.3f}"
            outcome = f"{met_in} of {len(c['gaps'])} regimes ({verdict})"
        else:
            outcome = "n/a (no breaking regime)"
        lines.append(
            f"| {group} | {share_text(c['quiet'], c['healthy'], 0.95, True, 'quiet')} "
            f"| {share_text(c['fired'], c['runs'], 0.90, True, 'fired')} | {outcome} "
            f"| {share_text(c['at_start'], c['above'], 0.10, False, 'at start')} |"
        )
    return lines


def page_lines() -> list[str]:
    """The page's block without its table headers and separators (the rendered rows carry the figures)."""
    block = PAGE.read_text().split(START, 1)[1].split(END, 1)[0]
    headers = ("| regime ", "| runs ", "| group ", "|---")
    return [line for line in block.strip().splitlines() if not line.startswith(headers)]


@pytest.fixture(scope="module")
def result() -> dict[str, Any]:
    return json.loads(RESULT.read_text())


def test_the_page_block_states_every_regime_and_target_of_the_result_file(result):
    mine = four_arm_lines(result)
    page = page_lines()
    assert [line for line in page if line.startswith(("|", "**"))] == [line for line in mine if line], (
        "docs/safeguard.md's rewind-outcome block differs from its result file: regenerate it with "
        "`python benchmarks/studies/rewind_outcome.py table --page`"
    )


def test_the_page_states_how_many_runs_and_what_is_not_measured(result):
    text = " ".join(page_lines())
    assert f"{result['runs_done']} of {result['runs_planned']} planned runs" in text
    assert f"({result['runs_trained']} trained, " in text
    assert f"Not measured: {'; '.join(result['not_measured'])}." in text


def test_the_render_reads_the_runs_not_the_summary(result):
    """A run's final reward moved by 0.01 moves the rendered figures: the check reads the raw runs."""
    first = next(iter(result["runs"]))
    edited = json.loads(json.dumps(result))
    edited["runs"][first]["final_reward"] += 0.01
    assert four_arm_lines(edited) != four_arm_lines(result)
