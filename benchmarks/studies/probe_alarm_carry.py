"""Runs like a new user's, with every probe reading recorded: the calibration regimes the alarm's statistic is chosen
on, extended to small pair folders trained with LoRA at high learning rates, and the question whether Diffusion-DPO's
held-out reward follows the probe's rise later at lr 2e-4 with full tuning.

Not part of the test suite. Every run is Diffusion-DPO (``safeguard_space="none"``) on the benchmark's base
(:data:`stability_map.STUDY_BASE`), 2 pairs a step, the held-out probe logged every :data:`PROBE_STEPS` steps and never
acted on (``on_pathology`` at its default, ``warn``), its pairs held back from the training data (no eval split), and
the held-out colour reward (the demo's evaluation: the same prompts and noise as the base's) at every
:data:`EVAL_EVERY` steps and at the end. Regimes (:data:`CELLS`):

* a **user folder**: ``pairs`` rows drawn at random (seed :data:`FOLDER_SEED` plus the data seed) from the study's
  pairs of one data seed, sorted by prompt (as a folder written caption by caption reads) or shuffled; LoRA at lr
  5e-3, 1e-2, 2e-2 and 5e-2 for 60 steps, and at 2e-4 (where it holds); the probe's 4 pairs (or 16) held back from
  the folder;
* the study's whole pair set at lr 2e-4 with full tuning for 100 steps (where the probe's relative rise reads 1.2 to
  2.7 within 50 steps on runs whose reward held: does the reward follow?).

The data: seed 0 is the calibration dataset (the demo's data every alarm study chose on); seed 1 is the held-out
dataset (:data:`HELD_OUT_DATA`), which no choice reads. The held-out model is the UNet 1.5 times as wide at 64 px
(``probe_z_runs.wide_recipe``); its runs are the recorded ones of ``cpu-probe-z-runs.json`` (parts ``wide-*``): this
study trains none on it.

    OMP_NUM_THREADS=1 nice -n 10 nohup python benchmarks/studies/probe_alarm_carry.py run --worker 0/2 &
    OMP_NUM_THREADS=1 nice -n 10 nohup python benchmarks/studies/probe_alarm_carry.py run --worker 1/2 &
    python benchmarks/studies/probe_alarm_carry.py assemble   # benchmarks/results/probe/cpu-probe-alarm-carry.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from probe_alarm_sequential import OUTCOME  # noqa: E402  (the outcome study's earlier round, whose runs it reads)

OUTPUT = ROOT / "benchmarks" / "results" / "probe" / "cpu-probe-alarm-carry.json"
PARTS = Path("/tmp/probe-alarm-carry-parts")
PROBE_STEPS = 5
EVAL_EVERY = 10
FOLDER_SEED = 7000  # the user folders' draw: other rows than any study's
CALIBRATION_DATA, HELD_OUT_DATA = 0, 1
CALIBRATION = "calibration"
PROBE_KEYS = (
    "mse_policy_winner",
    "mse_ref_winner",
    "mse_policy_loser",
    "mse_ref_loser",
    "delta_winner",
    "delta_loser",
    "implicit_acc",
    "winner_rise_z",
)


@dataclass(frozen=True)
class Cell:
    """One regime: the data seed, the learning rate, the tuning, the folder's size (``0``: the study's whole pair
    set), its order, the probe's held-back pairs, and the steps."""

    data: int = CALIBRATION_DATA
    lr: float = 1e-2
    tuning: str = "lora"
    pairs: int = 40
    order: str = "sorted"
    probe_pairs: int = 4
    steps: int = 60

    @property
    def name(self) -> str:
        folder = f"folder{self.pairs}" if self.pairs else "all"
        shape = f"{self.tuning}-{folder}-{self.order}-probe{self.probe_pairs}"
        return f"data{self.data}-lr{self.lr:g}-{shape}-{self.steps}steps"

    @property
    def held_out(self) -> str:
        return "held-out dataset" if self.data == HELD_OUT_DATA else CALIBRATION


SEEDS = (0, 1, 2)
LORA_LRS = (5e-3, 1e-2, 2e-2, 5e-2)
#: in the order they run: the calibration folders first, the held-out dataset's, then the probe-size and
#: full-tuning cells
CELLS: tuple[Cell, ...] = (
    *(Cell(lr=lr) for lr in LORA_LRS),
    *(Cell(lr=lr, order="shuffled", pairs=30) for lr in LORA_LRS),
    *(Cell(data=HELD_OUT_DATA, lr=lr, pairs=50, order="shuffled") for lr in (5e-3, 1e-2, 2e-2)),
    Cell(lr=1e-2, pairs=60, order="shuffled", probe_pairs=16),
    Cell(lr=5e-3, pairs=60, order="shuffled", probe_pairs=16),
    Cell(lr=2e-4, tuning="full", pairs=0, steps=100),
    # where a folder's LoRA holds: the healthy runs of the same shapes
    Cell(lr=2e-4, pairs=60, order="shuffled", probe_pairs=16),
    Cell(lr=2e-4),
    Cell(data=HELD_OUT_DATA, lr=2e-4, pairs=50, order="shuffled"),
)


def run_key(cell: Cell, seed: int) -> str:
    return f"{cell.name}__seed{seed}"


def _method(cell: Cell) -> Any:
    from trl_diffusion_sdpo.demo.methods import METHODS, Method

    key = f"carry-dpo-probe{cell.probe_pairs}"
    config = (("probe_steps", PROBE_STEPS), ("probe_pairs", cell.probe_pairs))
    METHODS.setdefault(key, Method(key, "Diffusion-DPO, probe logged", False, config=config))
    return METHODS[key]


def folder(dataset: Any, cell: Cell) -> Any:
    """The cell's pair folder: ``cell.pairs`` rows of ``dataset`` drawn at random, sorted by prompt (the rows keep
    the study's order, which is by caption) or shuffled; the whole set where ``cell.pairs`` is 0."""
    if not cell.pairs:
        return dataset
    import random

    rows = sorted(random.Random(FOLDER_SEED + cell.data).sample(range(len(dataset)), cell.pairs))
    chosen = dataset.select(rows)
    return chosen.shuffle(seed=1234).flatten_indices() if cell.order == "shuffled" else chosen.flatten_indices()


class Recorder:
    """Every probe reading, as the trainer logs it."""

    def __new__(cls) -> Any:
        from transformers import TrainerCallback

        class _Recorder(TrainerCallback):
            def __init__(self) -> None:
                self.probe: list[dict[str, float]] = []

            def on_log(self, args, state, control, logs=None, **kwargs):
                logs = logs or {}
                if "probe/winner_rise_z" in logs:
                    reading = {"step": state.global_step}
                    reading.update({k: float(logs[f"probe/{k}"]) for k in PROBE_KEYS if f"probe/{k}" in logs})
                    self.probe.append(reading)

        return _Recorder()


def train_one(cell: Cell, seed: int) -> dict[str, Any]:
    """One Diffusion-DPO run of ``cell`` at training seed ``seed``: its probe readings and held-out rewards."""
    import stability_map
    import torch
    from rewind_outcome import Data, weights_digest

    from trl_diffusion_sdpo.demo.run import _evaluate, train_preference

    torch.set_num_threads(1)
    data = Data.get("benchmark", cell.data)
    method = _method(cell)
    recipe = dataclasses.replace(
        data["recipe"], learning_rate=cell.lr, tuning=cell.tuning, seeds=(seed,), methods=(method.key,),
        max_steps=cell.steps,
    )  # fmt: skip
    recorder = Recorder()
    evaluator = stability_map.EvaluateAt(list(range(EVAL_EVERY, cell.steps, EVAL_EVERY)), data["held_out"], recipe)
    tick = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="probe-alarm-carry-") as latents:
        pipeline, history = train_preference(
            data["base"], folder(data["dataset"], cell), recipe, method, seed, latents, [recorder, evaluator]
        )
    seconds = time.perf_counter() - tick
    pipeline.unet.eval()
    _, rewards = _evaluate(pipeline, data["held_out"], recipe)
    reward_at = {str(s): r for s, r in sorted(evaluator.rewards.items())}
    reward_at[str(cell.steps)] = float(rewards.mean())
    return {
        "cell": asdict(cell),
        "seed": seed,
        "base_reward": data["base_reward"],
        "reward_at": reward_at,
        "last_step": history["step"][-1],
        "probe": recorder.probe,
        "weights_sha256": weights_digest(pipeline.unet),
        "seconds": round(seconds, 1),
        "eval_seconds": round(evaluator.seconds, 1),
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }


#: the rewind study's Diffusion-DPO runs on the benchmark's base log the probe's ``z`` and ``delta_winner`` only; their
#: reference's winner error (one figure per run: the reference is frozen and the probe's draws start afresh at every
#: probe) is measured again by the first :data:`PROBE_STEPS` steps of each run, which train as the stored run's did
REFERENCE_STEPS = PROBE_STEPS


def reference_keys() -> list[tuple[Any, int]]:
    """The rewind study's cells on the benchmark's base in its earlier round (``probe_alarm_sequential.OUTCOME``) that
    set the probe's pairs and draws apart (data seed, order, probe source, tuning; not the learning rate or the
    steps), each with its seeds."""
    from probe_alarm_sequential import OUTCOME_SEEDS, outcome_cells

    seen: dict[tuple[Any, ...], Any] = {}
    for cell in outcome_cells():
        if cell.model == "benchmark":
            seen.setdefault((cell.data, cell.order, cell.probe, cell.tuning), cell)
    return [(cell, seed) for seed in OUTCOME_SEEDS for cell in seen.values()]


def reference_key(cell: Any, seed: int) -> str:
    return f"reference__data{cell.data}-{cell.tuning}-{cell.order}-{cell.probe}__seed{seed}"


def reference_one(cell: Any, seed: int) -> dict[str, Any]:
    """The probe's reading at step :data:`REFERENCE_STEPS` of the rewind study's Diffusion-DPO run of ``cell`` (its
    setting ``dpo``) at ``seed``, trained again for that many steps: its ``mse_ref_winner`` and the figures to check
    against the stored run's reading at that step."""
    import torch
    from rewind_outcome import Data, _methods

    from trl_diffusion_sdpo.demo.run import train_preference

    torch.set_num_threads(1)
    data = Data.get(cell.model, cell.data)
    method = _methods()["dpo"]
    recipe = dataclasses.replace(
        data["recipe"], learning_rate=cell.lr, tuning=cell.tuning, seeds=(seed,), methods=(method.key,),
        max_steps=cell.steps,
    )  # fmt: skip
    dataset = data["shuffled"] if cell.order == "shuffled" else data["dataset"]
    probe_pairs = data["eval_split"] if cell.probe == "eval-split" else None
    recorder = Recorder()
    with tempfile.TemporaryDirectory(prefix="probe-alarm-carry-") as latents:
        # the stored run's schedule (its max_steps), stopped after its first probe
        callbacks = [recorder, _StopAfter(REFERENCE_STEPS)]
        train_preference(data["base"], dataset, recipe, method, seed, latents, callbacks, probe_pairs)
    return {"cell": asdict(cell), "seed": seed, "reading": recorder.probe[-1]}


class _StopAfter:
    """Stops training at the end of step ``step`` (after the probe of that step has logged)."""

    def __new__(cls, step: int) -> Any:
        from transformers import TrainerCallback

        class _Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step >= step:
                    control.should_training_stop = True

        return _Stop()


def run(parts: Path, worker: int, workers: int) -> int:
    """Train what ``parts`` lacks, seed by seed across the cells, each run written to its own file at once (worker
    ``worker`` of ``workers`` takes every ``workers``-th run)."""
    parts.mkdir(parents=True, exist_ok=True)
    # the first seed of every cell, the references (short), then the later seeds: a study cut short holds whole seeds
    todo = [(run_key(c, SEEDS[0]), train_one, c, SEEDS[0]) for c in CELLS]
    todo += [(reference_key(c, s), reference_one, c, s) for c, s in reference_keys()]
    todo += [(run_key(c, seed), train_one, c, seed) for seed in SEEDS[1:] for c in CELLS]
    todo = [t for i, t in enumerate(todo) if i % workers == worker]
    todo = [t for t in todo if not (parts / f"{t[0]}.json").exists()]
    print(f"{len(todo)} runs to do", flush=True)
    for key, train, cell, seed in todo:
        tick = time.perf_counter()
        result = train(cell, seed)
        path = parts / f"{key}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, path)
        print(f"{key}: {time.perf_counter() - tick:.0f} s", flush=True)
    return 0


def assemble(parts: Path, output: Path = OUTPUT) -> int:
    """Every run of ``parts`` in one result file, with the machine, the load and the commands."""
    import stability_map

    runs = {p.stem: json.loads(p.read_text()) for p in sorted(parts.glob("data*__seed*.json"))}
    references = {p.stem: json.loads(p.read_text()) for p in sorted(parts.glob("reference__*.json"))}
    planned = [run_key(c, s) for s in SEEDS for c in CELLS]
    out = {
        "description": (
            "Diffusion-DPO runs like a new user's (small pair folders, sorted or shuffled, no eval split: the probe's "
            "pairs held back, LoRA at lr 5e-3 to 5e-2, 60 steps) and full tuning at lr 2e-4 for 100 steps, on the "
            "benchmark's base, every probe reading and the held-out colour reward every 10 steps recorded; the "
            "probe logged, never acted on."
        ),
        "commands": [
            "OMP_NUM_THREADS=1 nice -n 10 python benchmarks/studies/probe_alarm_carry.py run --worker i/2 (i = 0, 1)",
            "python benchmarks/studies/probe_alarm_carry.py assemble",
        ],
        "machine": stability_map.machine(),
        "load": "a 2-core CPU shared with other work throughout (each run records its load average); runs' seconds "
        "are wall times under that load",
        "protocol": {
            "model": "the benchmark's base (stability_map.STUDY_BASE)",
            "held_out": {
                "dataset": f"data seed {HELD_OUT_DATA}: the demo's data at that seed, never read by a choice",
                "model": "wide (probe_z_runs.wide_recipe): its recorded runs in cpu-probe-z-runs.json, never read by "
                "a choice; none trained here",
            },
            "probe_steps": PROBE_STEPS,
            "eval_every": EVAL_EVERY,
            "seeds": list(SEEDS),
            "folder_seed": FOLDER_SEED,
            "batch_size": 2,
        },
        "cells": [asdict(c) | {"name": c.name, "held_out": c.held_out} for c in CELLS],
        "runs_planned": len(planned),
        "runs_done": len(runs),
        "not_run": [k for k in planned if k not in runs],
        "runs": runs,
        "references": references,
    }
    output.write_text(json.dumps(out, indent=1) + "\n")
    print(f"{output}: {len(runs)} of {len(planned)} runs")
    return 0


# ------------------------------------------------------------------------------------------------------ analysis

Z_RUNS = ROOT / "benchmarks" / "results" / "probe" / "cpu-probe-z-runs.json"
DOC = ROOT / "benchmarks" / "research" / "alarm.md"
START, END = "<!-- probe-alarm-carry-tables:start -->", "<!-- probe-alarm-carry-tables:end -->"
USER_DOC = ROOT / "docs" / "safeguard.md"
USER_START, USER_END = "<!-- probe-alarm-carry:begin -->", "<!-- probe-alarm-carry:end -->"


#: the probe's figures a record keeps: the relative rise's and the significance floor's
KEPT = ("delta_winner", "mse_ref_winner", "winner_rise_z")


def _readings(probe: list[dict[str, Any]], reference: float | None = None) -> list[dict[str, float]]:
    """A run's readings under the probe's own metric names, the figures the rule reads (``reference``: the run's
    ``mse_ref_winner`` where its record lacks it)."""
    out = []
    for p in probe:
        reading = {"step": p["step"], **{f"probe/{k}": p[k] for k in KEPT if k in p}}
        if reference is not None:
            reading["probe/mse_ref_winner"] = reference
        out.append(reading)
    return out


def _label(changes: dict[int, float]) -> str:
    from probe_alarm_sequential import run_class

    return run_class({"reward_change": changes})


def records(carry: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """Every run with the probe logged and never acted on whose readings give the relative rise, as
    ``tests.helpers.alarm_choice`` reads them (its module docstring), and what could not be read (why)."""
    from probe_alarm import load_z_runs

    out, missing = [], []
    for run in load_z_runs(Z_RUNS):
        wide = run["model"] == "wide"
        tuning = "LoRA" if run["mode"] == "online" else "full"
        axis = "held-out model" if wide else CALIBRATION
        out.append({
            "id": f"z-runs/{run['id']}", "held_out": axis, "class": _label(run["reward_change"]),
            "group": f"{axis}, {run['mode']} {tuning}, probe 4 held back",
            "regime": f"{run['cell']}, {'safeguard' if run['safeguard'] else 'Diffusion-DPO'}",
            "probe": _readings(run["probe"]),
        })  # fmt: skip
    references = {
        (json.dumps(r["cell"], sort_keys=True), r["seed"]): r["reading"] for r in carry["references"].values()
    }
    outcome = json.loads(OUTCOME.read_text())
    for key, run in outcome["runs"].items():
        cell = run["cell"]
        if run["setting"] != "dpo" or "model" not in cell:
            continue
        axis = {("benchmark", 0): CALIBRATION, ("benchmark", 1): "held-out dataset"}.get(
            (cell["model"], cell["data"]), "held-out model"
        )
        ref_cell = next(
            (c for c, s in reference_keys() if s == run["seed"] and (c.model, c.data, c.order, c.probe, c.tuning)
             == (cell["model"], cell["data"], cell["order"], cell["probe"], cell["tuning"])), None)  # fmt: skip
        reading = (
            None if ref_cell is None else references.get((json.dumps(asdict(ref_cell), sort_keys=True), run["seed"]))
        )
        if reading is None:
            missing.append(f"outcome/{key}: its reference's error not measured")
            continue
        source = "eval split" if cell["probe"] == "eval-split" else "held back"
        changes = {int(s): r - run["base_reward"] for s, r in run["reward_at"].items()}
        # the stored run's first probe checks the one trained again where they are the same run (same rate, steps)
        check = {"reference_check": {"stored": run["probe"][0], "again": reading}} if asdict(ref_cell) == cell else {}
        out.append({
            **check, "id": f"outcome/{key}", "held_out": axis, "class": _label(changes),
            "group": f"{axis}, offline {'LoRA' if cell['tuning'] == 'lora' else 'full'}, probe 4 {source}",
            "regime": f"{cell['model']}-data{cell['data']}, {cell['tuning']}, {cell['order']}, {source}, "
            f"lr {cell['lr']:g}, {cell['steps']} steps",
            "probe": _readings(run["probe"], reading["mse_ref_winner"]),
        })  # fmt: skip
    for key, run in carry["runs"].items():
        cell = Cell(**run["cell"])
        changes = {int(s): r - run["base_reward"] for s, r in run["reward_at"].items()}
        folder_ = f"{cell.pairs}-pair folder" if cell.pairs else "all pairs"
        out.append({
            "id": f"carry/{key}", "held_out": cell.held_out, "class": _label(changes),
            "group": f"{cell.held_out}, offline {'LoRA' if cell.tuning == 'lora' else 'full'}, "
            f"probe {cell.probe_pairs} held back",
            "regime": f"benchmark-data{cell.data}, {cell.tuning}, {folder_} {cell.order}, lr {cell.lr:g}, "
            f"{cell.steps} steps",
            "probe": _readings(run["probe"]),
        })  # fmt: skip
    return out, missing


def analyse(path: Path = OUTPUT) -> dict[str, Any]:
    """The relative rise's rule chosen on the calibration records (``tests.helpers.alarm_choice.choose``), and its
    rates per group on every record, held-out groups included; written into ``path``'s ``analysis``."""
    from tests.helpers import alarm_choice
    from trl_diffusion_sdpo.callbacks.rewind import ProbeAlarmRule

    carry = json.loads(path.read_text())
    every, missing = records(carry)
    chosen = alarm_choice.choose(alarm_choice.calibration_records(every))
    rule = ProbeAlarmRule.relative(chosen["rise"], chosen["z_floor"], chosen["patience"])
    wrong = [
        {"id": r["id"], "group": r["group"], "regime": r["regime"], "class": r["class"],
         "peak_rise": alarm_choice.peak_rise(r), "peak_z": max(p["probe/winner_rise_z"] for p in r["probe"])}
        for r in every
        if r["class"] != "dipped" and (r["class"] == "healthy") == bool(alarm_choice.fires(rule, r))
    ]  # fmt: skip
    checks = [r["reference_check"] for r in every if "reference_check" in r]
    reference_check = {
        "runs": len(checks),
        "largest_z_difference": max((abs(c["stored"]["winner_rise_z"] - c["again"]["winner_rise_z"]) for c in checks),
                                    default=None),
        "largest_delta_winner_difference": max(
            (abs(c["stored"]["delta_winner"] - c["again"]["delta_winner"]) for c in checks), default=None),
        "what": "the stored run's first probe (step 5) against the same run trained again for 5 steps here, whose "
        "mse_ref_winner the record takes (the stored runs used 2 torch threads, these 1)",
    }  # fmt: skip
    carry["analysis"] = {
        "reference_check": reference_check,
        "statistic": "r_t = probe/delta_winner / probe/mse_ref_winner (callbacks.rewind.relative_winner_rise); a "
        "probe is unhealthy where r_t > rise and probe/winner_rise_z > z_floor; the alarm fires at patience "
        "unhealthy probes in a row",
        "labels": "probe_alarm_sequential.run_class at tolerance 0.02 on the held-out colour reward at every "
        "evaluation: breaking (ends below), healthy (never below), dipped (below and back: neither)",
        "chosen": chosen,
        "chosen_on": sorted({r["group"] for r in alarm_choice.calibration_records(every)}),
        "targets": {"quiet": alarm_choice.QUIET_TARGET, "firing": alarm_choice.FIRING_TARGET},
        "groups": alarm_choice.rates(rule, every),
        "wrong": wrong,
        "not_read": missing,
        "records": every,
    }
    path.write_text(json.dumps(carry, indent=1) + "\n")
    return carry["analysis"]


def tables(analysis: dict[str, Any]) -> str:
    """The chosen rule in a sentence and its per-group table (``tests.helpers.alarm_choice.table``)."""
    from tests.helpers import alarm_choice
    from trl_diffusion_sdpo.callbacks.rewind import ProbeAlarmRule

    chosen = analysis["chosen"]
    rule = ProbeAlarmRule.relative(chosen["rise"], chosen["z_floor"], chosen["patience"])
    tied = ", ".join(f"{v:g}" for v in chosen["tied_rises"])
    head = (
        f"Chosen on the calibration records: the rise above {chosen['rise']:g} of the reference's error with "
        f"`probe/winner_rise_z` above {chosen['z_floor']:g}, at {chosen['patience']} probe(s) in a row (the "
        f"thresholds tied on every criterion: {tied}; the middle one is taken)."
    )
    return f"{head}\n\n{alarm_choice.table(rule, analysis['records'])}"


def _write_block(page: Path, start: str, end: str, block: str) -> None:
    head, rest = page.read_text().split(start, 1)
    page.write_text(f"{head}{start}\n\n{block}\n{end}{rest.split(end, 1)[1]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("run", "assemble", "analyse", "table"))
    parser.add_argument("--worker", default="0/1", help="i/n: this process trains every n-th run from the i-th")
    parser.add_argument("--parts", type=Path, default=PARTS)
    parser.add_argument("--page", action="store_true", help=f"table: write it into {DOC.name}'s marked block")
    args = parser.parse_args(argv)
    if args.command == "run":
        worker, workers = (int(v) for v in args.worker.split("/"))
        return run(args.parts, worker, workers)
    if args.command == "assemble":
        return assemble(args.parts)
    if args.command == "analyse":
        analyse()
    analysis = json.loads(OUTPUT.read_text())["analysis"]
    block = tables(analysis)
    if args.page:
        _write_block(DOC, START, END, block)
        # docs/safeguard.md: the table alone, under the config's rule (tests/docs/test_probe_alarm_carry_table.py)
        _write_block(USER_DOC, USER_START, USER_END, block.split("\n\n", 1)[1])
    print(block)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
