"""Step time of SmPO's ReNoise inversion against forward noising, side by side in one run.

One ``DiffusionSDPOTrainer`` (``benchmarks/harness.py``'s trainer: the Diffusion-DPO objective with the config's
default output-space safeguard, synthetic pairs, the UNet presets) whose noising stage is swapped step by step:
forward noising, inversion with the policy inverting (SmPO's code), inversion with the reference inverting. The modes
alternate on the same trainer, model, batches and seconds, so a shared machine's drifts hit them alike. Reported per
mode: the median wall and process-CPU step time after warm-up, and the ratio to forward noising. Inversion:
``--inversion-steps`` (SmPO: 5 for SD1.5) grid steps with ``--renoise`` evaluations each; a pair takes the grid
points below its timestep, so a step costs on average about ``steps * renoise / 2`` extra no-grad forward passes of
the batch (timesteps are uniform).

    OMP_NUM_THREADS=1 python benchmarks/speed/inversion_cost.py --runs uncached-full,uncached-lora \\
        --output benchmarks/results/objectives/cpu-inversion-cost-small.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: the package, benchmarks.harness


import torch  # noqa: E402

from benchmarks.harness import (  # noqa: E402
    Clock,
    add_setup_arguments,
    machine_description,
    make_trainer,
    resolve_setup,
)

MODES = ("forward", "inversion-policy", "inversion-reference")


def run(opts: argparse.Namespace, run_name: str) -> dict[str, Any]:
    from transformers import TrainerCallback

    from trl_diffusion_sdpo.families.inversion import DDIMInversionNoiser, InversionSettings

    num_steps = (opts.warmup + opts.steps) * len(MODES)
    with tempfile.TemporaryDirectory() as workdir:
        trainer, _ = make_trainer(opts, run_name, workdir, num_steps)
        forward = trainer.stages.noiser
        scheduler_config = trainer.pipeline.scheduler.config
        noisers = {
            "forward": forward,
            **{
                f"inversion-{network}": DDIMInversionNoiser(
                    forward, InversionSettings(opts.inversion_steps, opts.renoise, network), scheduler_config
                )
                for network in ("policy", "reference")
            },
        }
        clock = Clock(opts.device)
        times: dict[str, list[tuple[float, float]]] = {mode: [] for mode in MODES}

        class Alternate(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                clock.reset()

            def on_step_begin(self, args, state, control, **kwargs):
                trainer.stages.noiser = noisers[MODES[state.global_step % len(MODES)]]

            def on_step_end(self, args, state, control, **kwargs):
                times[MODES[(state.global_step - 1) % len(MODES)]].append(clock.lap())

        trainer.add_callback(Alternate())
        trainer.train()
    rows = {}
    for mode in MODES:
        kept = times[mode][opts.warmup :]
        rows[mode] = {
            "median_step_s": statistics.median(w for w, _ in kept),
            "median_step_cpu_s": statistics.median(c for _, c in kept),
            "step_times_s": [w for w, _ in kept],
        }
    for mode in MODES:
        rows[mode]["ratio_to_forward"] = rows[mode]["median_step_s"] / rows["forward"]["median_step_s"]
        rows[mode]["cpu_ratio_to_forward"] = rows[mode]["median_step_cpu_s"] / rows["forward"]["median_step_cpu_s"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_setup_arguments(parser)
    parser.add_argument("--steps", type=int, default=8, help="measured steps per mode")
    parser.add_argument("--warmup", type=int, default=2, help="steps per mode discarded before measuring")
    parser.add_argument("--runs", default="uncached-full,uncached-lora")
    parser.add_argument("--inversion-steps", type=int, default=5)
    parser.add_argument("--renoise", type=int, default=2)
    parser.add_argument("--output", required=True)
    opts = parser.parse_args()
    resolve_setup(opts)
    torch.manual_seed(0)
    began = time.perf_counter()
    report: dict[str, Any] = {
        "machine": machine_description(opts.device),
        "setup": {k: v for k, v in vars(opts).items() if k != "output"},
        "load_average_start": [round(v, 2) for v in os.getloadavg()],
        "runs": {},
    }
    for name in opts.runs.split(","):
        report["runs"][name] = run(opts, name)
        print(name, json.dumps({m: round(r["ratio_to_forward"], 2) for m, r in report["runs"][name].items()}))
    report["wall_s"] = round(time.perf_counter() - began, 1)
    report["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    with open(opts.output, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
