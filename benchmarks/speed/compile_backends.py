"""What ``torch_compile=True`` costs and changes on a CPU, per ``torch_compile_backend``: the tests' tiny SD UNet with
LoRA (r4 on the attention projections), Diffusion-DPO, 2 pairs at 32 px, float32, the same seed and data.

Not part of the test suite. One thread (``--threads``). In one process, for eager (no compile), ``aot_eager`` and
``inductor``, a fresh trainer trains ``--steps`` optimizer steps, logging every step: the wall time of ``train()``, of
its first step (where the compile happens) and the median of the others, and the logged loss of each step, with its
largest difference from eager's (exactly 0 where the compiled run computes what eager does, in eager's order).

    python benchmarks/speed/compile_backends.py --json benchmarks/results/step-time/cpu-compile-backends-tiny.json
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

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from datasets import Dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from tests.helpers.common import fast_config_values, lora_config, pickapic_rows  # noqa: E402
from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer  # noqa: E402
from trl_diffusion_sdpo.testing import build_tiny_sd_pipeline  # noqa: E402

BACKENDS = ("eager", "aot_eager", "inductor")


class _StepClock(TrainerCallback):
    """Wall seconds of each optimizer step, ``on_step_begin`` to ``on_step_end``."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)


def run(backend: str, steps: int, workdir: str) -> dict:
    torch._dynamo.reset()
    pipeline = build_tiny_sd_pipeline(seed=0, tokenizer_dir=os.path.join(workdir, "tokenizer"))
    fields = {**fast_config_values(os.path.join(workdir, backend)), "max_steps": steps, "logging_steps": 1}
    if backend != "eager":
        fields |= {"torch_compile": True, "torch_compile_backend": backend}
    trainer = DiffusionSDPOTrainer(
        pipeline,
        args=DiffusionSDPOConfig(**fields),
        train_dataset=Dataset.from_list(pickapic_rows(2 * steps)),
        peft_config=lora_config(),
    )
    clock = _StepClock()
    trainer.add_callback(clock)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return {
        "train_seconds": round(seconds, 2),
        "first_step_seconds": round(clock.seconds[0], 3),
        "later_step_seconds_median": round(statistics.median(clock.seconds[1:]), 4),
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    opts = parser.parse_args(argv)
    torch.set_num_threads(opts.threads)
    rows: dict[str, dict] = {}
    result: dict = {}
    with tempfile.TemporaryDirectory() as workdir:
        for backend in BACKENDS:  # the file is written after each backend: a run stopped early keeps what it has
            rows[backend] = run(backend, opts.steps, workdir)
            print(f"{backend}: {json.dumps(rows[backend])}", flush=True)
            result = _result(rows, opts, argv)
            if opts.json:
                Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
                Path(opts.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _result(rows: dict[str, dict], opts: argparse.Namespace, argv: list[str] | None) -> dict:
    eager = rows["eager"]["losses"]
    for row in rows.values():
        row["largest_loss_difference_from_eager"] = max(abs(a - b) for a, b in zip(row["losses"], eager, strict=True))
        row["steps_equal_to_eager"] = [a == b for a, b in zip(row["losses"], eager, strict=True)]
    return {
        "what": " ".join(__doc__.split("\n\n")[:2]).replace("\n", " "),
        "command": "python " + " ".join(["benchmarks/speed/compile_backends.py", *(argv or sys.argv[1:])]),
        "torch": torch.__version__,
        "load": f"load average {os.getloadavg()[0]:.1f} at the end (2 CPU cores shared with other work)",
        "settings": {"steps": opts.steps, "threads": opts.threads},
        "rows": rows,
        "not_measured": [backend for backend in BACKENDS if backend not in rows],
    }


if __name__ == "__main__":
    main()
