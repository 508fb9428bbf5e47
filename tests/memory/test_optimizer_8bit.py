"""8-bit optimizer states for full tuning: torchao's ``adamw_torch_8bit`` trains on the CPU (its first step compiles:
slow); the update-space safeguard, which predicts the update from float32 moments, refuses every 8-bit optimizer when
the config is made, and bitsandbytes' 8-bit optimizers are refused with ``use_cpu``."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.common import snapshot
from trl_diffusion_sdpo import DiffusionSDPOTrainer
from trl_diffusion_sdpo.engines.memory import RunShape, estimate_memory, model_sizes


@pytest.mark.parametrize("optim", ["adamw_torch_8bit", "adamw_bnb_8bit", "paged_adamw_8bit"])
def test_update_space_refuses_8bit_optimizers_naming_both_fields(make_config, optim) -> None:
    with pytest.raises(ValueError, match=rf"safeguard_space='update'.*optim='{optim}'.*safeguard_space='parameter'"):
        make_config(optim=optim, safeguard_space="update", use_cpu=optim == "adamw_torch_8bit")


@pytest.mark.parametrize("optim", ["adamw_bnb_8bit", "adamw_8bit", "lion_8bit"])
def test_bitsandbytes_8bit_optimizers_are_refused_on_the_cpu(make_config, optim) -> None:
    with pytest.raises(ValueError, match=rf"optim='{optim}' is a bitsandbytes 8-bit optimizer.*adamw_torch_8bit"):
        make_config(optim=optim, use_cpu=True)


def test_torchao_8bit_adamw_is_accepted_with_the_parameter_space() -> None:
    from trl_diffusion_sdpo import DiffusionSDPOConfig

    config = DiffusionSDPOConfig(
        output_dir="unused", optim="adamw_torch_8bit", safeguard_space="parameter", use_cpu=True, report_to="none"
    )
    assert str(getattr(config.optim, "value", config.optim)) == "adamw_torch_8bit"


def test_estimate_counts_two_bytes_of_8bit_optimizer_state_per_weight() -> None:
    sizes = model_sizes("trl-diffusion-sdpo:tiny")
    p = sum(t.numel() for t in sizes.denoiser.parameters())
    shape = {"pairs": 1, "resolution": 32, "lora_rank": None}
    assert estimate_memory(sizes, RunShape(**shape, optim="adamw_torch_8bit")).components["optimizer"] == 2 * p
    assert estimate_memory(sizes, RunShape(**shape, optim="adamw_torch")).components["optimizer"] == 8 * p


@pytest.mark.slow
def test_full_tuning_trains_with_torchao_8bit_adamw_and_the_one_pass_safeguard(
    make_pipeline, make_config, pickapic_dataset
) -> None:
    from torchao.optim import AdamW8bit
    from torchao.optim.subclass_8bit import OptimState8bit

    pipe = make_pipeline()
    before = snapshot(pipe.unet)
    trainer = DiffusionSDPOTrainer(
        pipe,
        args=make_config(optim="adamw_torch_8bit", safeguard_space="parameter", max_steps=2, learning_rate=1e-4),
        train_dataset=pickapic_dataset,
    )
    trainer.train()
    optimizer = trainer.optimizer.optimizer
    assert isinstance(optimizer, AdamW8bit)
    states = [optimizer.state[p] for group in optimizer.param_groups for p in group["params"]]
    # torchao keeps the moments of tensors of 4096 elements or more in 8 bits, the smaller ones in float32
    assert any(isinstance(state["exp_avg"], OptimState8bit) for state in states)
    changed = [name for name, value in pipe.unet.state_dict().items() if not torch.equal(value, before[name])]
    assert len(changed) == len(before)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)
    assert any("safeguard/lambda_mean" in h for h in trainer.state.log_history)
