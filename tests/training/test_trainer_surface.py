"""The trainer's public surface that callbacks act through: ``policy``, ``compute_dtype``, ``eval_collator``,
``dormant_safeguard`` and ``set_safeguard``, each checked against what the run does with it."""

from __future__ import annotations

import torch

from trl_diffusion_sdpo.engines.base import trainable_parameters
from trl_diffusion_sdpo.safeguards import OutputSpace


def test_the_policy_is_the_module_whose_trainable_weights_the_optimizer_steps(make_trainer):
    trainer = make_trainer(max_steps=1, safeguard_space="none")
    before = [p.detach().clone() for p in trainable_parameters(trainer.policy)]
    trainer.train()
    stepped = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    weights = list(trainable_parameters(trainer.policy))
    assert weights and {id(p) for p in weights} == stepped
    assert any(not torch.equal(a, b) for a, b in zip(before, weights, strict=True))
    # The reference is held in the dtype the denoiser computes in, which the property names.
    assert trainer.compute_dtype == torch.float32 and trainer.family.vae.dtype == trainer.compute_dtype


def test_the_eval_collator_collates_the_eval_rows_the_evaluation_reads(make_trainer, make_pickapic):
    evaluation = make_pickapic(2)
    trainer = make_trainer(eval_dataset=evaluation)
    batch = trainer.eval_collator([trainer.eval_dataset[i] for i in range(2)])
    tokens = trainer.family.prompt_tokenizer()(list(evaluation["caption"]))
    assert torch.equal(batch["input_ids"], tokens["input_ids"])


def test_set_safeguard_puts_the_dormant_safeguard_in_force_and_none_takes_it_out(make_trainer):
    trainer = make_trainer(max_steps=1, logging_steps=1, safeguard_space="none", on_pathology="safeguard")
    dormant = trainer.dormant_safeguard
    assert trainer.safeguard is None and isinstance(dormant, OutputSpace)
    trainer.set_safeguard(dormant)
    assert trainer.safeguard is dormant and trainer.dormant_safeguard is None
    trainer.train()
    assert any("safeguard/lambda_mean" in entry for entry in trainer.state.log_history)  # the step ran it

    plain = make_trainer(max_steps=1, logging_steps=1, safeguard_space="output", safeguard_mu=0.5)
    plain.set_safeguard(None)
    plain.train()
    logged = [entry for entry in plain.state.log_history if "loss" in entry]
    assert logged and not any("safeguard/lambda_mean" in entry for entry in logged)
