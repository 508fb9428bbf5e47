"""The trainer's public surface that callbacks act through: ``policy``, ``compute_dtype``, ``eval_collator``,
``dormant_safeguard``, ``set_safeguard`` and ``callbacks_of``, each checked against what the run does with it."""

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


def test_callbacks_of_finds_subclasses_and_trackers_by_their_own_class_in_the_order_they_run(make_trainer, tmp_path):
    """The one lookup: instances of a class, subclasses included (the config's ``TrainingLogAlarm`` is an
    ``AlarmCallback``), a tracker found by its own class and returned itself (registered in a ``TrackerCallback``), in
    the order transformers runs them; a class named by a module that is not loaded has nothing registered, and naming
    it loads nothing."""
    import sys

    from transformers import TrainerCallback
    from transformers.integrations import TensorBoardCallback

    from trl_diffusion_sdpo.callbacks import AlarmCallback, TrainingLogAlarm
    from trl_diffusion_sdpo.io.trackers import TrackerCallback

    tracker = TensorBoardCallback(tb_writer=None)
    trainer = make_trainer(max_steps=1, report_to="none", callbacks=[tracker])
    assert trainer.callbacks_of(AlarmCallback) == trainer.callbacks_of(TrainingLogAlarm) == [trainer.alarm]
    assert type(trainer.alarm) is TrainingLogAlarm
    assert trainer.callbacks_of(TensorBoardCallback) == [tracker]
    [registered] = trainer.callbacks_of(TrackerCallback)
    assert registered.tracker is tracker
    everything = trainer.callbacks_of(TrainerCallback)
    assert everything.index(trainer.alarm) < everything.index(registered)  # trackers after the package's callbacks
    assert "trl_diffusion_sdpo.not_loaded" not in sys.modules
    assert trainer.callbacks_of("trl_diffusion_sdpo.not_loaded:Anything") == []
    assert "trl_diffusion_sdpo.not_loaded" not in sys.modules
