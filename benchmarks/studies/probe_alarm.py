"""The held-out probe's alarm against the held-out measures it is meant to predict: the probe's readings of every run
of the probe study (``stability_probe.py``, the probe logged, never acted on) replayed through a grid of rules.

* **Runs**: the runs of :data:`SOURCE` whose setting does not act on the alarm (Diffusion-DPO, the default safeguard
  and the best fixed settings; the rewind's runs act on it and are left out), with their probe readings (every
  ``probe_steps`` optimizer steps, ``probe_pairs`` at the config's default).
* **Label**: as the training-log alarm's calibration labels a run (``alarm_calibration.label``): its held-out colour
  reward at the last evaluation step more than ``alarm_calibration.TOLERANCE`` below the base's.
* **Rules** (:class:`ProbeRule`, :data:`GRID`): a probe is unhealthy when a signal of its readings lies above (or
  below) a threshold; the alarm fires at the probe that makes ``patience`` unhealthy probes in a row (as
  ``callbacks.rewind.Rewind`` reads them). The signals: ``delta_winner`` (the winner's held-out error minus the
  reference's), ``relative_delta_winner`` (the same over the reference's error), ``delta_winner_minus_loser`` (the
  implicit margin) and ``implicit_acc``.
* **Split**: chosen on the runs of even training seeds of Diffusion-DPO and the default safeguard in the 50-step
  cells (:data:`CHOOSE_METHODS`, :data:`CHOOSE_REGIMES`; the best F1; ties: fewer false alarms, then more timely
  alarms, then the first in the grid), reported on every other run: the odd seeds, the best fixed settings' runs,
  and the small-beta and long runs, overall and per regime and cell, with the safeguard on and off.
* **Timeliness** (:func:`timely`): of the alarms that fired on a run whose reward fell, the share that fired before
  the held-out reward had fallen by half of what it finally lost. The reward is measured at the evaluation steps
  only: *strict* counts an alarm when an evaluation at or after its step still found the reward above half its final
  loss; *lenient* when it fired before the first evaluation that found it below.

* **Online** (:func:`analyse_online`, the result file's ``online``): the runs of :data:`ONLINE_SOURCE` that log the
  probe without acting on it (online Diffusion-DPO in every regime of ``stability_probe_online.ONLINE_REGIMES``, 10
  seeds each; a searched regime's search runs are not among them), labelled alike against the base of the regime's
  stored file, the rule chosen over :data:`ONLINE_GRID` (the online scale) on the even seeds of every regime and
  reported on the odd ones, per regime, beside the offline rule. No online run with a safeguard logs the probe:
  safeguard off only.

``python benchmarks/studies/probe_alarm.py`` writes :data:`OUTPUT`; ``--check`` recomputes it and compares (exit
status 1 on a difference); ``--table`` prints the Markdown tables ``benchmarks/research/alarm.md`` carries and
``--page`` writes them there.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from alarm_calibration import TOLERANCE, confusion, label, split, write_page_block  # noqa: E402

from trl_diffusion_sdpo.callbacks.rewind import ProbeAlarmRule, alarm_steps  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SOURCE = RESULTS / "probe" / "cpu-stability-probe-demo.json"
OUTPUT = RESULTS / "probe" / "cpu-probe-alarm-calibration.json"
PAGE = ROOT / "benchmarks" / "research" / "alarm.md"
START, END = "<!-- probe-alarm-tables:start -->", "<!-- probe-alarm-tables:end -->"
ONLINE_START, ONLINE_END = "<!-- probe-alarm-online-tables:start -->", "<!-- probe-alarm-online-tables:end -->"
CHOOSE_REGIMES = ("offline",)  # the regime the rule is chosen on (its even seeds); the others' runs only report it
CHOOSE_METHODS = ("dpo", "sdpo-output-mu0.5")  # the settings it is chosen on; the best fixed ones' runs report it
ACTING = ("rewind", "dormant-safeguard")  # settings that act on an alarm: their runs are not the alarm's evidence
SAFEGUARDED = ("sdpo", "auto-mu")  # a method key holding one of these trains with a safeguard

#: each signal of a probe's readings (the probe's metrics without their ``probe/`` prefix)
SIGNALS: dict[str, Callable[[Mapping[str, float]], float]] = {
    "delta_winner": lambda r: r["delta_winner"],
    "relative_delta_winner": lambda r: r["delta_winner"] / r["mse_ref_winner"],
    "delta_winner_minus_loser": lambda r: r["delta_winner"] - r["delta_loser"],
    "implicit_acc": lambda r: r["implicit_acc"],
}
Grid = dict[str, tuple[tuple[bool, ...], tuple[float, ...]]]
#: per signal: the directions searched (``True``: unhealthy above the threshold) and the thresholds
GRID: Grid = {
    "delta_winner": ((True,), (0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.3)),
    "relative_delta_winner": ((True,), (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0)),
    "delta_winner_minus_loser": ((True, False), (-0.05, -0.03, -0.02, -0.01, -0.005, 0.0, 0.005, 0.01)),
    "implicit_acc": ((True, False), (0.25, 0.5, 0.75)),
}
PATIENCE = (1, 2, 3, 4)


@dataclass(frozen=True)
class ProbeRule:
    """A probe is unhealthy when ``signal`` (:data:`SIGNALS`) lies above ``threshold`` (``above``; else below it);
    the alarm fires at the ``patience``-th unhealthy probe in a row."""

    signal: str
    above: bool
    threshold: float
    patience: int

    def unhealthy(self, reading: Mapping[str, float]) -> bool:
        value = SIGNALS[self.signal](reading)
        return value > self.threshold if self.above else value < self.threshold

    def package(self) -> ProbeAlarmRule | None:
        """The package's rule (``callbacks.rewind.ProbeAlarmRule``, on ``winner_rise_z``) this one is, where it can
        say it."""
        if self.signal == "winner_rise_z" and self.above:
            return ProbeAlarmRule(patience=self.patience, threshold=self.threshold)
        return None


#: the rules on ``delta_winner`` the package read, one per mode, before its one rule in the probe's units (the z
#: study, :func:`analyse_z`): this calibration chose them, and its record (``package_rule``) names them
DELTA_RULES = {
    "offline": ProbeAlarmRule(patience=2, threshold=0.05),
    "online": ProbeAlarmRule(patience=1, threshold=0.01),
}

BEFORE = ProbeRule("delta_winner", True, 0.0, 2)
"""The rule before calibration: the pathology as the paper defines it (the winner's held-out error above the
reference's), 2 probes in a row."""


def candidates(grid: Grid = GRID) -> list[ProbeRule]:
    return [
        ProbeRule(signal, above, threshold, patience)
        for signal, (directions, thresholds) in grid.items()
        for above, threshold, patience in itertools.product(directions, thresholds, PATIENCE)
    ]


def fires(run: dict[str, Any], rule: ProbeRule) -> int | None:
    """The optimizer step of the probe at which ``rule`` fires on the run's readings, seen one at a time, up to its
    last evaluation step (``None``: never)."""
    last, in_a_row = max(run["reward_change"]), 0
    for reading in run["probe"]:
        if reading["step"] > last:
            break
        in_a_row = in_a_row + 1 if rule.unhealthy(reading) else 0
        if in_a_row == rule.patience:
            return int(reading["step"])
    return None


def half_fallen(run: dict[str, Any]) -> tuple[int, int]:
    """``(before, at)``: the first evaluation step at which the held-out reward had fallen by half of its final loss
    (``at``), and the evaluation step before it (``before``; 0, the base, when none)."""
    changes = run["reward_change"]
    final = changes[max(changes)]
    steps = sorted(changes)
    at = next(s for s in steps if changes[s] <= final / 2)
    before = max((s for s in steps if s < at), default=0)
    return before, at


def timely(run: dict[str, Any], fired_at: int) -> dict[str, bool]:
    """Whether an alarm at ``fired_at`` on a run whose reward fell came before it had fallen by half (module
    docstring): ``strict`` and ``lenient``."""
    before, at = half_fallen(run)
    return {"strict": fired_at <= before, "lenient": fired_at < at}


def side(run: dict[str, Any]) -> str:
    """``choose`` for the runs of even training seeds of :data:`CHOOSE_METHODS` in :data:`CHOOSE_REGIMES`
    (``alarm_calibration.split``), ``report`` for every other run."""
    return split(run) if run["regime"] in CHOOSE_REGIMES and run["method"] in CHOOSE_METHODS else "report"


def safeguarded(run: dict[str, Any]) -> bool:
    return any(word in run["method"] for word in SAFEGUARDED)


def score(runs: list[dict[str, Any]], rule: ProbeRule) -> dict[str, Any]:
    """The confusion matrix of ``rule`` on ``runs`` (``alarm_calibration.confusion``) with the timeliness of its true
    alarms."""
    return matrix_of(runs, [fires(r, rule) for r in runs])


def matrix_of(runs: list[dict[str, Any]], fired: list[int | None]) -> dict[str, Any]:
    """The confusion matrix of alarms that fired at ``fired`` (a step per run; ``None``: quiet) with the timeliness
    of the true ones."""
    fell = [label(r) for r in runs]
    matrix = confusion([f is not None for f in fired], fell)
    true_alarms = [timely(r, f) for r, f, y in zip(runs, fired, fell, strict=True) if f is not None and y]
    for kind in ("strict", "lenient"):
        count = sum(t[kind] for t in true_alarms)
        matrix[f"timely_{kind}"] = count
        matrix[f"timely_{kind}_share"] = count / len(true_alarms) if true_alarms else None
    return matrix


def choose_rule(runs: list[dict[str, Any]], grid: Grid = GRID) -> tuple[ProbeRule, dict[str, Any]]:
    """The rule of :func:`candidates` with the best F1 on ``runs`` (ties: fewer false alarms, more strictly timely
    alarms, the first in the grid)."""
    scored = []
    for index, rule in enumerate(candidates(grid)):
        matrix = score(runs, rule)
        scored.append(((-matrix["f1"], matrix["fired_held"], -matrix["timely_strict"], index), rule, matrix))
    _, rule, matrix = min(scored, key=lambda s: s[0])
    return rule, matrix


def load_runs(path: Path = SOURCE) -> list[dict[str, Any]]:
    """The runs of the probe study's result file that log the probe without acting on it: per run its key, regime,
    cell, seed, setting, probe readings and held-out reward change per evaluation step."""
    report = json.loads(path.read_text())
    runs = []
    for regime, part in report["regimes"].items():
        for key, run in part["runs"].items():
            if run["method"] in ACTING or not run.get("probe"):
                continue
            runs.append(
                {
                    "id": f"{regime}/{key}",
                    "regime": regime,
                    "cell": f"{regime}, lr {run['learning_rate']:g}, beta {run['beta']:g}",
                    "seed": int(run["seed"]),
                    "method": run["method"],
                    "probe": run["probe"],
                    "reward_change": {int(s): v for s, v in run["reward_change"].items()},
                    "log_alarm_at": run.get("alarm", {}).get("fired_at"),
                }
            )
    return runs


def _log_alarm(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The training-log alarm (``callbacks.health.RULE``, as these runs logged it) on the same runs."""
    return confusion([r["log_alarm_at"] is not None for r in runs], [label(r) for r in runs])


def best_per_signal(halves: dict[str, list[dict[str, Any]]], grid: Grid) -> dict[str, Any]:
    """Per signal of ``grid``: its best rule on the runs chosen on, with its matrix there and on the held-out runs."""
    per_signal = {}
    for signal in grid:
        best, matrix = choose_rule_among(halves["choose"], signal, grid)
        per_signal[signal] = {"rule": asdict(best), "chosen_on": matrix, "report_runs": score(halves["report"], best)}
    return per_signal


def _source(path: Path) -> str:
    """How a result file names the study's runs it read: relative to the repository where it lies inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def _calibration_record(
    mode: str,
    grid: Grid,
    rules: dict[str, ProbeRule],
    on_choose: dict[str, Any],
    matrices: dict[str, Any],
    per_signal: dict[str, Any],
    groups: dict[str, Any],
) -> dict[str, Any]:
    """The part of a calibration's record the offline and the online one share: the grid searched, the rules
    compared, the package's rule for ``mode`` and whether it is the calibrated one, and the scores."""
    earlier = DELTA_RULES[mode]
    package = ProbeRule("delta_winner", True, earlier.threshold, earlier.patience)
    return {
        "grid": grid_record(grid),
        "rules": {name: asdict(rule) for name, rule in rules.items()},
        "package_rule": {"patience": earlier.patience, "threshold": earlier.threshold},
        "package_rule_is_calibrated": package == rules["calibrated"],
        "chosen_on": on_choose,
        "aim": {"precision": 0.9, "recall": 0.9},
        "confusion": matrices,
        "best_per_signal": per_signal,
        "groups": groups,
    }


def grid_record(grid: Grid) -> dict[str, Any]:
    """``grid`` as the result file records it: per signal its directions and thresholds, and the patiences."""
    return {s: {"above": list(d), "thresholds": list(t)} for s, (d, t) in grid.items()} | {"patience": PATIENCE}


def analyse(path: Path = SOURCE) -> dict[str, Any]:
    """The labels, the split, the chosen rule, its confusion matrices and timeliness (the result file's content)."""
    runs = load_runs(path)
    halves = {name: [r for r in runs if side(r) == name] for name in ("choose", "report")}
    chosen, on_choose = choose_rule(halves["choose"])
    before = BEFORE
    per_signal = best_per_signal(halves, GRID)
    groups: dict[str, Any] = {}
    for cell in dict.fromkeys(r["cell"] for r in runs):
        for guarded, word in ((False, "safeguard off"), (True, "safeguard on")):
            mine = [r for r in halves["report"] if r["cell"] == cell and safeguarded(r) == guarded]
            if mine:
                groups[f"{cell}, {word}"] = {"calibrated": score(mine, chosen), "training_log_alarm": _log_alarm(mine)}
    rules = {"before": before, "calibrated": chosen}
    matrices = {
        name: {
            "report_runs": score(halves["report"], rule),
            "choose_runs": score(halves["choose"], rule),
            "all_runs": score(runs, rule),
            **{
                f"report_runs_safeguard_{word}": score([r for r in halves["report"] if safeguarded(r) == on], rule)
                for on, word in ((False, "off"), (True, "on"))
            },
        }
        for name, rule in rules.items()
    }
    matrices["training_log_alarm"] = {"report_runs": _log_alarm(halves["report"]), "all_runs": _log_alarm(runs)}
    return {
        "what": "The held-out probe's alarm replayed on the probe study's runs (the probe logged, not acted on), "
        "against each run's held-out colour reward (benchmarks/studies/probe_alarm.py).",
        "source": _source(path),
        "label": f"fell: the held-out colour reward at the last eval step more than {TOLERANCE} below the base's",
        "tolerance": TOLERANCE,
        "split": f"rule chosen on the runs of even training seeds of {', '.join(CHOOSE_METHODS)} in "
        f"{', '.join(CHOOSE_REGIMES)} (best F1; ties: "
        "fewer false alarms, more strictly timely alarms, the first in the grid), reported on every other run "
        "(report_runs: odd seeds and the other regimes' runs)",
        "timeliness": "of the true alarms, the share fired before the held-out reward had fallen by half of its final "
        "loss; strict: an evaluation at or after the alarm's step still found it above half; lenient: fired before "
        "the first evaluation that found it below half",
        **_calibration_record("offline", GRID, rules, on_choose, matrices, per_signal, groups),
        "runs": [
            {
                "id": r["id"],
                "seed": r["seed"],
                "split": side(r),
                "method": r["method"],
                "safeguard": safeguarded(r),
                "cell": r["cell"],
                "reward_change": round(r["reward_change"][max(r["reward_change"])], 6),
                "fell": label(r),
                "half_fallen_at": half_fallen(r)[1] if label(r) else None,
                "before_fires_at": fires(r, before),
                "calibrated_fires_at": fires(r, chosen),
                "training_log_alarm_at": r["log_alarm_at"],
            }
            for r in runs
        ],
    }


def choose_rule_among(runs: list[dict[str, Any]], signal: str, grid: Grid = GRID) -> tuple[ProbeRule, dict[str, Any]]:
    """:func:`choose_rule` restricted to the rules on ``signal``: what that signal alone reaches."""
    scored = []
    for index, rule in enumerate(candidates(grid)):
        if rule.signal != signal:
            continue
        matrix = score(runs, rule)
        scored.append(((-matrix["f1"], matrix["fired_held"], -matrix["timely_strict"], index), rule, matrix))
    _, rule, matrix = min(scored, key=lambda s: s[0])
    return rule, matrix


# ------------------------------------------------------------------------------------------------------ online

ONLINE_SOURCE = RESULTS / "probe" / "cpu-stability-probe-online.json"
#: the online grid: the same signals and directions at the online runs' scale (a healthy or slowly drifting run's
#: ``delta_winner`` peaks at a few thousandths where the offline runs' reach tenths), up to the scale at which the
#: breaking regime's runs fail (``online-hacking-fast``: tenths to about 1; over the reference's error up to about 20)
ONLINE_GRID: Grid = {
    "delta_winner": ((True,), (0.0, 0.0002, 0.0005, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.01, 0.05, 0.1, 0.2, 0.5)),
    "relative_delta_winner": ((True,), (0.0, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.3, 1.0, 3.0)),
    "delta_winner_minus_loser": (
        (True, False),
        (-0.05, -0.01, -0.002, -0.001, -0.0005, 0.0, 0.0005, 0.001, 0.002, 0.01, 0.05),
    ),
    "implicit_acc": ((True, False), (0.25, 0.5, 0.75)),
}


def load_online_runs(path: Path = ONLINE_SOURCE) -> list[dict[str, Any]]:
    """The online probe study's runs that log the probe without acting on it (``<dpo>-probe``; its plain runs do
    not probe, its rewinding runs act), as :func:`load_runs` gives the offline ones. The reward change is the
    held-out colour reward's (the label's reward in every regime; the hacking regime trains on brightness) from the
    base's in the regime's stored file."""
    report = json.loads(path.read_text())
    runs = []
    for regime, entry in report["regimes"].items():
        base = json.loads((ROOT / entry["stored_file"]).read_text())["base"]["measures"]["colour_reward"]
        for key, run in entry["runs"].items():
            if run["method"] != f"{entry['reference']}-probe" or not run.get("probe"):
                continue
            runs.append(
                {
                    "id": f"{regime}/{key}",
                    "regime": regime,
                    "cell": f"{regime}, lr {run['learning_rate']:g}, {entry['config']['max_steps']} steps",
                    "seed": int(run["seed"]),
                    "method": run["method"],
                    "probe": run["probe"],
                    "reward_change": {int(s): m["colour_reward"] - base for s, m in run["curve"].items()},
                    "log_alarm_at": run.get("alarm", {}).get("fired_at"),
                }
            )
    return runs


def analyse_online(path: Path = ONLINE_SOURCE) -> dict[str, Any]:
    """The online calibration: the rule chosen on the even seeds of every online regime over :data:`ONLINE_GRID`,
    reported on the odd ones per regime beside the offline rule and the training-log alarm (the result file's
    ``online`` part)."""
    runs = load_online_runs(path)
    halves = {name: [r for r in runs if split(r) == name] for name in ("choose", "report")}
    chosen, on_choose = choose_rule(halves["choose"], ONLINE_GRID)
    offline = DELTA_RULES["offline"]
    rules = {"offline": ProbeRule("delta_winner", True, offline.threshold, offline.patience), "calibrated": chosen}
    matrices: dict[str, Any] = {
        name: {which: score(halves[side_], rule) for side_, which in (("report", "report_runs"),
                                                                      ("choose", "choose_runs"))}
        | {"all_runs": score(runs, rule)}
        for name, rule in rules.items()
    }  # fmt: skip
    matrices["training_log_alarm"] = {"report_runs": _log_alarm(halves["report"]), "all_runs": _log_alarm(runs)}
    per_signal = best_per_signal(halves, ONLINE_GRID)
    groups: dict[str, Any] = {}
    for cell in dict.fromkeys(r["cell"] for r in runs):
        for name, half in halves.items():
            mine = [r for r in half if r["cell"] == cell]
            if mine:
                groups[f"{cell}, safeguard off, {'chosen on' if name == 'choose' else 'held-out'}"] = {
                    "calibrated": score(mine, chosen),
                    "offline_rule": score(mine, rules["offline"]),
                    "training_log_alarm": _log_alarm(mine),
                }
    fell_on_choose = sum(label(r) for r in halves["choose"])
    return {
        "what": "The held-out probe's alarm replayed on the online probe study's runs (online Diffusion-DPO with the "
        "probe logged, not acted on), against each run's held-out colour reward, with a rule chosen for online runs "
        "(benchmarks/studies/probe_alarm.py).",
        "source": _source(path),
        "label": f"fell: the held-out colour reward at the last eval step more than {TOLERANCE} below the base's "
        "(the base of the regime's stored result file)",
        "safeguard": "off only: the online probe study's runs are online Diffusion-DPO; no online run with a "
        "safeguard logs the probe",
        "split": "rule chosen on the runs of even training seeds of every online regime (best F1; ties: fewer false "
        "alarms, more strictly timely alarms, the first in the grid), reported on the odd seeds",
        "choice_without_a_fallen_run": None
        if fell_on_choose
        else "no run of the even seeds fell, so every rule's F1 there is 0 and the choice is the first rule of the "
        "grid (thresholds rising, patience rising within a threshold) with the fewest false alarms: the most "
        "sensitive rule of the grid that stays quiet on the healthy runs chosen on",
        **_calibration_record("online", ONLINE_GRID, rules, on_choose, matrices, per_signal, groups),
        "runs": [
            {
                "id": r["id"],
                "seed": r["seed"],
                "split": split(r),
                "regime": r["regime"],
                "reward_change": round(r["reward_change"][max(r["reward_change"])], 6),
                "fell": label(r),
                "half_fallen_at": half_fallen(r)[1] if label(r) else None,
                "peak_delta_winner": max(p["delta_winner"] for p in r["probe"]),
                "offline_rule_fires_at": fires(r, rules["offline"]),
                "calibrated_fires_at": fires(r, chosen),
                "training_log_alarm_at": r["log_alarm_at"],
            }
            for r in runs
        ],
    }


# ------------------------------------------------------------------------------------------ the probe's own units

Z_SOURCE = RESULTS / "probe" / "cpu-probe-z-runs.json"
Z_OUTPUT = RESULTS / "probe" / "cpu-probe-alarm-z-calibration.json"
Z_START, Z_END = "<!-- probe-alarm-z-tables:start -->", "<!-- probe-alarm-z-tables:end -->"
#: the one rule's grid: ``winner_rise_z`` above a threshold (standard errors), ``patience`` in a row
Z_THRESHOLDS = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 12.0, 15.0, 20.0, 30.0)
Z_GRID: Grid = {"winner_rise_z": ((True,), Z_THRESHOLDS)}
SIGNALS["winner_rise_z"] = lambda r: r["winner_rise_z"]


#: the package's rule in the probe's units before its CUSUM: ``winner_rise_z`` above 7 at 4 probes in a row (this
#: calibration chose it; ``probe_alarm_sequential.py`` compares the CUSUM with it)
IN_A_ROW_RULE = ProbeRule("winner_rise_z", True, 7.0, 4)


def package_z_rule() -> ProbeRule:
    """The rule in the probe's units the package read before its CUSUM (``probe_alarm_sequential.py`` chose that):
    ``winner_rise_z`` above 7 at 4 probes in a row, the rule this calibration chose."""
    return IN_A_ROW_RULE


def load_z_runs(path: Path = Z_SOURCE) -> list[dict[str, Any]]:
    """The runs of ``probe_z_runs.py``'s result file: per run its model (``benchmark`` or ``wide``), mode, cell,
    seed, setting, whether a safeguard trains, its probe readings and its held-out colour reward change per
    evaluation step."""
    report = json.loads(path.read_text())
    stored = json.loads(SOURCE.read_text())["regimes"]["offline"]["runs"]
    runs: list[dict[str, Any]] = []
    for part, entry in report["parts"].items():
        model = "wide" if part.startswith("wide") else "benchmark"
        for key, run in entry.get("runs", {}).items() if not part.startswith("online") else ():
            changes = {int(s): v for s, v in run["reward_change"].items()}
            curve = "this run's"
            twin = stored.get(key) if model == "benchmark" else None
            if twin is not None and twin["reward_change"][str(max(changes))] == changes[max(changes)]:
                # the probe study's run of the same key: the same training bit for bit (equal at the last step),
                # measured at every probe's step
                changes, curve = {int(s): v for s, v in twin["reward_change"].items()}, f"{_source(SOURCE)}'s"
            runs.append(
                {
                    "id": f"{part}/{key}",
                    "model": model,
                    "mode": "offline",
                    "cell": f"{model}, offline, lr {run['learning_rate']:g}",
                    "seed": int(run["seed"]),
                    "method": run["method"],
                    "safeguard": any(word in run["method"] for word in SAFEGUARDED),
                    "probe": run["probe"],
                    "reward_change": changes,
                    "curve": curve,
                }
            )
    online = [(part, regime, entry) for part, whole in report["parts"].items() if part.startswith("online")
              for regime, entry in whole.get("regimes", {}).items()]  # fmt: skip
    for part, regime, entry in online:
        for key, run in entry["runs"].items():
            runs.append(
                {
                    "id": f"{part}/{regime}/{key}",
                    "model": "benchmark",
                    "mode": "online",
                    "cell": f"benchmark, {regime}, lr {entry['learning_rate']:g}",
                    "seed": int(run["seed"]),
                    "method": run["method"],
                    "safeguard": run["method"].startswith("sdpo"),
                    "probe": run["probe"],
                    "reward_change": {int(s): m["colour_reward"] - entry["base"] for s, m in run["curve"].items()},
                    "curve": "this run's",
                }
            )
    return runs


def z_side(run: dict[str, Any]) -> str:
    """``choose``: the benchmark's runs of even seeds, offline and online together (one rule for both); ``report``:
    its odd seeds; ``second_model``: every run of the wide model (never chosen on)."""
    if run["model"] != "benchmark":
        return "second_model"
    return split(run)


def _z_groups(runs: list[dict[str, Any]], rules: dict[str, ProbeRule]) -> dict[str, Any]:
    """Per set of runs (side, mode, cell and safeguard), each rule's confusion matrix."""
    groups: dict[str, Any] = {}
    sides = ("report", "second_model", "choose")
    for side_ in sides:
        mine = [r for r in runs if z_side(r) == side_]
        keys = [f"{side_}"] + [f"{side_}, {m}" for m in ("offline", "online")]
        keys += [f"{side_}, {c}, safeguard {'on' if g else 'off'}" for c in dict.fromkeys(r["cell"] for r in mine)
                 for g in (False, True)]  # fmt: skip
        for key in keys:
            parts = key.split(", ")
            chosen = [
                r
                for r in mine
                if (len(parts) < 2 or parts[1] in (r["mode"], r["cell"].split(", ")[0]))
                and (len(parts) < 3 or ", ".join(parts[1:-1]) == r["cell"])
                and (len(parts) < 3 or r["safeguard"] == (parts[-1] == "safeguard on"))
            ]
            if chosen:
                groups[key] = {name: score(chosen, rule) for name, rule in rules.items()}
    return groups


def z_series(run: dict[str, Any]) -> list[tuple[int, float]]:
    """The run's probes up to its last evaluation step: ``(step, winner_rise_z)``, a reading without a spread
    (``nan``) read as 0 (no rise)."""
    last = max(run["reward_change"])
    readings = [(int(p["step"]), p["winner_rise_z"]) for p in run["probe"] if p["step"] <= last]
    return [(step, 0.0 if math.isnan(z) else z) for step, z in readings]


@dataclass(frozen=True)
class SeriesRule:
    """A rule of one of :data:`FAMILIES` on a run's series ``z_1, z_2, ...`` of ``winner_rise_z``, with its two
    parameters ``a`` and ``b`` (the family's :data:`FAMILY_PARAMETERS`):

    * ``in_a_row``: the package's rule (``callbacks.rewind.alarm_steps``): ``z_t > a`` at ``b`` probes in a row;
    * ``cusum``: the one-sided CUSUM ``S_t = max(0, S_{t-1} + z_t - a)``, ``S_0 = 0``, fires when ``S_t > b``;
    * ``mean``: the mean of the last ``a`` readings above ``b``;
    * ``rise``: the rise since the run's lowest reading so far, ``z_t - min_{s<=t} z_s > a``, at ``b`` probes in a
      row.
    """

    family: str
    a: float
    b: float

    def fires(self, run: dict[str, Any]) -> int | None:
        """The step of the probe at which the rule first fires on the run, up to its last evaluation step."""
        series = z_series(run)
        if self.family == "in_a_row":
            rule = ProbeAlarmRule(patience=int(self.b), threshold=self.a)
            steps = alarm_steps(rule, [(s, {ProbeAlarmRule.SIGNAL: z}) for s, z in series])
            return steps[0] if steps else None
        total, lowest, in_a_row = 0.0, math.inf, 0
        for index, (step, z) in enumerate(series):
            if self.family == "cusum":
                total = max(0.0, total + z - self.a)
                if total > self.b:
                    return step
            elif self.family == "mean":
                window = [v for _, v in series[max(0, index + 1 - int(self.a)) : index + 1]]
                if len(window) == int(self.a) and sum(window) / len(window) > self.b:
                    return step
            else:
                lowest = min(lowest, z)
                in_a_row = in_a_row + 1 if z - lowest > self.a else 0
                if in_a_row == int(self.b):
                    return step
        return None


#: each family's parameters (``a``, ``b``) and their grids, in the probe's units (standard errors, probes)
FAMILY_PARAMETERS = {
    "in_a_row": ("threshold", "patience"),
    "cusum": ("allowance k", "limit h"),
    "mean": ("window", "threshold"),
    "rise": ("rise", "patience"),
}
FAMILIES: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "in_a_row": (Z_THRESHOLDS, PATIENCE),  # the package's grid (:data:`Z_GRID`)
    "cusum": ((2.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 15.0), (2.0, 5.0, 10.0, 20.0, 40.0, 80.0)),
    "mean": ((2, 3, 4, 5), Z_THRESHOLDS),
    "rise": ((2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0), (1, 2, 3)),
}


def choose_series_rule(runs: list[dict[str, Any]], family: str) -> tuple[SeriesRule, dict[str, Any]]:
    """The family's rule with the best F1 on ``runs`` (ties as :func:`choose_rule`: fewer false alarms, more strictly
    timely alarms, the first in the grid)."""
    scored = []
    for index, (a, b) in enumerate(itertools.product(*FAMILIES[family])):
        rule = SeriesRule(family, a, b)
        matrix = matrix_of(runs, [rule.fires(r) for r in runs])
        scored.append(((-matrix["f1"], matrix["fired_held"], -matrix["timely_strict"], index), rule, matrix))
    _, rule, matrix = min(scored, key=lambda s: s[0])
    return rule, matrix


def analyse_families(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each family's rule chosen on the runs chosen on (:func:`z_side`), and its confusion matrix there and on the
    held-out runs: the benchmark's odd seeds (all, offline, online) and the second model."""
    result = {}
    chosen_on = [r for r in runs if z_side(r) == "choose"]
    held = {
        "report": [r for r in runs if z_side(r) == "report"],
        "report, offline": [r for r in runs if z_side(r) == "report" and r["mode"] == "offline"],
        "report, online": [r for r in runs if z_side(r) == "report" and r["mode"] == "online"],
        "second_model": [r for r in runs if z_side(r) == "second_model"],
    }
    for family in FAMILIES:
        rule, on_choose = choose_series_rule(chosen_on, family)
        tied = [
            SeriesRule(family, a, b)
            for a, b in itertools.product(*FAMILIES[family])
            if matrix_of(chosen_on, [SeriesRule(family, a, b).fires(r) for r in chosen_on])["f1"] == on_choose["f1"]
        ]
        result[family] = {
            "parameters": dict(zip(FAMILY_PARAMETERS[family], (rule.a, rule.b), strict=True)),
            "chosen_on": on_choose,
            "tied_on_chosen": len(tied),
            "held_out": {k: matrix_of(v, [rule.fires(r) for r in v]) for k, v in held.items() if v},
        }
    return result


def _parameters(families: dict[str, Any], family: str) -> tuple[float, float]:
    return tuple(families[family]["parameters"].values())  # type: ignore[return-value]


def analyse_z(path: Path = Z_SOURCE) -> dict[str, Any]:
    """The one rule in the probe's units: chosen over :data:`Z_GRID` on the benchmark's even seeds (offline and
    online), reported on its odd seeds per mode, cell and safeguard, and on the wide model without recalibrating;
    beside it the per-mode rules on ``delta_winner`` the package read before (:data:`DELTA_RULES`)."""
    runs = load_z_runs(path)
    chosen, on_choose = choose_rule([r for r in runs if z_side(r) == "choose"], Z_GRID)
    package = package_z_rule()
    delta = {m: ProbeRule("delta_winner", True, r.threshold, r.patience) for m, r in DELTA_RULES.items()}
    rules = {"calibrated": chosen, "package": package}
    groups = _z_groups(runs, rules)
    result_families = analyse_families(runs)
    for mode, rule in delta.items():  # the earlier rules, each on its own mode's runs
        for side_ in ("report", "second_model"):
            mine = [r for r in runs if z_side(r) == side_ and r["mode"] == mode]
            if mine:
                groups[f"{side_}, {mode}"][f"delta_rule_{mode}"] = score(mine, rule)
    report = json.loads(path.read_text())
    return {
        "what": "The held-out probe's one alarm rule in its own units (probe/winner_rise_z) on runs that log it with "
        "the probe never acting: chosen on the benchmark's even seeds, offline and online together, reported on its "
        "odd seeds and, without recalibrating, on a second model (benchmarks/studies/probe_alarm.py --z).",
        "command": "python benchmarks/studies/probe_alarm.py --z",
        "source": _source(path),
        "source_commands": report["commands"],
        "machine": report["machine"],
        "load": report["load"],
        "probe": report["probe"],
        "second_model": report["wide_model"],
        "label": f"fell: the held-out colour reward at the last eval step more than {TOLERANCE} below the base's",
        "split": "chosen on the benchmark's runs of even training seeds, offline and online together (best F1; ties: "
        "fewer false alarms, more strictly timely alarms, the first in the grid); reported on its odd seeds; the "
        "second model's runs are all held out",
        "grid": grid_record(Z_GRID),
        "rules": {name: asdict(rule) for name, rule in rules.items()}
        | {f"delta_rule_{m}": asdict(r) for m, r in delta.items()},
        "package_rule_is_calibrated": package == chosen,
        "chosen_on": on_choose,
        "aim": {"precision": 0.9, "recall": 0.9},
        "confusion": groups,
        "families": result_families,
        "rewind_runs_rule": rewind_rules(),
        "families_what": "richer rules on the same series, each family's two parameters chosen on the runs chosen on "
        "as the package's rule is (SeriesRule's docstring states each formula); the package keeps the simplest "
        "family (in_a_row) unless another does better on the runs chosen on",
        "misses": [
            {
                "id": r["id"],
                "split": z_side(r),
                "reward_change": round(r["reward_change"][max(r["reward_change"])], 6),
                "peak_winner_rise_z": round(max(z for _, z in z_series(r)), 3),
                "caught_by": [f for f in FAMILIES if SeriesRule(f, *_parameters(result_families, f)).fires(r)],
            }
            for r in runs
            if z_side(r) != "choose" and label(r) and fires(r, package) is None
        ],
        "highest_peak_of_a_run_that_held": {
            side_: round(max(max(z for _, z in z_series(r)) for r in runs if z_side(r) == side_ and not label(r)), 3)
            for side_ in ("choose", "report", "second_model")
        },
        "runs": [
            {
                "id": r["id"],
                "model": r["model"],
                "mode": r["mode"],
                "cell": r["cell"],
                "seed": r["seed"],
                "split": z_side(r),
                "method": r["method"],
                "safeguard": r["safeguard"],
                "reward_change": round(r["reward_change"][max(r["reward_change"])], 6),
                "fell": label(r),
                "peak_winner_rise_z": max((p["winner_rise_z"] for p in r["probe"]), default=None),
                "peak_delta_winner": max((p["delta_winner"] for p in r["probe"]), default=None),
                "calibrated_fires_at": fires(r, chosen),
                "package_fires_at": fires(r, package),
                "held_out_curve": r["curve"],
            }
            for r in runs
        ],
    }


REWIND_SOURCES = (SOURCE, ONLINE_SOURCE)  # the probe studies whose rewinding runs acted on an alarm


def rewind_rules(paths: tuple[Path, ...] = REWIND_SOURCES) -> dict[str, Any]:
    """Per probe study's result file, the rule its rewinding runs' alarm read, as each run recorded it
    (``probe_alarm``: then on ``probe/delta_winner``, :data:`DELTA_RULES`), and whether they can be replayed under the
    package's rule: only where their probe readings carry ``winner_rise_z`` (the statistic needs the spread over
    pairs and draws, which a mean does not keep)."""
    package = package_z_rule()
    marks = {}
    for path in paths:
        report = json.loads(path.read_text())
        rewinding = [run for part in report["regimes"].values() for run in part["runs"].values()
                     if "rewind" in run["method"]]  # fmt: skip
        read = sorted({json.dumps(run.get("probe_alarm"), sort_keys=True) for run in rewinding})
        replayable = all(run.get("probe") and "winner_rise_z" in run["probe"][0] for run in rewinding)
        rules = [{"signal": "delta_winner", "above": True, **json.loads(rule)} for rule in read]
        marks[_source(path)] = {
            "runs": len(rewinding),
            "read": rules,
            "package_rule_now": asdict(package),
            "replayed_under_package_rule": False,
            "note": f"these {len(rewinding)} rewinding runs' alarm read "
            + "; ".join(describe(rule) for rule in rules)
            + " (the package's rule when they ran), not the package's rule now ("
            + describe(asdict(package))
            + "). "
            + (
                "Their probe readings carry winner_rise_z: they can be replayed."
                if replayable
                else "Their probe readings carry no winner_rise_z (the spread over pairs and noise draws the "
                "statistic needs was not kept), so they are not replayed under it: the rewind's figures there are "
                "the earlier rule's; under today's rule they are not measured."
            ),
        }
    return marks


def mark_online_rewinds(path: Path = ONLINE_SOURCE) -> dict[str, Any]:
    """Writes :func:`rewind_rules` of the online probe study into its result file (``rewind_alarm_rule``), which
    records the rule its runs read without naming its signal. (The offline study's file is rebuilt from its runs by
    its own ``assemble``; the z calibration's file carries the same record for both.)"""
    from online_comparison import _write

    report = json.loads(path.read_text())
    report["rewind_alarm_rule"] = rewind_rules((path,))[_source(path)]
    _write(path, report)  # as the online study writes it
    return report["rewind_alarm_rule"]


def z_tables(result: dict[str, Any]) -> str:
    """The Markdown table of the z calibration: per set of runs, the package's rule's confusion matrix, and the
    earlier per-mode rules beside it where measured."""
    rule = result["rules"]["package"]
    lines = [
        f"The package's rule: {describe(rule)} (calibrated on the runs chosen on: "
        f"{'yes' if result['package_rule_is_calibrated'] else 'no, ' + describe(result['rules']['calibrated'])}).",
        "",
        "| runs | n | fired, fell | fired, held | quiet, fell | quiet, held | precision | recall "
        "| earlier `delta_winner` rule: precision, recall |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for group, entry in result["confusion"].items():
        m = entry["package"]
        earlier = next((v for k, v in entry.items() if k.startswith("delta_rule_")), None)
        other = "" if earlier is None else f"{_cell(earlier['precision'])}, {_cell(earlier['recall'])}"
        lines.append(
            f"| {group} | {m['runs']} | {m['fired_fell']} | {m['fired_held']} | {m['quiet_fell']} | {m['quiet_held']} "
            f"| {_cell(m['precision'])} | {_cell(m['recall'])} | {other} |"
        )
    return "\n".join(lines + ["", *family_lines(result)])


def family_lines(result: dict[str, Any]) -> list[str]:
    """The richer rules' table (each family chosen on the runs chosen on; its confusion matrix as fired-fell,
    fired-held, quiet-fell, quiet-held there and held out) and the held-out misses of the package's rule."""
    held = ("report, offline", "report, online", "second_model")
    lines = [
        "Richer rules on the same series, each chosen on the runs chosen on "
        "(confusion: fired and fell, fired and held, quiet and fell, quiet and held; precision / recall):",
        "",
        "| rule | parameters | rules tied on F1 | chosen on | " + " | ".join(held) + " |",
        "|---|---|---:|---|" + "---|" * len(held),
    ]
    for family, entry in result["families"].items():
        cells = [_confusion_cell(entry["chosen_on"])]
        cells += [_confusion_cell(entry["held_out"][k]) if k in entry["held_out"] else "none" for k in held]
        parameters = ", ".join(f"{k} {v:g}" for k, v in entry["parameters"].items())
        lines.append(f"| {family} | {parameters} | {entry['tied_on_chosen']} | " + " | ".join(cells) + " |")
    peaks = ", ".join(f"{k} {v:g}" for k, v in result["highest_peak_of_a_run_that_held"].items())
    lines += [
        "",
        f"Fallen held-out runs the package's rule misses (the highest peak `winner_rise_z` of a run that held: "
        f"{peaks}):",
        "",
    ]
    lines += [
        f"- `{m['id']}`: reward change {m['reward_change']:+.3f}, peak `winner_rise_z` {m['peak_winner_rise_z']:g}; "
        f"caught by {', '.join(m['caught_by']) if m['caught_by'] else 'no family'}"
        for m in result["misses"]
    ] or ["- none"]
    return lines


def _confusion_cell(m: dict[str, Any]) -> str:
    counts = "/".join(str(m[k]) for k in ("fired_fell", "fired_held", "quiet_fell", "quiet_held"))
    return f"{counts} ({_cell(m['precision'])} / {_cell(m['recall'])})"


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def describe(rule: dict[str, Any]) -> str:
    side = "above" if rule["above"] else "below"
    return f"`{rule['signal']}` {side} {rule['threshold']:g}, {rule['patience']} in a row"


def _matrix_lines(confusions: dict[str, Any], rules: dict[str, str], names: dict[str, str]) -> list[str]:
    """The confusion-matrix table: a row per rule and set of runs, with timeliness where it was measured."""
    head = ("| rule | runs | fired, fell | fired, held | quiet, fell | quiet, held | precision | recall "
            "| timely (strict / lenient) |")  # fmt: skip
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for rule, matrices in confusions.items():
        for which, m in matrices.items():
            timely = ""
            if "timely_strict" in m:
                timely = f"{_cell(m['timely_strict_share'])} / {_cell(m['timely_lenient_share'])}"
            lines.append(
                f"| {rules[rule]} | {names[which]} ({m['runs']}) | {m['fired_fell']} | {m['fired_held']} "
                f"| {m['quiet_fell']} | {m['quiet_held']} | {_cell(m['precision'])} | {_cell(m['recall'])} "
                f"| {timely} |"
            )
    return lines


def _best_per_signal_lines(best: dict[str, Any]) -> list[str]:
    """The table of each signal's best rule on the runs chosen on, with its held-out precision and recall."""
    lines = ["", "| signal | its best rule on the runs chosen on | precision, recall (held-out) |", "|---|---|---|"]
    for signal, entry in best.items():
        m = entry["report_runs"]
        lines.append(f"| `{signal}` | {describe(entry['rule'])} | {_cell(m['precision'])}, {_cell(m['recall'])} |")
    return lines


def tables(result: dict[str, Any]) -> str:
    """The Markdown tables of ``benchmarks/research/alarm.md``'s probe section: the matrices with timeliness, the best
    rule per signal, and the held-out runs per cell."""
    names = {"report_runs": "held-out", "choose_runs": "chosen on", "all_runs": "all",
             "report_runs_safeguard_off": "held-out, safeguard off",
             "report_runs_safeguard_on": "held-out, safeguard on"}  # fmt: skip
    rules = {
        "before": f"before calibration ({describe(result['rules']['before'])})",
        "calibrated": f"calibrated ({describe(result['rules']['calibrated'])})",
        "training_log_alarm": "the training-log alarm (as logged)",
    }
    lines = _matrix_lines(result["confusion"], rules, names)
    lines += _best_per_signal_lines(result["best_per_signal"])
    lines += ["", "| held-out runs | runs | fell | calibrated: fired, fell / fired, held "
              "| timely (strict) | training-log alarm: fired, fell / fired, held |",
              "|---|---:|---:|---|---:|---|"]  # fmt: skip
    for group, entry in result["groups"].items():
        m, log = entry["calibrated"], entry["training_log_alarm"]
        lines.append(
            f"| {group} | {m['runs']} | {m['fired_fell'] + m['quiet_fell']} | {m['fired_fell']} / {m['fired_held']} "
            f"| {m['timely_strict']} | {log['fired_fell']} / {log['fired_held']} |"
        )
    return "\n".join(lines)


def online_tables(online: dict[str, Any]) -> str:
    """The Markdown tables of ``benchmarks/research/alarm.md``'s online calibration: the matrices with timeliness (the
    offline rule, the online rule, the training-log alarm), the best rule per signal, per regime and half, and the
    runs one by one."""
    names = {"report_runs": "held-out, odd seeds", "choose_runs": "chosen on, even seeds", "all_runs": "all"}
    rules = {
        "offline": f"the offline rule ({describe(online['rules']['offline'])})",
        "calibrated": f"online, calibrated ({describe(online['rules']['calibrated'])})",
        "training_log_alarm": "the training-log alarm (as logged)",
    }
    lines = _matrix_lines(online["confusion"], rules, names)
    lines += _best_per_signal_lines(online["best_per_signal"])
    lines += ["", "| regime and half | runs | fell | online rule: fired, fell / fired, held | offline rule: fired "
              "| training-log alarm: fired |", "|---|---:|---:|---|---:|---:|"]  # fmt: skip
    for group, entry in online["groups"].items():
        m, off, log = entry["calibrated"], entry["offline_rule"], entry["training_log_alarm"]
        lines.append(
            f"| {group} | {m['runs']} | {m['fired_fell'] + m['quiet_fell']} | {m['fired_fell']} / {m['fired_held']} "
            f"| {off['fired_fell'] + off['fired_held']} | {log['fired_fell'] + log['fired_held']} |"
        )
    lines += ["", "| run | split | reward change | fell | peak `delta_winner` | online rule fires at |",
              "|---|---|---:|---|---:|---:|"]  # fmt: skip
    for run in online["runs"]:
        fired = run["calibrated_fires_at"]
        lines.append(
            f"| {run['id']} | {run['split']} | {run['reward_change']:+.3f} | {'yes' if run['fell'] else 'no'} "
            f"| {run['peak_delta_winner']:.4f} | {'quiet' if fired is None else fired} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=SOURCE, type=Path)
    parser.add_argument("--online-source", default=ONLINE_SOURCE, type=Path)
    parser.add_argument("--check", action="store_true", help=f"Recompute and compare with {OUTPUT.name}.")
    parser.add_argument("--table", action="store_true", help="Print the Markdown tables of the written file.")
    parser.add_argument("--page", action="store_true", help=f"Write the tables into {PAGE.name}'s marked blocks.")
    parser.add_argument("--z", action="store_true", help=f"The one rule in the probe's units: {Z_OUTPUT.name}.")
    parser.add_argument("--mark-rewinds", action="store_true",
                        help="Write into the online probe study's file the rule its rewinding runs read.")  # fmt: skip
    args = parser.parse_args(argv)
    if args.mark_rewinds:
        print(json.dumps(mark_online_rewinds(), indent=1))
        return 0
    if args.z:
        if args.page or args.table:
            block = z_tables(json.loads(Z_OUTPUT.read_text()))
            if args.page:
                write_page_block(Z_START, Z_END, block)
            else:
                print(block)
            return 0
        result = json.loads(json.dumps(analyse_z()))
        if args.check:
            same = json.loads(Z_OUTPUT.read_text()) == result
            print(f"{Z_OUTPUT.name}: {'up to date' if same else 'differs from the recomputation'}")
            return 0 if same else 1
        Z_OUTPUT.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps({k: result[k] for k in ("rules", "chosen_on", "package_rule_is_calibrated")}, indent=1))
        return 0
    if args.table or args.page:
        written = json.loads(OUTPUT.read_text())
        blocks = {(START, END): tables(written), (ONLINE_START, ONLINE_END): online_tables(written["online"])}
        for (start, end), block in blocks.items():
            if args.page:
                write_page_block(start, end, block)
            else:
                print(block, end="\n\n")
        return 0
    result = {**analyse(args.source.resolve()), "online": analyse_online(args.online_source.resolve())}
    if args.check:
        written = json.loads(OUTPUT.read_text())
        recomputed = json.loads(json.dumps(result))
        same = {
            "offline": {k: v for k, v in written.items() if k != "online"}
            == {k: v for k, v in recomputed.items() if k != "online"},
            "online": written.get("online") == recomputed["online"],
        }
        for part, equal in same.items():
            print(f"{OUTPUT.name}, {part}: {'up to date' if equal else 'differs from the recomputation'}")
        return 0 if all(same.values()) else 1
    OUTPUT.write_text(json.dumps(result, indent=1) + "\n")
    for part in (result, result["online"]):
        print(json.dumps({k: part[k] for k in ("rules", "chosen_on")}, indent=1))
        print(json.dumps(part["confusion"]["calibrated"]["report_runs"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
