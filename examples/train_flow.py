"""Diffusion-DPO / Diffusion-SDPO on a flow-matching transformer: SD3 / SD3.5 or FLUX.1, LoRA or full tuning.

    python examples/train_flow.py --config examples/configs/sd3_lora.yaml
    python examples/train_flow.py --config examples/configs/flux_lora.yaml --output_dir my-flux-run
    python examples/train_flow.py --model_name_or_path path/to/sd3.5-medium --dataset_name path/to/pairs \
        --no_lora --output_dir sd35-sdpo-full --beta 100 --safeguard_mu 0.5 --gradient_checkpointing

The pipeline is loaded with ``DiffusionPipeline.from_pretrained`` (a ``StableDiffusion3Pipeline`` or a
``FluxPipeline``); the trainer picks the family from its components. Every `DiffusionSDPOConfig` field is a
command-line flag or a YAML key; command-line flags override the YAML file. See docs/sd3.md and docs/flux.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import DiffusionPipeline
from peft import LoraConfig
from trl import TrlParser

from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer, zero3_init_disabled
from trl_diffusion_sdpo.data.preference import load_preference_dataset

# The attention projections of both streams (image and text tokens), as flow_grpo's SD3.5 Flow-DPO adapts them.
FLOW_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(metadata={"help": "SD3/SD3.5 or FLUX.1 pipeline folder or Hub id."})
    dataset_name: str = field(metadata={"help": "Hub id, local data folder, or a folder written by save_to_disk."})
    dataset_train_split: str = field(default="train", metadata={"help": "Training split."})
    dataset_eval_split: str | None = field(default=None, metadata={"help": "Optional evaluation split."})
    streaming: bool = field(default=False, metadata={"help": "Stream the dataset (then set max_steps)."})
    max_train_rows: int | None = field(default=None, metadata={"help": "Use only the first N rows."})
    lora: bool = field(default=True, metadata={"help": "Train LoRA adapters (--no_lora: the full transformer)."})
    lora_rank: int = field(default=32, metadata={"help": "LoRA rank r."})
    lora_alpha: int | None = field(default=None, metadata={"help": "LoRA alpha (default: 2 r, as flow_grpo)."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(FLOW_LORA_TARGETS), metadata={"help": "Transformer modules to adapt."}
    )
    weights_dtype: str = field(
        default="float32", metadata={"help": "dtype of the loaded pipeline: float32, bfloat16 or float16."}
    )


def parse_args(argv: list[str] | None = None) -> tuple[ScriptArguments, DiffusionSDPOConfig]:
    parser = TrlParser((ScriptArguments, DiffusionSDPOConfig))
    script_args, training_args = parser.parse_args_and_config(argv)
    return script_args, training_args


def load_pipeline(script_args: ScriptArguments) -> DiffusionPipeline:
    # Whole on every process, even under a ZeRO-3 config with zero3_init_flag (frozen parts stay unsharded).
    with zero3_init_disabled():
        return DiffusionPipeline.from_pretrained(
            script_args.model_name_or_path, torch_dtype=getattr(torch, script_args.weights_dtype)
        )


def main(argv: list[str] | None = None) -> DiffusionSDPOTrainer:
    script_args, training_args = parse_args(argv)
    pipe = load_pipeline(script_args)
    train_dataset = load_preference_dataset(
        script_args.dataset_name, script_args.dataset_train_split, script_args.streaming, script_args.max_train_rows
    )
    eval_dataset = (
        load_preference_dataset(script_args.dataset_name, script_args.dataset_eval_split)
        if script_args.dataset_eval_split
        else None
    )
    peft_config = None
    if script_args.lora:
        peft_config = LoraConfig(
            r=script_args.lora_rank,
            lora_alpha=script_args.lora_alpha or 2 * script_args.lora_rank,
            init_lora_weights="gaussian",
            target_modules=script_args.lora_target_modules,
        )
    trainer = DiffusionSDPOTrainer(pipe, None, training_args, train_dataset, eval_dataset, peft_config=peft_config)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    if training_args.push_to_hub:
        trainer.push_to_hub()
    return trainer


if __name__ == "__main__":
    main()
