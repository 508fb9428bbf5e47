"""Figures and a table from ``benchmarks/studies/stability_map.py``'s results (works on a partial file too).

    python benchmarks/studies/stability_map_figures.py benchmarks/results/stability/cpu-stability-map-demo.json \\
        --images docs/images

Per cell (learning rate, beta), method and evaluation step: the held-out reward change against the base, mean over
seeds with a 95% Student t interval (``trl_diffusion_sdpo.demo.stats``), and the pathology test of
``stability_map.py`` (winner delta > 0, implicit accuracy > 0.5 and reward change < 0; windows of 10% of the steps
before the evaluation step, averaged over seeds). Writes ``stability_map_reward.png`` (reward change at the last
evaluation step per setting, Diffusion-DPO beside each safeguard) and ``stability_map_winner.png`` (winner delta
over training, per learning rate), and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from trl_diffusion_sdpo.demo.stats import summarise  # noqa: E402

LABELS = {"dpo": "Diffusion-DPO", "sdpo-output-mu0.5": "output space, mu=0.5", "sdpo-output": "output space, mu=0.9"}


def table(report: dict) -> tuple[list[dict], list[str]]:
    """One row per (cell, method, evaluation step), and the Markdown lines."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for run in report["runs"].values():
        groups[(run["learning_rate"], run["beta"], run["method"])].append(run)
    methods = report["grid"]["methods"]  # a comma-separated string in older files, a list since the seeds grew
    methods = methods.split(",") if isinstance(methods, str) else methods
    rows, lines = [], []
    lines.append(
        "| lr | beta | method | step | reward change (95% CI) | winner delta | loser delta | implicit acc. | seeds "
        "| pathology |"
    )
    lines.append("|---|---|---|---:|---|---:|---:|---:|---:|---|")
    for lr, beta, method in sorted(groups, key=lambda k: (k[0], k[1], methods.index(k[2]))):
        runs = groups[(lr, beta, method)]
        for step in sorted(runs[0]["reward_change"], key=int):
            change = summarise([r["reward_change"][step] for r in runs])
            win = {k: float(np.mean([r["window"][step][k] for r in runs])) for k in runs[0]["window"][step]}
            sick = win["delta/winner"] > 0 and win["implicit_acc"] > 0.5 and change["mean"] < 0
            row = {"lr": lr, "beta": beta, "method": method, "step": int(step), "change": change, **win}
            row["pathology"] = sick
            rows.append(row)
            ci = "" if change["ci95"] is None else f" [{change['ci95'][0]:+.4f}, {change['ci95'][1]:+.4f}]"
            lines.append(
                f"| {lr:g} | {beta:g} | {LABELS.get(method, method)} | {step} | {change['mean']:+.4f}{ci} | "
                f"{win['delta/winner']:+.4f} | {win['delta/loser']:+.4f} | {win['implicit_acc']:.2f} | "
                f"{change['n']} | {'yes' if sick else ''} |"
            )
    return rows, lines


def plot(report: dict, rows: list[dict], images: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = report["grid"]["methods"]  # a comma-separated string in older files, a list since the seeds grew
    methods = methods.split(",") if isinstance(methods, str) else methods
    last = max(r["step"] for r in rows)
    demo_lr, demo_beta = 2e-5, 5000.0
    sweeps = [
        ("learning rate (beta 5000)", sorted({r["lr"] for r in rows if r["beta"] == demo_beta}), "lr"),
        ("beta (learning rate 2e-5)", sorted({r["beta"] for r in rows if r["lr"] == demo_lr}), "beta"),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    width = 0.8 / len(methods)
    for ax, (title, values, axis) in zip(axes, sweeps):
        for j, method in enumerate(methods):
            means, errs = [], [[], []]
            for v in values:
                cell = (v, demo_beta) if axis == "lr" else (demo_lr, v)
                row = next(
                    (r for r in rows if (r["lr"], r["beta"]) == cell and r["method"] == method and r["step"] == last),
                    None,
                )
                mean = row["change"]["mean"] if row else np.nan
                ci = row["change"]["ci95"] if row and row["change"]["ci95"] else [mean, mean]
                means.append(mean)
                errs[0].append(mean - ci[0])
                errs[1].append(ci[1] - mean)
            x = np.arange(len(values)) + (j - (len(methods) - 1) / 2) * width
            ax.bar(x, means, width, yerr=errs, capsize=2, label=LABELS.get(method, method))
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xticks(np.arange(len(values)), [f"{v:g}" for v in values])
        ax.set_xlabel(title)
        ax.set_title(f"held-out reward change after {last} steps")
    axes[0].set_ylabel("reward change vs base (95% CI over seeds)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    images.mkdir(parents=True, exist_ok=True)
    fig.savefig(images / "stability_map_reward.png", dpi=80)
    plt.close(fig)

    lrs = sweeps[0][1]
    fig, axes = plt.subplots(1, len(lrs), figsize=(3 * len(lrs), 3), sharey=False)
    for ax, lr in zip(np.atleast_1d(axes), lrs):
        for method in methods:
            runs = [r for r in report["runs"].values() if r["learning_rate"] == lr and r["beta"] == demo_beta]
            runs = [r for r in runs if r["method"] == method]
            if not runs:
                continue
            length = min(len(r["history"]["step"]) for r in runs)
            winner = np.mean([r["history"]["delta/winner"][:length] for r in runs], axis=0)
            ax.plot(runs[0]["history"]["step"][:length], winner, lw=1, label=LABELS.get(method, method))
        ax.axhline(0, color="black", lw=0.6)
        ax.set_title(f"lr {lr:g}, beta 5000", fontsize=9)
        ax.set_xlabel("step")
    np.atleast_1d(axes)[0].set_ylabel("winner error - reference's (mean over seeds)")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(images / "stability_map_winner.png", dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("json")
    parser.add_argument("--images", default=None, help="Write the two PNG figures into this folder.")
    args = parser.parse_args(argv)
    report = json.loads(Path(args.json).read_text())
    rows, lines = table(report)
    print("\n".join(lines))
    if args.images:
        plot(report, rows, Path(args.images))
    return 0


if __name__ == "__main__":
    sys.exit(main())
