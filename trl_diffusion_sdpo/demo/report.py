"""The CPU demo's results: per-step metric histories from the trainer's logs, the per-method summary with its
intervals, and the console tables."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from .methods import Method
from .recipe import LAST_FRACTION, BreakingRegime
from .stats import bootstrap_paired_change, summarise

__all__ = [
    "format_breaking_table",
    "format_closing",
    "format_report",
    "format_table",
    "plain_text",
    "recommendation_line",
    "rewind_text",
    "run_reading",
    "safeguard_recommendation",
    "summarise_breaking",
]

RECOMMENDATION_FILE = Path(__file__).with_name("safeguard_recommendation.json")
"""When to turn the safeguard on, from the paired comparison on this demo
(``benchmarks/studies/safeguard_comparison.py``, written there from
``benchmarks/results/safeguard-comparison/cpu-safeguard-comparison-demo.json``); shipped so the demo can quote it
without rerunning the comparison."""

# metric -> its range (t intervals are clipped to it), or None
_METRICS: dict[str, tuple[float, float] | None] = {
    "reward": (0.0, 1.0),
    "reward_change": None,
    "winner_delta": None,
    "loser_delta": None,
    "implicit_acc": (0.0, 1.0),
    "loss": None,
    "lambda_mean": (0.0, 1.0),
}

_HISTORY_KEYS = (
    "loss",
    "implicit_acc",
    "delta/winner",
    "delta/loser",
    "mse/policy_winner",
    "mse/policy_loser",
    "mse/ref_winner",
    "mse/ref_loser",
    "safeguard/lambda_mean",
    "safeguard/lambda_min",
    "safeguard/lambda_max",
    "safeguard/engaged",
    "safeguard/output_lambda_mean",
    "safeguard/mu",
    "beta",
    "margin",
    "guard/capped_fraction",
    "guard/sft_loss",
)

BREAKING_SOURCE = "benchmarks/results/safeguard-comparison/cpu-safeguard-comparison-shipped-base-runs.json"
"""Where the breaking regime's setting comes from: the shipped base's Diffusion-DPO runs at its learning rate."""


def history_from_logs(log_history: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per-step metrics from ``trainer.state.log_history`` as columns (``step`` plus the logged keys), and with
    ``on_pathology="rewind"`` its rewinds as ``rewinds``: ``[step fired, step restored]`` each."""
    rows = [entry for entry in log_history if "delta/winner" in entry]
    columns: dict[str, list[float]] = {"step": [int(row["step"]) for row in rows]}
    for key in _HISTORY_KEYS:
        if all(key in row for row in rows):
            columns[key] = [float(row[key]) for row in rows]
    rewinds = [[int(e["step"]), int(e["health/rewind_to"])] for e in log_history if "health/rewind_to" in e]
    if rewinds:
        columns["rewinds"] = rewinds
    return columns


def final_mean(history: dict[str, list[float]], key: str, max_steps: int) -> float:
    """Mean of ``key`` over the logged steps in the last ``LAST_FRACTION`` of training (at least one entry)."""
    threshold = max_steps * (1.0 - LAST_FRACTION)
    values = [v for s, v in zip(history["step"], history[key]) if s > threshold] or history[key][-1:]
    return float(np.mean(values))


def mean_history(histories: list[dict[str, list[float]]]) -> dict[str, list[float]]:
    """Per-step means over the seeds' histories (they log the same steps)."""
    keys = [k for k in histories[0] if all(k in h for h in histories)]
    return {k: list(np.mean([h[k] for h in histories], axis=0)) for k in keys}


def summarise_methods(
    methods: list[Method],
    runs: dict[str, list[dict[str, Any]]],
    rewards_per_run: dict[str, list[np.ndarray]],
    base_rewards: np.ndarray,
    seed: int,
) -> dict[str, dict[str, Any]]:
    """Per method: its label, config fields and runs, each metric's mean with a t interval over the training seeds,
    the bootstrap interval of the reward change (paired with the base's samples) and, except for ``dpo``, the
    per-seed reward difference to DPO."""
    results = {}
    for method in methods:
        rows = runs[method.key]
        aggregate: dict[str, Any] = {"label": method.label, "config": method.config_kwargs(), "runs": rows}
        for metric, bounds in _METRICS.items():
            if all(metric in r for r in rows):
                aggregate[metric] = summarise([r[metric] for r in rows], bounds)
        aggregate["reward_change_bootstrap"] = bootstrap_paired_change(
            np.stack(rewards_per_run[method.key]), base_rewards.ravel(), seed=seed
        )
        if method.key != "dpo" and "dpo" in runs:
            by_seed = {r["seed"]: r["reward"] for r in runs["dpo"]}
            aggregate["reward_minus_dpo"] = summarise([r["reward"] - by_seed[r["seed"]] for r in rows])
        results[method.key] = aggregate
    return results


def _guard_log(history: dict[str, list[float]]) -> dict[str, float]:
    """What a row's guard logged over the run, the evidence that its config field reached the trainer: the
    safeguard's mean ``lambda``, ``mu`` at the start and the end (``"auto"`` moves it), ``beta`` at the start and the
    end (``auto_beta`` moves it), the fraction of pairs at ``max_margin``'s cap and the SFT anchor's mean loss."""
    found: dict[str, float] = {}
    if "safeguard/lambda_mean" in history:
        found["lambda_mean"] = float(np.mean(history["safeguard/lambda_mean"]))
    for key, name in (("safeguard/mu", "mu"), ("beta", "beta")):
        if key in history:
            found[f"{name}_first"], found[f"{name}_final"] = float(history[key][0]), float(history[key][-1])
    for key, name in (("guard/capped_fraction", "capped_fraction_mean"), ("guard/sft_loss", "sft_loss_mean")):
        if key in history:
            found[name] = float(np.mean(history[key]))
    return found


def _rewind_log(history: dict[str, list[float]], method: Method, max_steps: int) -> dict[str, Any] | None:
    """A rewinding row's rewinds (``[step fired, step restored]``) and the step it stopped at (``None``: it trained
    to ``max_steps``); ``None`` for a row without ``on_pathology="rewind"``."""
    if method.config_kwargs().get("on_pathology") != "rewind":
        return None
    last = int(history["step"][-1])
    return {"rewinds": history.get("rewinds", []), "stopped_at": last if last < max_steps else None}


def summarise_breaking(
    regime: BreakingRegime,
    methods: list[Method],
    rewards: dict[str, dict[int, np.ndarray]],
    base_rewards: np.ndarray,
    histories: dict[str, dict[str, list[float]]],
    seconds: dict[str, float],
    skipped: dict[str, str],
) -> dict[str, Any]:
    """The breaking regime's entry in ``summary.json``: its settings, the base's held-out reward and per row its
    label, config fields, held-out reward and change from the base at each evaluation step (``rewards[key][step]``:
    ``[P, S]``, sample ``j`` sharing prompt and noise with the base's), the end's change with a bootstrap over the
    held-out samples (one training seed: only the sample level varies) and its difference from Diffusion-DPO's
    (paired by sample), the last 10% of steps' diagnostics and :func:`_guard_log`. ``diffusion_dpo_breaks``:
    Diffusion-DPO's end change has its bootstrap interval below 0."""
    end = regime.max_steps
    base_mean = float(base_rewards.mean())
    rows: dict[str, dict[str, Any]] = {}
    for method in methods:
        history = histories[method.key]
        at = rewards[method.key]
        row: dict[str, Any] = {
            "label": method.label,
            "config": method.config_kwargs(),
            "reward": {str(step): float(at[step].mean()) for step in regime.eval_steps},
            "reward_change": {str(step): float(at[step].mean()) - base_mean for step in regime.eval_steps},
            "reward_change_bootstrap": bootstrap_paired_change(
                at[end].ravel(), base_rewards.ravel(), seed=regime.seed
            ),
        }
        if method.key != "dpo" and "dpo" in rewards:
            row["reward_minus_dpo"] = bootstrap_paired_change(
                at[end].ravel(), rewards["dpo"][end].ravel(), seed=regime.seed
            )
        for metric, key in (("winner_delta", "delta/winner"), ("loser_delta", "delta/loser"), ("implicit_acc",) * 2):
            row[metric] = final_mean(history, key, end)
        row["guard_log"] = _guard_log(history)
        rewind = _rewind_log(history, method, end)
        if rewind is not None:
            row["rewind"] = rewind
        row["seconds"] = round(seconds[method.key], 2)
        rows[method.key] = row
    dpo = rows.get("dpo")
    return {
        "settings": {**dataclasses.asdict(regime), "source": BREAKING_SOURCE},
        "base_reward": base_mean,
        "methods": rows,
        "diffusion_dpo_breaks": None if dpo is None else dpo["reward_change_bootstrap"]["ci95"][1] < 0,
        "skipped": skipped,
    }


def safeguard_recommendation(path: Path = RECOMMENDATION_FILE) -> dict[str, Any] | None:
    """The shipped recommendation: ``text`` (what the README and ``docs/safeguard.md`` carry, rendered from the file's
    rows by ``benchmarks/studies/recommendation.py``, which writes it into the file), ``source`` (the comparison's
    result file), ``sources`` (every result file the text's figures come from), ``seeds`` (paired seeds per method
    and setting), ``run_steps`` (the rows' run lengths) and ``pairs_per_step`` (their runs'); ``None`` if the file
    is absent."""
    if not path.is_file():
        return None
    found = json.loads(path.read_text())
    return {
        "text": found["text"],
        "source": found["source"],
        "sources": found.get("sources", [found["source"]]),
        "seeds": found["seeds"],
        "run_steps": sorted({row["run_steps"] for row in found.get("rows", [])}),
        "pairs_per_step": found.get("pairs_per_step"),
    }


_MARKDOWN_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
_MARKDOWN_CODE = re.compile(r"`([^`]*)`")
_MARKDOWN_STRONG = re.compile(r"\*\*([^*]+)\*\*")


def plain_text(markdown: str) -> str:
    """``markdown``'s inline markup as plain text, for the console: ``[text](target)`` becomes ``text (target)``,
    code spans and strong emphasis lose their marks; list bullets (``- ``) and line breaks stay as they read."""
    text = _MARKDOWN_LINK.sub(r"\1 (\2)", markdown)
    text = _MARKDOWN_CODE.sub(r"\1", text)
    return _MARKDOWN_STRONG.sub(r"\1", text)


def _listed(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + f" and {items[-1]}"


def _run_setting(config: dict[str, Any], seeds: int) -> str:
    return (
        f"lr {config['learning_rate']:g}, {config['max_steps']} steps of {config['batch_size']} pairs, "
        f"{seeds} seed{'s' if seeds != 1 else ''}"
    )


def run_reading(summary: dict[str, Any]) -> str:
    """What this run's own tables say, every figure as its table prints it: Diffusion-DPO's held-out reward change
    against the base, each other method's difference from Diffusion-DPO of the same seed and where each interval
    lies, and which methods (if any) rose above Diffusion-DPO; then, where the breaking regime ran, Diffusion-DPO's
    change there and the guards whose difference from it lies above 0."""
    results, config = summary["methods"], summary["config"]
    base = "the shipped base" if summary["base"]["source"] == "shipped" else f"base {summary['base']['recipe_hash']}"
    seeds = max(r["reward"]["n"] for r in results.values())
    parts = [f"This run ({base}, {_run_setting(config, seeds)}; the tables above):"]
    dpo = results.get("dpo")
    others = [r for key, r in results.items() if key != "dpo" and r.get("reward_minus_dpo") is not None]
    if dpo is not None:
        parts.append(
            f"Diffusion-DPO's held-out reward changed by {_cell(dpo['reward_change'], 4, True)} against the base "
            f"({_where(dpo['reward_change'])})" + (";" if others else ".")
        )
    if others:
        against = [
            f"{r['label']} {_cell(r['reward_minus_dpo'], 4, True)} ({_where(r['reward_minus_dpo'])})" for r in others
        ]
        above = [r["label"] for r in others if _where(r["reward_minus_dpo"]) == "above 0"]
        if all(_where(r["reward_minus_dpo"]) == "no interval" for r in others):
            verdict = "With one seed there is no interval to choose by."
        elif above:
            verdict = f"Here {_listed(above)} rose above Diffusion-DPO's reward."
        else:
            verdict = "Here no safeguard's reward rose above Diffusion-DPO's."
        parts.append(f"against Diffusion-DPO of the same seed, {_listed(against)}. {verdict}")
    regime = summary.get("breaking_regime")
    if regime is not None and "dpo" in regime["methods"]:
        settings, rows = regime["settings"], regime["methods"]
        kept = [
            f"{r['label']} {_cell(r['reward_minus_dpo'], 4, True)}"
            for key, r in rows.items()
            if key != "dpo" and _where(r["reward_minus_dpo"]) == "above 0"
        ]
        dpo_change = rows["dpo"]["reward_change_bootstrap"]
        parts.append(
            f"In the breaking regime ({_run_setting(settings, 1)}) Diffusion-DPO's changed by "
            f"{_cell(dpo_change, 4, True)} ({_where(dpo_change)}); "
            + (f"above it (interval above 0): {_listed(kept)}." if kept else "no guard's interval lies above it.")
        )
        parts += [_rewind_reading(r) for r in rows.values() if "rewind" in r]
    return " ".join(parts)


def _rewind_reading(row: dict[str, Any]) -> str:
    """What a rewinding row did, from its own log: when its alarm fired and which step it restored, whether it then
    trained on (with the safeguard the rewind switches on) or stopped, and its end's change against the base and
    Diffusion-DPO."""
    rewind, label = row["rewind"], row["label"]
    if not rewind["rewinds"]:
        return f"{label}: its alarm stayed quiet, so it trained as Diffusion-DPO."
    events = _listed([f"at step {fired} back to step {restored}" for fired, restored in rewind["rewinds"]])
    restored = rewind["rewinds"][-1][1]
    healthy = "the base's" if restored == 0 else f"step {restored}'s"
    then = (
        f"stopped at step {rewind['stopped_at']} with the last healthy weights ({healthy})"
        if rewind["stopped_at"] is not None
        else "trained on to the end with the safeguard on"
    )
    change, against = row["reward_change_bootstrap"], row.get("reward_minus_dpo")
    return (
        f"{label} rewound {events}, then {then}: held-out reward change {_cell(change, 4, True)} against the base, "
        f"{_cell(against, 4, True)} against Diffusion-DPO ({_where(against)})."
    )


def recommendation_line(recommendation: dict[str, Any], summary: dict[str, Any] | None = None) -> str:
    """The package's recommendation in plain text (:func:`plain_text`; the shipped text is markdown for the README
    and docs), after a heading that says plainly which results it quotes and why they are not this run's: the
    comparisons' seeds, run lengths and pairs per step beside this run's (``summary``), and every result file its
    figures come from. One line, or a heading line and the list."""
    low, high = min(recommendation["seeds"], default=0), max(recommendation["seeds"], default=0)
    seeds = str(low) if low == high else f"{low}-{high}"
    steps = _listed([str(s) for s in recommendation.get("run_steps", [])] or ["the recorded"])
    pairs = recommendation.get("pairs_per_step")
    setting = f"{steps} steps" + (f" of {pairs} pairs" if pairs else "")
    if summary is not None:
        config = summary["config"]
        setting += f" (this run: {config['max_steps']} steps of {config['batch_size']})"
    files = _listed(recommendation.get("sources", [recommendation["source"]]))
    text = plain_text(recommendation["text"])
    gap = "\n" if "\n" in text else " "
    return (
        f"Which setting to use, quoted from other runs than this one (not rerun here): paired comparisons of {seeds} "
        f"seeds per method and setting over {setting}, in {files}. They rest on more seeds and on other learning "
        "rates, run lengths and bases than this run, so their figures are not those of the tables above; one demo "
        f"run cannot stand in for them:{gap}{text}"
    )


def _cell(stats: dict[str, Any] | None, digits: int, signed: bool = False) -> str:
    if stats is None:
        return "-"
    fmt = f"{{:{'+' if signed else ''}.{digits}f}}"
    text = fmt.format(stats["mean"])
    if stats.get("ci95") is not None:
        low, high = stats["ci95"]
        text += f" [{fmt.format(low)}, {fmt.format(high)}]"
    return text


def _where(stats: dict[str, Any] | None) -> str:
    """Whether an interval lies above zero, below zero, or covers it (no claim beyond that)."""
    if stats is None or stats.get("ci95") is None:
        return "no interval"
    low, high = stats["ci95"]
    return "above 0" if low > 0 else "below 0" if high < 0 else "interval includes 0"


def _table(width: int, columns: list[tuple[str, int]], cells: list[tuple[str, list[str]]]) -> list[str]:
    """A header, a rule and one line per label, each cell right-aligned in its column's width."""
    header = f"{'':{width}}" + "".join(f"{name:>{size}}" for name, size in columns)
    lines = [header, "-" * len(header)]
    for label, row in cells:
        lines.append(f"{label:{width}}" + "".join(f"{cell:>{size}}" for cell, (_, size) in zip(row, columns)))
    return lines


def format_table(summary: dict[str, Any]) -> str:
    """Two console tables (held-out reward; training diagnostics), each cell a mean with its 95% interval, then
    where each interval lies relative to zero, and the methods skipped."""
    results = summary["methods"]
    width = max(len(r["label"]) for r in results.values()) + 2
    n = max(r["reward"]["n"] for r in results.values())
    lines = [f"Held-out reward (base {summary['base']['reward']:.3f}); mean over {n} training seed(s) [95% interval]"]
    columns = [("reward", 27), ("change vs base (t)", 30), ("change (bootstrap)", 30), ("minus DPO (t)", 30)]
    cells = [
        (
            r["label"],
            [
                _cell(r["reward"], 4),
                _cell(r["reward_change"], 4, True),
                _cell(r["reward_change_bootstrap"], 4, True),
                _cell(r.get("reward_minus_dpo"), 4, True),
            ],
        )
        for r in results.values()
    ]
    lines += _table(width, columns, cells)
    steps = summary["config"]["max_steps"]
    lines.append("")
    lines.append(
        f"Training diagnostics, mean over the last {max(1, round(steps * LAST_FRACTION))} of {steps} steps "
        "(delta = policy - reference denoising error)"
    )
    columns = [("winner delta", 30), ("loser delta", 30), ("implicit acc", 22), ("mean lambda", 22)]
    cells = [
        (
            r["label"],
            [
                _cell(r["winner_delta"], 5, True),
                _cell(r["loser_delta"], 5, True),
                _cell(r["implicit_acc"], 2),
                _cell(r.get("lambda_mean"), 3),
            ],
        )
        for r in results.values()
    ]
    lines += _table(width, columns, cells)
    lines.append("")
    for r in results.values():
        lines.append(
            f"{r['label']}: winner delta {_where(r['winner_delta'])}, loser delta {_where(r['loser_delta'])}; "
            f"reward change: t {_where(r['reward_change'])}, bootstrap {_where(r['reward_change_bootstrap'])}"
        )
    for key, reason in summary["skipped"].items():
        lines.append(f"{key}: skipped ({reason})")
    return "\n".join(lines)


def _guard_text(log: dict[str, float]) -> str:
    parts = []
    if "lambda_mean" in log:
        parts.append(f"lambda {log['lambda_mean']:.2f}")
    if "mu_first" in log:
        parts.append(f"mu {log['mu_first']:.2f}->{log['mu_final']:.2f}")
    if "beta_first" in log:
        parts.append(f"beta {log['beta_first']:.0f}->{log['beta_final']:.0f}")
    if "capped_fraction_mean" in log:
        parts.append(f"capped {log['capped_fraction_mean']:.0%}")
    if "sft_loss_mean" in log:
        parts.append(f"sft loss {log['sft_loss_mean']:.3f}")
    return ", ".join(parts) or "-"


def rewind_text(rewind: dict[str, Any]) -> str:
    """A rewinding row's guard cell: ``rewind 20->10, stop 30`` (fired -> restored; the step it stopped at)."""
    if not rewind["rewinds"]:
        return "alarm quiet"
    text = "rewind " + ", ".join(f"{fired}->{restored}" for fired, restored in rewind["rewinds"])
    return text + (f", stop {rewind['stopped_at']}" if rewind["stopped_at"] is not None else "")


def format_breaking_table(regime: dict[str, Any]) -> str:
    """The breaking regime's console table: per row the held-out reward change from the base at each evaluation
    step (the end's with its bootstrap interval over held-out samples), minus Diffusion-DPO's, the winner's error
    delta and what the guard logged; then whether Diffusion-DPO's reward fell."""
    settings, results = regime["settings"], regime["methods"]
    steps = [str(s) for s in settings["eval_steps"]]
    width = max(len(r["label"]) for r in results.values()) + 2
    lines = [
        f"Breaking regime: lr {settings['learning_rate']:g}, {settings['max_steps']} steps of "
        f"{settings['batch_size']} pairs, seed {settings['seed']} (the setting of {settings['source']}); held-out "
        f"reward (base {regime['base_reward']:.3f}) change, [95% bootstrap over held-out samples]; samples in "
        "breaking_regime.png"
    ]
    columns = [(f"change @{s}", 14) for s in steps[:-1]]
    columns += [(f"change @{steps[-1]}", 28), ("minus DPO", 28), ("winner delta", 14), ("guard's log", 30)]
    cells = [
        (
            r["label"],
            [
                *(f"{r['reward_change'][s]:+.4f}" for s in steps[:-1]),
                _cell(r["reward_change_bootstrap"], 4, True),
                _cell(r.get("reward_minus_dpo"), 4, True),
                f"{r['winner_delta']:+.5f}",
                ", ".join(
                    part
                    for part in (rewind_text(r["rewind"]) if "rewind" in r else "", _guard_text(r["guard_log"]))
                    if part and part != "-"
                )
                or "-",
            ],
        )
        for r in results.values()
    ]
    lines += _table(width, columns, cells)
    if regime["diffusion_dpo_breaks"] is not None:
        dpo = results["dpo"]["reward_change_bootstrap"]
        lines.append(
            f"Diffusion-DPO's held-out reward {'fell' if regime['diffusion_dpo_breaks'] else 'did not fall'} here "
            f"({_cell(dpo, 4, True)}: {_where(dpo)}; one training seed)"
        )
    for key, reason in regime["skipped"].items():
        lines.append(f"{key}: skipped ({reason})")
    return "\n".join(lines)


def format_closing(summary: dict[str, Any]) -> str:
    """What closes the report: the run's own reading (:func:`run_reading`), then the package's recommendation with
    what it quotes (:func:`recommendation_line`) where the summary carries one."""
    lines = [run_reading(summary)]
    if summary.get("recommendation"):
        lines += ["", recommendation_line(summary["recommendation"], summary)]
    return "\n".join(lines)


def format_report(summary: dict[str, Any]) -> str:
    """The console report: the breaking regime's table first (the demo's headline, when it ran), then the per-method
    tables (:func:`format_table`), then the run's reading and the recommendation (:func:`format_closing`)."""
    parts = [] if summary.get("breaking_regime") is None else [format_breaking_table(summary["breaking_regime"]), ""]
    return "\n".join([*parts, format_table(summary), "", format_closing(summary)])
