"""What a training step costs on the tiny flow pipelines of tests/ (Qwen-Image, Z-Image, FLUX.2 [dev] and [klein],
FLUX.1 Kontext on editing pairs, FLUX.1 for comparison), on the CPU: median step time of LoRA Diffusion-DPO, and with
the output-space and the parameter-space safeguard.

The tiny models say how the three methods compare on one machine, not what a real-size model costs: their
transformers have a few thousand parameters and the step is dominated by fixed overheads (the VAE, the text
encoder, Python). Run alone on a quiet machine; the shared CPUs this was measured on move numbers by tens of percent.

    python benchmarks/speed/flow_family_cost.py --steps 8 \
        --json benchmarks/results/flow-families/cpu-flow-family-cost-tiny.json
    python benchmarks/speed/flow_family_cost.py --families flux2 flux2-klein flux \
        --json benchmarks/results/flow-families/cpu-flow-family-cost-tiny-flux2.json
    python benchmarks/speed/flow_family_cost.py --families flux-kontext flux \
        --json benchmarks/results/flow-families/cpu-flow-family-cost-tiny-kontext.json
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

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: the package measured

FAMILIES = ("qwen-image", "z-image", "flux", "flux-kontext", "flux2", "flux2-klein")
DEFAULT_FAMILIES = ("qwen-image", "z-image", "flux")
METHODS = {
    "dpo": {"safeguard_space": "none"},
    "output safeguard": {"safeguard_space": "output"},
    "parameter safeguard": {"safeguard_space": "parameter"},
}


def _pipeline(family: str, workdir: str):
    from trl_diffusion_sdpo.testing import (
        build_tiny_flux2_klein_pipeline,
        build_tiny_flux2_pipeline,
        build_tiny_flux_kontext_pipeline,
        build_tiny_flux_pipeline,
        build_tiny_qwen_image_pipeline,
        build_tiny_z_image_pipeline,
    )

    if family == "flux-kontext":
        return build_tiny_flux_kontext_pipeline(seed=0, tokenizer_dir=workdir, max_length=32)
    if family == "flux":
        return build_tiny_flux_pipeline(seed=0, tokenizer_dir=workdir, max_length=32)
    if family == "flux2":
        return build_tiny_flux2_pipeline(seed=0, tokenizer_dir=workdir)
    if family == "flux2-klein":
        return build_tiny_flux2_klein_pipeline(seed=0, tokenizer_dir=workdir)
    builder = build_tiny_qwen_image_pipeline if family == "qwen-image" else build_tiny_z_image_pipeline
    return builder(seed=0, tokenizer_dir=workdir)


def _pairs(n: int, edits: bool = False):
    import io

    from datasets import Dataset
    from PIL import Image

    def png(colour: tuple[int, int, int]) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (40, 40), colour).save(buffer, format="PNG")
        return buffer.getvalue()

    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)]
    rows = [
        {"caption": f"a square number {i}", "jpg_0": png(colours[i % 4]), "jpg_1": png(colours[(i + 1) % 4]),
         "label_0": float(i % 2)}
        for i in range(n)
    ]  # fmt: skip
    if edits:  # an editing family's pairs: a source image of the edits' size beside each
        for i, row in enumerate(rows):
            row["source_image"] = png(colours[(i + 2) % 4])
    return Dataset.from_list(rows)


def measure(family: str, method: str, steps: int, pairs: int) -> dict[str, float]:
    from peft import LoraConfig
    from transformers import TrainerCallback

    from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.began)

    with tempfile.TemporaryDirectory() as workdir:
        pipe = _pipeline(family, workdir)
        args = DiffusionSDPOConfig(
            output_dir=workdir, resolution=32, per_device_train_batch_size=pairs, max_steps=steps, beta=100.0,
            max_sequence_length=32, learning_rate=1e-4, scale_lr=False, use_cpu=True, report_to="none",
            save_strategy="no", dataloader_num_workers=0, disable_tqdm=True, logging_steps=1, seed=0,
            **METHODS[method],
        )  # fmt: skip
        targets = ["to_q", "to_k", "to_v", "to_out.0"]
        if family.startswith("flux2"):  # the family's (diffusers' FLUX.2 scripts') targets, single blocks included
            from trl_diffusion_sdpo.families import family_for_pipeline

            targets = list(family_for_pipeline(pipe).lora_target_modules)
        trainer = DiffusionSDPOTrainer(
            pipe,
            args=args,
            train_dataset=_pairs(pairs * steps, edits=family == "flux-kontext"),
            peft_config=LoraConfig(r=4, target_modules=targets),
        )
        trainer.add_callback(Clock())
        trainer.train()
    kept = times[1:]  # the first step pays for lazy imports and allocations
    return {"median_step_s": statistics.median(kept), "min_step_s": min(kept), "steps_timed": len(kept)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(DEFAULT_FAMILIES))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report: dict = {"settings": vars(args), "machine": "cpu", "resolution": 32, "lora_r": 4, "results": {}}
    for family in args.families:
        report["results"][family] = {}
        for method in METHODS:
            result = measure(family, method, args.steps, args.pairs)
            report["results"][family][method] = result
            print(f"{family:11s} {method:20s} {result['median_step_s']:.3f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
