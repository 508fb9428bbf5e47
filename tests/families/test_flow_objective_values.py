"""The flow families' objectives at the reference: the first step's loss has a known value, and the step trains.

At the first step the policy equals the reference (full tuning copies it; LoRA's B matrices start at zero), so the
Diffusion-DPO logit ``u`` is 0 and every objective's value follows from its formula alone: DPO ``-log sigmoid(0) =
log 2``, DMPO ``KL(Bernoulli(1/2) || Bernoulli(1 - alpha))``, and DSPO and SFT the winners' mean error (DSPO's
policy-reference gap is zero). A loss that is merely finite could be any of these, or a constant; the values pin
each objective down, and the weights moved after the step show its gradient reached the optimizer.
"""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig

from tests.helpers.common import LORA_TARGETS, pickapic_rows
from trl_diffusion_sdpo import DiffusionSDPOTrainer
from trl_diffusion_sdpo.testing import build_tiny_flux_pipeline, build_tiny_sd3_pipeline

SEQ = 16  # T5 tokens
BUILDERS = {"sd3": build_tiny_sd3_pipeline, "flux": build_tiny_flux_pipeline}


def _trainer(kind: str, tmp_path, make_config, lora: bool, pipeline_kwargs: dict | None = None, **overrides):
    pipe = BUILDERS[kind](
        seed=0, tokenizer_dir=str(tmp_path / f"tok-{kind}"), max_length=SEQ, **(pipeline_kwargs or {})
    )
    args = make_config(**{"beta": 100.0, "max_sequence_length": SEQ, "max_steps": 1, **overrides})
    peft = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=LORA_TARGETS) if lora else None
    return DiffusionSDPOTrainer(pipe, args=args, train_dataset=Dataset.from_list(pickapic_rows(4)), peft_config=peft)


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}


def _train_one_step(trainer: DiffusionSDPOTrainer) -> dict:
    """Train one step; return its log, after checking that the trainable weights moved."""
    before = _trainable(trainer.model)
    assert before, "nothing to train"
    trainer.train()
    after = _trainable(trainer.model)
    moved = [n for n in before if not torch.equal(before[n], after[n])]
    assert moved, "the step left every trainable weight where it was"
    if trainer.is_lora:  # LoRA's B matrices start at zero: the step must move them
        assert any("lora_B" in n for n in moved)
    return next(h for h in trainer.state.log_history if "loss" in h)


@pytest.mark.parametrize(
    "kind,lora,pipeline_kwargs",
    [
        ("sd3", True, {}),
        ("sd3", False, {}),
        ("flux", True, {}),
        ("flux", False, {"guidance_embeds": False}),  # FLUX.1-schnell: no guidance embedding
    ],
    ids=["sd3-lora", "sd3-full", "flux-lora", "flux-schnell-full"],
)
def test_flow_dpo_starts_at_log_2_and_its_step_moves_the_weights(tmp_path, make_config, kind, lora, pipeline_kwargs):
    trainer = _trainer(kind, tmp_path, make_config, lora, pipeline_kwargs)
    log = _train_one_step(trainer)
    assert log["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert log["implicit_acc"] in (0.0, 0.5, 1.0) and log["delta/winner"] == 0.0


def test_flow_dpo_in_bf16_starts_at_log_2_and_trains_the_float32_adapters(tmp_path, make_config):
    trainer = _trainer("sd3", tmp_path, make_config, lora=True, bf16=True)
    log = _train_one_step(trainer)
    # The reference is the adapter-disabled policy in the same bf16 arithmetic: u is exactly 0.
    assert log["loss"] == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize("loss_type", ["dspo", "dmpo", "sft"])
def test_other_objectives_on_a_flow_model_start_at_their_value_at_the_reference(tmp_path, make_config, loss_type):
    trainer = _trainer(
        "sd3",
        tmp_path,
        make_config,
        lora=True,
        loss_type=loss_type,
        safeguard_space="none" if loss_type == "sft" else "output",
    )
    log = _train_one_step(trainer)
    if loss_type == "dmpo":
        p, q = 0.5, 1.0 - 0.01  # sigmoid(0); the default dmpo_alpha = 0.01 gives q = 1 - alpha
        expected = p * (math.log(p) - math.log(q)) + (1 - p) * (math.log(1 - p) - math.log(1 - q))
    else:  # DSPO with a zero policy-reference gap, and SFT: the winners' mean error
        expected = log["mse/policy_winner"]
    assert log["loss"] == pytest.approx(expected, rel=1e-5)
