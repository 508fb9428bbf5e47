"""One process of a two-process online run whose reward fails on one process only: process 1's second scoring
returns a NaN. Each process writes what ``train()`` raised and the step it stopped at to ``<out>/raised-<rank>.json``.

    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml --num_processes 2 \\
        --mixed_precision no tests/rewards/reward_failure_worker.py OUT
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch


def main(out: str) -> None:
    torch.set_num_threads(1)
    from datasets import Dataset
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    from trl_diffusion_sdpo.demo.pretrain import SHIPPED_BASE_DIR
    from trl_diffusion_sdpo.demo.shapes import all_captions
    from trl_diffusion_sdpo.online import OnlineDiffusionSDPOConfig, OnlineDiffusionSDPOTrainer
    from trl_diffusion_sdpo.rewards.functions import RewardError

    rank = int(os.environ.get("RANK", "0"))
    calls = []

    def red_minus_blue(prompts, images, **columns):
        calls.append(len(images))
        if rank == 1 and len(calls) == 2:
            return [float("nan")] * len(images)
        return [float((np.asarray(im, float)[..., 0] - np.asarray(im, float)[..., 2]).mean() / 255) for im in images]

    args = OnlineDiffusionSDPOConfig(
        output_dir=os.path.join(out, "model"),
        resolution=32,
        per_device_train_batch_size=2,
        max_steps=3,
        learning_rate=1e-3,
        scale_lr=False,
        warmup_steps=0,
        num_generations=2,
        sample_steps=2,
        report_to="none",
        save_strategy="no",
        dataloader_num_workers=0,
        use_cpu=True,  # two processes launched on the CPU (multi_gpu.yaml)
        disable_tqdm=True,
        seed=0,
    )
    trainer = OnlineDiffusionSDPOTrainer(
        StableDiffusionPipeline.from_pretrained(str(SHIPPED_BASE_DIR)),
        None,
        args,
        Dataset.from_dict({"prompt": [c.text for c in all_captions()[:12]]}),
        reward_funcs=[red_minus_blue],
        peft_config=LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
    )
    try:
        trainer.train()
        raised = None
    except RewardError as err:
        raised = str(err)
    with open(os.path.join(out, f"raised-{rank}.json"), "w") as f:
        json.dump({"raised": raised, "global_step": trainer.state.global_step, "calls": len(calls)}, f)


if __name__ == "__main__":
    main(sys.argv[1])
