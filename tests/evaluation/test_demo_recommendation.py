"""The demo's closing text agrees with what sits beside it: its reading of the run quotes the run's own tables, and
the package's recommendation it quotes says which result files it comes from, each figure one of theirs.

Read from the run behind the docs' figures (``docs/images/demo_summary.json``, the full comparison) and the result
files the shipped recommendation names; no figure is stored here."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from trl_diffusion_sdpo.demo.report import (
    format_breaking_table,
    format_report,
    format_table,
    plain_text,
    recommendation_line,
    run_reading,
    safeguard_recommendation,
)

ROOT = Path(__file__).resolve().parents[2]
CELL = re.compile(r"[+-]\d+\.\d+ \[[+-]\d+\.\d+, [+-]\d+\.\d+\]")
DECIMAL = re.compile(r"(?<![\w.])[+-]?\d+\.\d{2,}")


def _default_run() -> dict[str, Any]:
    """The summary of the run behind the docs' figures (every method, ``--full``), quoting the recommendation as
    shipped now."""
    summary = json.loads((ROOT / "docs/images/demo_summary.json").read_text())
    return {**summary, "recommendation": safeguard_recommendation()}


def _interval(stats: dict[str, Any]) -> str:
    return "{:+.4f} [{:+.4f}, {:+.4f}]".format(stats["mean"], *stats["ci95"])


def test_the_runs_reading_quotes_its_own_tables_and_nothing_else():
    summary = _default_run()
    report, reading = format_report(summary), run_reading(summary)
    tables = format_breaking_table(summary["breaking_regime"]) + "\n" + format_table(summary)
    assert report.index(reading) > report.index("Held-out reward (base")  # below the tables it reads
    # Diffusion-DPO's change against the base and each method's difference from it: the summary's, as printed
    methods = summary["methods"]
    assert f"Diffusion-DPO's held-out reward changed by {_interval(methods['dpo']['reward_change'])}" in reading
    for key, result in methods.items():
        if key != "dpo":
            assert f"{result['label']} {_interval(result['reward_minus_dpo'])}" in reading, key
    # every figure of the reading is a cell of the tables above it, and it has no other figure
    cells = CELL.findall(reading)
    assert cells and all(cell in tables for cell in cells)
    assert DECIMAL.findall(re.sub(r"lr [\d.e-]+", "", CELL.sub("", reading))) == []  # learning rates as the tables
    # what it concludes follows from those intervals
    above = [r["label"] for k, r in methods.items() if k != "dpo" and r["reward_minus_dpo"]["ci95"][0] > 0]
    assert ("no safeguard's reward rose above Diffusion-DPO's" in reading) == (not above)
    setting = f"lr {summary['config']['learning_rate']:g}, {summary['config']['max_steps']} steps of "
    assert setting + f"{summary['config']['batch_size']} pairs, 3 seeds" in reading


def _figures(tree: Any, keys: set[str], inside: bool = False) -> set[float]:
    """Every ``mean`` and ``ci95`` bound under an entry named in ``keys``, anywhere in ``tree``."""
    found: set[float] = set()
    if isinstance(tree, dict):
        for key, value in tree.items():
            if inside and key == "mean" and isinstance(value, float):
                found.add(value)
            elif inside and key == "ci95" and isinstance(value, list):
                found |= {v for v in value if isinstance(v, float)}
            else:
                found |= _figures(value, keys, inside or key in keys)
    elif isinstance(tree, list):
        for value in tree:
            found |= _figures(value, keys, inside)
    return found


def _is_one_of(token: str, values: set[float]) -> bool:
    """``token`` (as printed, sign optional) is one of ``values`` rounded to its digits."""
    digits = len(token.split(".")[1])
    number = float(token)
    return any(abs(round(v, digits) - number) < 10**-digits / 2 or abs(round(-v, digits) - number) < 10**-digits / 2
               for v in values)  # fmt: skip


def test_the_quoted_recommendation_names_its_results_and_each_figure_is_theirs():
    summary = _default_run()
    recommendation = summary["recommendation"]
    line = recommendation_line(recommendation, summary)
    heading, quoted = line.split(":\n", 1) if ":\n" in line else line.rsplit(": ", 1)
    assert "quoted from other runs than this one" in heading
    assert quoted == plain_text(recommendation["text"])
    # the files it names are the files its figures come from, and the settings it names are theirs
    files = {path: json.loads((ROOT / path).read_text()) for path in recommendation["sources"]}
    assert all(path in heading for path in files)
    comparison = files[recommendation["source"]]
    steps = sorted({setting["steps"] for setting in comparison["settings"].values()})
    pairs = {source["grid"]["batch_size"] for source in comparison["sources"].values()}
    assert f"over {' and '.join(map(str, steps))} steps of {pairs.pop()} pairs" in heading
    assert f"this run: {summary['config']['max_steps']} steps of {summary['config']['batch_size']}" in heading
    # each line's figures are those of the file it rests on
    online = [files[p] for p in recommendation["sources"] if "online" in p]
    tiny = next(p for p in recommendation["sources"] if p in _line(quoted, "- The shipped tiny base"))
    lines_and_values = {
        "- Default": _figures(comparison, {"reward_minus_dpo_by_step"}),
        "- Diffusion-DPO": _figures(comparison, {"reward_minus_dpo_by_step"}),
        "- The update space": _figures(comparison, {"reward_minus_dpo_by_step"}),
        "- Online": _figures(online, {"minus_online_dpo", "vs_dpo"}),
        "- The shipped tiny base": _figures(files[tiny], {"reward_change", "implicit_acc"}),
    }
    checked = 0
    for start, values in lines_and_values.items():
        text = _line(quoted, start).split(".json", 1)[-1]  # past a named file's digits
        for token in DECIMAL.findall(text):
            assert _is_one_of(token, values), f"{start}: {token} is none of its file's figures"
            checked += 1
    assert checked >= 20


def _line(text: str, start: str) -> str:
    (found,) = [line for line in text.splitlines() if line.startswith(start)]
    return found
