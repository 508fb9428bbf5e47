"""Diffusion-DPO / Diffusion-SDPO on a Stable Diffusion XL UNet with LoRA, in the shape of TRL's
``examples/scripts/dpo.py``: the parser, the config, the trainer, ``train()``, ``save_model()``, ``push_to_hub()``.

```bash
python examples/train_sdxl.py \
    --model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
    --dataset_name yuvalkirstain/pickapic_v2 \
    --dataset_streaming \
    --resolution 1024 \
    --per_device_train_batch_size 1 \
    --gradient_accumulation_steps 128 \
    --max_steps 2000 \
    --bf16 \
    --output_dir sdxl-diffusion-sdpo-lora \
    --use_peft \
    --lora_r 16 \
    --lora_alpha 16
```

The arguments are TRL's ``ScriptArguments`` and ``ModelConfig`` and every ``DiffusionSDPOConfig`` field (``--config
file.yaml`` reads them from a YAML file, as TRL's scripts do); the learning rate, ``beta`` and the safeguard left unset
take the package's defaults for the family, which the start summary prints. Pick-a-Pic's columns (``caption``,
``jpg_0``, ``jpg_1``, ``label_0``) and TRL's (``prompt``, ``chosen``, ``rejected``) are both read. The
``trl-diffusion-sdpo train`` command serves every model family with more options (latent caches, column renames,
validation grids, preemption): docs/quickstart.md.
"""

from __future__ import annotations

import torch
from datasets import load_dataset
from diffusers import StableDiffusionXLPipeline
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config

from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer
from trl_diffusion_sdpo.families.sdxl import StableDiffusionXLFamily


def main(script_args: ScriptArguments, training_args: DiffusionSDPOConfig, model_args: ModelConfig):
    # The pipeline; its UNet is trained, the VAE and both text encoders stay frozen.
    dtype = None if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    pipeline = StableDiffusionXLPipeline.from_pretrained(
        model_args.model_name_or_path, revision=model_args.model_revision, torch_dtype=dtype
    )

    # The preference pairs.
    dataset = load_dataset(
        script_args.dataset_name, name=script_args.dataset_config, streaming=script_args.dataset_streaming
    )

    # LoRA on the UNet's attention projections unless --lora_target_modules names others.
    peft_config = get_peft_config(model_args)
    if peft_config is not None and not model_args.lora_target_modules:
        peft_config.target_modules = list(StableDiffusionXLFamily.lora_target_modules)

    trainer = DiffusionSDPOTrainer(
        pipeline,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        peft_config=peft_config,
    )

    # Train, then save the LoRA adapters (pytorch_lora_weights.safetensors) and the model card.
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.create_model_card(dataset_name=script_args.dataset_name)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)

    # Finish the trackers and leave the process group, as TRL's scripts do.
    trainer.end()
    return trainer


def make_parser() -> TrlParser:
    return TrlParser((ScriptArguments, DiffusionSDPOConfig, ModelConfig))


if __name__ == "__main__":
    script_args, training_args, model_args = make_parser().parse_args_and_config()
    main(script_args, training_args, model_args)
