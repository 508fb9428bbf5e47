"""A shortened run of the real-scale recipe at its true cost: train, then evaluate, with real-size random models.

Nothing can be downloaded here, so every model is built from its real config with random weights (the cost does
not depend on the weights; the numbers it produces mean nothing as quality): an SD1.5-sized pipeline saved as a local
folder, a synthetic Pick-a-Pic-style dataset of 512 px JPEGs saved with ``save_to_disk``, and a PickScore-sized
CLIP ViT-H/14. Then, through the same entry points a user runs:

1. ``trl-diffusion-sdpo train --config examples/configs/sd15_full.yaml`` (the authors' SD1.5 recipe: full UNet, 8 pairs
   per device, bf16, gradient checkpointing) for ``--steps`` optimizer steps without accumulation, with the chosen
   safeguard space; records wall time per step and peak GPU memory;
2. ``trl_diffusion_sdpo.evaluation.evaluate`` of the base and the trained UNet on ``--prompts`` prompts with the
   authors' protocol (Euler, 50 steps, 512 px, guidance 8.5) and PickScore; records seconds per image.

    python benchmarks/smoke/real_scale_smoke.py --workdir /tmp/smoke --steps 30 --prompts 16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the package and benchmarks.harness

from benchmarks import harness  # noqa: E402

# CLIP ViT-H/14 (laion2B-s32B-b79K, PickScore_v1's architecture).
VIT_H = {
    "text": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_attention_heads": 16,
        "num_hidden_layers": 24,
        "max_position_embeddings": 77,
        "vocab_size": 49408,
        "hidden_act": "gelu",
    },
    "vision": {
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_attention_heads": 16,
        "num_hidden_layers": 32,
        "image_size": 224,
        "patch_size": 14,
        "hidden_act": "gelu",
    },
    "projection_dim": 1024,
}


def build_assets(workdir: Path, pairs: int) -> dict[str, Path]:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from trl_diffusion_sdpo.testing import write_char_tokenizer

    paths = {"base": workdir / "sd15", "data": workdir / "data", "pickscore": workdir / "pickscore"}
    if not paths["base"].exists():
        harness.build_pipeline("sd15", "cpu").save_pretrained(paths["base"], safe_serialization=True)
    if not paths["data"].exists():
        harness.synthetic_pairs(pairs, 512).save_to_disk(str(paths["data"]))
    if not paths["pickscore"].exists():
        config = CLIPConfig(
            text_config=VIT_H["text"], vision_config=VIT_H["vision"], projection_dim=VIT_H["projection_dim"]
        )
        CLIPModel(config).save_pretrained(paths["pickscore"], safe_serialization=True)
        tokenizer = write_char_tokenizer(str(workdir / "pickscore-tokenizer"), 77)
        CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tokenizer).save_pretrained(paths["pickscore"])
    return paths


def train(paths: dict[str, Path], workdir: Path, steps: int, space: str) -> dict:
    from trl_diffusion_sdpo.cli.train import main as train_command  # after the models are built: heavy

    output_dir = workdir / f"run-{space}"
    argv = [
        "--config",
        str(ROOT / "examples" / "configs" / "sd15_full.yaml"),
        "--model_name_or_path",
        str(paths["base"]),
        "--dataset_name",
        str(paths["data"]),
        "--dataset_streaming",
        "false",
        "--output_dir",
        str(output_dir),
        "--max_steps",
        str(steps),
        "--gradient_accumulation_steps",
        "1",
        "--warmup_steps",
        "0",
        "--logging_steps",
        str(max(steps // 3, 1)),
        "--save_steps",
        str(steps),
        "--report_to",
        "none",
        "--safeguard_space",
        space,
        "--dataloader_num_workers",
        "4",
    ]
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer = train_command(argv)
    seconds = time.perf_counter() - start
    runtime = [h for h in trainer.state.log_history if "train_runtime" in h][-1]
    return {
        "safeguard_space": space,
        "steps": steps,
        "pairs_per_step": trainer.args.per_device_train_batch_size,
        "train_runtime_s": runtime["train_runtime"],
        "seconds_per_step": runtime["train_runtime"] / steps,
        "wall_s_including_setup_and_save": seconds,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "lambdas": [h["safeguard/lambda_mean"] for h in trainer.state.log_history if "safeguard/lambda_mean" in h],
        "output_dir": str(output_dir),
    }


def evaluate(paths: dict[str, Path], workdir: Path, trained: str, prompts: int) -> dict:
    from trl_diffusion_sdpo.evaluation import evaluate as run_evaluation
    from trl_diffusion_sdpo.evaluation.generation import GenerationSettings

    prompt_list = [f"a photo of object number {i} on a table, studio light" for i in range(prompts)]
    settings = GenerationSettings(dtype="bfloat16")
    start = time.perf_counter()
    result = run_evaluation(
        str(paths["base"]),
        {"trained": trained},
        prompts=prompt_list,
        scorers=("pickscore",),
        output_dir=str(workdir / "evaluation"),
        settings=settings,
        batch_size=8,
        device="cuda",
        scorer_kwargs={"pickscore": {"model": str(paths["pickscore"]), "processor": str(paths["pickscore"])}},
        progress=False,
    )
    seconds = time.perf_counter() - start
    images = 2 * prompts
    return {
        "images": images,
        "wall_s": seconds,
        "seconds_per_image_all_in": seconds / images,
        "generated": result.generated,
        "summary": [str(s) for s in result.summary],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/real-scale-smoke")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--spaces", default="output,parameter")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("real_scale_smoke.py measures a GPU run; no CUDA device here")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    report: dict = {"device": torch.cuda.get_device_name(), "train": []}
    paths = build_assets(workdir, args.pairs)
    for space in args.spaces.split(","):
        row = train(paths, workdir, args.steps, space)
        report["train"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "lambdas"}), flush=True)
    trained = os.path.join(report["train"][-1]["output_dir"])
    report["evaluate"] = evaluate(paths, workdir, trained, args.prompts)
    print(json.dumps({k: v for k, v in report["evaluate"].items() if k != "summary"}), flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
