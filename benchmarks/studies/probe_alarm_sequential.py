"""The held-out probe's alarm chosen by its detection delay at a stated false-alarm rate: rules on the probe's series
of ``probe/winner_rise_z`` (``z_1, z_2, ...``), replayed on the runs of ``probe_z_runs.py`` (the probe logged, never
acted on). No run is trained for it.

* **Runs**: the runs of ``probe_z_runs.py`` (:data:`SOURCE`, read by ``probe_alarm.load_z_runs``) and the
  Diffusion-DPO runs of ``rewind_outcome.py`` (:data:`OUTCOME`, :func:`outcome_runs`: the probe logged, the rewind
  off). The calibration runs are the benchmark's base on the demo's data at data seed 0: ``offline-a/b/c``, seeds
  0-7 at lr 2e-4, 1e-3 and 2e-5, Diffusion-DPO and the default safeguard; ``online-a/b``, seeds 0 and 1; and the
  outcome study's regimes there (lr 1e-4, 1e-3 and 1e-2, full tuning and LoRA, pairs sorted or shuffled, rows held
  back or an eval split). Only they choose the rule. Held out, only reported: the model 1.5 times as wide at 64 px
  (``wide-*`` and the outcome study's ``wide`` cells) and the dataset at data seed 1 (the outcome study's).
* **Classes** (:func:`run_class`), from the held-out colour reward's change from the base's at the evaluation steps:
  *breaking* when it ends more than :data:`TOLERANCE` below the base's; *healthy* when no evaluation found it more than
  :data:`TOLERANCE` below; *dipped* otherwise (it fell beyond the tolerance and came back by the end: neither, its
  alarms reported apart). The tolerance is beyond the measure's noise: :func:`noise_floor` records the lowest change
  any run at the lowest learning rate (2e-5, where the weights barely move) reached at any evaluation.
* **Start of the fall** (:func:`fall_start`): the first evaluation step from which every evaluation to the end found
  the reward more than :data:`TOLERANCE` below the base's. The offline benchmark runs carry the reward at every
  probe's step (their twin in the probe study, equal bit for bit at the last step); the online runs at steps 20, 40,
  60 and the held-out model's at 25 and 50 only, so there the fall began in the interval up to that step, and a delay
  measured from it is a lower bound of the true one by up to the gap between evaluations.
* **Delay** (:func:`evaluate`): on a breaking run, ``(alarm step - start of the fall) / probe_steps`` in probes
  (negative: the alarm came before the evaluations saw the fall); a breaking run with no alarm is a miss, counted
  in the recall, not in the delays.
* **Rules** (:class:`Rule`): ``in_a_row`` (the package's rule before: ``z_t > a`` at ``b`` probes in a row) and the
  one-sided ``cusum`` (``S_0 = 0``, ``S_t = max(0, S_(t-1) + z_t - k)``, fires when ``S_t > h``, ``k = a``,
  ``h = b``; after firing it counts afresh from 0), over :data:`GRID`.
* **False-alarm rate** (:func:`jittered_far`): the share of healthy runs a rule fires on, observed, and over
  :data:`DRAWS` re-draws of the healthy series with each reading moved by an independent standard normal (one
  standard error, the statistic's own noise: what another draw of the probe's noises could have read). The jittered
  rate keeps a rule from being chosen just above the healthiest run's peak.
* **Per regime** (:func:`regime_rates`): a user's run stands in one regime (a model, a learning rate, a tuning, a
  pair order, a probe source), so the rate a user meets is that regime's, not the pooled one: a pooled rate over many
  quiet LoRA runs hides a regime where most healthy runs alarm. The observed and jittered rates are also taken per
  calibration regime with a healthy run (:func:`regime`), and the worst of them is bounded.
* **Choice** (:func:`choose`): among the rules whose observed and jittered false-alarm rates on the calibration
  runs, pooled and in every calibration regime, are at most :data:`FAR_TARGET` (and the pooled jittered rate at
  most the first rule's before, so the choice never raises it), the highest recall on the breaking runs, then the
  lowest median delay, then the lowest mean delay, then the first in the grid.

``python benchmarks/studies/probe_alarm_sequential.py`` writes :data:`OUTPUT`; ``--check`` recomputes it and compares
(exit status 1 on a difference); ``--table`` prints the Markdown table ``benchmarks/research/alarm.md`` carries and
``--page`` writes it there.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from alarm_calibration import TOLERANCE, write_page_block  # noqa: E402
from probe_alarm import IN_A_ROW_RULE, Z_SOURCE, _source, load_z_runs, z_series  # noqa: E402

SOURCE = Z_SOURCE
#: the outcome study's earlier round (the CUSUM rule, three settings, before the rewind's ladder), kept as it was: the
#: alarm's choices read its Diffusion-DPO runs; ``rewind_outcome.py`` now writes the present rule's round elsewhere
OUTCOME = ROOT / "benchmarks" / "results" / "probe" / "cpu-rewind-outcome-cusum.json"
#: that round's cells whose Diffusion-DPO runs the choice read (the first of its record's cells, in its order); the
#: cells after them, and its online cells, were added after the choice and check the chosen rule
CHOICE_CELLS = 22
OUTCOME_SEEDS = (0, 1, 2, 3, 4)


@dataclass(frozen=True)
class OutcomeCell:
    """An offline cell of the outcome study's earlier round, with the fields its record's runs name."""

    model: str
    data: int
    lr: float
    tuning: str
    order: str
    probe: str
    steps: int


def outcome_cells(path: Path = OUTCOME) -> list[OutcomeCell]:
    """The earlier round's offline cells, in its record's order."""
    names = [f.name for f in OutcomeCell.__dataclass_fields__.values()]
    cells = json.loads(path.read_text())["cells"].values()
    return [OutcomeCell(**{k: entry[k] for k in names}) for entry in cells if "model" in entry]


OUTPUT = ROOT / "benchmarks" / "results" / "probe" / "cpu-probe-alarm-sequential.json"
START, END = "<!-- probe-alarm-sequential-tables:start -->", "<!-- probe-alarm-sequential-tables:end -->"
PROBE_STEPS = 5  # the runs' probe_steps: delays are counted in probes
FAR_TARGET = 0.05  # the stated false-alarm rate: at most 5 % of healthy runs alarm
DRAWS, JITTER_SEED = 2000, 0
BEFORE = ("in_a_row", IN_A_ROW_RULE.threshold, float(IN_A_ROW_RULE.patience))  # the package's first rule
POOLED_CUSUM = ("cusum", 6.5, 6.0)  # the rule chosen on the pooled rate alone, before the per-regime bound
#: per family, its two parameters' names and grids (in the probe's units: standard errors, probes)
GRID: dict[str, tuple[tuple[str, str], tuple[float, ...], tuple[float, ...]]] = {
    "in_a_row": (
        ("threshold", "patience"),
        (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 6.5, 7.0, 7.5, 8.0, 8.5, 9.0, 9.5, 10.0, 11.0, 12.0, 15.0, 20.0),
        (1.0, 2.0, 3.0, 4.0, 5.0, 6.0),
    ),
    "cusum": (
        ("allowance k", "limit h"),
        tuple(x / 2 for x in range(0, 31)),
        (0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 15.0, 20.0, 25.0, 30.0, 40.0, 50.0, 60.0, 80.0),
    ),
}


# ------------------------------------------------------------------------------------------------ the labels


def run_class(run: dict[str, Any], tolerance: float = TOLERANCE) -> str:
    """``breaking``: the reward ends more than ``tolerance`` below the base's; ``healthy``: no evaluation found it
    more than ``tolerance`` below; ``dipped``: it did and came back by the end."""
    changes = run["reward_change"]
    if changes[max(changes)] < -tolerance:
        return "breaking"
    return "healthy" if min(changes.values()) >= -tolerance else "dipped"


def fall_start(run: dict[str, Any], tolerance: float = TOLERANCE) -> int | None:
    """The first evaluation step from which every evaluation to the end found the reward more than ``tolerance``
    below the base's (``None``: the run does not end below)."""
    changes = run["reward_change"]
    steps = sorted(changes)
    for index, step in enumerate(steps):
        if all(changes[s] < -tolerance for s in steps[index:]):
            return step
    return None


def noise_floor(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The lowest reward change any run at the lowest learning rate reached at any evaluation, per model: the
    measure's noise where training barely moves the weights."""
    floors = {}
    for model in dict.fromkeys(r["model"] for r in runs):
        mine = [r for r in runs if r["model"] == model and r["mode"] == "offline"]
        lowest_lr = min(float(r["cell"].rsplit("lr ", 1)[1]) for r in mine)
        at = [r for r in mine if float(r["cell"].rsplit("lr ", 1)[1]) == lowest_lr]
        floors[model] = {"learning_rate": lowest_lr, "runs": len(at),
                         "lowest_change": round(min(min(r["reward_change"].values()) for r in at), 6)}  # fmt: skip
    return floors


def outcome_runs(path: Path = OUTCOME) -> list[dict[str, Any]]:
    """The Diffusion-DPO runs of ``rewind_outcome.py``'s result file (the probe logged, never acted on) in the shape
    of ``probe_alarm.load_z_runs``: model ``benchmark`` (the calibration base on the calibration data, data seed 0),
    ``benchmark-data1`` (the held-out dataset) or ``wide`` (the held-out model); the reward change from the base's at
    every evaluation step (10 to 50). Only the cells the choice read (:data:`CHOICE_CELLS`): the cells
    added after it (100 steps, the pair order and the eval split together, online) check the chosen rule. Read as
    calibration, every offline one of them with it, they would move the choice to an allowance of 14.5: among them is
    the one healthy calibration-base run the chosen rule alarms on (100 steps, at step 95), its regime's only healthy
    run."""
    chosen_on = [asdict(cell) for cell in outcome_cells(path)[:CHOICE_CELLS]]
    report = json.loads(path.read_text())
    runs = []
    for key, run in report["runs"].items():
        if run["setting"] != "dpo" or run["cell"] not in chosen_on:  # the cells added after the choice check it
            continue
        cell = run["cell"]
        model = cell["model"] if cell["data"] == 0 else f"{cell['model']}-data{cell['data']}"
        probe = "eval split" if cell["probe"] == "eval-split" else "rows held back"
        runs.append(
            {
                "id": f"outcome/{key}",
                "model": model,
                "mode": "offline",
                "cell": f"{model}, offline, {cell['tuning']}, {cell['order']}, {probe}, lr {cell['lr']:g}",
                "seed": int(run["seed"]),
                "method": "dpo",
                "safeguard": False,
                "probe": run["probe"],
                "reward_change": {int(s): r - run["base_reward"] for s, r in run["reward_at"].items()},
                "curve": "this run's",
            }
        )
    return runs


def regime(run: dict[str, Any]) -> str:
    """The regime a run stands in: its cell (model, mode, tuning, order and probe source where recorded, learning
    rate) and, for the probe study's runs, whether a safeguard trains."""
    return f"{run['cell']}, {'safeguard' if run['safeguard'] else 'Diffusion-DPO'}"


def regime_rates(rule: Rule, runs: list[dict[str, Any]], draws: int = DRAWS) -> dict[str, dict[str, float]]:
    """Per regime (:func:`regime`) with a healthy run: the share of its healthy runs ``rule`` fires on, observed and
    jittered (:func:`jittered_far`)."""
    healthy = [r for r in runs if run_class(r) == "healthy"]
    out = {}
    for name in sorted({regime(r) for r in healthy}):
        mine = [r for r in healthy if regime(r) == name]
        observed = sum(rule.fires(r) is not None for r in mine) / len(mine)
        out[name] = {"healthy": len(mine), "observed": observed, "jittered": jittered_far(rule, padded(mine), draws)}
    return out


# ------------------------------------------------------------------------------------------------- the rules


def cusum_fires(series: list[tuple[int, float]], k: float, h: float) -> list[int]:
    """The steps at which the one-sided CUSUM fires on ``series`` (``(step, z)``): ``S_0 = 0``,
    ``S_t = max(0, S_(t-1) + z_t - k)``, fires where ``S_t > h`` and then starts again from ``S_t = 0``."""
    total, fired = 0.0, []
    for step, z in series:
        total = max(0.0, total + z - k)
        if total > h:
            fired.append(step)
            total = 0.0
    return fired


def in_a_row_fires(series: list[tuple[int, float]], threshold: float, patience: int) -> list[int]:
    """The steps at which ``z_t > threshold`` at ``patience`` probes in a row fires on ``series`` (the count starts
    again from 0 after firing)."""
    count, fired = 0, []
    for step, z in series:
        count = count + 1 if z > threshold else 0
        if count >= patience:
            fired.append(step)
            count = 0
    return fired


@dataclass(frozen=True)
class Rule:
    """A rule of :data:`GRID`: ``family`` with parameters ``a`` (threshold or allowance ``k``) and ``b`` (patience
    or limit ``h``)."""

    family: str
    a: float
    b: float

    def fires(self, run: dict[str, Any]) -> int | None:
        """The first step at which the rule fires on the run's series up to its last evaluation (``None``: never)."""
        series = z_series(run)
        steps = cusum_fires(series, self.a, self.b) if self.family == "cusum" else in_a_row_fires(
            series, self.a, int(self.b))  # fmt: skip
        return steps[0] if steps else None

    def describe(self) -> str:
        if self.family == "cusum":
            return f"CUSUM of `winner_rise_z`, k {self.a:g}, h {self.b:g}"
        return f"`winner_rise_z` above {self.a:g}, {int(self.b)} in a row"


def rules() -> list[Rule]:
    return [Rule(f, a, b) for f, (_, aa, bb) in GRID.items() for a, b in itertools.product(aa, bb)]


def fire_matrix(rule: Rule, series: np.ndarray) -> np.ndarray:
    """Whether ``rule`` fires on each of ``series`` (``[..., probe]``; ``-inf`` pads a shorter run: it resets
    both families): the vectorised :func:`cusum_fires` / :func:`in_a_row_fires`."""
    state = np.zeros(series.shape[:-1])
    fired = np.zeros(series.shape[:-1], dtype=bool)
    for t in range(series.shape[-1]):
        z = series[..., t]
        if rule.family == "cusum":
            state = np.maximum(0.0, state + z - rule.a)
            now = state > rule.b
        else:
            state = np.where(z > rule.a, state + 1, 0.0)
            now = state >= rule.b
        fired |= now
        state = np.where(now, 0.0, state)
    return fired


def padded(runs: list[dict[str, Any]]) -> np.ndarray:
    """The runs' series of ``z`` as one array, a shorter run padded with ``-inf``."""
    series = [[z for _, z in z_series(r)] for r in runs]
    out = np.full((len(series), max(len(s) for s in series)), -np.inf)
    for i, s in enumerate(series):
        out[i, : len(s)] = s
    return out


def jittered_fires(rule: Rule, healthy: np.ndarray, draws: int = DRAWS, seed: int = JITTER_SEED) -> np.ndarray:
    """Per healthy run, the share of re-draws on which ``rule`` fires, each reading moved by an independent standard
    normal (:func:`padded` series; a padded reading stays ``-inf``)."""
    noise = np.random.default_rng(seed).standard_normal((draws, *healthy.shape))
    return fire_matrix(rule, healthy[None] + noise).mean(axis=0)


def jittered_far(rule: Rule, healthy: np.ndarray, draws: int = DRAWS, seed: int = JITTER_SEED) -> float:
    """The share of (re-draw, healthy run) on which ``rule`` fires (:func:`jittered_fires`)."""
    return float(jittered_fires(rule, healthy, draws, seed).mean())


def _spread(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    q1, median, q3 = (float(v) for v in np.percentile(values, [25, 50, 75]))
    return {"n": len(values), "median": median, "q1": q1, "q3": q3, "min": min(values), "max": max(values),
            "mean": round(statistics.fmean(values), 4)}  # fmt: skip


def evaluate(rule: Rule, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per class (:func:`run_class`): the alarms; the false-alarm rate on the healthy runs, the recall and the delays
    (:func:`fall_start`, in probes) on the breaking ones, precision over breaking and healthy runs."""
    fired = {r["id"]: rule.fires(r) for r in runs}
    by_class = {c: [r for r in runs if run_class(r) == c] for c in ("breaking", "healthy", "dipped")}
    alarms = {c: sum(fired[r["id"]] is not None for r in mine) for c, mine in by_class.items()}
    delays = [(fired[r["id"]] - fall_start(r)) / PROBE_STEPS for r in by_class["breaking"]
              if fired[r["id"]] is not None]  # fmt: skip
    counts = {c: len(mine) for c, mine in by_class.items()}
    true, false = alarms["breaking"], alarms["healthy"]
    return {
        "runs": counts,
        "alarms": alarms,
        "false_alarm_rate": false / counts["healthy"] if counts["healthy"] else None,
        "recall": true / counts["breaking"] if counts["breaking"] else None,
        "precision": true / (true + false) if true + false else None,
        "delay_probes": _spread(delays),
        "fires_at": fired,
    }


def choose(runs: list[dict[str, Any]]) -> tuple[Rule, dict[str, Any]]:
    """The rule of :func:`rules` chosen on ``runs`` (the module docstring's choice) and every rule's figures there:
    per rule its observed and jittered false-alarm rates, recall and delays, and, for the rules within the pooled
    bounds, the worst calibration regime's rates (:func:`regime_rates`)."""
    healthy = padded([r for r in runs if run_class(r) == "healthy"])
    scored = {}
    for rule in rules():
        figures = evaluate(rule, runs)
        figures["jittered_false_alarm_rate"] = jittered_far(rule, healthy)
        scored[rule] = figures
    before = scored[Rule(*BEFORE)]
    bound = min(FAR_TARGET, before["jittered_false_alarm_rate"])
    pooled = [(i, r) for i, r in enumerate(scored) if scored[r]["false_alarm_rate"] <= FAR_TARGET
              and scored[r]["jittered_false_alarm_rate"] <= bound]  # fmt: skip
    admissible = []
    for i, rule in pooled:
        rates = regime_rates(rule, runs)
        worst = {kind: max(r[kind] for r in rates.values()) for kind in ("observed", "jittered")}
        scored[rule]["worst_regime_false_alarm_rate"] = worst
        if _admissible(scored[rule]):
            admissible.append((i, rule))

    def key(entry: tuple[int, Rule]) -> tuple[float, ...]:
        figures = scored[entry[1]]
        delay = figures["delay_probes"]
        return (-figures["recall"], delay.get("median", np.inf), delay.get("mean", np.inf), entry[0])

    search = {"scored": scored, "jittered_bound": bound, "within_pooled_bounds": len(pooled)}
    return min(admissible, key=key)[1], search | {"admissible": len(admissible)}


def _admissible(figures: dict[str, Any]) -> bool:
    """Whether a rule's figures (:func:`choose`'s) meet every bound of the choice."""
    worst = figures.get("worst_regime_false_alarm_rate")
    return worst is not None and max(worst.values()) <= FAR_TARGET


# ------------------------------------------------------------------------------------------------ the study


def _figures(rule: Rule, runs: list[dict[str, Any]], jitter: bool = True) -> dict[str, Any]:
    figures = evaluate(rule, runs)
    healthy = [r for r in runs if run_class(r) == "healthy"]
    if jitter and healthy:
        per_run = jittered_fires(rule, padded(healthy))
        figures["jittered_false_alarm_rate"] = float(per_run.mean())
        figures["jittered_per_healthy_run"] = {
            r["id"]: round(float(p), 4) for r, p in zip(healthy, per_run, strict=True)
        }
    return figures


def analyse(path: Path = SOURCE) -> dict[str, Any]:
    """The classes, the choice on the calibration parts, and the chosen rule beside the package's rule before, on
    the calibration parts (all, offline, online) and the held-out model."""
    runs = load_z_runs(path) + outcome_runs()
    calibration = [r for r in runs if r["model"] == "benchmark"]
    chosen, search = choose(calibration)
    before = Rule(*BEFORE)
    scored = search["scored"]
    best_per_family = {}
    for family in GRID:
        mine = [r for r in scored if r.family == family and _admissible(scored[r])]
        best = min(mine, key=lambda r: (-scored[r]["recall"], scored[r]["delay_probes"].get("median", np.inf),
                                        scored[r]["delay_probes"].get("mean", np.inf)))  # fmt: skip
        best_per_family[family] = asdict(best)
    sets = {
        "calibration": calibration,
        "calibration, offline": [r for r in calibration if r["mode"] == "offline"],
        "calibration, online": [r for r in calibration if r["mode"] == "online"],
        "held-out dataset": [r for r in runs if r["model"] == "benchmark-data1"],
        "held-out model": [r for r in runs if r["model"] == "wide"],
    }
    compared = {"before": before, "pooled CUSUM": Rule(*POOLED_CUSUM), "chosen": chosen}
    # each family's best under the same bound, where it is neither the chosen rule nor the rule before
    best = {f"best {f}": Rule(**best_per_family[f]) for f in GRID}
    compared |= {name: rule for name, rule in best.items() if rule not in compared.values()}
    # the chosen family's nearest neighbours: how the figures move with its parameters
    step_a, step_b = 0.5, 1.0
    neighbours = [Rule(chosen.family, chosen.a + da, chosen.b + db) for da, db in ((-step_a, 0), (step_a, 0),
                  (0, -step_b), (0, step_b))]  # fmt: skip
    report = json.loads(path.read_text())
    return {
        "what": "The held-out probe's alarm chosen by its detection delay at a stated false-alarm rate, on the "
        "runs of probe_z_runs.py and the Diffusion-DPO runs of rewind_outcome.py (the probe logged, never acted "
        "on); no run trained for it (benchmarks/studies/probe_alarm_sequential.py).",
        "command": "python benchmarks/studies/probe_alarm_sequential.py",
        "source": [_source(path), _source(OUTCOME)],
        "probe": report["probe"],
        "classes": f"breaking: the held-out colour reward ends more than {TOLERANCE} below the base's; healthy: no "
        f"evaluation found it more than {TOLERANCE} below; dipped: it fell beyond that and came back by the end "
        "(neither: its alarms are reported apart)",
        "tolerance": TOLERANCE,
        "noise_floor": noise_floor(runs),
        "fall_start": "the first evaluation step from which every evaluation to the end found the reward more than "
        f"{TOLERANCE} below the base's; the offline benchmark runs are evaluated at every probe's step, the online "
        "runs at 20, 40, 60 and the held-out model's at 25, 50 only (there the fall began at or before that step: "
        "a delay from it is a lower bound)",
        "delay": f"(alarm step - start of the fall) / {PROBE_STEPS}, in probes, on the breaking runs the rule fires "
        "on; negative: before the evaluations saw the fall",
        "false_alarm_rate": "the share of healthy runs the rule fires on: observed, and jittered (each reading "
        f"moved by an independent standard normal, {DRAWS} re-draws, seed {JITTER_SEED})",
        "choice": f"on the calibration runs (the benchmark's base on the data at data seed 0, offline and online): "
        f"observed and jittered false-alarm rates at most {FAR_TARGET}, pooled and in every calibration regime with "
        f"a healthy run, and the pooled jittered rate at most the package's first rule's "
        f"({Rule(*BEFORE).describe()}); "
        "then the highest recall, the lowest median delay, the lowest mean delay, the first in the grid",
        "far_target": FAR_TARGET,
        "jittered_bound": search["jittered_bound"],
        "grid": {f: {"parameters": list(names), "a": list(aa), "b": list(bb)} for f, (names, aa, bb) in GRID.items()},
        "rules_searched": len(search["scored"]),
        "rules_within_pooled_bounds": search["within_pooled_bounds"],
        "rules_admissible": search["admissible"],
        "best_per_family": {
            f: asdict(rule) | {"describe": rule.describe()}
            for f, rule in ((name.removeprefix("best "), rule) for name, rule in best.items())
        },
        "rules": {name: asdict(rule) | {"describe": rule.describe()} for name, rule in compared.items()},
        "chosen_against_before": None,  # filled below
        "figures": {name: {s: _figures(rule, mine) for s, mine in sets.items()} for name, rule in compared.items()},
        "per_regime": {
            name: {s: regime_rates(rule, sets[s]) for s in ("calibration", "held-out dataset", "held-out model")}
            for name, rule in compared.items()
            if name in ("pooled CUSUM", "chosen")
        },
        "neighbours": [
            asdict(r)
            | {"describe": r.describe(), **{k: v for k, v in _figures(r, calibration).items() if k != "fires_at"}}
            for r in neighbours
            if r.b >= 0 and r.a >= 0
        ],  # fmt: skip
        "runs": [
            {
                "id": r["id"],
                "model": r["model"],
                "mode": r["mode"],
                "cell": r["cell"],
                "method": r["method"],
                "class": run_class(r),
                "fall_start": fall_start(r),
                "reward_change": {str(s): round(v, 6) for s, v in sorted(r["reward_change"].items())},
                "winner_rise_z": [round(z, 3) for _, z in z_series(r)],
            }
            for r in runs
        ],  # fmt: skip
    }


def against(result: dict[str, Any], before: str = "pooled CUSUM") -> dict[str, Any]:
    """The chosen rule beside the rule chosen on the pooled rate alone (``before``), check by check: on the
    calibration runs the worst regime's false-alarm rate, the recall and the median delay; on each held-out set the
    false-alarm rate, the recall and the median delay. Each is recorded as it comes out: the per-regime bound buys
    quiet regimes with recall and delay, and this says how much."""
    new, old = result["figures"]["chosen"], result["figures"][before]
    worst = {
        name: max(r["observed"] for r in result["per_regime"][name]["calibration"].values())
        for name in ("chosen", before)
    }
    checks = {"calibration: worst regime's false-alarm rate lower": worst["chosen"] < worst[before],
              "calibration: recall not lower": new["calibration"]["recall"] >= old["calibration"]["recall"],
              "calibration: median delay not longer": new["calibration"]["delay_probes"]["median"]
              <= old["calibration"]["delay_probes"]["median"]}  # fmt: skip
    for held in ("held-out dataset", "held-out model"):
        n, o = new[held], old[held]
        checks[f"{held}: false-alarm rate not higher"] = n["false_alarm_rate"] <= o["false_alarm_rate"]
        checks[f"{held}: recall not lower"] = n["recall"] >= o["recall"]
        checks[f"{held}: median delay not longer"] = n["delay_probes"]["median"] <= o["delay_probes"]["median"]
    return {"before": before, "checks": checks, "all": all(checks.values())}


def _cell(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _delay_cell(d: dict[str, Any]) -> str:
    if not d["n"]:
        return "none"
    return f"{d['median']:g} [{d['q1']:g}, {d['q3']:g}], {d['min']:g} to {d['max']:g}, mean {d['mean']:.2f}"


def tables(result: dict[str, Any]) -> str:
    """The Markdown table of ``benchmarks/research/alarm.md``'s section: per rule and set of runs, the classes'
    counts, the false-alarm rates, recall, precision and the delay's spread."""
    lines = [
        "| rule | runs | breaking / healthy / dipped | false alarms (healthy) | jittered false-alarm rate | recall "
        "| precision | delay in probes: median [quartiles], range, mean | alarms on dipped runs |",
        "|---|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for name, per_set in result["figures"].items():
        rule = result["rules"][name]["describe"]
        for which, f in per_set.items():
            n, a = f["runs"], f["alarms"]
            lines.append(
                f"| {name}: {rule} | {which} | {n['breaking']} / {n['healthy']} / {n['dipped']} "
                f"| {a['healthy']} of {n['healthy']} | {_cell(f.get('jittered_false_alarm_rate'), 3)} "
                f"| {_cell(f['recall'])} | {_cell(f['precision'])} | {_delay_cell(f['delay_probes'])} "
                f"| {a['dipped']} of {n['dipped']} |"
            )
    lines += ["", "The chosen rule's neighbours on the calibration parts:", "",
              "| rule | false alarms | jittered rate | recall | delay: median [quartiles], mean |",
              "|---|---:|---:|---:|---|"]  # fmt: skip
    for r in result["neighbours"]:
        d = r["delay_probes"]
        lines.append(
            f"| {r['describe']} | {r['alarms']['healthy']} of {r['runs']['healthy']} "
            f"| {_cell(r['jittered_false_alarm_rate'], 3)} | {_cell(r['recall'])} "
            f"| {d['median']:g} [{d['q1']:g}, {d['q3']:g}], {d['mean']:.2f} |"
        )
    verdict = result["chosen_against_before"]
    lines += ["", f"The chosen rule against the {verdict['before']} rule ("
              + result["rules"][verdict["before"]]["describe"] + "): "
              + "; ".join(f"{k}: {'yes' if v else 'no'}" for k, v in verdict["checks"].items()) + "."]  # fmt: skip
    return "\n".join(lines)


def safeguard_sentence(result: dict[str, Any]) -> str:
    """What docs/safeguard.md stated of the choice while the CUSUM was the package's rule: the chosen rule against the
    rule chosen on the pooled rate alone, on the calibration runs and on each held-out set."""
    new, old = result["figures"]["chosen"], result["figures"]["pooled CUSUM"]

    def part(f: dict[str, Any]) -> str:
        n, a, d = f["runs"], f["alarms"], f["delay_probes"]
        delay = (
            "no delay to measure"
            if not d["n"]
            else (f"a median {d['median']:g} probes [quartiles {d['q1']:g}, {d['q3']:g}] from the start of the fall")
        )
        counts = f"{a['healthy']} of {n['healthy']} healthy runs and {a['breaking']} of {n['breaking']} breaking ones"
        return f"{counts}, {delay}"

    def worst(name: str) -> str:
        rates = result["per_regime"][name]["calibration"]
        label, rate = max(rates.items(), key=lambda item: item[1]["observed"])
        return f"{rate['observed']:.0%} ({label})"

    held = ("held-out dataset", "held-out model")
    return (
        f"On the calibration runs the chosen rule ({result['rules']['chosen']['describe']}) fired on "
        f"{part(new['calibration'])}, its worst regime's false-alarm rate {worst('chosen')}; the rule chosen on the "
        f"pooled rate alone ({result['rules']['pooled CUSUM']['describe']}) fired on {part(old['calibration'])}, its "
        f"worst regime's rate {worst('pooled CUSUM')}. Never chosen on: "
        + "; ".join(f"the {h}, the chosen rule on {part(new[h])}, the pooled one on {part(old[h])}" for h in held)
    )


def compute(path: Path = SOURCE) -> dict[str, Any]:
    result = analyse(path)
    result["chosen_against_before"] = against(result)
    return json.loads(json.dumps(result))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help=f"Recompute and compare with {OUTPUT.name}.")
    parser.add_argument("--table", action="store_true", help="Print the Markdown table of the written file.")
    parser.add_argument("--page", action="store_true", help="Write the table into benchmarks/research/alarm.md.")
    args = parser.parse_args(argv)
    if args.table or args.page:
        block = tables(json.loads(OUTPUT.read_text()))
        if args.page:
            write_page_block(START, END, block)
        else:
            print(block)
        return 0
    result = compute()
    if args.check:
        same = json.loads(OUTPUT.read_text()) == result
        print(f"{OUTPUT.name}: {'up to date' if same else 'differs from the recomputation'}")
        return 0 if same else 1
    OUTPUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("rules", "chosen_against_before", "jittered_bound")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
