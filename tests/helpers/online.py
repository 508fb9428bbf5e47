"""A tiny online trainer and its LoRA weights."""

from __future__ import annotations

import numpy as np
import torch
from datasets import Dataset
from diffusers import StableDiffusionPipeline
from peft import LoraConfig

from tests.helpers.common import fast_config_values
from trl_diffusion_sdpo.demo.pretrain import SHIPPED_BASE_DIR
from trl_diffusion_sdpo.demo.shapes import all_captions
from trl_diffusion_sdpo.online import OnlineDiffusionSDPOConfig, OnlineDiffusionSDPOTrainer

PROMPTS = [c.text for c in all_captions()[:8]]

LORA = dict(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"])


def red_minus_blue(prompts, images, **columns) -> list[float]:
    """A reward read off the pixels: mean red minus mean blue, in [-1, 1]."""
    return [
        float((np.asarray(im, dtype=np.float64)[..., 0] - np.asarray(im, dtype=np.float64)[..., 2]).mean() / 255)
        for im in images
    ]


# Two prompts a step sampled in two steps, for the runs whose checks do not depend on how many: about a third of
# :func:`online_config`'s sampling (4 prompts in 3 steps), which is most of an online step's time
CHEAP_SAMPLING = {"per_device_train_batch_size": 2, "sample_steps": 2}


def online_config(tmp_path, **overrides) -> OnlineDiffusionSDPOConfig:
    """The suite's fast CPU config with 4 prompts a step, 2 steps, 3 samples of 3 sampling steps each."""
    values = fast_config_values(str(tmp_path / "out"))
    values.update(per_device_train_batch_size=4, max_steps=2, num_generations=3, sample_steps=3)
    return OnlineDiffusionSDPOConfig(**{**values, **overrides})


def make_trainer(tmp_path, reward=red_minus_blue, lora=True, prompts=PROMPTS, callbacks=None, **overrides):
    pipe = StableDiffusionPipeline.from_pretrained(str(SHIPPED_BASE_DIR))
    return OnlineDiffusionSDPOTrainer(
        pipe,
        None,
        online_config(tmp_path, **overrides),
        Dataset.from_dict({"prompt": prompts}),
        reward_funcs=[reward],
        peft_config=LoraConfig(**LORA) if lora else None,
        callbacks=callbacks,
    )


def lora_weights(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer._policy().named_parameters() if p.requires_grad}
