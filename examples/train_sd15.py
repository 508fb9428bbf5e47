"""Diffusion-DPO / Diffusion-SDPO on a Stable Diffusion 1.x/2.x UNet, LoRA or full tuning.

    python examples/train_sd15.py --config examples/configs/sd15_lora.yaml
    python examples/train_sd15.py --model_name_or_path path/to/sd15 --dataset_name path/to/pairs --no_lora \
        --output_dir sd15-sdpo-full --beta 5000 --safeguard_mu 0.9
    accelerate launch --config_file examples/accelerate_configs/deepspeed_zero2.yaml --num_processes 8 \
        examples/train_sd15.py --config examples/configs/sd15_full.yaml

Every `DiffusionSDPOConfig` field (and so every `transformers.TrainingArguments` field) is a command-line flag or
a YAML key; command-line flags override the YAML file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from peft import LoraConfig
from trl import TrlParser

from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer, load_pipeline
from trl_diffusion_sdpo.data.preference import load_preference_dataset
from trl_diffusion_sdpo.data.sharded_cache import load_sharded_latent_cache


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(metadata={"help": "Pipeline folder or Hub id (e.g. a SD 1.5 checkpoint)."})
    dataset_name: str = field(metadata={"help": "Hub id, local data folder, or a folder written by save_to_disk."})
    dataset_train_split: str = field(default="train", metadata={"help": "Training split."})
    dataset_eval_split: str | None = field(default=None, metadata={"help": "Optional evaluation split."})
    streaming: bool = field(default=False, metadata={"help": "Stream the dataset (then set max_steps)."})
    max_train_rows: int | None = field(default=None, metadata={"help": "Use only the first N rows."})
    latent_cache: str | None = field(
        default=None,
        metadata={"help": "Train from this folder written by `trl-diffusion-sdpo cache` (streamed; set max_steps)."},
    )
    lora: bool = field(default=True, metadata={"help": "Train LoRA adapters (--no_lora: the full UNet)."})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank r (lora_alpha = r)."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], metadata={"help": "UNet modules to adapt."}
    )
    weights_dtype: str = field(
        default="float32", metadata={"help": "dtype of the loaded pipeline: float32, bfloat16 or float16."}
    )


def parse_args(argv: list[str] | None = None) -> tuple[ScriptArguments, DiffusionSDPOConfig]:
    parser = TrlParser((ScriptArguments, DiffusionSDPOConfig))
    script_args, training_args = parser.parse_args_and_config(argv)
    return script_args, training_args


def main(argv: list[str] | None = None) -> DiffusionSDPOTrainer:
    script_args, training_args = parse_args(argv)
    # Loaded whole on every process, even under a ZeRO-3 config with zero3_init_flag (frozen parts stay unsharded).
    pipe = load_pipeline(
        script_args.model_name_or_path, torch_dtype=getattr(torch, script_args.weights_dtype)
    )
    if script_args.latent_cache:
        train_dataset = load_sharded_latent_cache(script_args.latent_cache)
    else:
        train_dataset = load_preference_dataset(
            script_args.dataset_name,
            script_args.dataset_train_split,
            script_args.streaming,
            script_args.max_train_rows,
        )
    eval_dataset = (
        load_preference_dataset(script_args.dataset_name, script_args.dataset_eval_split)
        if script_args.dataset_eval_split
        else None
    )
    peft_config = (
        LoraConfig(
            r=script_args.lora_rank,
            lora_alpha=script_args.lora_rank,
            init_lora_weights="gaussian",
            target_modules=script_args.lora_target_modules,
        )
        if script_args.lora
        else None
    )
    trainer = DiffusionSDPOTrainer(
        pipe, None, training_args, train_dataset, eval_dataset, peft_config=peft_config
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    if training_args.push_to_hub:
        trainer.push_to_hub()
    return trainer


if __name__ == "__main__":
    main()
