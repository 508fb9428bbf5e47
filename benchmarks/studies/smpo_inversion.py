"""SmPO on the toy demo with and without its ReNoise inversion: held-out reward and the winner's error.

Not part of the test suite. On the benchmark's base (``stability_map.STUDY_BASE``), its preference pairs (with the
colour rewards as SmPO's score columns, normalised over the reward's range [0, 1]) and its held-out evaluation
(``trl_diffusion_sdpo.demo``), it trains SmPO (``loss_type="smpo"``, no safeguard, the demo's learning rate, beta and
steps) with ``noising="inversion"`` (the paper's method, this package's default for SmPO: 5 inversion steps, 2 renoise
evaluations, the policy inverting) and with ``noising="forward"`` (SmPO's smoothed preference alone), for every seed in
``--seeds``; per run it records the held-out reward change against the base at the end, the step time, and the logged
winner's and loser's error against the reference (``delta/winner``, ``delta/loser``, mean over the last 10% of steps;
each run's errors are on its own noised inputs, so these compare the runs' own objectives, not a common measurement).

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/studies/smpo_inversion.py \
        --json benchmarks/results/objectives/cpu-smpo-inversion-demo.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.studies.stability_map import STUDY_BASE, load_study_base  # noqa: E402
from trl_diffusion_sdpo.cli.console import quiet_command_line  # noqa: E402
from trl_diffusion_sdpo.demo.methods import Method  # noqa: E402
from trl_diffusion_sdpo.demo.pairs import make_preference_pairs  # noqa: E402
from trl_diffusion_sdpo.demo.pretrain import recipe_hash  # noqa: E402
from trl_diffusion_sdpo.demo.recipe import DemoRecipe  # noqa: E402
from trl_diffusion_sdpo.demo.run import _evaluate, train_preference  # noqa: E402
from trl_diffusion_sdpo.demo.shapes import split_captions  # noqa: E402

# The colour reward lies in [0, 1]: SmPO's min-max normalisation over that range.
SMPO = (("loss_type", "smpo"), ("smpo_score_min", 0.0), ("smpo_score_max", 1.0))
METHODS = {
    "smpo-inversion": Method(
        "smpo-inversion", "SmPO (ReNoise inversion)", False, config=SMPO + (("noising", "inversion"),)
    ),
    "smpo-forward": Method("smpo-forward", "SmPO (forward noising)", False, config=SMPO + (("noising", "forward"),)),
}
HISTORY_KEYS = ("step", "loss", "delta/winner", "delta/loser", "implicit_acc")


def last_window(history: dict[str, list[float]]) -> dict[str, float]:
    """Means of the winner's and loser's error deltas and the implicit accuracy over the last 10% of logged steps."""
    steps = history["step"]
    last = [i for i, s in enumerate(steps) if s > 0.9 * steps[-1]] or [len(steps) - 1]
    return {k: float(np.mean([history[k][i] for i in last])) for k in ("delta/winner", "delta/loser", "implicit_acc")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--methods", default="smpo-inversion,smpo-forward")
    parser.add_argument("--max-steps", type=int, default=None, help="Default: the demo's.")
    parser.add_argument("--json", required=True, help="Results file; finished runs in it are skipped on a rerun.")
    args = parser.parse_args(argv)
    path = Path(args.json)
    report: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"runs": {}, "invocations": []}
    invocation = {"load_average_start": [round(v, 2) for v in os.getloadavg()], "cpu_count": os.cpu_count()}
    report["invocations"].append(invocation)
    torch.set_num_threads(1)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="smpo-latents-") as latent_cache_dir:
        recipe = DemoRecipe(pretrain=STUDY_BASE, **({} if args.max_steps is None else {"max_steps": args.max_steps}))
        base, _ = load_study_base()
        pair_captions, held_out = split_captions(recipe.num_held_out_prompts, recipe.seed)
        dataset, stats = make_preference_pairs(
            base,
            pair_captions,
            recipe.pairs_per_prompt,
            recipe.min_reward_margin,
            recipe.num_inference_steps,
            recipe.guidance_scale,
            seed=100_000 * recipe.seed,
            scores=True,
        )
        _, base_rewards = _evaluate(base, held_out, recipe)
        report["base"] = {
            "reward": float(base_rewards.mean()),
            "recipe_hash": recipe_hash(recipe.pretrain),
            "pairs": stats.num_kept,
            "mean_margin": stats.mean_margin,
        }
        report["recipe"] = {k: v for k, v in recipe.to_dict().items() if k != "pretrain"}
        for seed in [int(s) for s in args.seeds.split(",")]:
            for key in args.methods.split(","):
                run_key = f"seed{seed}-{key}"
                if run_key in report["runs"]:
                    continue
                tick = time.perf_counter()
                pipeline, history = train_preference(base, dataset, recipe, METHODS[key], seed, latent_cache_dir)
                seconds = time.perf_counter() - tick
                _, rewards = _evaluate(pipeline, held_out, recipe)
                report["runs"][run_key] = {
                    "seed": seed,
                    "method": key,
                    "reward_change": float(rewards.mean()) - report["base"]["reward"],
                    "window": last_window(history),
                    "history": {k: history[k] for k in HISTORY_KEYS if k in history},
                    "train_seconds": round(seconds, 1),
                }
                invocation["wall_seconds"] = round(time.perf_counter() - began, 1)
                invocation["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(report))
                run = report["runs"][run_key]
                print(
                    f"{run_key}: reward change {run['reward_change']:+.4f}, window {run['window']} ({seconds:.0f} s)"
                )
    summary = {}
    for key in args.methods.split(","):
        runs = [r for r in report["runs"].values() if r["method"] == key]
        changes = np.array([r["reward_change"] for r in runs])
        winner = np.array([r["window"]["delta/winner"] for r in runs])
        summary[key] = {
            "seeds": len(runs),
            "reward_change_mean": float(changes.mean()),
            "reward_change_std": float(changes.std(ddof=1)) if len(runs) > 1 else None,
            "delta_winner_mean": float(winner.mean()),
            "delta_winner_std": float(winner.std(ddof=1)) if len(runs) > 1 else None,
            "train_seconds_mean": float(np.mean([r["train_seconds"] for r in runs])),
        }
    report["summary"] = summary
    path.write_text(json.dumps(report, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    quiet_command_line(own_report=True)  # the script's own process: its report only
    sys.exit(main())
