"""Diffusion-DPO / Diffusion-SDPO on a flow-matching transformer (SD3 / SD3.5 or FLUX.1), LoRA or full tuning: a
thin wrapper around ``trl-diffusion-sdpo train`` (which serves every model family; see docs/sd3.md, docs/flux.md).

    python examples/train_flow.py --config examples/configs/sd3_lora.yaml
    trl-diffusion-sdpo train --config examples/configs/flux_lora.yaml --output_dir my-flux-run   # the same command
    python examples/train_flow.py --model_name_or_path path/to/sd3.5-medium --dataset_name path/to/pairs \
        --output_dir sd35-sdpo-full --beta 100 --safeguard_mu 0.5 --activation_checkpointing

The pipeline is loaded with ``DiffusionPipeline.from_pretrained`` (a ``StableDiffusion3Pipeline`` or a
``FluxPipeline``); the trainer picks the family from its components. With ``--use_peft`` and no
``--lora_target_modules``, both attention streams are adapted (``to_q/k/v``, ``to_out.0``, ``add_q/k/v_proj``,
``to_add_out``). Arguments are TRL's ``ScriptArguments`` and ``ModelConfig`` plus every ``DiffusionSDPOConfig``
field; flags override the YAML file.
"""

from __future__ import annotations

import sys

from trl_diffusion_sdpo.cli.train import main, parse_args

__all__ = ["main", "parse_args"]

if __name__ == "__main__":
    main(sys.argv[1:])
