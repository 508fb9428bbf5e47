"""A trainer whose construction is refused leaves the pipeline it was given as it was: no LoRA adapters, the same
modules, ``requires_grad`` flags, train/eval modes, dtypes and values, no hooks left on the VAE; the same pipeline
object then builds a trainer that trains."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from datasets import Dataset
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from peft import LoraConfig

from tests.helpers.common import lora_config
from tests.helpers.online import LORA, PROMPTS, online_config, red_minus_blue
from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer
from trl_diffusion_sdpo.callbacks import EMAWeights
from trl_diffusion_sdpo.demo.pretrain import SHIPPED_BASE_DIR
from trl_diffusion_sdpo.online import OnlineDiffusionSDPOTrainer


def module_state(pipeline: DiffusionPipeline) -> dict[str, Any]:
    """Everything of the pipeline's modules a trainer could change, copied: modules (names and objects), modes,
    tensors (values, dtypes, devices, ``requires_grad``), adapters, gradient checkpointing, forward hooks, config."""
    state: dict[str, Any] = {}
    for name, component in pipeline.components.items():
        if not isinstance(component, torch.nn.Module):
            continue
        modules = list(component.named_modules())
        tensors = [*component.named_parameters(), *component.named_buffers()]
        state[name] = {
            "modules": [(n, id(m)) for n, m in modules],
            "modes": [m.training for _, m in modules],
            "tensors": {n: (t.detach().clone(), t.dtype, t.device, t.requires_grad) for n, t in tensors},
            "adapters": bool(getattr(component, "peft_config", None)),
            "checkpointing": getattr(component, "is_gradient_checkpointing", None),
            "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks)) for _, m in modules],
            "config": type(getattr(component, "config", None)),
        }
    return state


def assert_unchanged(pipeline: DiffusionPipeline, before: dict[str, Any]) -> None:
    after = module_state(pipeline)
    assert after.keys() == before.keys()
    for name, was in before.items():
        now = after[name]
        for key in ("modules", "modes", "adapters", "checkpointing", "hooks", "config"):
            assert now[key] == was[key], f"{name}: {key} changed"
        assert now["tensors"].keys() == was["tensors"].keys(), f"{name}: other tensors"
        for tensor_name, (value, dtype, device, requires_grad) in was["tensors"].items():
            new_value, new_dtype, new_device, new_requires_grad = now["tensors"][tensor_name]
            assert (new_dtype, new_device, new_requires_grad) == (dtype, device, requires_grad), (name, tensor_name)
            assert torch.equal(new_value, value), f"{name}.{tensor_name} changed value"


class RefusingTrainer(DiffusionSDPOTrainer):
    """Refuses once everything of the trainer's construction has run: the latest point a construction can fail."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        raise ValueError("refused after construction")


def bad_columns(dataset: Dataset) -> Dataset:
    return dataset.remove_columns(["jpg_1"])


@pytest.mark.parametrize(
    "refusal,match",
    [
        ("dataset", "jpg_1"),  # the data's validation: after the frozen modules were frozen
        ("ema", "EMAWeights was given and the config sets ema_decay"),  # run control beside its field: first
        ("subclass", "refused after construction"),  # a subclass's check after everything __init__ did
    ],
)
def test_a_refused_construction_leaves_the_pipeline_as_given_and_a_retry_trains(
    refusal, match, make_pipeline, make_config, pickapic_dataset
):
    pipeline = make_pipeline()
    pipeline.vae.register_to_config(force_upcast=True)  # kept in float32, as SDXL's: hooks cast its inputs
    before = module_state(pipeline)
    # bf16: the LoRA base and the text encoder are cast to it
    config = make_config(
        bf16=True, max_steps=1, gradient_checkpointing=True, ema_decay=0.9 if refusal == "ema" else None
    )
    trainer_class = RefusingTrainer if refusal == "subclass" else DiffusionSDPOTrainer
    with pytest.raises(ValueError, match=match):
        trainer_class(
            pipeline,
            args=config,
            train_dataset=bad_columns(pickapic_dataset) if refusal == "dataset" else pickapic_dataset,
            peft_config=lora_config(),
            callbacks=[EMAWeights([torch.nn.Parameter(torch.zeros(1))], 0.9, print)] if refusal == "ema" else None,
        )
    assert_unchanged(pipeline, before)

    trainer = DiffusionSDPOTrainer(pipeline, args=config, train_dataset=pickapic_dataset, peft_config=lora_config())
    trainer.train()
    assert trainer.state.global_step == 1
    assert bool(pipeline.unet.peft_config)  # trained in place, as a trainer that was built does


def failing_reward(prompts, images, **columns) -> list[float]:
    raise RuntimeError("the reward is down")


def test_a_refused_online_construction_leaves_the_pipeline_as_given(tmp_path):
    """The online trainer pairs the probe's prompts once the offline construction is done: a reward failing there is
    the last point its construction can fail."""
    pipeline = StableDiffusionPipeline.from_pretrained(str(SHIPPED_BASE_DIR))
    before = module_state(pipeline)
    prompts = Dataset.from_dict({"prompt": PROMPTS})
    with pytest.raises(RuntimeError, match="the reward is down"):
        OnlineDiffusionSDPOTrainer(
            pipeline,
            args=online_config(tmp_path, probe_steps=1, probe_pairs=2),
            train_dataset=prompts,
            reward_funcs=[failing_reward],
            peft_config=LoraConfig(**LORA),
        )
    assert_unchanged(pipeline, before)
    trainer = OnlineDiffusionSDPOTrainer(
        pipeline, args=online_config(tmp_path), train_dataset=prompts, reward_funcs=[red_minus_blue],
        peft_config=LoraConfig(**LORA),
    )  # fmt: skip
    assert trainer.policy is pipeline.unet


def test_recording_the_given_pipeline_reads_no_deprecated_property(tmp_path, pickapic_dataset):
    """The record a construction keeps to undo itself reads no property transformers has deprecated (its text
    encoder's ``is_gradient_checkpointing`` warns when read): a trainer built as the README builds it warns of no
    such thing."""
    pipe = StableDiffusionPipeline.from_pretrained(SHIPPED_BASE_DIR)
    args = DiffusionSDPOConfig(output_dir=str(tmp_path / "out"), max_steps=1, report_to="none", resolution=32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        DiffusionSDPOTrainer(pipe, args=args, train_dataset=pickapic_dataset, peft_config=lora_config())
    deprecated = [str(w.message) for w in caught if "is_gradient_checkpointing" in str(w.message)]
    assert not deprecated, deprecated
