"""Diffusion-DPO / Diffusion-SDPO on an SDXL UNet, LoRA or full tuning.

    python examples/train_sdxl.py --config examples/configs/sdxl_lora.yaml
    python examples/train_sdxl.py --config examples/configs/sdxl_full.yaml --output_dir my-sdxl-run
    python examples/train_sdxl.py --model_name_or_path path/to/sdxl --dataset_name path/to/pairs --no_lora \
        --output_dir sdxl-sdpo-full --optim adafactor --gradient_checkpointing --safeguard_mu 0.6

Every `DiffusionSDPOConfig` field (and so every `transformers.TrainingArguments` field) is a command-line flag or
a YAML key; command-line flags override the YAML file. See docs/sdxl.md for the recipe and the precision notes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline
from peft import LoraConfig
from trl import TrlParser

from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer, zero3_init_disabled
from trl_diffusion_sdpo.data.preference import load_preference_dataset
from trl_diffusion_sdpo.data.sharded_cache import load_sharded_latent_cache


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(metadata={"help": "SDXL pipeline folder or Hub id."})
    dataset_name: str = field(metadata={"help": "Hub id, local data folder, or a folder written by save_to_disk."})
    dataset_train_split: str = field(default="train", metadata={"help": "Training split."})
    dataset_eval_split: str | None = field(default=None, metadata={"help": "Optional evaluation split."})
    streaming: bool = field(default=False, metadata={"help": "Stream the dataset (then set max_steps)."})
    max_train_rows: int | None = field(default=None, metadata={"help": "Use only the first N rows."})
    latent_cache: str | None = field(
        default=None,
        metadata={"help": "Train from this folder written by `trl-diffusion-sdpo cache` (streamed; set max_steps)."},
    )
    vae_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Optional replacement VAE (e.g. an fp16-safe SDXL VAE); by default the pipeline's VAE "
                  "encodes in float32."},
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


def load_pipeline(script_args: ScriptArguments) -> StableDiffusionXLPipeline:
    dtype = getattr(torch, script_args.weights_dtype)
    components = {}
    # Whole on every process, even under a ZeRO-3 config with zero3_init_flag (frozen parts stay unsharded).
    with zero3_init_disabled():
        if script_args.vae_name_or_path:
            components["vae"] = AutoencoderKL.from_pretrained(script_args.vae_name_or_path, torch_dtype=dtype)
        return StableDiffusionXLPipeline.from_pretrained(
            script_args.model_name_or_path, torch_dtype=dtype, **components
        )


def main(argv: list[str] | None = None) -> DiffusionSDPOTrainer:
    script_args, training_args = parse_args(argv)
    pipe = load_pipeline(script_args)
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
    trainer = DiffusionSDPOTrainer(pipe, None, training_args, train_dataset, eval_dataset, peft_config=peft_config)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    if training_args.push_to_hub:
        trainer.push_to_hub()
    return trainer


if __name__ == "__main__":
    main()
