"""The held-out probe's cost on the tiny SD LoRA run: its share of the training time, measured side by side in one
run (the time spent inside the probe's measurements over the run's ``train_runtime``).

    python benchmarks/speed/probe_cost.py --steps 60 --probe-steps 10 \\
        --out benchmarks/results/probe/cpu-probe-cost-tiny.json

The run: the tiny Stable Diffusion pipeline (``trl_diffusion_sdpo.testing``), LoRA, resolution 32, 2 pairs per step
on 24 coloured pairs, Diffusion-DPO, the probe at its default ``probe_pairs`` held back from them. One intra-op
thread; the machine's cores may be shared with other work, so the figure is a share, not a time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def measure(steps: int, probe_steps: int) -> dict:
    import torch
    from datasets import Dataset

    from tests.helpers.common import fast_config_values, lora_config, pickapic_rows
    from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer
    from trl_diffusion_sdpo.testing import build_tiny_sd_pipeline

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_tiny_sd_pipeline(seed=0, tokenizer_dir=os.path.join(tmp, "tok"))
        values = {**fast_config_values(os.path.join(tmp, "out")), "max_steps": steps, "logging_steps": 10}
        args = DiffusionSDPOConfig(**values, safeguard_space="none", probe_steps=probe_steps)
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
    parser.add_argument("--out", type=Path)
    options = parser.parse_args()
    runs = [measure(options.steps, every) for every in options.probe_steps]
    result = {
        "question": "the held-out probe's share of the training time on the tiny SD LoRA run",
        "command": "python benchmarks/speed/probe_cost.py " + " ".join(sys.argv[1:]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": 1},
        "note": "CPU shared with other work while measured; the share, not the times, is the figure",
        "runs": runs,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if options.out is not None:
        options.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
