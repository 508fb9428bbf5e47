"""The dormant safeguard's analysis in :mod:`stability_guards`' study: the goal judged on every held-out measure,
the dormant runs paired with the stored runs of the same seeds, the alarm's steps, the verdict and the docs' tables.
The online regimes come from the online studies (``online_hacking.py``, ``online_comparison.py``), whose dormant
setting tries the offline switch target online (:func:`tried_online`), judged on their held-out colour reward.

    python benchmarks/studies/stability_guards.py dormant --parts /tmp/dormant-parts \
        --online online-hacking=/tmp/online-hacking.json --online online-healthy=/tmp/online-healthy.json
    python benchmarks/studies/stability_guards.py dormant-tables --page benchmarks/research/stability.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import stability_guards as study  # noqa: E402

#: The goal's direction per held-out measure: +1 higher is better, -1 lower is better. The diversity has none (it
#: rises as samples turn to noise and falls as they collapse to one image): reported, never judged.
BETTER = {"reward": 1, "shape_iou": 1, "denoising_error": -1}


def _worse(ci: list[float] | None, sign: int) -> float:
    """How far a 95% interval ``ci`` lies on the worse side of 0 (``sign``: :data:`BETTER`'s): its nearer end's
    distance from 0, or 0 when it includes 0 or lies on the better side (``nan`` without an interval)."""
    if ci is None:
        return float("nan")
    return max(0.0, -sign * (ci[1] if sign > 0 else ci[0]))


def goal_all_measures(analysis: dict[str, Any]) -> dict[str, Any]:
    """The two halves on every judged held-out measure (:data:`BETTER`) at each cell's last evaluation step:

    - a cell *breaks* when Diffusion-DPO's held-out reward change against the base has its 95% interval below 0;
      there Diffusion-DPO's measure *falls* where its interval lies on the worse side of 0, and a setting *holds*
      when, on every measure where Diffusion-DPO's falls, its own interval against the base includes 0 or lies on
      the better side (``miss``: how far its interval's nearer end lies on the worse side);
    - a cell is *healthy* otherwise; there a setting *costs nothing* when on every judged measure its paired
      interval against Diffusion-DPO includes 0 or lies on the better side (``miss``: as above, of that interval).
    """
    out: dict[str, Any] = {}
    for regime, cells in analysis.items():
        for cell, entry in cells.items():
            methods = {m: v for m, v in entry.items() if isinstance(v, dict) and "steps" in v}
            if "dpo" not in methods or len(methods["dpo"]["seeds"]) < 2 or len(methods) < 2:
                continue
            last = max(methods["dpo"]["steps"], key=int)
            at = {m: v["steps"][last] for m, v in methods.items() if last in v["steps"]}
            dpo_ci = at["dpo"]["reward"]["vs_base"]["ci95"]
            breaks = dpo_ci is not None and dpo_ci[1] < 0
            falls = [m for m, sign in BETTER.items() if _worse(at["dpo"][m]["vs_base"]["ci95"], sign) > 0]
            settings = {}
            for method, row in at.items():
                if method == "dpo":
                    continue
                judged = falls if breaks else list(BETTER)
                against = "vs_base" if breaks else "vs_dpo"
                measures = {}
                for measure in judged:
                    item = row[measure].get(against) or {}
                    miss = _worse(item.get("ci95"), BETTER[measure])
                    measures[measure] = {
                        "against": against,
                        "mean": item.get("mean"),
                        "ci95": item.get("ci95"),
                        "met": miss == 0.0,
                        "miss": miss,
                    }
                settings[method] = {
                    "half": "holds where Diffusion-DPO breaks"
                    if breaks
                    else "costs nothing where Diffusion-DPO is healthy",
                    "met": all(v["met"] for v in measures.values()),
                    "measures": measures,
                }
            out[f"{regime}/{cell}"] = {
                "step": int(last),
                "diffusion_dpo_breaks": breaks,
                "dpo_falls_on": falls,
                "settings": settings,
            }
    return out


def both_halves(verdicts: dict[str, Any]) -> dict[str, Any]:
    """Per setting, over the cells it ran in (:func:`goal_all_measures`): the cells of each half, those it meets, and
    whether it meets both halves (it ran in at least one cell of each and met every one)."""
    out: dict[str, Any] = {}
    for cell, verdict in verdicts.items():
        for method, item in verdict["settings"].items():
            half = "breaks" if verdict["diffusion_dpo_breaks"] else "healthy"
            mine = out.setdefault(method, {"breaks": {}, "healthy": {}})
            mine[half][cell] = item["met"]
    for mine in out.values():
        mine["meets_both"] = all(mine[h] and all(mine[h].values()) for h in ("breaks", "healthy"))
    return out


DORMANT_OUTPUT = Path("benchmarks/results/stability/cpu-stability-dormant-demo.json")
#: the online studies' dormant setting: Diffusion-DPO with on_pathology="safeguard", switched to :func:`tried_online`
ONLINE_DORMANT = {"safeguard_space": "none", "on_pathology": "safeguard"}


def tried_online() -> None:
    """Let this process's online runs switch to the offline target (``health.SWITCH_TO``) when the alarm fires. The
    package refuses ``on_pathology="safeguard"`` online (``online.defaults.ONLINE_SWITCH_TO``, which the online
    config's ``pathology_switch`` returns, is ``None``); the online studies' dormant runs measure what that refusal
    gives up."""
    from trl_diffusion_sdpo.callbacks import health
    from trl_diffusion_sdpo.online import defaults as online_defaults

    online_defaults.ONLINE_SWITCH_TO = dict(health.SWITCH_TO)


DORMANT_NOT_RUN = [
    "the search's other cells (Diffusion-DPO alone, 100 steps: beta 50, lr 5e-4 and 1e-3): no setting to pair with "
    "there; its smallest beta (5) is the small-beta regime",
]
#: the online studies' settings under this study's names, where it has them (the others keep theirs: LABELS)
ONLINE_NAMES = {
    "online-dpo": "dpo",
    "online-dormant-safeguard": study.DORMANT,
    "online-sdpo-output": study.DEFAULT_METHOD,
    "sdpo-default": "sdpo-output-mu0.9",
    "sdpo-output-auto": "guard-auto-mu",
    "max-margin-5": "guard-max-margin",
    "sft-1": "guard-sft",
    "auto-beta": "guard-auto-beta",
}
LABELS = {**study.LABELS, "sdpo-output-mu0.9": "output space, mu=0.9", "ema-0.999": "Diffusion-DPO, ema_decay=0.999"}
#: the online regimes: the online studies' files (``None``: only in this study's result file)
ONLINE_REGIMES: dict[str, Path | None] = {
    "online-hacking": Path("benchmarks/results/online/cpu-online-hacking-demo.json"),
    "online-healthy": None,
}
#: this study's measures in the online studies' curves: the goal's reward is the held-out colour reward (the online
#: hacking regime trains on brightness, which the caption never asks for)
ONLINE_MEASURES = {
    "reward": "colour_reward",
    "shape_iou": "shape_iou",
    "diversity": "diversity",
    "denoising_error": "denoising_error",
}


def from_online(report: dict[str, Any]) -> dict[str, Any]:
    """An online study's runs at its grid's learning rate as this study's (:func:`study.analyse` reads them): the
    settings renamed by :data:`ONLINE_NAMES`, the measures by :data:`ONLINE_MEASURES`, the base's as step ``"0"``."""
    base = report["base"]["measures"]
    lr = report.get("grid_learning_rate") or max(run["learning_rate"] for run in report["runs"].values())
    runs = {}
    for key, run in report["runs"].items():
        if run["learning_rate"] != lr:
            continue
        steps = {"0": base, **run["curve"]}
        runs[key] = {
            "seed": run["seed"],
            "learning_rate": lr,
            "beta": report["config"]["beta"],
            "method": ONLINE_NAMES.get(run["method"], run["method"]),
            "measures": {s: {m: point[src] for m, src in ONLINE_MEASURES.items()} for s, point in steps.items()},
            **({"alarm": run["alarm"]} if "alarm" in run else {}),
        }
    return {"runs": runs}


def online_regimes(given: dict[str, Path], kept: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per online regime (:data:`ONLINE_REGIMES`): the online study's report as run (``given``: a file per regime,
    else the regime ``kept`` in this study's result file), with the runs this study keeps: the dormant ones where
    the regime has a stored file (the others are there), every run where it has none."""
    out: dict[str, dict[str, Any]] = {}
    for name, stored in ONLINE_REGIMES.items():
        if name in given:
            report = json.loads(Path(given[name]).read_text())
            dormant = [
                k for k, r in report["runs"].items() if ONLINE_NAMES.get(r["method"], r["method"]) == study.DORMANT
            ]
            mine = {k: r for k, r in report["runs"].items() if stored is None or k in dormant}
            held = json.loads(stored.read_text())["invocations"] if stored is not None else []
            new = [i for i in report["invocations"] if i not in held]  # the stored file's record its own runs
            out[name] = {
                **{k: v for k, v in report.items() if k not in ("analysis", "search")},
                "invocations": new,
                "runs": mine,
            }
        elif name in kept:
            out[name] = kept[name]
    return out


def online_runs(name: str, report: dict[str, Any]) -> dict[str, Any]:
    """The runs :func:`study.analyse` reads for online regime ``name``: its stored file's and this study's."""
    stored = ONLINE_REGIMES[name]
    runs = json.loads(stored.read_text())["runs"] if stored is not None else {}
    return from_online({**report, "runs": {**runs, **report["runs"]}})


def rerun_differences(stored: dict[str, Any], rerun: dict[str, Any]) -> dict[str, Any]:
    """Per rerun run (a :mod:`stability_map` part) held in ``stored``'s regimes: the largest absolute difference of
    each held-out measure over the evaluation steps, and of the reward change, from the stored run's."""
    out: dict[str, Any] = {}
    for key, run in rerun["runs"].items():
        old = next((r["runs"][key] for r in stored["regimes"].values() if key in r["runs"]), None)
        if old is None:
            continue
        steps = old["measures"]
        diffs = {m: max(abs(run["measures"][s][m] - steps[s][m]) for s in steps) for m in study.MEASURES}
        diffs["reward_change"] = max(
            abs(run["reward_change"][s] - old["reward_change"][s]) for s in old["reward_change"]
        )
        out[key] = {"max_abs_difference": diffs, "seconds": run["seconds"]}
    return out


def alarms(runs: dict[str, Any]) -> dict[str, Any]:
    """Per cell: the dormant runs' steps of the first alarm and of the switch (``None``: never), and how many
    switched."""
    out: dict[str, Any] = {}
    for run in sorted(runs.values(), key=lambda r: (study._cell(r), r["seed"])):
        cell = out.setdefault(study._cell(run), {"runs": 0, "switched": 0, "switched_at": {}})
        cell["runs"] += 1
        step = run["alarm"]["switched_at"]
        cell["switched"] += step is not None
        cell["switched_at"][str(run["seed"])] = step
    return out


def verdict(halves: dict[str, Any], verdicts: dict[str, Any], method: str = study.DORMANT) -> dict[str, Any]:
    """The rule for ``method``: it becomes the default where it meets both halves (:func:`both_halves`) and no fixed
    setting does; otherwise, per cell of a half it misses, the measures it misses and by how much."""
    fixed_both = sorted(m for m, v in halves.items() if m != method and v["meets_both"])
    mine = halves.get(method, {"breaks": {}, "healthy": {}, "meets_both": False})
    missed = {
        cell: {
            m: round(v["miss"], 4) for m, v in verdicts[cell]["settings"][method]["measures"].items() if not v["met"]
        }
        for half in ("breaks", "healthy")
        for cell, met in mine[half].items()
        if not met
    }
    return {
        "meets_both": mine["meets_both"],
        "fixed_settings_meeting_both": fixed_both,
        "becomes_default": mine["meets_both"] and not fixed_both,
        "meets": {h: all(mine[h].values()) if mine[h] else None for h in ("breaks", "healthy")},
        "missed_by": missed,
    }


def assemble_dormant(
    parts: Path, stored_path: Path, path: Path, rerun: Path | None, online: dict[str, Path] | None = None
) -> int:
    """The dormant safeguard's result file: its runs (from ``parts``), paired at the same seeds with the stored runs
    of every other setting in ``stored_path`` (the runs are deterministic on one machine: ``rerun``, a part file of
    stored runs trained again, records how close), with per cell the paired intervals against the base, Diffusion-DPO
    and the best fixed setting, the two halves on every judged measure, and the rule's verdict. The online regimes
    (:func:`online_regimes`; ``online`` names a file per regime, else the stored one, else this result file's)
    are judged the same way on the online studies' held-out measures (:data:`ONLINE_MEASURES`)."""
    stored = json.loads(stored_path.read_text())
    kept = json.loads(path.read_text()).get("online_regimes", {}) if path.exists() else {}
    online_found = online_regimes(online or {}, kept)
    mine: dict[str, dict[str, Any]] = {}
    for part in sorted(parts.glob("*.json")):
        report = json.loads(part.read_text())
        runs = {k: r for k, r in report["runs"].items() if r["method"] == study.DORMANT}
        if runs:
            held = stored["regimes"][part.stem]["invocations"]
            # those --reuse copied are the stored runs'; none left: the dormant runs trained beside the stored ones
            new = [i for i in report["invocations"] if i not in held] or report["invocations"]
            mine[part.stem] = {**{k: report[k] for k in ("grid", "base", "recipe")}, "invocations": new, "runs": runs}
    merged = {
        name: {**stored["regimes"][name], "runs": {**stored["regimes"][name]["runs"], **report["runs"]}}
        for name, report in mine.items()
    }
    cells = {(name, study._cell(r)) for name, report in mine.items() for r in report["runs"].values()}
    analysis = {
        name: {cell: entry for cell, entry in by_cell.items() if (name, cell) in cells}
        for name, by_cell in study.analyse(merged).items()
    }
    read = {name: online_runs(name, report) for name, report in online_found.items()}
    analysis.update(study.analyse(read))
    verdicts = goal_all_measures(analysis)
    halves = both_halves(verdicts)
    dormant_runs = {name: report["runs"] for name, report in mine.items()}
    dormant_runs |= {n: {k: r for k, r in v["runs"].items() if r["method"] == study.DORMANT} for n, v in read.items()}
    report = {
        "description": "The dormant safeguard (Diffusion-DPO with on_pathology='safeguard': the output-space "
        "safeguard at mu=0.5 from the step after the pathology alarm fires) in the stability benchmark's regimes, "
        "paired at the same seeds with the stored runs of Diffusion-DPO and every fixed setting. Online, where the "
        "package refuses on_pathology='safeguard', the runs try the offline target (stability_dormant.tried_online).",
        "paired_with": str(stored_path),
        "measures": stored["measures"],
        "online_measures": {k: f"the online study's held-out {v}" for k, v in ONLINE_MEASURES.items()},
        "reproducibility": rerun_differences(stored, json.loads(rerun.read_text())) if rerun else "not measured",
        "regimes": mine,
        "online_regimes": online_found,
        "alarms": {name: alarms(runs) for name, runs in dormant_runs.items()},
        "analysis": analysis,
        "goal_all_measures": verdicts,
        "both_halves": halves,
        "verdict": verdict(halves, verdicts),
        "not_run": DORMANT_NOT_RUN,
    }
    path.write_text(json.dumps(report))
    print(f"wrote {path}")
    return 0


DORMANT_START, DORMANT_END = "<!-- dormant-tables:start -->", "<!-- dormant-tables:end -->"


def measure_table(name: str, mine: dict[str, Any], entry: dict[str, Any], last: str) -> list[str]:
    """A cell's Markdown table at evaluation step ``last``: each held-out measure's change against the base for
    Diffusion-DPO and the setting ``name`` (``mine``: its analysis in the cell ``entry``), and the setting's paired
    differences from Diffusion-DPO and the best fixed setting (95% t intervals)."""
    lines = [
        f"| measure | Diffusion-DPO vs base | {name} vs base | {name} vs Diffusion-DPO | {name} vs best fixed |",
        "|---|---|---|---|---|",
    ]
    for measure in study.MEASURES:
        row, dpo = mine["steps"][last][measure], entry["dpo"]["steps"][last][measure]
        lines.append(
            f"| {measure} | {study._ci(dpo['vs_base'])} | {study._ci(row['vs_base'])} | "
            f"{study._ci(row.get('vs_dpo'))} | {study._ci(row.get('vs_best_fixed'))} |"
        )
    return lines


def dormant_tables(path: Path) -> str:
    """The Markdown the pages quote from the dormant safeguard's result file (:func:`assemble_dormant`): per cell at
    the last evaluation step, each held-out measure's change against the base for Diffusion-DPO and the dormant
    safeguard, and the dormant one's paired differences from Diffusion-DPO and the best fixed setting (95% t
    intervals); when the alarm switched; the two halves and the rule's verdict."""
    report = json.loads(path.read_text())
    lines = []
    for regime, cells in report["analysis"].items():
        for cell, entry in cells.items():
            mine = entry[study.DORMANT]
            last = max(mine["steps"], key=int)
            best = mine.get("best_fixed")
            alarm = report["alarms"][regime][cell]
            at = sorted({v for v in alarm["switched_at"].values() if v is not None})
            lines += [
                f"{regime}, lr {entry['learning_rate']:g}, beta {entry['beta']:g}, step {last}, "
                f"{len(mine['seeds'])} seeds (Diffusion-DPO vs base: its {len(entry['dpo']['seeds'])}); "
                f"switched in {alarm['switched']} of {alarm['runs']} runs"
                + (f" (at step {', '.join(map(str, at))})" if at else "")
                + f"; best fixed setting: {LABELS.get(best, best)}:",
                "",
                *measure_table("dormant", mine, entry, last),
                "",
            ]
    for cell, verdict in report["goal_all_measures"].items():
        item = verdict["settings"][study.DORMANT]
        judged = ", ".join(
            f"{m} " + ("met" if v["met"] else f"missed by {v['miss']:.3f}") for m, v in item["measures"].items()
        )
        others = [LABELS.get(m, m) for m, v in verdict["settings"].items() if m != study.DORMANT and v["met"]]
        lines.append(
            f"- {cell}: {item['half']}: {'meets' if item['met'] else 'misses'} ({judged}); fixed settings "
            f"meeting it: {', '.join(others) or 'none'}"
        )
    rule = report["verdict"]
    lines += [
        "",
        f"Both halves: {'met' if rule['meets_both'] else 'not met'}; fixed settings meeting both: "
        f"{', '.join(rule['fixed_settings_meeting_both']) or 'none'}; becomes the default: "
        f"{'yes' if rule['becomes_default'] else 'no'}.",
    ]
    return "\n".join(lines)
