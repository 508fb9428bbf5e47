"""Where a trainer step's time goes: ``torch.profiler`` tables of one Diffusion-DPO, output-space and
parameter-space step on the same trainer (``harness``'s models and data), for finding overheads.

    python benchmarks/speed/profile_step.py --device cuda --unet sd15 --run cached-full
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: the package, benchmarks.harness

from benchmarks import harness  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--unet", default="small")
    parser.add_argument("--run", default="cached-full")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=12)
    args = parser.parse_args(argv)
    opts = harness.parse_setup_args(["--device", args.device, "--unet", args.unet])
    trainer, _ = harness.make_trainer(opts, args.run, tempfile.mkdtemp(), 100)
    model = trainer.model
    model.train()
    trainer._trainable = [p for p in model.parameters() if p.requires_grad]
    trainer.current_gradient_accumulation_steps = 1
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def step(loss: str) -> None:
        trainer.args.safeguard = loss != "dpo"
        trainer.args.safeguard_space = "parameter" if loss == "sdpo_param" else "output"
        model.zero_grad(set_to_none=True)
        trainer.training_step(model, inputs)

    losses = ["dpo", "sdpo", "sdpo_param"]
    for loss in losses * 2:
        step(loss)
    for loss in losses:
        sync()
        start = time.perf_counter()
        for _ in range(args.steps):
            step(loss)
        sync()
        print(f"{loss}: {1000 * (time.perf_counter() - start) / args.steps:.1f} ms/step (forward + backward)")
    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    for loss in losses:
        with torch.profiler.profile(activities=activities) as prof:
            step(loss)
            sync()
        key = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
        print(f"\n== {loss}")
        print(prof.key_averages().table(sort_by=key, row_limit=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
