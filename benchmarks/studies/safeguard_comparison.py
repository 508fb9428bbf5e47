"""The paired comparison of the safeguards against Diffusion-DPO on the toy demo, from ``stability_map.py``'s runs.

    python benchmarks/studies/safeguard_comparison.py \\
        benchmarks/results/safeguard-comparison/cpu-safeguard-comparison-demo-lr1e-4-2e-4.json \\
        benchmarks/results/safeguard-comparison/cpu-safeguard-comparison-demo-lr2e-5-1000steps.json \\
        --json benchmarks/results/safeguard-comparison/cpu-safeguard-comparison-demo.json --images docs/images \\
        --recommendation trl_diffusion_sdpo/demo/safeguard_recommendation.json

Works on partial files (runs cut short): a method is compared with Diffusion-DPO over the seeds both have finished.
Per setting (learning rate, beta, steps) and method it gives the paired difference from Diffusion-DPO, seed by seed
(every method of a seed saw the same batches, timesteps and noise: the reference's errors, which depend on nothing
else, are checked to be identical), with the 95% paired t interval and a percentile bootstrap over seeds
(``trl_diffusion_sdpo.demo.stats.paired_difference``), for:

* the held-out reward change at the last evaluation step (and at every evaluation step);
* the winner's error against the reference (``delta/winner``) and the implicit accuracy, means over the last 10% of
  the steps.

Power: the minimum detectable reward difference at 80% power, alpha 0.05 (paired t), from the paired SD.

Verdicts: a method *pays* in a setting when the reward difference's interval lies above 0, *costs* when it lies
below 0, and otherwise shows *no detectable difference* (at that setting's minimum detectable effect). Writes the
summary JSON, ``safeguard_comparison.png`` (the paired differences with their intervals) and the recommendation
file the demo ships and quotes, and prints the Markdown tables; ``recommendation.py`` then puts its text into the
README and ``docs/safeguard.md``.

To compare a new method (the per-pair scope, SmPO with inversion): add its ``Method`` line to
``stability_map.EXTRA_METHODS``, rerun ``stability_map.py`` with the same arguments and its key appended to
``--methods`` (the runs already there are kept), then rerun this script.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from trl_diffusion_sdpo.callbacks.health import winner_pathology  # noqa: E402
from trl_diffusion_sdpo.demo.stats import paired_difference, summarise  # noqa: E402

REFERENCE = "dpo"
LABELS = {
    "dpo": "Diffusion-DPO",
    "sdpo-output-mu0.5": "output space, mu=0.5",
    "sdpo-output": "output space, mu=0.9",
    "sdpo-parameter-mu0.5": "parameter space, mu=0.5",
    "sdpo-update-mu0.5": "update space, mu=0.5",
    "sdpo-pair-mu0.5": "parameter space per pair, mu=0.5",
}
METRICS = ("reward_change", "winner_delta", "implicit_acc")
MIN_SEEDS = 10  # paired seeds a method needs in a setting before the recommendation rests on it


def setting_key(run: dict[str, Any], steps: int) -> str:
    return f"lr{run['learning_rate']:g}-beta{run['beta']:g}-{steps}steps"


def run_metrics(run: dict[str, Any], step: str) -> dict[str, float]:
    """The compared numbers of one run at evaluation step ``step``."""
    window = run["window"][step]
    return {
        "reward_change": run["reward_change"][step],
        "winner_delta": window["delta/winner"],
        "implicit_acc": window["implicit_acc"],
    }


def compare(report: dict[str, Any]) -> dict[str, Any]:
    """Per setting of one ``stability_map.py`` file: per method its means, its paired differences from DPO, the
    pairing check and the cost."""
    steps = int(report["grid"]["max_steps"])
    final = str(steps)
    grouped: dict[str, dict[str, dict[int, dict]]] = defaultdict(lambda: defaultdict(dict))
    for run in report["runs"].values():
        grouped[setting_key(run, steps)][run["method"]][run["seed"]] = run
    out = {}
    for key, by_method in grouped.items():
        any_run = next(iter(next(iter(by_method.values())).values()))
        setting: dict[str, Any] = {
            "learning_rate": any_run["learning_rate"],
            "beta": any_run["beta"],
            "steps": steps,
            "eval_steps": sorted((int(s) for s in any_run["reward_change"]), key=int),
            "methods": {},
        }
        reference = by_method.get(REFERENCE, {})
        for method, runs in by_method.items():
            seeds = sorted(runs)
            entry: dict[str, Any] = {
                "label": LABELS.get(method, method),
                "seeds": seeds,
                "seconds": round(sum(r["seconds"] for r in runs.values()), 1),
                "seconds_per_run": round(float(np.mean([r["seconds"] for r in runs.values()])), 1),
                "machines": sorted(
                    {json.dumps(r.get("machine", "not recorded"), sort_keys=True) for r in runs.values()}
                ),
            }
            entry["machines"] = [json.loads(m) for m in entry["machines"]]
            values = {m: [run_metrics(runs[s], final)[m] for s in seeds] for m in METRICS}
            entry.update({m: summarise(values[m]) if len(seeds) > 1 else None for m in METRICS})
            paired = sorted(set(seeds) & set(reference))
            if method != REFERENCE and len(paired) >= 2:
                entry["paired_seeds"] = paired
                entry["minus_dpo"] = {
                    m: paired_difference(
                        [run_metrics(runs[s], final)[m] for s in paired],
                        [run_metrics(reference[s], final)[m] for s in paired],
                    )
                    for m in METRICS
                }
                entry["reward_minus_dpo_by_step"] = {
                    str(step): paired_difference(
                        [runs[s]["reward_change"][str(step)] for s in paired],
                        [reference[s]["reward_change"][str(step)] for s in paired],
                    )
                    for step in setting["eval_steps"]
                }
                entry["verdict"] = verdict(entry["minus_dpo"]["reward_change"])
            setting["methods"][method] = entry
        setting["pairing"] = pairing_check(by_method)
        if reference:
            setting["dpo_health_flag"] = health_flag(list(reference.values()))
        out[key] = setting
    return out


def health_flag(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """How often ``health/winner_pathology`` (``trl_diffusion_sdpo.callbacks.health.winner_pathology`` over the logged
    steps, one log per step here) would have fired in these runs: the fraction of steps flagged and the first
    flagged step, per seed, so one sees whether the flag tells the pathological setting from the mild one."""
    fractions, first = [], []
    for run in runs:
        history = run["history"]
        logs = [
            {"delta/winner": w, "implicit_acc": a} for w, a in zip(history["delta/winner"], history["implicit_acc"])
        ]
        flags = [winner_pathology(logs[: i + 1]) for i in range(len(logs))]
        fractions.append(float(np.mean(flags)))
        first.append(next((int(history["step"][i]) for i, f in enumerate(flags) if f), None))
    return {"fraction_of_steps": summarise(fractions), "first_step": first}


def verdict(difference: dict[str, Any]) -> str:
    low, high = difference["ci95"]
    return "pays" if low > 0 else "costs" if high < 0 else "no detectable difference"


def _same_reference(run: dict[str, Any], reference: dict[str, Any]) -> str:
    """How a run's reference errors compare with Diffusion-DPO's of the same seed: ``exact`` (same digest over
    every step), ``trace`` (every step within float32 rounding, rtol 1e-5: the parameter and update spaces evaluate
    each branch's half batch), ``first steps`` (only the first three steps were recorded by the DPO run, and they
    agree within rtol 1e-5), or ``differ``."""
    mine, theirs = run["reference_errors"], reference["reference_errors"]
    if mine["sha256"] == theirs["sha256"]:
        return "exact"
    if "trace" in mine and "trace" in theirs:
        return "trace" if np.allclose(mine["trace"], theirs["trace"], rtol=1e-5, atol=0) else "differ"
    return "first steps" if np.allclose(mine["first_steps"], theirs["first_steps"], rtol=1e-5, atol=0) else "differ"


def pairing_check(by_method: dict[str, dict[int, dict]]) -> dict[str, Any]:
    """Per seed, every method's reference errors (which depend only on the batches, timesteps and noise: the
    reference is frozen) must be Diffusion-DPO's, and the seeds' must differ (else the check would be vacuous)."""
    counts: dict[str, int] = defaultdict(int)
    differ = []
    reference = by_method.get(REFERENCE, {})
    for method, runs in by_method.items():
        for seed, run in runs.items():
            if method == REFERENCE or seed not in reference:
                continue
            found = _same_reference(run, reference[seed])
            counts[found] += 1
            if found == "differ":
                differ.append(f"seed{seed}-{method}")
    distinct = len({run["reference_errors"]["sha256"] for run in reference.values()})
    return {
        "runs_against_dpo": dict(counts),
        "runs_with_other_batches": differ,
        "dpo_seeds": len(reference),
        "distinct_across_seeds": distinct,
        "paired": not differ and distinct == len(reference),
    }


def _setting(settings: dict[str, Any], lr: float, steps: int) -> dict[str, Any] | None:
    found = [s for s in settings.values() if s["learning_rate"] == lr and s["steps"] == steps]
    return found[0] if found else None


def _ci(difference: dict[str, Any]) -> str:
    return f"{difference['mean']:+.3f} [{difference['ci95'][0]:+.3f}, {difference['ci95'][1]:+.3f}]"


def recommendation(settings: dict[str, Any], source: str) -> dict[str, Any]:
    """The recommendation the docs and the demo quote, by rule from the verdicts: a safeguard is recommended when
    it pays at the pathological setting (lr 2e-4, 200 steps) and costs nothing detectable at the demo's learning
    rate (2e-5, 200 and 1000 steps); one that pays only where the pathology shows is recommended for that case
    only; if none pays, Diffusion-DPO stays the default. Also one row per (setting, method) for the tables."""
    regimes = (
        ("pathological: lr 2e-4, 200 steps", _setting(settings, 2e-4, 200), "200"),
        ("between: lr 1e-4, 200 steps", _setting(settings, 1e-4, 200), "200"),
        ("demo's lr 2e-5, 200 steps", _setting(settings, 2e-5, 200) or _setting(settings, 2e-5, 1000), "200"),
        ("demo's lr 2e-5, 1000 steps", _setting(settings, 2e-5, 1000), "1000"),
    )
    rows = []
    for name, setting, step in regimes:
        if setting is None:
            continue
        for key, entry in setting["methods"].items():
            if "minus_dpo" not in entry:
                continue
            reward = entry["reward_minus_dpo_by_step"][step]
            row = {"setting": name, "method": key, "label": entry["label"], "n": reward["n"], "step": int(step)}
            row.update(learning_rate=setting["learning_rate"], run_steps=setting["steps"])
            row["reward_minus_dpo"] = {k: reward[k] for k in ("mean", "ci95", "mde80")}
            row["verdict"] = verdict(reward)
            if step == str(setting["steps"]):
                for metric in ("winner_delta", "implicit_acc"):
                    row[f"{metric}_minus_dpo"] = {k: entry["minus_dpo"][metric][k] for k in ("mean", "ci95")}
            rows.append(row)

    # Decide on rows with the full MIN_SEEDS paired seeds; a method needs one at lr 2e-4 and one at the demo's lr.
    decisive = [r for r in rows if r["n"] >= MIN_SEEDS]
    methods = list(dict.fromkeys(r["method"] for r in rows))

    def verdicts(method: str, prefix: str, pool: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in pool if r["method"] == method and r["setting"].startswith(prefix)]

    full = [m for m in methods if verdicts(m, "pathological", decisive) and verdicts(m, "demo's", decisive)]
    undecided = [m for m in methods if m not in full]
    preliminary = not full
    pool = rows if preliminary else decisive
    methods = methods if preliminary else full
    pathological = {m: verdicts(m, "pathological", pool) for m in methods}
    mild = {m: verdicts(m, "demo's", pool) for m in methods}
    pays = [m for m in methods if pathological[m] and pathological[m][0]["verdict"] == "pays"]
    safe = [m for m in pays if mild[m] and all(r["verdict"] != "costs" for r in mild[m])]
    measured = [m for m in pays if mild[m]]

    def mild_cost(method: str) -> float:  # the worst mean reward difference at the demo's learning rate
        return min(r["reward_minus_dpo"]["mean"] for r in mild[method])

    # of the safeguards that pay where the pathology bites, the one that costs least where it does not
    best = max(measured, key=mild_cost) if measured else pays[0] if pays else None
    if safe:
        pick = max(safe, key=lambda m: pathological[m][0]["reward_minus_dpo"]["mean"])
        row = pathological[pick][0]
        mild_text = "; ".join(
            f"{_ci(r['reward_minus_dpo'])} at {r['step']} steps, where {r['n']} seeds detect "
            f"{r['reward_minus_dpo']['mde80']:.3f}"
            for r in mild[pick]
        )
        text = (
            f"Turn the safeguard on ({row['label']}): at lr 2e-4 it changes the held-out reward by "
            f"{_ci(row['reward_minus_dpo'])} against Diffusion-DPO, and at the demo's lr 2e-5 it costs nothing "
            f"detectable ({mild_text})."
        )
    elif best is not None:
        row = pathological[best][0]
        costs = [r for r in mild[best] if r["verdict"] == "costs"]
        where = (
            "; ".join(f"{_ci(r['reward_minus_dpo'])} at {r['step']} steps" for r in costs)
            if costs
            else "not measured there"
        )
        text = (
            f"Train with Diffusion-DPO (safeguard_space='none') where it is healthy; turn the safeguard on "
            f"({row['label']}) "
            f"only where Diffusion-DPO's pathology bites (its held-out reward falls while the winner's error rises, "
            f"here at 10x the demo's learning rate): at lr 2e-4 it changes the held-out reward by "
            f"{_ci(row['reward_minus_dpo'])} against Diffusion-DPO, but at the demo's lr 2e-5 it costs {where}."
        )
        flags = [_setting(settings, 2e-4, 200), _setting(settings, 2e-5, 200) or _setting(settings, 2e-5, 1000)]
        if all(f is not None and "dpo_health_flag" in f for f in flags):
            shares = [f["dpo_health_flag"]["fraction_of_steps"]["mean"] for f in flags]
            text += (
                f" The per-step health/winner_pathology flag does not tell the two apart here: it fired on "
                f"{shares[0]:.2f} of Diffusion-DPO's steps at 2e-4 and {shares[1]:.2f} at 2e-5."
            )
    else:
        text = (
            "No safeguard pays on the toy demo: train with Diffusion-DPO (safeguard_space='none'). No safeguard's "
            "held-out reward is detectably above Diffusion-DPO's at lr 2e-4, where Diffusion-DPO's pathology appears."
        )
    if preliminary:
        text += f" (Preliminary: fewer than {MIN_SEEDS} paired seeds.)"
    elif undecided:
        labels = []
        for method in undecided:
            label = next(r["label"] for r in rows if r["method"] == method)
            reasons = []
            for prefix, where in (("pathological", "lr 2e-4"), ("demo's", "the demo's lr 2e-5")):
                if not verdicts(method, prefix, rows):
                    reasons.append(f"not run at {where}")
                elif not verdicts(method, prefix, decisive):
                    reasons.append(f"{max(r['n'] for r in verdicts(method, prefix, rows))} seeds at {where}")
            labels.append(f"{label} ({', '.join(reasons)})")
        text += f" Not decided (fewer than {MIN_SEEDS} paired seeds, or not run): {'; '.join(labels)}."
    n = sorted({r["n"] for r in rows})
    return {"source": source, "seeds": n, "min_seeds": MIN_SEEDS, "text": text, "rows": rows}


def recommendation_table(rec: dict[str, Any]) -> list[str]:
    """The Markdown table the README and docs/safeguard.md carry."""
    lines = [
        "| setting | safeguard | seeds | reward minus Diffusion-DPO [95% paired t] | detectable (80% power) "
        "| verdict |",
        "|---|---|---:|---|---:|---|",
    ]
    for row in rec["rows"]:
        reward = row["reward_minus_dpo"]
        lines.append(
            f"| {row['setting']} | {row['label']} | {row['n']} | {_ci(reward)} | {reward['mde80']:.3f} | "
            f"{row['verdict']} |"
        )
    return lines


def _fmt(difference: dict[str, Any], digits: int = 4) -> str:
    low, high = difference["ci95"]
    return f"{difference['mean']:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def markdown(settings: dict[str, Any]) -> list[str]:
    """One table per setting: each method's paired differences from DPO with 95% paired t intervals."""
    lines = []
    for key, setting in settings.items():
        dpo = setting["methods"].get(REFERENCE)
        lines.append(
            f"\n{key}: Diffusion-DPO reward change {_summary(dpo, 'reward_change')}, winner delta "
            f"{_summary(dpo, 'winner_delta', 3)}, implicit acc. {_summary(dpo, 'implicit_acc', 2)}"
        )
        lines.append(
            "| method | seeds | reward minus DPO [95% t] | bootstrap | MDE (80%) | winner delta minus DPO "
            "| implicit acc. minus DPO | verdict | s / run |"
        )
        lines.append("|---|---:|---|---|---:|---|---|---|---:|")
        for entry in setting["methods"].values():
            if "minus_dpo" not in entry:
                continue
            reward = entry["minus_dpo"]["reward_change"]
            boot = reward["ci95_bootstrap"]
            lines.append(
                f"| {entry['label']} | {reward['n']} | {_fmt(reward)} | [{boot[0]:+.4f}, {boot[1]:+.4f}] | "
                f"{reward['mde80']:.4f} | {_fmt(entry['minus_dpo']['winner_delta'], 3)} | "
                f"{_fmt(entry['minus_dpo']['implicit_acc'], 2)} | {entry['verdict']} | {entry['seconds_per_run']} |"
            )
    return lines


def _summary(entry: dict[str, Any] | None, metric: str, digits: int = 4) -> str:
    if entry is None or entry.get(metric) is None:
        return "-"
    stats = entry[metric]
    low, high = stats["ci95"]
    return f"{stats['mean']:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}] (n={stats['n']})"


def plot(settings: dict[str, Any], path: Path) -> None:
    """Per setting (columns, by learning rate), each method's paired reward and winner-error differences from DPO:
    the per-seed differences (ticks) and the mean with its 95% paired t interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(
        (k for k, s in settings.items() if any("minus_dpo" in e for e in s["methods"].values())),
        key=lambda k: (settings[k]["learning_rate"], settings[k]["steps"]),
    )
    fig, axes = plt.subplots(2, len(keys), figsize=(6.0 * len(keys), 6.6), squeeze=False)
    colours = {"above": "tab:blue", "below": "tab:orange", "includes": "tab:grey"}
    for column, key in enumerate(keys):
        setting = settings[key]
        entries = [e for e in setting["methods"].values() if "minus_dpo" in e]
        for row, (metric, name) in enumerate((("reward_change", "held-out reward"), ("winner_delta", "winner error"))):
            ax = axes[row][column]
            for y, entry in enumerate(entries):
                difference = entry["minus_dpo"][metric]
                mean, (low, high) = difference["mean"], difference["ci95"]
                colour = colours["above" if low > 0 else "below" if high < 0 else "includes"]
                ax.errorbar(mean, y, xerr=[[mean - low], [high - mean]], fmt="o", color=colour, capsize=3)
                ax.plot(difference["differences"], [y + 0.2] * difference["n"], "|", color=colour, alpha=0.6)
            ax.axvline(0.0, color="black", lw=0.8)
            ax.set_yticks(range(len(entries)), [f"{e['label']} ({e['minus_dpo'][metric]['n']})" for e in entries])
            ax.set_ylim(len(entries) - 0.5, -0.5)
            ax.set_xlabel(f"{name}: method minus Diffusion-DPO")
            ax.grid(alpha=0.3, axis="x")
            if row == 0:
                ax.set_title(f"lr {setting['learning_rate']:g}, beta {setting['beta']:g}, {setting['steps']} steps")
    fig.suptitle(
        "Paired difference from Diffusion-DPO: per seed (ticks), mean and 95% paired t interval (seeds in brackets)\n"
        "blue: interval above 0, orange: below 0, grey: includes 0 "
        "(benchmarks/results/safeguard-comparison/cpu-safeguard-comparison-demo.json)"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="stability_map.py result files")
    parser.add_argument("--json", required=True, help="Summary to write.")
    parser.add_argument("--images", default=None, help="Folder for safeguard_comparison.png.")
    parser.add_argument("--recommendation", default=None, help="The recommendation file the demo ships and quotes.")
    args = parser.parse_args(argv)
    settings: dict[str, Any] = {}
    sources = {}
    merged: dict[str, dict[str, Any]] = {}  # files of the same run length pooled (a method may run in its own file)
    for name in args.runs:
        report = json.loads(Path(name).read_text())
        pool = merged.setdefault(str(report["grid"]["max_steps"]), {"grid": report["grid"], "runs": {}})
        pool["runs"].update(report["runs"])
        sources[name] = {
            "grid": report["grid"],
            "runs": len(report["runs"]),
            "invocations": report["invocations"],
            "skipped": report.get("skipped", {}),
            "base": report["base"],
        }
    for pool in merged.values():
        settings.update(compare(pool))
    cost = {
        "run_seconds": round(sum(m["seconds"] for s in settings.values() for m in s["methods"].values()), 1),
        "invocation_wall_seconds": round(
            sum(x.get("wall_seconds", 0) for s in sources.values() for x in s["invocations"]), 1
        ),
        "invocation_process_cpu_seconds": round(
            sum(x.get("process_cpu_seconds", 0) for s in sources.values() for x in s["invocations"]), 1
        ),
        "runs": sum(s["runs"] for s in sources.values()),
        "machines": sorted(
            {json.dumps(x.get("machine"), sort_keys=True) for s in sources.values() for x in s["invocations"]}
        ),
    }
    cost["machines"] = [json.loads(m) for m in cost["machines"]]
    summary = {
        "what": "paired differences from Diffusion-DPO per setting and method "
        "(benchmarks/studies/safeguard_comparison.py)",
        "intervals": "95% paired t over training seeds (df = n - 1); ci95_bootstrap: percentile bootstrap over seeds",
        "power": "mde80: smallest true mean difference a two-sided paired t test (alpha 0.05) detects with 80% power",
        "settings": settings,
        "sources": sources,
        "cost": cost,
    }
    Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    if args.images:
        plot(settings, Path(args.images) / "safeguard_comparison.png")
    for line in markdown(settings):
        print(line)
    rec = recommendation(settings, Path(args.json).as_posix())
    rec["cost"] = {k: cost[k] for k in ("runs", "run_seconds", "machines")}
    if args.recommendation:
        # The text the demo, README and docs quote: recommendation.py's one rendering of these rows.
        from benchmarks.studies.recommendation import shipped_fields

        shipped = {**rec, **shipped_fields(rec)}
        Path(args.recommendation).write_text(json.dumps(shipped, indent=1) + "\n")
    print()
    for line in recommendation_table(rec):
        print(line)
    print(rec["text"])
    for key, setting in settings.items():
        print(f"{key}: pairing {setting['pairing']}")
        if "dpo_health_flag" in setting:
            flag = setting["dpo_health_flag"]
            share = flag["fraction_of_steps"]["mean"]
            print(f"{key}: DPO health flag on {share:.2f} of steps, first flagged steps {flag['first_step']}")
    print(f"cost: {cost}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
