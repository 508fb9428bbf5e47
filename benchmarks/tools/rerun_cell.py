"""Rerun one recorded cell of the studies' evidence from a clean checkout and compare it with its record.

The cell (the defaults): training seed 4 at learning rate 2e-4 and beta 5000, Diffusion-DPO and the output-space
safeguard at ``mu=0.5``, their held-out reward change against the base at step 50, as
``benchmarks/results/safeguard-comparison/cpu-safeguard-comparison-demo-lr1e-4-2e-4.json`` records them (one cell of
the paired comparison behind the README's "which setting" table). Everything is rebuilt the way
``benchmarks/studies/stability_map.py`` made the record, from what the file records: the benchmark's base from its
stored weights (``stability_map.load_study_base``: ``benchmarks/study_base/``, checked against its recipe hash and
SHA-256 digests), the preference pairs and the held-out evaluation from the file's ``recipe``, each run from its
``grid`` (pairs per step, samples per held-out prompt) and its run key (seed, learning rate, beta, method). A run
trains to the cell's step only: the schedule is constant after a fixed warmup, so the first 50 steps of the
recorded 200-step run are the 50-step run (``stability_map.py``'s docstring).

It compares, and prints, in the order a difference would arise: the base's held-out reward and the number of pairs
(the data), each run's reference errors at every step up to the cell's (they depend on the batches, timesteps and
noise alone), its loss at every step (the first step that departs from the record), and the held-out reward change
at the cell's step. ``--pretrained-base`` pretrains the base's recipe again instead of loading the stored weights,
and reports how far its weights lie from the stored ones: the way to see what the stored weights guard against.

    OMP_NUM_THREADS=1 python benchmarks/tools/rerun_cell.py [--json rerun.json]

Exit status 0 when everything compared agrees with the record (:func:`differences`: the data exactly, the reward
changes within ``--tolerance``, the traces within rounding), 1 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.studies.stability_map import (  # noqa: E402
    EXTRA_METHODS,
    STUDY_BASE,
    EvaluateAt,
    _run_key,
    load_study_base,
    machine,
    study_pairs,
)
from trl_diffusion_sdpo.cli.console import quiet_command_line  # noqa: E402
from trl_diffusion_sdpo.demo.base_check import compare_pipelines  # noqa: E402
from trl_diffusion_sdpo.demo.methods import METHODS  # noqa: E402
from trl_diffusion_sdpo.demo.pretrain import recipe_hash  # noqa: E402
from trl_diffusion_sdpo.demo.recipe import DemoRecipe  # noqa: E402
from trl_diffusion_sdpo.demo.run import train_preference  # noqa: E402

RECORD = "benchmarks/results/safeguard-comparison/cpu-safeguard-comparison-demo-lr1e-4-2e-4.json"
"""The result file the default cell is read from (a ``stability_map.py`` run)."""
SEED, LEARNING_RATE, BETA, STEP = 4, 2e-4, 5000.0, 50
TRACE_TOLERANCE = 1e-2
"""The largest difference of a loss or winner-delta trace from the record, relative to the trace's magnitude, that
still counts as rounding (:func:`differences`)."""
METHOD_KEYS = ("dpo", "sdpo-output-mu0.5")


def recorded_recipe(report: dict[str, Any]) -> tuple[DemoRecipe, list[str]]:
    """The demo recipe a ``stability_map.py`` file records (its ``recipe`` over the benchmark's base), and the
    recorded keys the demo's recipe no longer has (listed, not used: none of them reaches a run)."""
    fields = {f.name for f in dataclasses.fields(DemoRecipe)}
    recorded = report["recipe"]
    dropped = sorted(k for k in recorded if k not in fields)
    kept = {k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items() if k in fields}
    return DemoRecipe(pretrain=STUDY_BASE, **kept), dropped


def _unit(value: float) -> float:
    """One unit in the last of the 6 significant digits the files keep of ``value``."""
    return 10.0 ** (math.floor(math.log10(abs(value))) - 5) if value else 1e-12


def first_departure(recorded: list[float], rerun: list[float]) -> int | None:
    """The 1-based index of the first value of ``rerun`` that departs from ``recorded`` (both as the file rounds them,
    6 significant digits) by more than one unit in their last digit (one unit: where a value on a rounding boundary
    rounds either way), or ``None`` if they agree over ``rerun``'s length."""
    for index, (a, b) in enumerate(zip(recorded, rerun), start=1):
        if abs(a - b) > 1.0001 * _unit(a):
            return index
    return None


def largest_difference(recorded: list[float], rerun: list[float]) -> dict[str, float]:
    """The largest absolute difference between the two traces over ``rerun``'s steps, its step and values, and
    ``relative``: that difference over the recorded trace's largest magnitude there (a trace's values pass through 0,
    so a step's own value is no scale)."""
    pairs = list(zip(recorded, rerun))
    step, (a, b) = max(enumerate(pairs, start=1), key=lambda item: abs(item[1][0] - item[1][1]))
    scale = max(abs(value) for value, _ in pairs) or 1.0
    return {"step": step, "recorded": a, "rerun": b, "difference": b - a, "relative": abs(b - a) / scale}


def _rounded(values: list[float]) -> list[float]:
    return [float(f"{v:.6g}") for v in values]


def rerun(
    record: Path,
    seed: int = SEED,
    learning_rate: float = LEARNING_RATE,
    beta: float = BETA,
    step: int = STEP,
    methods: tuple[str, ...] = METHOD_KEYS,
    pretrained_base: bool = False,
) -> dict[str, Any]:
    """Rerun the cell of ``record`` and return the comparison (see the module's docstring)."""
    for method in EXTRA_METHODS:  # the studies' methods beside the demo's, as stability_map.py registers them
        METHODS.setdefault(method.key, method)
    report = json.loads(record.read_text())
    grid = report["grid"]
    if step not in [int(s) for s in str(grid["eval_steps"]).split(",")]:
        raise ValueError(f"{record} evaluated its runs at steps {grid['eval_steps']}, not {step}")
    keys = {key: _run_key(seed, learning_rate, beta, key) for key in methods}
    missing = [run for run in keys.values() if run not in report["runs"]]
    if missing:
        raise ValueError(f"{record} holds no run {', '.join(missing)}")
    recipe, dropped = recorded_recipe(report)
    base_recipe = dataclasses.replace(
        recipe, batch_size=grid["batch_size"], eval_seeds_per_prompt=grid["eval_seeds_per_prompt"]
    )
    result: dict[str, Any] = {
        "record": record.relative_to(ROOT).as_posix() if record.is_relative_to(ROOT) else str(record),
        "cell": {"seed": seed, "learning_rate": learning_rate, "beta": beta, "step": step, "methods": list(methods)},
        "recorded_keys_unused": dropped,
        "machine": machine(),
        "torch": torch.__version__,
    }
    torch.set_num_threads(1)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rerun-latents-") as latent_cache_dir:
        base, source = load_study_base(pretrain=pretrained_base)
        result["base_source"] = source
        if pretrained_base:
            stored, _ = load_study_base()
            result["pretrained_against_stored"] = compare_pipelines(base, stored)
        dataset, pair_stats, held_out, base_rewards = study_pairs(base, base_recipe)
        result["base"] = {
            "recipe_hash": {"recorded": report["base"]["recipe_hash"], "rerun": recipe_hash(STUDY_BASE)},
            "reward": {"recorded": report["base"]["reward"], "rerun": float(base_rewards.mean())},
            "pairs": {"recorded": report["base"]["pairs"], "rerun": pair_stats.num_kept},
        }
        result["runs"] = {}
        for key, run_key in keys.items():
            stored_run = report["runs"][run_key]
            run_recipe = dataclasses.replace(
                base_recipe, learning_rate=learning_rate, beta=beta, seeds=(seed,), methods=(key,), max_steps=step
            )
            evaluator = EvaluateAt([step], held_out, run_recipe)
            tick = time.perf_counter()
            _, history = train_preference(base, dataset, run_recipe, METHODS[key], seed, latent_cache_dir, [evaluator])
            reference = [_rounded(history["mse/ref_winner"]), _rounded(history["mse/ref_loser"])]
            # every step's reference errors where the file keeps their trace, else its first three steps'
            recorded_reference = (
                stored_run["reference_errors"].get("trace") or stored_run["reference_errors"]["first_steps"]
            )
            departures = {
                "reference_winner": first_departure(recorded_reference[0], reference[0]),
                "reference_loser": first_departure(recorded_reference[1], reference[1]),
                "loss": first_departure(stored_run["history"]["loss"], _rounded(history["loss"])),
                "winner_delta": first_departure(
                    stored_run["history"]["delta/winner"], _rounded(history["delta/winner"])
                ),
            }
            result["runs"][key] = {
                "run": run_key,
                "reward_change": {
                    "recorded": stored_run["reward_change"][str(step)],
                    "rerun": evaluator.rewards[step] - float(base_rewards.mean()),
                },
                "first_step_departing": departures,
                "largest_difference": {
                    name: largest_difference(stored_run["history"][key], _rounded(history[key]))
                    for name, key in (("loss", "loss"), ("winner_delta", "delta/winner"))
                },
                "loss_at_step_1": {
                    "recorded": stored_run["history"]["loss"][0],
                    "rerun": _rounded(history["loss"])[0],
                },
                "seconds": round(time.perf_counter() - tick, 1),
            }
    result["seconds"] = round(time.perf_counter() - began, 1)
    return result


def differences(result: dict[str, Any], tolerance: float, trace_tolerance: float = TRACE_TOLERANCE) -> list[str]:
    """What departs from the record: the base's recipe and pairs (exactly), its held-out reward and each run's reward
    change (within ``tolerance``), each run's reference errors (within the file's rounding: the same batches,
    timesteps and noise) and its loss and winner-delta traces (their largest difference within ``trace_tolerance`` of
    the trace's magnitude: float32 sums taken in another order differ from the last digits on, a run on other data
    or weights by its whole size)."""
    found = []
    base = result["base"]
    if base["recipe_hash"]["recorded"] != base["recipe_hash"]["rerun"]:
        found.append(f"base recipe {base['recipe_hash']['rerun']}, recorded {base['recipe_hash']['recorded']}")
    if base["pairs"]["recorded"] != base["pairs"]["rerun"]:
        found.append(f"{base['pairs']['rerun']} pairs, recorded {base['pairs']['recorded']}")
    if abs(base["reward"]["recorded"] - base["reward"]["rerun"]) > tolerance:
        found.append(f"base reward {base['reward']['rerun']:.4f}, recorded {base['reward']['recorded']:.4f}")
    for key, run in result["runs"].items():
        change = run["reward_change"]
        if abs(change["recorded"] - change["rerun"]) > tolerance:
            found.append(f"{key}: reward change {change['rerun']:+.4f}, recorded {change['recorded']:+.4f}")
        for trace in ("reference_winner", "reference_loser"):
            if run["first_step_departing"].get(trace) is not None:
                found.append(f"{key}: {trace} departs from the record at step {run['first_step_departing'][trace]}")
        for trace, largest in run.get("largest_difference", {}).items():
            if largest["relative"] > trace_tolerance:
                at, rerun_value, recorded = largest["step"], largest["rerun"], largest["recorded"]
                found.append(f"{key}: {trace} {rerun_value:.6g} at step {at}, recorded {recorded:.6g}")
    return found


def report_lines(result: dict[str, Any]) -> list[str]:
    cell = result["cell"]
    base = result["base"]
    lines = [
        f"{result['record']}: seed {cell['seed']}, lr {cell['learning_rate']:g}, beta {cell['beta']:g}, step "
        f"{cell['step']}; base {result['base_source']} (recipe {base['recipe_hash']['rerun']})",
        f"  base held-out reward {base['reward']['rerun']:.4f} (recorded {base['reward']['recorded']:.4f}), "
        f"{base['pairs']['rerun']} pairs (recorded {base['pairs']['recorded']})",
    ]
    for key, run in result["runs"].items():
        change, departing = run["reward_change"], run["first_step_departing"]
        where = ", ".join(f"{name} from step {at}" for name, at in departing.items() if at is not None)
        largest = ", ".join(
            f"{name} by {d['relative']:.1e} of its magnitude" for name, d in run.get("largest_difference", {}).items()
        )
        lines.append(
            f"  {key}: reward change {change['rerun']:+.6f} (recorded {change['recorded']:+.6f}); "
            + (
                f"past the file's rounding: {where}; at most {largest}"
                if where
                else f"every logged step up to {cell['step']} as recorded"
            )
        )
    if "pretrained_against_stored" in result:
        weights = ", ".join(
            f"{name} " + ("identical" if w.get("identical") else f"relative L2 {w['relative_l2']:.2e}")
            for name, w in result["pretrained_against_stored"].items()
        )
        lines.append(f"  the pretrained base against the stored one: {weights}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--record", default=RECORD, help="The stability_map.py result file (default: %(default)s).")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--lr", type=float, default=LEARNING_RATE)
    parser.add_argument("--beta", type=float, default=BETA)
    parser.add_argument("--step", type=int, default=STEP)
    parser.add_argument("--methods", default=",".join(METHOD_KEYS))
    parser.add_argument("--tolerance", type=float, default=5e-4, help="Largest difference that agrees (reward).")
    parser.add_argument(
        "--pretrained-base", action="store_true", help="Pretrain the base again instead of loading it."
    )
    parser.add_argument("--json", default=None, help="Write the comparison here.")
    args = parser.parse_args(argv)
    record = Path(args.record)
    record = record if record.is_absolute() else ROOT / record
    result = rerun(
        record, args.seed, args.lr, args.beta, args.step, tuple(args.methods.split(",")), args.pretrained_base
    )
    result["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    found = differences(result, args.tolerance)
    result["tolerance"], result["reproduced"], result["differences"] = args.tolerance, not found, found
    for line in report_lines(result):
        print(line)
    print("reproduced the record" if not found else "does not reproduce the record: " + "; ".join(found))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0 if not found else 1


if __name__ == "__main__":
    quiet_command_line(own_report=True)  # the script's own process: its report only
    sys.exit(main())
