"""The stability benchmark with the held-out probe logged: the runs the probe's alarm is calibrated on, and the rewind
(``on_pathology="rewind"``) measured against the goal.

Not part of the test suite. The runs are :mod:`stability_guards`' (the benchmark's base, its 123 pairs, its held-out
prompts and measures, batches of 2 pairs; resumable, one run appended at a time), with every setting probing
(``probe_steps`` :data:`PROBE_STEPS`, ``probe_pairs`` at the config's default): the probe holds the same pairs back
from training in every setting, so the settings of a cell train on the same 119 pairs and stay paired. The held-out
measures are taken at every probe's step in the 50-step cells (every 10 steps at the small beta, 100 to 250 in the
long runs), to say when the held-out reward fell against when the alarm fired.

- ``dpo``, ``sdpo-output-mu0.5`` (the package's default safeguard) and the best fixed setting of each cell in the
  stability benchmark (``guard-auto-mu`` at lr 1e-3, ``guard-max-margin`` at 2e-5; at 2e-4 the default safeguard is
  the best): the probe logged, never acted on (``on_pathology`` at its default, ``warn``); each run records the
  probe's readings (``probe``).
- ``rewind``: Diffusion-DPO with ``on_pathology="rewind"`` (the offline rule of :data:`~trl_diffusion_sdpo.callbacks.
  rewind.probe_alarm` at the config's defaults, :func:`package_rule`, chosen on the first kind of run by
  ``probe_alarm.py``); each run records its rewinds
  (``rewinds``: the step fired and the step restored) and, where the run stopped itself, the step (``stopped_at``):
  its held-out measures at that step stand for every later evaluation step, the stopped run's weights being its
  result.

    OMP_NUM_THREADS=1 nice -n 5 nohup python benchmarks/studies/stability_probe.py run --parts /tmp/probe-parts &
    python benchmarks/studies/stability_probe.py assemble --parts /tmp/probe-parts

Online (``online``, ``online-tables``): the online regimes with the probe logged and the rewind,
:mod:`stability_probe_online`::

    OMP_NUM_THREADS=1 nice -n 5 nohup python benchmarks/studies/stability_probe.py online --seeds 0-9 &
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import stability_guards as study  # noqa: E402
import stability_map  # noqa: E402
from stability_dormant import LABELS, both_halves, goal_all_measures, measure_table, verdict  # noqa: E402

from trl_diffusion_sdpo.callbacks.rewind import ProbeAlarmRule  # noqa: E402
from trl_diffusion_sdpo.demo.methods import METHODS, Method  # noqa: E402

PROBE_STEPS = 5  # a probe every 5 optimizer steps: 10 readings in a 50-step run
OUTPUT = Path("benchmarks/results/probe/cpu-stability-probe-demo.json")
EVERY_5, EVERY_10 = ",".join(map(str, range(5, 55, 5))), ",".join(map(str, range(10, 110, 10)))
GRID = {"--max-steps": "50", "--eval-steps": EVERY_5, "--betas": "", "--eval-seeds-per-prompt": "4"}
SMALL_BETA = {"--lrs": "", "--betas": "5", "--max-steps": "100", "--eval-steps": EVERY_10}
SMALL_BETA |= {"--eval-seeds-per-prompt": "4"}
LONG = {"--lrs": "6.7e-5", "--betas": "", "--max-steps": "1000", "--eval-steps": "100,200,300,400,500,750,1000"}
LONG |= {"--eval-seeds-per-prompt": "4"}
TEN = ",".join(map(str, range(10)))
LOGGED = f"dpo,{study.DEFAULT_METHOD}"
#: (regime, stability_map arguments), in this order: the probe logged in the breaking cells and the healthy one
#: (10 seeds: Diffusion-DPO and the default safeguard), on which the alarm is chosen; the rewind there; the best
#: fixed settings of the cells where the default safeguard is not the best; then the small beta (with its best fixed
#: setting, the margin cap) and the long runs (the default safeguard is their best), logged and rewinding
REGIMES: tuple[tuple[str, dict[str, str]], ...] = (
    ("offline", GRID | {"--lrs": "2e-4,1e-3,2e-5", "--seeds": TEN, "--methods": LOGGED}),
    ("offline", GRID | {"--lrs": "2e-4,1e-3,2e-5", "--seeds": TEN, "--methods": study.REWIND}),
    ("offline", GRID | {"--lrs": "1e-3", "--seeds": TEN, "--methods": "guard-auto-mu"}),
    ("offline", GRID | {"--lrs": "2e-5", "--seeds": TEN, "--methods": "guard-max-margin"}),
    ("small-beta", SMALL_BETA | {"--seeds": TEN, "--methods": f"{LOGGED},{study.REWIND}"}),
    ("small-beta", SMALL_BETA | {"--seeds": TEN, "--methods": "guard-max-margin"}),
    ("long", LONG | {"--seeds": TEN, "--methods": f"{LOGGED},{study.REWIND}"}),
)


def package_rule() -> dict[str, Any]:
    """The alarm's rule a run reads at the config's defaults (``probe_alarm_rise``, ``probe_alarm_z``:
    ``callbacks.rewind.probe_alarm``) and the probe's figure it reads, as a run records it (``probe_alarm``)."""
    from trl_diffusion_sdpo import DiffusionSDPOConfig
    from trl_diffusion_sdpo.callbacks.rewind import probe_alarm

    rule = probe_alarm(DiffusionSDPOConfig(output_dir="unused", use_cpu=True))
    return {**dataclasses.asdict(rule), "signal": ProbeAlarmRule.SIGNAL}


def probing(method: Method) -> Method:
    """``method`` with the held-out probe on (``probe_steps``), its key kept (the analysis pairs by key)."""
    return dataclasses.replace(method, config=(*method.config, ("probe_steps", PROBE_STEPS)))


class ProbeMeasures(study.HeldOutMeasures):
    """:class:`stability_guards.HeldOutMeasures` plus the probe's readings and the rewinds, as the training logs
    carry them; a run that stops itself (a rewind's stop) is measured at its last step, which stands for every later
    evaluation step."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.probe: list[dict[str, float]] = []
        self.rewinds: list[dict[str, int]] = []
        self.stopped_at: int | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=logs, **kwargs)
        logs = logs or {}
        if "probe/delta_winner" in logs:
            reading = {k.split("/", 1)[1]: float(v) for k, v in logs.items() if k.startswith("probe/")}
            self.probe.append({"step": state.global_step, **reading})
        if "health/rewind_to" in logs:
            self.rewinds.append({"fired_at": state.global_step, "restored": int(logs["health/rewind_to"])})

    def on_train_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step >= args.max_steps:
            return
        self.stopped_at = step
        measured, reward = self.measures.get(str(step)), self.rewards.get(step)
        if measured is None:  # not an evaluation step: measured here, kept only as the later steps' figures
            self.steps.add(step)
            self.on_step_end(args, state, control)
            self.steps.discard(step)
            measured, reward = self.measures.pop(str(step)), self.rewards.pop(step)
            self.samples.pop(str(step), None)
        for later in (s for s in sorted(self.steps) if s > step):
            self.measures[str(later)], self.rewards[later] = measured, reward

    def extras(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"probe": self.probe, "rewinds": self.rewinds, "stopped_at": self.stopped_at}
        if self.recipe.methods == (study.REWIND,):  # the rule the run's alarm read
            extra["probe_alarm"] = package_rule()
        return {**super().extras(), **extra}


def install() -> None:
    """Every setting of :data:`REGIMES` probing, the rewind among them, and :class:`ProbeMeasures` as the
    evaluator."""
    study._install(**{k: v for k, v in study.GUARD_DEFAULTS.items()})
    rewind = Method(study.REWIND, "DPO on_pathology=rewind", False, config=(("on_pathology", "rewind"),))
    for method in (*stability_map.EXTRA_METHODS, rewind):
        METHODS.setdefault(method.key, method)
    for key in list(METHODS):
        METHODS[key] = probing(METHODS[key])
    stability_map.EVALUATOR = ProbeMeasures


def run(parts: Path, only: str | None, entries: list[int] | None = None) -> int:
    """Train what :data:`REGIMES` (``entries``: only these of them, by index) lacks in the part files of ``parts``."""
    install()
    parts.mkdir(parents=True, exist_ok=True)
    for index, (name, grid) in enumerate(REGIMES):
        if (only is not None and name != only) or (entries is not None and index not in entries):
            continue
        argv = [a for flag, value in grid.items() for a in (flag, value)]
        argv += ["--json", str(parts / f"{name}.json")]
        print(f"regime {name}: {' '.join(argv)}", flush=True)
        stability_map.main(argv)
    return 0


# ------------------------------------------------------------------------------------------------------ analysis


def rewinds(runs: dict[str, Any]) -> dict[str, Any]:
    """Per cell: the rewind's runs, how many rewound, when (the step fired and the step restored, per seed), how many
    stopped themselves and at which step."""
    out: dict[str, Any] = {}
    for run in sorted(runs.values(), key=lambda r: (study._cell(r), r["seed"])):
        if run["method"] != study.REWIND:
            continue
        cell = out.setdefault(study._cell(run), {"runs": 0, "rewound": 0, "stopped": 0, "per_seed": {}})
        cell["runs"] += 1
        cell["rewound"] += bool(run["rewinds"])
        cell["stopped"] += run["stopped_at"] is not None
        cell["per_seed"][str(run["seed"])] = {"rewinds": run["rewinds"], "stopped_at": run["stopped_at"]}
    return out


def quiet_identity(runs: dict[str, Any]) -> dict[str, Any]:
    """Per cell: the rewind's runs whose alarm stayed quiet, and how many of them have held-out measures equal to the
    Diffusion-DPO run of the same seed at every evaluation step (a quiet rewind trains bit for bit as Diffusion-DPO
    with the probe; equal measures are what that gives at the held-out prompts)."""
    out: dict[str, Any] = {}
    by_key = {(study._cell(r), r["seed"], r["method"]): r for r in runs.values()}
    for (cell, seed, method), run in sorted(by_key.items()):
        if method != study.REWIND or run["rewinds"]:
            continue
        dpo = by_key.get((cell, seed, "dpo"))
        entry = out.setdefault(cell, {"quiet": 0, "equal_to_dpo": 0, "seeds": []})
        entry["quiet"] += 1
        entry["seeds"].append(seed)
        entry["equal_to_dpo"] += dpo is not None and dpo["measures"] == run["measures"]
    return out


NOT_RUN: list[str] = []  # the online runs, their calibration and their rewind are in ONLINE_OUTPUT


def not_run(regimes: dict[str, dict[str, Any]]) -> list[str]:
    """:data:`NOT_RUN`, and per regime of :data:`REGIMES` the settings with fewer than 10 seeds."""
    extra = []
    for name, grid in REGIMES:
        runs = regimes.get(name, {}).get("runs", {}).values()
        for method in grid["--methods"].split(","):
            seeds = {r["seed"] for r in runs if r["method"] == method}
            if len(seeds) < 10:
                extra.append(f"{name}: {study.LABELS.get(method, method)}: {len(seeds)} of 10 seeds")
    return [*NOT_RUN, *dict.fromkeys(extra)]


def goal_record(regimes: dict[str, Any]) -> dict[str, Any]:
    """The rewind judged on ``regimes``' runs, as the offline and the online result files record it: the paired
    analysis, the goal's verdict on every judged measure, its two halves, the rule's verdict, each regime's rewinds
    and whether its quiet runs equal Diffusion-DPO's."""
    analysis = study.analyse(regimes)
    verdicts = goal_all_measures(analysis)
    halves = both_halves(verdicts)
    return {
        "analysis": analysis,
        "goal_all_measures": verdicts,
        "both_halves": halves,
        "verdict": verdict(halves, verdicts, study.REWIND) if study.REWIND in halves else "not run",
        "rewinds": {name: rewinds(report["runs"]) for name, report in regimes.items()},
        "quiet_identity": {name: quiet_identity(report["runs"]) for name, report in regimes.items()},
    }


def assemble(parts: Path, path: Path) -> int:
    """The probe study's result file: every regime's runs, per cell, setting and evaluation step the paired intervals
    against the base, Diffusion-DPO and (the rewind) the best fixed setting; the two halves on every judged measure,
    the rule's verdict for the rewind, its rewinds and whether its quiet runs equal Diffusion-DPO's."""
    regimes = {p.stem: json.loads(p.read_text()) for p in sorted(parts.glob("*.json"))}
    every = {f"{name}/{k}": r for name, report in regimes.items() for k, r in report["runs"].items()}
    report = {
        "description": __doc__.split("\n\n")[0].replace("\n", " "),
        "probe": {"probe_steps": PROBE_STEPS, "probe_pairs": "the config's default"},
        "measures": {
            "reward": "the demo's colour reward on the held-out prompts (the training's reward, unseen prompts)",
            "shape_iou": "the shape IoU of the held-out samples (online_measures.shape_scores); never trained on",
            "diversity": "mean pairwise RMS pixel distance between a prompt's samples; never trained on",
            "denoising_error": "the UNet's denoising MSE on clean drawings of the held-out captions; lower is better",
        },
        "regimes": regimes,
        **goal_record(regimes),
        "runs": len(every),
        "not_run": not_run(regimes),
    }
    path.write_text(json.dumps(report))
    print(f"wrote {path}")
    return 0


REWIND_START, REWIND_END = "<!-- rewind-tables:start -->", "<!-- rewind-tables:end -->"
ONLINE_REWIND_START, ONLINE_REWIND_END = "<!-- online-rewind-tables:start -->", "<!-- online-rewind-tables:end -->"


def _rewound(cell: dict[str, Any]) -> str:
    fired = sorted({r["fired_at"] for seed in cell["per_seed"].values() for r in seed["rewinds"]})
    restored = sorted({r["restored"] for seed in cell["per_seed"].values() for r in seed["rewinds"]})
    text = f"rewound in {cell['rewound']} of {cell['runs']} runs"
    if fired:
        text += f" (fired at step {', '.join(map(str, fired))}; restored step {', '.join(map(str, restored))})"
    return f"{text}, stopped in {cell['stopped']}"


def rewind_tables(path: Path) -> str:
    """The Markdown benchmarks/research/stability.md quotes from the probe study's result file (:func:`assemble`): per
    cell at the last evaluation step, each held-out measure's change against the base for Diffusion-DPO and the rewind,
    and the rewind's paired differences from Diffusion-DPO and the best fixed setting (95% t intervals, every setting
    with the probe on); its rewinds; the two halves and the rule's verdict."""
    report = json.loads(path.read_text())
    lines = []
    for regime, cells in report["analysis"].items():
        for cell, entry in cells.items():
            if study.REWIND not in entry:
                continue
            mine = entry[study.REWIND]
            last = max(mine["steps"], key=int)
            best = mine.get("best_fixed")
            quiet = report["quiet_identity"][regime].get(cell, {"quiet": 0, "equal_to_dpo": 0})
            lines += [
                f"{regime}, lr {entry['learning_rate']:g}, beta {entry['beta']:g}, step {last}, "
                f"{len(mine['seeds'])} seeds; {_rewound(report['rewinds'][regime][cell])}; quiet in {quiet['quiet']}, "
                f"of which {quiet['equal_to_dpo']} equal to Diffusion-DPO on every held-out measure; best fixed "
                f"setting: {LABELS.get(best, best)}:",
                "",
                *measure_table("rewind", mine, entry, last),
                "",
            ]
    for cell, judged_cell in report["goal_all_measures"].items():
        item = judged_cell["settings"].get(study.REWIND)
        if item is None:
            continue
        judged = ", ".join(
            f"{m} " + ("met" if v["met"] else f"missed by {v['miss']:.3f}") for m, v in item["measures"].items()
        )
        settings = judged_cell["settings"].items()
        others = [LABELS.get(m, m) for m, v in settings if m != study.REWIND and v["met"]]
        lines.append(
            f"- {cell}: {item['half']}: {'meets' if item['met'] else 'misses'} ({judged}); fixed settings "
            f"meeting it: {', '.join(others) or 'none'}"
        )
    rule = report["verdict"]
    if isinstance(rule, dict):
        lines += [
            "",
            f"Both halves: {'met' if rule['meets_both'] else 'not met'}; fixed settings meeting both: "
            f"{', '.join(rule['fixed_settings_meeting_both']) or 'none'}; becomes the default: "
            f"{'yes' if rule['becomes_default'] else 'no'}.",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from stability_probe_online import ONLINE_OUTPUT, ONLINE_REGIMES, ONLINE_SETTINGS, run_online

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("run", "assemble", "tables", "online", "online-tables"))
    parser.add_argument("--page", default=None, type=Path, help="tables: rewrite this page's marked block.")
    parser.add_argument("--parts", default="/tmp/stability-probe-parts", type=Path)
    parser.add_argument("--regime", default=None, help="run: only this regime.")
    parser.add_argument("--entries", default=None, help="run: only these REGIMES entries (indices, e.g. 0,1,2).")
    parser.add_argument("--json", default=None, type=Path, help=f"default: {OUTPUT}; online: {ONLINE_OUTPUT}")
    parser.add_argument("--online-regimes", default=",".join(ONLINE_REGIMES), help="online: of these.")
    parser.add_argument("--seeds", default="0-9", help="online: seeds, e.g. 0-9 or 0,3.")
    parser.add_argument("--settings", default=",".join(ONLINE_SETTINGS), help="online: of these.")
    args = parser.parse_args(argv)
    if args.command == "online":
        from benchmarks.studies.online_comparison import _ints

        regimes, settings = args.online_regimes.split(","), args.settings.split(",")
        if any(r not in ONLINE_REGIMES for r in regimes) or any(s not in ONLINE_SETTINGS for s in settings):
            parser.error(f"--online-regimes names only {list(ONLINE_REGIMES)}, --settings only {ONLINE_SETTINGS}")
        return run_online(regimes, _ints(args.seeds), settings, args.json or ONLINE_OUTPUT)
    if args.command == "online-tables":  # the online file's rewind against the goal, as `tables` offline
        text = rewind_tables(args.json or ONLINE_OUTPUT)
        if args.page is None:
            print(text)
            return 0
        study.write_block(args.page, ONLINE_REWIND_START, ONLINE_REWIND_END, text)
        return 0
    args.json = args.json or OUTPUT
    if args.command == "run":
        entries = None if args.entries is None else [int(i) for i in args.entries.split(",")]
        return run(args.parts, args.regime, entries)
    if args.command == "tables":
        text = rewind_tables(args.json)
        if args.page is None:
            print(text)
            return 0
        study.write_block(args.page, REWIND_START, REWIND_END, text)
        return 0
    return assemble(args.parts, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
