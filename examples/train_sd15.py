"""Diffusion-DPO / Diffusion-SDPO on a Stable Diffusion 1.x/2.x UNet, LoRA or full tuning: a thin wrapper around
``trl-diffusion-sdpo train`` (which serves every model family; see docs/quickstart.md).

    python examples/train_sd15.py --config examples/configs/sd15_lora.yaml
    trl-diffusion-sdpo train --config examples/configs/sd15_lora.yaml          # the same
    accelerate launch --config_file examples/accelerate_configs/deepspeed_zero2.yaml --num_processes 8 \
        examples/train_sd15.py --config examples/configs/sd15_full.yaml

Arguments are TRL's ``ScriptArguments`` and ``ModelConfig`` (``--use_peft --lora_r 16 --lora_alpha 16``,
``--dtype bfloat16``) plus every ``DiffusionSDPOConfig`` field; flags override the YAML file.
"""

from __future__ import annotations

import sys

from trl_diffusion_sdpo.cli.train import main, parse_args

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    main(sys.argv[1:])
