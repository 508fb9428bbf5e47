"""The two safeguard lambdas during real training steps of a tiny flow transformer (SD3 or FLUX).

With ``safeguard_space="parameter"`` the trainer logs, for every micro-batch, the exact rule's ``lambda`` (the one
applied) and the authors' output-space ``lambda`` on the same predictions (``safeguard/output_lambda``). This trains
LoRA adapters on random-colour preference pairs for ``--steps`` steps per model and ``mu`` and reports both series'
mean, range, mean absolute difference and correlation.

    python benchmarks/studies/flow_lambda_stats.py \
        --output benchmarks/results/flow-families/cpu-flow-lambda-stats-tiny.json
"""

from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer  # noqa: E402
from trl_diffusion_sdpo.testing import build_tiny_flux_pipeline, build_tiny_sd3_pipeline  # noqa: E402

BUILDERS = {"sd3": build_tiny_sd3_pipeline, "flux": build_tiny_flux_pipeline}


def _pairs(n: int, seed: int = 0):
    from datasets import Dataset
    from PIL import Image

    rng = random.Random(seed)

    def png() -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (40, 40), tuple(rng.randrange(256) for _ in range(3))).save(buffer, format="PNG")
        return buffer.getvalue()

    return Dataset.from_list(
        [{"caption": f"a coloured square {i}", "jpg_0": png(), "jpg_1": png(), "label_0": 1.0} for i in range(n)]
    )


def run(kind: str, mu: float, steps: int, pairs: int) -> dict:
    from peft import LoraConfig

    pipe = BUILDERS[kind](seed=0, tokenizer_dir=tempfile.mkdtemp(), max_length=16)
    with tempfile.TemporaryDirectory() as tmp:
        args = DiffusionSDPOConfig(
            output_dir=tmp, resolution=32, per_device_train_batch_size=pairs, max_steps=steps, learning_rate=1e-3,
            scale_lr=False, warmup_steps=0, logging_steps=1, use_cpu=True, report_to="none", save_strategy="no",
            disable_tqdm=True, beta=100.0, safeguard_mu=mu, safeguard_space="parameter",
            max_sequence_length=16,
        )  # fmt: skip
        lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v"])
        trainer = DiffusionSDPOTrainer(pipe, args=args, train_dataset=_pairs(pairs * steps), peft_config=lora)
        trainer.train()
    logs = [h for h in trainer.state.log_history if "safeguard/lambda_mean" in h]
    exact = [h["safeguard/lambda_mean"] for h in logs]
    output = [h["safeguard/output_lambda_mean"] for h in logs]
    return {
        "steps": len(logs),
        "parameter_mean": statistics.mean(exact),
        "parameter_range": [min(exact), max(exact)],
        "output_mean": statistics.mean(output),
        "output_range": [min(output), max(output)],
        "mean_abs_difference": statistics.mean(abs(a - b) for a, b in zip(exact, output)),
        # None where a series is constant (e.g. lambda = 1 at every step)
        "correlation": statistics.correlation(exact, output) if len(set(exact)) > 1 < len(set(output)) else None,
        "parameter_below_1": sum(x < 1 for x in exact),
        "output_below_1": sum(x < 1 for x in output),
        "final_implicit_acc": logs[-1]["implicit_acc"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--mu", type=float, nargs="+", default=[0.0, 0.5])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = {"settings": vars(args), "machine": "cpu", "runs": {}}
    for kind in BUILDERS:
        for mu in args.mu:
            report["runs"][f"{kind}-mu{mu}"] = run(kind, mu, args.steps, args.pairs)
            print(kind, mu, json.dumps(report["runs"][f"{kind}-mu{mu}"]), flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
