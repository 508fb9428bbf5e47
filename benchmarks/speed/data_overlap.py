"""How long the training loop waits for its next batch when images are encoded every step, with the batches loaded
in the training process (0 workers) and by worker processes, in one run each, side by side.

Not part of the test suite. CPU, one thread for the step. The ``small`` preset (its VAE at an eighth of SD's width, so
encoding is about as large a share of the step as with the real models) on Pick-a-Pic-style JPEG pairs decoded every
step, Diffusion-DPO, full tuning. Per optimizer step: its time (``on_step_begin`` to ``on_step_end``) and the wait
before it (the previous ``on_step_end`` to its ``on_step_begin``: where transformers fetches the window's batches),
median over ``--steps`` steps after ``--warmup``. On a GPU the same workers overlap the host's share (reading,
decoding, collating) with the device's step; the encoders' own compute stays in the step.

    python benchmarks/speed/data_overlap.py --resolution 512 --steps 6 --warmup 1 \
        --json benchmarks/results/step-time/cpu-data-overlap-small-512px.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import harness  # noqa: E402


class StepClock(TrainerCallback):
    """Each step's time and the wait for its batches before it."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self.waits: list[float] = []
        self._begin = self._end = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._begin = time.perf_counter()
        if self._end is not None:
            self.waits.append(self._begin - self._end)

    def on_step_end(self, args, state, control, **kwargs):
        self._end = time.perf_counter()
        self.steps.append(self._end - self._begin)


def run(workers: int, opts: argparse.Namespace, args: argparse.Namespace) -> dict:
    opts.dataloader_num_workers = workers
    with tempfile.TemporaryDirectory() as workdir:
        trainer, _ = harness.make_trainer(opts, "encoded-full", workdir, args.warmup + args.steps + 1)
        clock = StepClock()
        trainer.add_callback(clock)
        trainer.train()
    waits, steps = clock.waits[args.warmup :], clock.steps[args.warmup + 1 :]
    row = {
        "dataloader_num_workers": workers,
        "median_step_s": statistics.median(steps),
        "median_wait_s": statistics.median(waits),
        "wait_share": statistics.median(waits) / (statistics.median(waits) + statistics.median(steps)),
        "step_times_s": steps,
        "wait_times_s": waits,
    }
    print(json.dumps({k: v for k, v in row.items() if not k.endswith("times_s")}))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="0,1")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    opts = argparse.Namespace(
        unet="small", device="cpu", channels_last=False, resolution=args.resolution, batch_size=2, dtype="fp32",
        optim="adamw_torch", max_grad_norm=1.0, torch_compile=False, dataloader_num_workers=0, loss_type="dpo",
        gradient_checkpointing=False, lora_rank=8, dataset_batches=args.warmup + args.steps + 2, stock_step=False,
    )  # fmt: skip
    rows = [run(int(w), opts, args) for w in args.workers.split(",")]
    result = {
        "machine": harness.machine_description("cpu", 1),
        "settings": vars(args) | {"json": str(args.json)},
        "rows": rows,
        "wait_ratio": rows[-1]["median_wait_s"] / rows[0]["median_wait_s"],
        "step_ratio": rows[-1]["median_step_s"] / rows[0]["median_step_s"],
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
