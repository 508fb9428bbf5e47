"""The pathology alarm against the held-out measures it is meant to predict: every run of the stability benchmark
replayed through ``trl_diffusion_sdpo.callbacks.health.winner_pathology``, labelled by its own held-out reward.

* **Runs**: every run with a per-step ``history`` in the result files of :data:`SOURCES` (offline learning rates
  6.7e-6 to 1e-3, betas 5 to 50000, 50 to 1000 steps, online hacking and online healthy; Diffusion-DPO, each
  safeguard and each guard). The files are found by name anywhere under ``benchmarks/results`` (the ``history``
  folder of older copies aside).
* **Label** (:func:`label`): a run's held-out measure *fell* when the demo's colour reward on the held-out prompts at
  its last evaluation step is more than :data:`TOLERANCE` below the base's (offline the reward the pairs were ranked
  by; online the caption's colours, which the hacking run's brightness reward does not read). The denoising error on
  clean drawings, where a file has it, is recorded beside the label, not used by it (the offline comparison files
  have the reward only).
* **Replay** (:func:`fires`): the benchmark logged every optimizer step; the trainer's logs are averages over
  ``logging_steps`` steps (default :data:`LOGGING_STEPS`), so the history is averaged in windows of that many steps
  and the rule sees the logs one at a time, as ``WinnerHealth.annotate`` does. A run's alarm *fired* when any log up
  to its last evaluation step was flagged. Today's rule is also replayed at the demo's ``logging_steps=1``.
* **Split** (:data:`CHOOSE_SEEDS`): the rule is chosen on the runs of even training seeds (the best F1, ties to the
  fewest false alarms) over :data:`GRID`, and reported on the runs of odd seeds, then on all runs. A seed's runs of
  every setting land on the same side, so reruns of one setting in two files never straddle the split.

``python benchmarks/studies/alarm_calibration.py`` writes :data:`OUTPUT`; ``--check`` recomputes it and compares
(exit status 1 on a difference); ``--table`` prints the Markdown tables ``benchmarks/research/alarm.md`` carries and
``--page`` writes them there.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from trl_diffusion_sdpo.callbacks.health import RULE, PathologyRule, winner_pathology  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SOURCES: tuple[str, ...] = (
    "cpu-safeguard-comparison-demo-*.json",
    "cpu-stability-map-demo.json",
    "cpu-stability-guards-demo.json",
    "cpu-online-hacking-demo.json",
    "cpu-online-comparison-tiny.json",
)
"""The result files the runs come from (file name patterns), the one place they are named."""
OTHER_BASE: tuple[str, ...] = (
    "cpu-safeguard-comparison-shipped-base-runs.json",
    "cpu-stability-guards-shipped-base.json",
)
"""Runs on another base (the shipped one; the studies train the benchmark's): the rules are reported on them too,
never chosen on them."""
OUTPUT = RESULTS / "stability" / "cpu-alarm-calibration.json"
PAGE = ROOT / "benchmarks" / "research" / "alarm.md"
START, END = "<!-- alarm-tables:start -->", "<!-- alarm-tables:end -->"
"""The page's block the tables are written into (``--page``)."""
TOLERANCE = 0.02
"""How far below the base's the held-out colour reward must end for a run to count as fallen (2.3% of the base's
0.87; healthy Diffusion-DPO at lr 2e-5 ends between -0.002 and +0.035)."""
LOGGING_STEPS = 10  # the config's default logging_steps
DEMO_LOGGING_STEPS = 1  # the demo's
TODAY = PathologyRule(
    windows=3, window_steps=None, min_delta_winner=0.0, max_implicit_acc=None, accuracy_must_grow=True
)
"""The rule before calibration: ``delta/winner > 0`` in each of 3 consecutive logs and ``implicit_acc`` grown from
the first of them to the last."""
CHOOSE_SEEDS = "even"
GRID: dict[str, tuple[Any, ...]] = {
    "windows": (2, 3, 4),
    "min_delta_winner": (0.0, 0.01, 0.02, 0.03, 0.05, 0.07, 0.1),
    "max_implicit_acc": (None, 0.55, 0.6, 0.65, 0.7, 0.8),
    "accuracy_must_grow": (False, True),
}
"""The rules searched, each with ``window_steps=LOGGING_STEPS``."""
SIGNALS = ("delta/winner", "delta/loser", "implicit_acc", "loss")


def find(pattern: str, results: Path = RESULTS) -> list[Path]:
    """The result files named ``pattern`` anywhere under ``results``, older copies in ``history`` aside."""
    return sorted(p for p in results.rglob(pattern) if "history" not in p.relative_to(results).parts)


def _run(source: str, key: str, run: dict[str, Any], reward: dict[int, float], denoising: dict[int, float] | None):
    method = run["method"]
    online = "online" in source and not method.startswith("offline")
    return {
        "id": f"{source}:{key}",
        "source": source,
        "seed": int(run["seed"]),
        "learning_rate": run["learning_rate"],
        "beta": run.get("beta"),
        "method": method,
        "regime": "online" if online else "offline",
        "steps": len(run["history"]["step"]),
        "history": {k: run["history"][k] for k in ("step", *SIGNALS)},
        "reward_change": reward,
        "denoising_error_change": denoising,
    }


def load_runs(results: Path = RESULTS, sources: tuple[str, ...] = SOURCES) -> list[dict[str, Any]]:
    """Every run with a history in the files of ``sources``: its signals per step and its held-out changes from
    the base at each evaluation step."""
    runs: list[dict[str, Any]] = []
    for pattern in sources:
        paths = find(pattern, results)
        if not paths:
            raise FileNotFoundError(f"no {pattern} under {results}")
        for path in paths:
            data, source = json.loads(path.read_text()), path.name
            if "regimes" in data:  # the stability guards: per regime, with the measures at step 0 (the base)
                for name, regime in data["regimes"].items():
                    for key, run in regime["runs"].items():
                        base = run["measures"]["0"]["denoising_error"]
                        denoising = {
                            int(s): m["denoising_error"] - base for s, m in run["measures"].items() if s != "0"
                        }
                        reward = {int(s): v for s, v in run["reward_change"].items()}
                        runs.append(_run(source, f"{name}/{key}", run, reward, denoising))  # keys repeat by regime
            elif "curve" in next(iter(data["runs"].values()), {}):  # online: measures per eval step and the base's
                base = data["base"]["measures"]
                for key, run in data["runs"].items():
                    curve = {int(s): m for s, m in run["curve"].items()}
                    reward = {s: m["colour_reward"] - base["colour_reward"] for s, m in curve.items()}
                    denoising = {s: m["denoising_error"] - base["denoising_error"] for s, m in curve.items()}
                    runs.append(_run(source, key, run, reward, denoising))
            else:  # the paired comparison and the map: the reward's change from the base per eval step
                for key, run in data.get("runs", {}).items():
                    runs.append(_run(source, key, run, {int(s): v for s, v in run["reward_change"].items()}, None))
    return runs


def label(run: dict[str, Any], tolerance: float = TOLERANCE) -> bool:
    """Whether the run's held-out reward fell: below the base's by more than ``tolerance`` at the last eval step."""
    return run["reward_change"][max(run["reward_change"])] < -tolerance


def logs(run: dict[str, Any], logging_steps: int = LOGGING_STEPS) -> list[dict[str, float]]:
    """The training logs the trainer would have written: each signal averaged over ``logging_steps`` steps, up to the
    run's last evaluation step, with the ``step`` of each log."""
    history, last = run["history"], max(run["reward_change"])
    out = []
    for end in range(logging_steps, min(run["steps"], last) + 1, logging_steps):
        entry = {k: sum(history[k][end - logging_steps : end]) / logging_steps for k in SIGNALS}
        out.append({**entry, "step": end})
    return out


def fires(run: dict[str, Any], rule: PathologyRule, logging_steps: int = LOGGING_STEPS) -> int | None:
    """The first step at which ``rule`` flags the run's logs, seen one at a time (``None``: never)."""
    seen: list[dict[str, float]] = []
    for entry in logs(run, logging_steps):
        seen.append(entry)
        if winner_pathology(seen, rule):
            return int(entry["step"])
    return None


def confusion(fired: Iterable[bool], fell: Iterable[bool]) -> dict[str, Any]:
    """The confusion matrix of ``fired`` against ``fell``, with precision and recall (``None`` where undefined)."""
    pairs = list(zip(fired, fell, strict=True))
    tp, fp = sum(f and y for f, y in pairs), sum(f and not y for f, y in pairs)
    fn, tn = sum(y and not f for f, y in pairs), sum(not f and not y for f, y in pairs)
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = 2 * precision * recall / (precision + recall) if precision and recall else 0.0
    return {"fired_fell": tp, "fired_held": fp, "quiet_fell": fn, "quiet_held": tn, "runs": len(pairs),
            "precision": precision, "recall": recall, "f1": f1}  # fmt: skip


def safeguarded(run: dict[str, Any]) -> bool:
    """Whether the run trained with a safeguard (its method names one: ``sdpo``, ``mu=auto``)."""
    return "sdpo" in run["method"] or "auto-mu" in run["method"]


def split(run: dict[str, Any]) -> str:
    """``choose`` for the runs of even training seeds, ``report`` for odd ones."""
    return "choose" if run["seed"] % 2 == 0 else "report"


def candidates() -> list[PathologyRule]:
    return [
        PathologyRule(window_steps=LOGGING_STEPS, **dict(zip(GRID, values)))
        for values in itertools.product(*GRID.values())
    ]


def choose_rule(runs: list[dict[str, Any]]) -> tuple[PathologyRule, dict[str, Any]]:
    """The rule of :data:`GRID` with the best F1 on ``runs`` (ties: fewer false alarms, then the first in the grid)."""
    fell = [label(r) for r in runs]
    scored = []
    for index, rule in enumerate(candidates()):
        matrix = confusion([fires(r, rule) is not None for r in runs], fell)
        scored.append((-matrix["f1"], matrix["fired_held"], index, rule, matrix))
    best = min(scored, key=lambda s: s[:3])
    return best[3], best[4]


def _by(runs: list[dict[str, Any]], rule: PathologyRule, logging_steps: int = LOGGING_STEPS) -> dict[str, Any]:
    return confusion([fires(r, rule, logging_steps) is not None for r in runs], [label(r) for r in runs])


def last_logs_mean(run: dict[str, Any], signal: str, last: int = 2) -> float | None:
    """``signal``'s mean over the run's last ``last`` logs (the calibrated rule's two windows); None without logs."""
    entries = logs(run)[-last:]
    return sum(e[signal] for e in entries) / len(entries) if entries else None


def separation(runs: list[dict[str, Any]], signal: str) -> float | None:
    """How well ``signal`` (:func:`last_logs_mean`) ranks the runs whose held-out reward fell above those where it
    held: the probability that a fallen run's value exceeds a held one's, ties counting half (the area under the ROC
    curve; 0.5 is no separation, below 0.5 a signal that falls with the reward). None without both kinds of run."""
    fell, held = [], []
    for run in runs:
        value = last_logs_mean(run, signal)
        if value is not None:
            (fell if label(run) else held).append(value)
    if not fell or not held:
        return None
    wins = sum((a > b) + 0.5 * (a == b) for a in fell for b in held)
    return wins / (len(fell) * len(held))


def _group(run: dict[str, Any]) -> str:
    lr = f"{run['learning_rate']:g}"
    beta = "" if run["beta"] in (None, 5000.0) else f", beta {run['beta']:g}"
    return f"{run['regime']}, lr {lr}{beta}, {run['steps']} steps"


def analyse(results: Path = RESULTS) -> dict[str, Any]:
    """The labels, the split, the chosen rule and both rules' confusion matrices (the result file's content)."""
    runs = load_runs(results)
    halves = {name: [r for r in runs if split(r) == name] for name in ("choose", "report")}
    chosen, on_choose = choose_rule(halves["choose"])
    rules = {"today": TODAY, "calibrated": chosen}
    matrices = {
        name: {
            "report_runs": _by(halves["report"], rule),
            "choose_runs": _by(halves["choose"], rule),
            "all_runs": _by(runs, rule),
        }
        for name, rule in rules.items()
    }
    matrices["today"]["all_runs_demo_logging"] = _by(runs, TODAY, DEMO_LOGGING_STEPS)
    other = load_runs(results, OTHER_BASE)
    for name, rule in rules.items():
        matrices[name]["other_base_runs"] = _by(other, rule)
    for name, rule in rules.items():
        for guarded, word in ((False, "safeguard_off"), (True, "safeguard_on")):
            held_out = [r for r in halves["report"] if safeguarded(r) == guarded]
            matrices[name][f"report_runs_{word}"] = _by(held_out, rule)
    # what each logged signal could tell, with and without a safeguard: where none separates, no rule on them can
    separations = {
        word: {signal: separation([r for r in runs if safeguarded(r) == guarded], signal) for signal in SIGNALS}
        for guarded, word in ((False, "safeguard_off"), (True, "safeguard_on"))
    }
    groups: dict[str, dict[str, Any]] = {}
    for run in runs:
        entry = groups.setdefault(_group(run), {"runs": 0, "fell": 0, "today_fired": 0, "calibrated_fired": 0})
        entry["runs"] += 1
        entry["fell"] += label(run)
        entry["today_fired"] += fires(run, TODAY) is not None
        entry["calibrated_fired"] += fires(run, chosen) is not None
    return {
        "what": "The pathology alarm (trl_diffusion_sdpo.callbacks.health) replayed on every run of the stability "
        "benchmark, against each run's held-out colour reward (benchmarks/studies/alarm_calibration.py).",
        "sources": sorted({r["source"] for r in runs}),
        "other_base": f"{', '.join(OTHER_BASE)}: the shipped base's runs, labelled and replayed alike, chosen on by "
        "no rule",
        "label": f"fell: the held-out colour reward at the last eval step more than {TOLERANCE} below the base's",
        "tolerance": TOLERANCE,
        "logging_steps": LOGGING_STEPS,
        "demo_logging_steps": DEMO_LOGGING_STEPS,
        "split": f"rule chosen on the runs of {CHOOSE_SEEDS} training seeds (best F1, ties to fewer false alarms), "
        "reported on the others",
        "grid": {k: list(v) for k, v in GRID.items()},
        "rules": {name: asdict(rule) for name, rule in rules.items()},
        "package_rule_is_calibrated": asdict(RULE) == asdict(chosen),
        "chosen_on": on_choose,
        "confusion": matrices,
        "separation": {
            "what": "per logged signal, its mean over a run's last two logs ranking the runs whose held-out reward "
            "fell above those where it held: the area under the ROC curve over all runs (0.5: none; below 0.5: the "
            "signal falls with the reward)",
            **separations,
        },
        "groups": groups,
        "runs": [
            {
                "id": r["id"],
                "seed": r["seed"],
                "split": split(r),
                "method": r["method"],
                "safeguard": safeguarded(r),
                "group": _group(r),
                "reward_change": round(r["reward_change"][max(r["reward_change"])], 6),
                "denoising_error_change": None
                if r["denoising_error_change"] is None
                else round(r["denoising_error_change"][max(r["denoising_error_change"])], 6),
                "fell": label(r),
                "today_fires_at": fires(r, TODAY),
                "calibrated_fires_at": fires(r, chosen),
            }
            for r in runs
        ],
    }


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def tables(result: dict[str, Any]) -> str:
    """The Markdown tables of ``benchmarks/research/alarm.md``: the matrices, then the runs per group."""
    lines = [
        "| rule | runs | fired, fell | fired, held | quiet, fell | quiet, held | precision | recall |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    names = {"report_runs": "held-out (odd seeds)", "choose_runs": "chosen on (even seeds)", "all_runs": "all",
             "all_runs_demo_logging": "all, logging_steps=1", "report_runs_safeguard_off": "held-out, safeguard off",
             "report_runs_safeguard_on": "held-out, safeguard on", "other_base_runs": "the shipped base"}  # fmt: skip
    rules = {"today": "before calibration", "calibrated": "calibrated"}
    for rule, matrices in result["confusion"].items():
        for which, m in matrices.items():
            lines.append(
                f"| {rules[rule]} | {names[which]} ({m['runs']}) | {m['fired_fell']} | {m['fired_held']} "
                f"| {m['quiet_fell']} | {m['quiet_held']} | {_cell(m['precision'])} | {_cell(m['recall'])} |"
            )
    separation = result["separation"]
    lines += ["", "| signal (mean of the last two logs) | separates fell from held: safeguard off | safeguard on |",
              "|---|---:|---:|"]  # fmt: skip
    for signal in SIGNALS:
        off, on = separation["safeguard_off"][signal], separation["safeguard_on"][signal]
        lines.append(f"| `{signal}` | {_cell(off)} | {_cell(on)} |")
    lines += ["", "| runs | count | held-out reward fell | fired before calibration | fired, calibrated |",
              "|---|---:|---:|---:|---:|"]  # fmt: skip
    for group, g in sorted(
        result["groups"].items(), key=lambda kv: (kv[0].split(",")[0], float(kv[0].split()[2].rstrip(",")), kv[0])
    ):
        lines.append(f"| {group} | {g['runs']} | {g['fell']} | {g['today_fired']} | {g['calibrated_fired']} |")
    return "\n".join(lines)


def write_page_block(start: str, end: str, block: str) -> None:
    """Rewrite what :data:`PAGE` holds between the ``start`` and ``end`` markers with ``block`` (this study's tables
    and the probe alarm's, :mod:`probe_alarm`, share the page)."""
    head, rest = PAGE.read_text().split(start, 1)
    PAGE.write_text(f"{head}{start}\n\n{block}\n\n{end}{rest.split(end, 1)[1]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help=f"Recompute and compare with {OUTPUT.name}.")
    parser.add_argument("--table", action="store_true", help="Print the Markdown tables of the written file.")
    parser.add_argument("--page", action="store_true", help=f"Write the tables into {PAGE.name}'s marked block.")
    args = parser.parse_args(argv)
    if args.table or args.page:
        block = tables(json.loads(OUTPUT.read_text()))
        if args.page:
            write_page_block(START, END, block)
        else:
            print(block)
        return 0
    result = analyse()
    if args.check:
        same = json.loads(OUTPUT.read_text()) == json.loads(json.dumps(result))
        print(f"{OUTPUT.name}: {'up to date' if same else 'differs from the recomputation'}")
        return 0 if same else 1
    OUTPUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("rules", "confusion")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
