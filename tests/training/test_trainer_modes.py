"""Suspected problems, each confirmed (and fixed) or ruled out by a test: one process driving several GPUs,
schedule-free optimizers under the parameter-space step, a dict of evaluation datasets, and fp16's gradient scaler
overflowing under ``on_nonfinite_loss="raise"``."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainingArguments

from tests.helpers.common import changed_keys, lora_config
from tests.helpers.trainer_steps import StepSnapshots, step_logs
from trl_diffusion_sdpo import DiffusionSDPOTrainer

# ------------------------------------------------------------------------------------- one process, several GPUs


def _seeing_gpus(args: TrainingArguments, count: int) -> TrainingArguments:
    """``args`` as transformers sets them up in a process started with ``python`` that sees ``count`` GPUs:
    ``_setup_devices`` then sets ``n_gpu`` to ``torch.cuda.device_count()`` (no GPU here: the count is set after the
    CPU setup, where nothing reads it again)."""
    _ = args.device  # the device setup runs once (a cached property) ...
    args._n_gpu = count  # ... and on a multi-GPU machine leaves this
    return args


def test_transformers_would_wrap_the_model_in_data_parallel_with_several_gpus(tmp_path):
    """The hazard, in transformers itself: with ``n_gpu > 1`` its model wrapping returns ``nn.DataParallel``."""
    args = _seeing_gpus(TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none"), 2)
    model = torch.nn.Linear(2, 2)
    wrapped = Trainer(model=model, args=args)._wrap_model(model, training=True)
    assert isinstance(wrapped, torch.nn.DataParallel)


def test_one_process_with_several_gpus_is_refused_with_the_launch_command(make_config, make_pipeline, make_pickapic):
    args = _seeing_gpus(make_config(), 4)
    with pytest.raises(ValueError, match="One process sees 4 GPUs") as info:
        DiffusionSDPOTrainer(make_pipeline(), args=args, train_dataset=make_pickapic(), peft_config=lora_config())
    assert "accelerate launch --num_processes 4" in str(info.value)
    assert "CUDA_VISIBLE_DEVICES=0" in str(info.value)


def test_one_process_with_one_gpu_or_none_trains(make_trainer):
    trainer = make_trainer(max_steps=1)
    assert trainer.args.n_gpu <= 1
    trainer.train()
    assert trainer.state.global_step == 1


# ------------------------------------------------------------------------------ schedule-free optimizers' modes


class ModalAdamW(torch.optim.AdamW):
    """AdamW with a schedule-free optimizer's contract (``schedulefree.AdamWScheduleFree``): created in eval mode,
    ``train()`` and ``eval()`` switch, and ``step()`` refuses to run in eval mode. Records each switch."""

    def __init__(self, params, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.training = False
        self.switches: list[str] = []

    def train(self) -> None:
        self.training = True
        self.switches.append("train")

    def eval(self) -> None:
        self.training = False
        self.switches.append("eval")

    def step(self, closure=None):
        if not self.training:
            raise RuntimeError("optimizer.step() called in eval mode: call optimizer.train() first")
        return super().step(closure)


@pytest.mark.parametrize("space", ["output", "parameter"])
def test_a_schedule_free_optimizer_is_in_train_mode_at_every_step_after_evaluations(
    make_trainer, make_pickapic, space
):
    """transformers' ``training_step`` calls ``optimizer.train()`` and its evaluation ``optimizer.eval()``; the
    parameter-space step, which replaces ``training_step``, must call ``train()`` too (it did not: step 1 raised)."""
    trainer = make_trainer(
        safeguard_space=space, max_steps=2, eval_dataset=make_pickapic(4), eval_strategy="steps", eval_steps=1
    )  # the evaluation after step 1 left it in eval mode: step 2 raised unless the step switched it back
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    trainer.optimizer = modal = ModalAdamW(params, lr=1e-3)
    snapshots = StepSnapshots(trainer.model)
    trainer.add_callback(snapshots)
    trainer.train()
    assert trainer.state.global_step == 2
    assert "eval" in modal.switches  # evaluations ran and switched it to eval mode in between
    before, *after = snapshots.snapshots
    assert all(changed_keys(a, b) for a, b in zip([before, *after], after))  # every step was applied


# ------------------------------------------------------------------------------ a dict of evaluation datasets


def test_a_dict_of_eval_datasets_is_evaluated_each_under_its_name(make_trainer, make_pickapic, trl_dataset):
    """As ``transformers.Trainer``: ``{"pickapic": a, "trl": b}`` logs ``eval_pickapic_*`` and ``eval_trl_*``, each
    the metrics that evaluating that dataset alone gives (its own columns: the TRL set names its own)."""
    pickapic = make_pickapic(4, labels=[1, 0.5, 0, 1])  # a tie, dropped and counted in that set's report
    both = make_trainer(eval_dataset={"pickapic": pickapic, "trl": trl_dataset})
    assert both.eval_data_report["pickapic"].ties_dropped == 1
    assert both.eval_data_report["trl"].ties_dropped == 0
    metrics = both.evaluate()
    for name, dataset in (("pickapic", pickapic), ("trl", trl_dataset)):
        alone = make_trainer(eval_dataset=dataset).evaluate()
        for key in ("eval_loss", "eval_implicit_acc", "eval_mse/policy_winner", "eval_delta/loser"):
            named = key.replace("eval_", f"eval_{name}_", 1)
            assert metrics[named] == pytest.approx(alone[key], rel=1e-6), named
    assert metrics["eval_pickapic_mse/policy_winner"] != pytest.approx(metrics["eval_trl_mse/policy_winner"])


def test_a_dict_of_eval_datasets_is_evaluated_during_training(make_trainer, make_pickapic, trl_dataset):
    trainer = make_trainer(
        eval_dataset={"a": make_pickapic(2), "b": trl_dataset}, max_steps=2, eval_strategy="steps", eval_steps=2
    )
    trainer.train()
    logged = {k for h in trainer.state.log_history for k in h}
    assert {"eval_a_loss", "eval_b_loss", "eval_a_implicit_acc", "eval_b_implicit_acc"} <= logged


def test_an_empty_dict_of_eval_datasets_is_refused(make_trainer):
    with pytest.raises(ValueError, match="eval_dataset is an empty dict"):
        make_trainer(eval_dataset={})


# ------------------------------------------------------------------------------------- fp16's gradient scaler


def _with_gradient_scaler(trainer) -> torch.amp.GradScaler:
    """Give ``trainer`` the gradient scaler accelerate makes for fp16 on a GPU (on the CPU accelerate makes none): it
    scales the loss, unscales and checks the gradients, skips an overflowing step and lowers its scale. The first
    scale, 2^127, overflows the scaled gradients of this model (an ordinary overflow, as fp16's 2^16 does at the
    start of a run); the backoff then brings it to 2^7, where the gradients fit."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-120, growth_interval=1000)
    trainer.accelerator.scaler = scaler
    return scaler


@pytest.mark.parametrize(
    ("on_nonfinite", "max_grad_norm"), [("raise", 1.0), ("skip", 0.0)], ids=["raise-clipping", "skip-no-clipping"]
)
def test_a_gradient_scaler_overflow_is_the_scalers_to_skip_not_a_non_finite_step(
    make_trainer, on_nonfinite, max_grad_norm
):
    """The non-finite guard took the scaler's ordinary first-step overflow for a non-finite gradient: with
    "raise" the run stopped at step 1; with "skip" and no clipping it dropped the gradients before the scaler looked
    at them, so the scale was never lowered and every step was skipped. Now the scaler skips the overflowing step and
    lowers its scale, the guard counts nothing, and the later steps are applied."""
    trainer = make_trainer(lora=False, max_steps=3, on_nonfinite_loss=on_nonfinite, max_grad_norm=max_grad_norm)
    scaler = _with_gradient_scaler(trainer)
    snapshots = StepSnapshots(trainer.model)
    trainer.add_callback(snapshots)
    trainer.train()
    assert scaler.get_scale() == 2.0**7  # one overflow, one backoff
    before, after_1, after_2, after_3 = snapshots.snapshots
    assert not changed_keys(before, after_1)  # the overflowing step was skipped (by the scaler)
    assert changed_keys(after_1, after_2) and changed_keys(after_2, after_3)
    assert all(torch.isfinite(v).all() for v in after_3.values())
    assert trainer.nonfinite.skipped == 0
    assert [h["nonfinite_skipped"] for h in step_logs(trainer)] == [0, 0, 0]


def test_a_non_finite_loss_under_a_gradient_scaler_is_still_raised_on(make_trainer, tmp_path):
    """The scaler owns gradient overflows, not losses: a NaN loss still stops a "raise" run."""
    trainer = make_trainer(lora=True, max_steps=2, on_nonfinite_loss="raise", output_dir=str(tmp_path / "run"))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**7)
    trainer.accelerator.scaler = scaler
    objective = trainer.objective

    class NaNLoss:
        name, requires_reference = objective.name, objective.requires_reference

        def __call__(self, predictions, errors, **kwargs):
            out = objective(predictions, errors, **kwargs)
            return type(out)(out.loss * float("nan"), out.logits)

    trainer.objective = NaNLoss()
    with pytest.raises(RuntimeError, match="Non-finite loss or gradient norm at optimizer step 1"):
        trainer.train()
