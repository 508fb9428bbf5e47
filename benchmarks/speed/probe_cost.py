"""The held-out probe's cost on the tiny SD LoRA run: its share of the training time, measured side by side in one
run (the time spent inside the probe's measurements over the run's ``train_runtime``).

    python benchmarks/speed/probe_cost.py --steps 60 --probe-steps 10 \\
        --out benchmarks/results/probe/cpu-probe-cost-tiny.json
    python benchmarks/speed/probe_cost.py --steps 100 --probe-steps 20 --draws 1 4 8 16 \\
        --out benchmarks/results/probe/cpu-probe-cost-draws-tiny.json  # probe_noise_draws

The run: the tiny Stable Diffusion pipeline (``trl_diffusion_sdpo.testing``), LoRA, resolution 32, 2 pairs per step
on 24 coloured pairs, Diffusion-DPO, the probe at its default ``probe_pairs`` held back from them. One intra-op
thread; the machine's cores may be shared with other work, so the figure is a share, not a time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import machine_description  # noqa: E402


def measure(steps: int, probe_steps: int, draws: int | None = None) -> dict:
    import torch
    from datasets import Dataset

    from tests.helpers.common import fast_config_values, lora_config, pickapic_rows
    from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer
    from trl_diffusion_sdpo.testing import build_tiny_sd_pipeline

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_tiny_sd_pipeline(seed=0, tokenizer_dir=os.path.join(tmp, "tok"))
        values = {**fast_config_values(os.path.join(tmp, "out")), "max_steps": steps, "logging_steps": 10}
        extra = {} if draws is None else {"probe_noise_draws": draws}
        args = DiffusionSDPOConfig(**values, safeguard_space="none", probe_steps=probe_steps, **extra)
        data = Dataset.from_list(pickapic_rows(24))
        trainer = DiffusionSDPOTrainer(pipe, args=args, train_dataset=data, peft_config=lora_config())
        probe = trainer.probe.probe
        spent: list[float] = []
        timed = probe.measure

        def timed_measure(*a, **k):  # the benchmark's own object: its time, the figures unchanged
            start = time.perf_counter()
            try:
                return timed(*a, **k)
            finally:
                spent.append(time.perf_counter() - start)

        probe.measure = timed_measure
        output = trainer.train()
    runtime = output.metrics["train_runtime"]
    return {
        "steps": steps,
        "probe_steps": probe_steps,
        "probe_pairs": args.probe_pairs,
        "probe_noise_draws": args.probe_noise_draws,
        "probes": len(spent),
        "train_runtime_s": runtime,
        "probe_s": sum(spent),
        "first_probe_s": spent[0],
        "probe_share_of_training": sum(spent) / runtime,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--probe-steps", type=int, nargs="+", default=[10])
    parser.add_argument(
        "--draws", type=int, nargs="+", default=[None], help="probe_noise_draws (default: the config's)."
    )
    parser.add_argument("--out", type=Path)
    options = parser.parse_args()
    runs = [measure(options.steps, every, draws) for every in options.probe_steps for draws in options.draws]
    result = {
        "question": "the held-out probe's share of the training time on the tiny SD LoRA run",
        "command": "python benchmarks/speed/probe_cost.py " + " ".join(sys.argv[1:]),
        "machine": machine_description("cpu", threads=1),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "note": "CPU shared with other work while measured; the share, not the times, is the figure",
        "runs": runs,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if options.out is not None:
        options.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
