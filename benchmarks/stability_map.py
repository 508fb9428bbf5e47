"""Stability map on the toy demo: where does Diffusion-DPO's pathology bite, does a safeguard keep the reward?

Not part of the test suite. Sweeps, on the demo's base model and pairs (``trl_diffusion_sdpo.demo``), a star around
the demo's setting (learning rate 2e-5, beta 5000): the learning rate over ``--lrs`` at the demo's beta, and beta
over ``--betas`` at the demo's learning rate; for each cell and each training length in ``--lengths`` it runs the
demo with Diffusion-DPO and the safeguards in ``--methods`` (output, parameter and update space at mu 0.5 and 0.9),
``--seeds`` training seeds each. Per run it records the held-out reward change against the base, and per logged step
the winner's and loser's error against the reference (``delta/winner``, ``delta/loser``) and the implicit accuracy
(the demo's ``history.json``). A run shows the pathology when, over its last 10% of steps, ``delta/winner > 0``
while the implicit accuracy is above 0.5, and its reward change is negative.

    python benchmarks/stability_map.py --json benchmarks/results/stability-map-cpu.json          # full star
    python benchmarks/stability_map.py --lrs 2e-5,2e-4 --betas 5000 --lengths 200 --seeds 0 \\
        --methods dpo,sdpo-parameter --json benchmarks/results/stability-map-cpu-small.json  # a small grid

The default grid: 4 learning rates spanning 30x (6.7e-6 to 2e-4), 3 betas spanning 100x (500 to 50000), lengths
50 and 200, 7 methods, 3 seeds, batch 4 pairs: 6 cells x 2 lengths x 7 methods x 3 seeds = 252 runs (6,300 x 50
optimizer steps). At the demo's measured 9 s per 50-step run at 8 pairs (docs/demo.md), about 4.5 s at 4 pairs,
that is an estimate of roughly 45-55 minutes on a quiet 2-core machine; not measured end to end.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trl_diffusion_sdpo.demo.methods import METHODS, Method  # noqa: E402
from trl_diffusion_sdpo.demo.run import DemoRecipe, quiet_libraries, run_demo  # noqa: E402

DEMO_LR, DEMO_BETA = 2e-5, 5000.0
EXTRA_METHODS = (
    Method("sdpo-output-mu0.5", "SDPO output mu=0.5", safeguard=True, safeguard_mu=0.5),
    Method("sdpo-parameter-mu0.5", "SDPO parameter mu=0.5", True, 0.5, "parameter"),
    Method("sdpo-update", "SDPO update mu=0.9", True, 0.9, "update"),
    Method("sdpo-update-mu0.5", "SDPO update mu=0.5", True, 0.5, "update"),
)
DEFAULT_METHODS = (
    "dpo",
    "sdpo-output-mu0.5",
    "sdpo-output",
    "sdpo-parameter-mu0.5",
    "sdpo-parameter",
    "sdpo-update-mu0.5",
    "sdpo-update",
)


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def cells(lrs: list[float], betas: list[float]) -> list[tuple[float, float]]:
    """The star: every learning rate at the demo's beta, every beta at the demo's learning rate (no duplicates)."""
    out = [(lr, DEMO_BETA) for lr in lrs] + [(DEMO_LR, beta) for beta in betas]
    return list(dict.fromkeys(out))


def pathology(history: dict[str, list[float]], max_steps: int) -> dict[str, float]:
    """Over the last 10% of logged steps: mean winner and loser deltas, mean implicit accuracy."""
    steps = history["step"]
    last = [i for i, s in enumerate(steps) if s > 0.9 * max_steps] or [len(steps) - 1]

    def mean(key: str) -> float:
        return sum(history[key][i] for i in last) / len(last)

    return {
        "winner_delta": mean("delta/winner"),
        "loser_delta": mean("delta/loser"),
        "implicit_acc": mean("implicit_acc"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lrs", default="6.7e-6,2e-5,6.7e-5,2e-4")
    parser.add_argument("--betas", default="500,5000,50000")
    parser.add_argument("--lengths", default="50,200")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--json", required=True, help="Write every run's figures and histories here.")
    args = parser.parse_args(argv)
    for method in EXTRA_METHODS:  # the demo's own list stays as it is
        METHODS.setdefault(method.key, method)
    methods = tuple(args.methods.split(","))
    seeds = tuple(int(s) for s in args.seeds.split(","))
    report: dict = {"grid": vars(args), "cells": []}
    began_cpu, began = time.process_time(), time.perf_counter()
    with quiet_libraries(), tempfile.TemporaryDirectory(prefix="stability-") as workdir:
        for lr, beta in cells(_floats(args.lrs), _floats(args.betas)):
            for length in (int(v) for v in args.lengths.split(",")):
                recipe = DemoRecipe(
                    learning_rate=lr,
                    beta=beta,
                    max_steps=length,
                    warmup_steps=min(5, length // 10),
                    batch_size=args.batch_size,
                    seeds=seeds,
                    methods=methods,
                )
                out = Path(workdir) / f"lr{lr:g}-beta{beta:g}-steps{length}"
                summary = run_demo(out, recipe, echo=lambda line: None)
                histories = json.loads((out / "history.json").read_text())
                cell = {"learning_rate": lr, "beta": beta, "max_steps": length, "methods": {}}
                for key, result in summary["methods"].items():
                    runs = []
                    for run in result["runs"]:
                        history = histories[key][str(run["seed"])]
                        runs.append({**run, "last_10pct": pathology(history, length), "history": history})
                    cell["methods"][key] = {"reward_change": result["reward_change"], "runs": runs}
                report["cells"].append(cell)
                changes = {k: round(v["reward_change"]["mean"], 4) for k, v in cell["methods"].items()}
                print(f"lr {lr:g} beta {beta:g} steps {length}: reward change {changes}", flush=True)
    report["wall_seconds"] = time.perf_counter() - began
    report["process_cpu_seconds"] = time.process_time() - began_cpu
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
