"""Soak test: do memory and step time stay flat over thousands of steps with periodic checkpoints?

One ``DiffusionSDPOTrainer.train()`` run on the tiny test pipeline (LoRA, resolution 32, 2 pairs per step, the
safeguard on) for ``--steps`` optimizer steps, saving a checkpoint every ``--save-steps`` steps (``save_total_limit``
2, so rotation deletes as it goes) and logging every ``--logging-steps``. A callback records after every step the
process's resident set size (``/proc/self/statm``) and the wall-clock time since the previous step.

Reported: per window of ``--window`` steps the median step time (wall clock, and the process's CPU time, which on a
loaded machine counts our work rather than our waiting), the median wall time of the steps that
saved a checkpoint, and the RSS at the window's end; the RSS growth and the median step times of the last window
against the first window after warm-up.
Nothing is asserted. Example::

    python benchmarks/smoke/soak.py --steps 2000 --save-steps 100 \
        --output benchmarks/results/reliability/cpu-soak-tiny.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
from datasets import Dataset
from transformers import TrainerCallback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # the repository root: the package and tests.helpers

from tests.helpers.common import lora_config, pickapic_rows  # noqa: E402
from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer  # noqa: E402
from trl_diffusion_sdpo.testing import build_tiny_sd_pipeline  # noqa: E402

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE / 2**20


class Recorder(TrainerCallback):
    """Wall-clock seconds of each step (step end to step end, the save included) and the RSS after it."""

    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.last_cpu = time.process_time()
        self.step_seconds: list[float] = []
        self.step_cpu_seconds: list[float] = []
        self.rss: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        # A save at this step happens after on_step_end; its time falls into the next step's interval.
        now, cpu = time.perf_counter(), time.process_time()
        self.step_seconds.append(now - self.last)
        self.step_cpu_seconds.append(cpu - self.last_cpu)
        self.last, self.last_cpu = now, cpu
        self.rss.append(rss_mib())


def summarise(recorder: Recorder, save_steps: int, window: int, warmup: int) -> dict:
    windows = []
    steps = len(recorder.step_seconds)
    for start in range(0, steps, window):
        end = min(start + window, steps)
        times = recorder.step_seconds[start:end]
        # step i (0-based) ends optimizer step i + 1; the save of step k is timed in step k + 1's interval
        after_save = [recorder.step_seconds[i] for i in range(start, end) if i > 0 and i % save_steps == 0]
        windows.append(
            {
                "steps": [start + 1, end],
                "median_step_s": statistics.median(times),
                "median_step_cpu_s": statistics.median(recorder.step_cpu_seconds[start:end]),
                "median_step_with_save_s": statistics.median(after_save) if after_save else None,
                "rss_end_mib": recorder.rss[end - 1],
            }
        )
    first = next(w for w in windows if w["steps"][0] > warmup)
    last = windows[-1]
    return {
        "windows": windows,
        "rss_first_window_end_mib": first["rss_end_mib"],
        "rss_last_window_end_mib": last["rss_end_mib"],
        "rss_growth_mib": last["rss_end_mib"] - first["rss_end_mib"],
        "rss_max_mib": max(recorder.rss),
        "median_step_ratio_last_to_first": last["median_step_s"] / first["median_step_s"],
        "median_step_cpu_ratio_last_to_first": last["median_step_cpu_s"] / first["median_step_cpu_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--save-steps", type=int, default=100)
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--window", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=0, help="steps before the first window compared")
    parser.add_argument("--output", default=None)
    options = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        args = DiffusionSDPOConfig(
            output_dir=os.path.join(tmp, "out"),
            resolution=32,
            per_device_train_batch_size=2,
            max_steps=options.steps,
            learning_rate=1e-4,
            scale_lr=False,
            warmup_steps=0,
            logging_steps=options.logging_steps,
            use_cpu=True,
            report_to="none",
            save_strategy="steps",
            save_steps=options.save_steps,
            save_total_limit=2,
            dataloader_num_workers=0,
            disable_tqdm=True,
            seed=0,
        )
        pipeline = build_tiny_sd_pipeline(seed=0, tokenizer_dir=os.path.join(tmp, "tok"))
        trainer = DiffusionSDPOTrainer(
            pipeline, args=args, train_dataset=Dataset.from_list(pickapic_rows(64)), peft_config=lora_config()
        )
        recorder = Recorder()
        trainer.add_callback(recorder)
        started = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - started
        checkpoints = sorted(n for n in os.listdir(args.output_dir) if n.startswith("checkpoint-"))

    report = {
        "benchmark": "soak",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__},
        "settings": vars(options) | {"tuning": "lora r=4", "resolution": 32, "pairs_per_step": 2},
        "total_wall_s": wall,
        "checkpoints_left": checkpoints,
        **summarise(recorder, options.save_steps, options.window, options.warmup),
    }
    text = json.dumps(report, indent=1)
    print(text)
    if options.output:
        with open(options.output, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
