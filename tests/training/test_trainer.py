"""DiffusionSDPOTrainer on a tiny real Stable Diffusion pipeline: what trains, what stays frozen, what is logged."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from tests.helpers.common import StopAt, changed_keys, snapshot
from tests.helpers.fixtures import tiny_sd_pipeline
from tests.helpers.trainer_steps import StepSnapshots, step_logs
from trl_diffusion_sdpo import DiffusionSDPOTrainer
from trl_diffusion_sdpo.families.noising import prediction_target
from trl_diffusion_sdpo.objectives import ObjectiveOutput
from trl_diffusion_sdpo.step.predictions import Reference, disabled_adapters

LOGGED_METRICS = [
    "loss",
    "implicit_acc",
    "mse/policy_winner",
    "mse/policy_loser",
    "mse/ref_winner",
    "mse/ref_loser",
    "delta/winner",
    "delta/loser",
    "safeguard/lambda_mean",
    "safeguard/lambda_min",
    "safeguard/lambda_max",
    "safeguard/engaged",
]


def unet_inputs(seed: int = 123, batch: int = 2):
    """Fixed UNet inputs for comparing two UNets' outputs."""
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 4, 4, 4, generator=gen)
    timesteps = torch.randint(0, 1000, (batch,), generator=gen)
    hidden = torch.randn(batch, 32, 32, generator=gen)
    return sample, timesteps, hidden


@torch.no_grad()
def unet_output(unet, inputs) -> torch.Tensor:
    sample, timesteps, hidden = inputs
    return unet(sample, timesteps, encoder_hidden_states=hidden, return_dict=False)[0]


@pytest.fixture(scope="module")
def trained_runs() -> dict[bool, dict]:
    """The default config's 3-step run of the seed-0 pipeline passed in, LoRA (``True``) and full tuning (``False``),
    made once per module by the first test that asks (:func:`trained_run`) for the tests that only read what it left:
    the pipeline, the trainer, and the weights taken before training. No test trains or evaluates with it (sampling
    from the pipeline leaves its weights as they are)."""
    return {}


def trained_run(trained_runs: dict, make_trainer, lora: bool) -> dict:
    if lora not in trained_runs:
        pipe = tiny_sd_pipeline(seed=0)
        run = {"pipe": pipe, "unet": snapshot(pipe.unet), "vae": snapshot(pipe.vae)}
        run["text_encoder"] = snapshot(pipe.text_encoder)
        run["trainer"] = trainer = make_trainer(pipeline=pipe, lora=lora)
        run["unet_with_adapters"] = snapshot(pipe.unet)
        run["reference"] = None if lora else snapshot(trainer.reference.denoiser)
        trainer.train()
        trained_runs[lora] = run
    return trained_runs[lora]


# ----------------------------------------------------------------------------------------------- initial state


def test_lora_at_initialisation_gives_loss_log_two_and_implicit_accuracy_half(make_trainer, pickapic_dataset):
    trainer = make_trainer(max_steps=1, eval_dataset=pickapic_dataset)
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["eval_implicit_acc"] == 0.5
    trainer.train()
    first = step_logs(trainer)[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["implicit_acc"] == 0.5
    assert first["delta/winner"] == 0.0 and first["delta/loser"] == 0.0
    assert first["mse/policy_winner"] == first["mse/ref_winner"]


def test_train_logs_every_listed_metric_with_consistent_values(trained_runs, make_trainer):
    trainer = trained_run(trained_runs, make_trainer, lora=True)["trainer"]
    logs = step_logs(trainer)
    assert len(logs) == 3
    for log in logs:
        missing = [name for name in LOGGED_METRICS if name not in log]
        assert not missing, f"not logged: {missing}"
        assert log["safeguard/lambda_min"] <= log["safeguard/lambda_mean"] <= log["safeguard/lambda_max"] <= 1.0
        assert 0.0 <= log["safeguard/engaged"] <= 1.0
        assert 0.0 <= log["implicit_acc"] <= 1.0
        assert log["delta/winner"] == pytest.approx(log["mse/policy_winner"] - log["mse/ref_winner"], abs=1e-5)
        assert log["delta/loser"] == pytest.approx(log["mse/policy_loser"] - log["mse/ref_loser"], abs=1e-5)
        assert log["nonfinite_skipped"] == 0
        assert log["data/skipped_rows"] == 0


def test_evaluate_returns_and_logs_every_metric_with_the_eval_prefix(make_trainer, pickapic_dataset):
    trainer = make_trainer(max_steps=1, eval_dataset=pickapic_dataset)
    metrics = trainer.evaluate()
    missing = [f"eval_{name}" for name in LOGGED_METRICS if f"eval_{name}" not in metrics]
    assert not missing, f"not returned by evaluate(): {missing}"
    logged = trainer.state.log_history[-1]
    assert {k: v for k, v in metrics.items() if k != "epoch"} == {
        k: v for k, v in logged.items() if k not in ("step", "epoch")
    }
    assert not any(k.startswith("eval_eval_") for k in metrics)
    # Training logs afterwards carry no eval metrics, and the eval buffers do not leak into them.
    trainer.train()
    assert not any(k.startswith("eval_") for log in step_logs(trainer) for k in log)
    # A custom prefix is honoured.
    custom = trainer.evaluate(metric_key_prefix="test")
    assert "test_implicit_acc" in custom and "test_safeguard/lambda_mean" in custom


def test_safeguard_off_logs_no_lambda(make_trainer):
    trainer = make_trainer(max_steps=1, safeguard_space="none")
    trainer.train()
    log = step_logs(trainer)[0]
    assert not any(k.startswith("safeguard/") for k in log)
    assert "implicit_acc" in log and "mse/policy_loser" in log


# ----------------------------------------------------------------------------------------------- what trains


def test_lora_training_changes_only_lora_weights(trained_runs, make_trainer):
    run = trained_run(trained_runs, make_trainer, lora=True)
    pipe, vae, text = run["pipe"], run["vae"], run["text_encoder"]
    unet_before = run["unet_with_adapters"]  # with the freshly added adapters
    changed = changed_keys(unet_before, snapshot(pipe.unet))
    assert changed, "training changed nothing"
    assert all("lora_" in k for k in changed), sorted(k for k in changed if "lora_" not in k)
    assert any("lora_B" in k for k in changed)
    assert not changed_keys(vae, snapshot(pipe.vae))
    assert not changed_keys(text, snapshot(pipe.text_encoder))


def test_full_training_changes_the_unet_and_nothing_else(trained_runs, make_trainer):
    run = trained_run(trained_runs, make_trainer, lora=False)
    pipe, trainer, reference_before = run["pipe"], run["trainer"], run["reference"]
    unet, vae, text = run["unet"], run["vae"], run["text_encoder"]
    changed = changed_keys(unet, snapshot(pipe.unet))
    assert len(changed) > len(unet) // 2  # most UNet tensors moved
    assert not changed_keys(vae, snapshot(pipe.vae))
    assert not changed_keys(text, snapshot(pipe.text_encoder))
    # The frozen reference copy holds the initial weights, before and after.
    assert not changed_keys(unet, reference_before)
    assert not changed_keys(reference_before, snapshot(trainer.reference.denoiser))
    assert trainer.reference.denoiser is not pipe.unet


def test_lora_reference_is_the_original_unet_after_training(trained_runs, make_pipeline, make_trainer):
    run = trained_run(trained_runs, make_trainer, lora=True)
    pipe, trainer = run["pipe"], run["trainer"]
    original = make_pipeline(seed=0).unet
    inputs = unet_inputs()
    with disabled_adapters(pipe.unet) as base:
        torch.testing.assert_close(unet_output(base, inputs), unet_output(original, inputs), rtol=0, atol=0)
    # The adapters are back on afterwards and make a difference.
    assert not torch.allclose(unet_output(pipe.unet, inputs), unet_output(original, inputs))
    reference = trainer.reference.predict(*inputs[:2], encoder_hidden_states=inputs[2])
    torch.testing.assert_close(reference, unet_output(original, inputs), rtol=0, atol=0)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_the_pipeline_passed_in_is_tuned_in_place(trained_runs, make_pipeline, make_trainer, lora):
    run = trained_run(trained_runs, make_trainer, lora=lora)
    pipe, trainer = run["pipe"], run["trainer"]
    original = make_pipeline(seed=0).unet
    inputs = unet_inputs()
    assert trainer.accelerator.unwrap_model(trainer.model) is pipe.unet
    assert not torch.allclose(unet_output(pipe.unet, inputs), unet_output(original, inputs))
    # The tuned pipeline still samples.
    image = pipe("a picture", num_inference_steps=2, height=32, width=32, output_type="np").images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()


def test_a_reference_must_implement_predict():
    class Incomplete(Reference):
        pass

    with pytest.raises(TypeError, match="predict"):
        Incomplete()


def test_same_object_as_policy_and_reference_raises(make_pipeline, make_trainer):
    pipe = make_pipeline()
    with pytest.raises(ValueError, match="same object"):
        make_trainer(pipeline=pipe, lora=False, ref_model=pipe)
    with pytest.raises(ValueError, match="same object"):
        make_trainer(pipeline=pipe, lora=False, ref_model=pipe.unet)


def test_explicit_reference_model_is_used_and_stays_frozen(make_pipeline, make_trainer):
    pipe, ref_pipe = make_pipeline(seed=0), make_pipeline(seed=1)
    ref_before = snapshot(ref_pipe.unet)
    trainer = make_trainer(pipeline=pipe, lora=False, ref_model=ref_pipe)
    assert trainer.reference.denoiser is ref_pipe.unet
    trainer.train()
    assert not changed_keys(ref_before, snapshot(ref_pipe.unet))
    # A different reference: the policy's and reference's errors differ from the first step.
    first = step_logs(trainer)[0]
    assert first["mse/policy_winner"] != first["mse/ref_winner"]


# ----------------------------------------------------------------------------------------------- the step itself


def _hand_computed_step(trainer, pipe, inputs, captured, beta, mu, safeguard):
    """The loss and parameter gradients of one step, recomputed from the formulas in the method reference.

    Uses only what the trainer drew at random (VAE latents, timesteps, noise) and computes everything else on its own:
    forward noising from ``alphas_cumprod``, the target, separate UNet forwards per branch, errors, ``u``, the
    float64 ``lambda`` and the analytic derivative of ``-logsigmoid``.
    """
    policy = trainer.accelerator.unwrap_model(trainer.model)
    latents = captured["latents"].float()
    timesteps, noise = captured["timesteps"], captured["noise"].float()
    batch = noise.shape[0]
    abar = trainer.noiser.scheduler.alphas_cumprod.double()[timesteps].float().view(-1, 1, 1, 1)
    hidden = pipe.text_encoder(inputs["input_ids"]).last_hidden_state
    prediction_type = pipe.scheduler.config.prediction_type

    def branch(z):
        x_t = abar.sqrt() * z + (1 - abar).sqrt() * noise
        target = noise if prediction_type == "epsilon" else abar.sqrt() * noise - (1 - abar).sqrt() * z
        pred = policy(x_t, timesteps, encoder_hidden_states=hidden).sample
        if trainer.is_lora:
            with torch.no_grad(), disabled_adapters(policy):
                ref = policy(x_t, timesteps, encoder_hidden_states=hidden).sample
        else:
            with torch.no_grad():
                ref = trainer.reference.denoiser(x_t, timesteps, encoder_hidden_states=hidden).sample
        return pred, ref, target

    pred_w, ref_w, target_w = branch(latents[:batch])
    pred_l, ref_l, target_l = branch(latents[batch:])
    err = lambda p, t: ((p - t) ** 2).mean(dim=(1, 2, 3))  # noqa: E731
    e_w, e_l = err(pred_w, target_w), err(pred_l, target_l)
    r_w, r_l = err(ref_w, target_w).double(), err(ref_l, target_l).double()
    u = -0.5 * beta * ((e_w.detach().double() - e_l.detach().double()) - (r_w - r_l))
    loss = -torch.nn.functional.logsigmoid(u).mean()

    res_w = (pred_w - target_w).detach().double()
    res_l = (pred_l - target_l).detach().double()
    num, den = float((res_w * res_w).sum()), float((res_l * res_w).sum())
    lam = min(max((1 - mu) * num / (den + 1e-9), 0.0), 1.0) if den > 0 else 1.0
    lam = lam if safeguard else 1.0
    # dL/de_w = 0.5 beta (1 - sigmoid(u)) / B, dL/de_l = -lambda * that (the safeguard scales the loser's gradient).
    coeff = (0.5 * beta * (1 - torch.sigmoid(u)) / batch).float()
    surrogate = (coeff * e_w).sum() - lam * (coeff * e_l).sum()
    params = [p for p in policy.parameters() if p.requires_grad]
    grads = torch.autograd.grad(surrogate, params)
    return float(loss), lam, [g.detach() for g in grads], u


@pytest.mark.parametrize(
    "lora,prediction_type,safeguard",
    [(False, "epsilon", True), (True, "epsilon", True), (False, "v_prediction", True), (False, "epsilon", False)],
    ids=["full-eps-sdpo", "lora-eps-sdpo", "full-v-sdpo", "full-eps-dpo"],
)
def test_training_step_loss_and_gradients_match_a_hand_computation(
    make_pipeline, make_trainer, monkeypatch, lora, prediction_type, safeguard
):
    beta, mu = 200.0, 0.5
    pipe = make_pipeline(prediction_type=prediction_type)
    trainer = make_trainer(
        pipeline=pipe,
        lora=lora,
        beta=beta,
        safeguard_mu=mu,
        safeguard_space="output" if safeguard else "none",
        proportion_empty_prompts=0.0,
    )
    model = trainer.model
    # Move the policy away from the reference so that u != 0 and the two branches get different weights.
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn(p.shape, generator=gen))

    captured = {}

    real_noise = trainer.stages.noise

    def record(*args, **kwargs):
        noised = real_noise(*args, **kwargs)
        half = noised.timesteps.shape[0] // 2  # winners and losers share them
        captured["timesteps"], captured["noise"] = noised.timesteps[:half], noised.noise[:half]
        captured["latents"] = noised.latents
        return noised

    monkeypatch.setattr(trainer.stages, "noise", record)

    inputs = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(2)]))
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    trainer.current_gradient_accumulation_steps = 1  # what train() sets for each accumulation window
    loss = trainer.training_step(model, inputs)  # the backward included, averaged over one micro-batch
    got = [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]
    lam_logged = trainer._metrics["train"]["safeguard/lambda"][-1].item() if safeguard else 1.0
    model.zero_grad(set_to_none=True)

    expected_loss, expected_lam, expected, u = _hand_computed_step(
        trainer, pipe, inputs, captured, beta, mu, safeguard
    )
    assert (u.abs() > 1e-3).all(), "the test needs a policy that differs from its reference"
    assert loss.item() == pytest.approx(expected_loss, rel=1e-4)
    assert lam_logged == pytest.approx(expected_lam, rel=1e-5)
    if safeguard:
        assert 0.0 < expected_lam < 1.0, "the test needs an active safeguard"
    grad_norm = torch.sqrt(sum((g.double() ** 2).sum() for g in expected))
    diff_norm = torch.sqrt(sum(((a.double() - b.double()) ** 2).sum() for a, b in zip(got, expected)))
    assert diff_norm / grad_norm < 1e-4
    if safeguard:
        # And it is not the plain-DPO gradient: the safeguard really reaches the parameters.
        _, _, plain, _ = _hand_computed_step(trainer, pipe, inputs, captured, beta, mu, safeguard=False)
        plain_diff = torch.sqrt(sum(((a.double() - b.double()) ** 2).sum() for a, b in zip(got, plain)))
        assert plain_diff / grad_norm > 1e-2


def test_v_prediction_target_is_the_velocity(make_pipeline):
    pipe = make_pipeline(prediction_type="v_prediction")
    from trl_diffusion_sdpo.families.noising import training_scheduler

    scheduler = training_scheduler(pipe.scheduler)
    assert scheduler.config.prediction_type == "v_prediction"
    gen = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, 4, 4, generator=gen), torch.randn(3, 4, 4, 4, generator=gen)
    timesteps = torch.tensor([0, 500, 999])
    abar = scheduler.alphas_cumprod.double()[timesteps].view(-1, 1, 1, 1)
    by_hand = (abar.sqrt() * noise.double() - (1 - abar).sqrt() * latents.double()).float()
    target = prediction_target(scheduler, latents, noise, timesteps)
    torch.testing.assert_close(target, by_hand)
    torch.testing.assert_close(target, scheduler.get_velocity(latents, noise, timesteps))
    eps_scheduler = training_scheduler(make_pipeline(prediction_type="epsilon").scheduler)
    assert torch.equal(prediction_target(eps_scheduler, latents, noise, timesteps), noise)


def test_v_prediction_pipeline_trains(make_pipeline, make_trainer):
    trainer = make_trainer(pipeline=make_pipeline(prediction_type="v_prediction"))
    assert trainer.noiser.scheduler.config.prediction_type == "v_prediction"
    trainer.train()
    logs = step_logs(trainer)
    assert len(logs) == 3 and all(np.isfinite(h["loss"]) for h in logs)
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


# ----------------------------------------------------------------------------------------------- evaluation


def test_two_evaluations_with_the_fixed_seed_agree(make_trainer, pickapic_dataset):
    trainer = make_trainer(lora=False, eval_dataset=pickapic_dataset, max_steps=1)
    trainer.train()
    volatile = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "epoch")
    first = {k: v for k, v in trainer.evaluate().items() if k not in volatile}
    torch.manual_seed(1234)  # the global RNG does not matter
    second = {k: v for k, v in trainer.evaluate().items() if k not in volatile}
    assert first == second
    assert first["eval_loss"] != pytest.approx(math.log(2), abs=1e-4)  # trained: not the initial value
    trainer.args.seed = 1  # evaluation draws from the run's seed
    other = trainer.evaluate()
    assert other["eval_mse/policy_winner"] != first["eval_mse/policy_winner"]


def test_evaluation_uses_no_prompt_dropout_and_does_not_train(make_trainer, pickapic_dataset):
    trainer = make_trainer(lora=False, eval_dataset=pickapic_dataset, proportion_empty_prompts=1.0)
    before = snapshot(trainer.model)
    hidden = []
    trainer.model.register_forward_pre_hook(
        lambda module, args, kwargs: hidden.append(kwargs["encoder_hidden_states"]), with_kwargs=True
    )
    trainer.evaluate()
    assert not changed_keys(before, snapshot(trainer.model))
    family = trainer.family
    with torch.no_grad():
        tokenize = family.prompt_tokenizer()
        empty = family.encode_prompts(tokenize([""])).encoder_hidden_states[0]
        captions = family.encode_prompts(tokenize(list(pickapic_dataset["caption"]))).encoder_hidden_states
    seen = torch.cat(hidden)
    assert seen.shape[0] == 2 * len(pickapic_dataset)
    for row in seen:  # every row carries a caption's embedding, never the empty prompt's
        assert not torch.allclose(row, empty)
        assert any(torch.allclose(row, c, atol=1e-5) for c in captions)


# ----------------------------------------------------------------------------------------------- non-finite losses


def _poison_step(trainer: DiffusionSDPOTrainer, bad_call: int) -> None:
    """Make the objective's loss NaN on the ``bad_call``-th training call (1-based)."""
    objective = trainer.objective
    calls = {"n": 0}

    class Poisoned:
        name = objective.name
        requires_reference = objective.requires_reference

        def __call__(self, predictions, errors, **kwargs):
            out = objective(predictions, errors, **kwargs)
            if trainer.model.training:
                calls["n"] += 1
                if calls["n"] == bad_call:
                    return ObjectiveOutput(loss=out.loss * float("nan"), logits=out.logits)
            return out

    trainer.objective = Poisoned()


def test_nonfinite_loss_is_skipped_without_touching_parameters_or_optimizer(make_trainer):
    trainer = make_trainer(lora=False, max_steps=3, on_nonfinite_loss="skip")
    _poison_step(trainer, bad_call=2)
    snapshots = StepSnapshots(trainer.model)
    trainer.add_callback(snapshots)
    trainer.train()
    before, after_1, after_2, after_3 = snapshots.snapshots
    assert changed_keys(before, after_1)
    assert not changed_keys(after_1, after_2), "the non-finite step changed parameters"
    assert changed_keys(after_2, after_3)
    assert all(torch.isfinite(v).all() for v in after_3.values())
    # The optimizer saw two steps, not three.
    adam_steps = {float(s["step"]) for s in trainer.optimizer.state.values()}
    assert adam_steps == {2.0}
    logs = step_logs(trainer)
    assert [h["nonfinite_skipped"] for h in logs] == [0, 1, 1]


def test_nonfinite_micro_batch_skips_the_whole_accumulated_step(make_trainer):
    trainer = make_trainer(lora=True, max_steps=2, gradient_accumulation_steps=2, on_nonfinite_loss="skip")
    _poison_step(trainer, bad_call=2)  # the second micro-batch of the first optimizer step
    snapshots = StepSnapshots(trainer.model)
    trainer.add_callback(snapshots)
    trainer.train()
    before, after_1, after_2 = snapshots.snapshots
    assert not changed_keys(before, after_1)
    assert changed_keys(after_1, after_2)


def test_nonfinite_loss_with_raise_stops_with_runtime_error_after_a_checkpoint(make_trainer, tmp_path):
    trainer = make_trainer(lora=True, max_steps=3, on_nonfinite_loss="raise", output_dir=str(tmp_path / "run"))
    _poison_step(trainer, bad_call=2)
    snapshots = StepSnapshots(trainer.model)
    trainer.add_callback(snapshots)
    with pytest.raises(RuntimeError, match="Non-finite loss"):
        trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-1"
    assert (checkpoint / "pytorch_lora_weights.safetensors").is_file()
    # The checkpoint holds the last good state (after step 1), which a new trainer resumes from.
    from safetensors.torch import load_file

    saved = load_file(checkpoint / "pytorch_lora_weights.safetensors")
    lora_b = [v for k, v in saved.items() if "lora_B" in k or "lora.up" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)
    after_1 = snapshots.snapshots[1]
    current = {n: p.detach() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert not changed_keys(after_1, current)


# ----------------------------------------------------------------------------------------------- resume


# By default: LoRA's bit-exact resume in test_checkpoints.py's test_a_run_killed_during_a_save_resumes_... and
# test_preemption.py's SIGTERM test, the resumed logs in test_log_window_resume.py,
# full tuning's in test_checkpoint_parts.py's full-tuning rewind resume
@pytest.mark.slow
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_resuming_from_a_checkpoint_gives_the_weights_of_an_uninterrupted_run(
    make_pipeline, make_config, pickapic_dataset, tmp_path, lora
):
    from tests.helpers.common import lora_config

    def run(output_dir, stop_at=None, resume=None):
        trainer = DiffusionSDPOTrainer(
            make_pipeline(seed=0),
            args=make_config(
                output_dir=str(output_dir),
                max_steps=4,
                save_strategy="steps",
                save_steps=2,
                random_flip=True,
                proportion_empty_prompts=0.5,
                learning_rate=1e-3 if lora else 1e-4,
            ),
            train_dataset=pickapic_dataset,
            peft_config=lora_config() if lora else None,
        )
        if stop_at is not None:
            trainer.add_callback(StopAt(stop_at))
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    straight = run(tmp_path / "straight")
    interrupted = run(tmp_path / "interrupted", stop_at=2)
    assert interrupted.state.global_step == 2
    checkpoint = tmp_path / "interrupted" / "checkpoint-2"
    assert checkpoint.is_dir()
    resumed = run(tmp_path / "interrupted", resume=str(checkpoint))
    assert resumed.state.global_step == 4
    a, b = snapshot(straight.model), snapshot(resumed.model)
    assert changed_keys(snapshot(interrupted.model), b), "resuming trained nothing"
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7, msg=key)
    # And the logged losses of steps 3 and 4 agree.
    tail = lambda t: [h["loss"] for h in step_logs(t) if h["step"] > 2]  # noqa: E731
    assert tail(resumed) == pytest.approx(tail(straight), rel=1e-5)


def test_resume_from_a_folder_without_weights_raises(make_trainer, tmp_path):
    trainer = make_trainer()
    empty = tmp_path / "checkpoint-7"
    os.makedirs(empty)
    with pytest.raises(ValueError, match="No trl-diffusion-sdpo weights"):
        trainer._load_from_checkpoint(str(empty))


def test_evaluation_during_training_logs_eval_metrics_and_tracks_the_best_model(make_trainer, pickapic_dataset):
    trainer = make_trainer(
        lora=True,
        max_steps=2,
        eval_dataset=pickapic_dataset,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="implicit_acc",
    )
    trainer.train()
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [1, 2]
    assert all(f"eval_{name}" in h for h in evals for name in LOGGED_METRICS)
    assert all(not any(k.startswith("eval_") for k in h) for h in step_logs(trainer))
    scores = [h["eval_implicit_acc"] for h in evals]
    best_step = evals[scores.index(max(scores))]["step"]  # the first of equal scores stays best
    assert trainer.state.best_metric == max(scores)
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best_step}")


def test_bf16_lora_training_keeps_adapters_in_float32(make_pipeline, make_trainer):
    pipe = make_pipeline()
    trainer = make_trainer(pipeline=pipe, bf16=True, max_steps=2)
    trainer.train()
    trainable = [p for p in pipe.unet.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert pipe.vae.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16
    assert all(np.isfinite(h["loss"]) for h in step_logs(trainer))


def test_bf16_lora_adapters_take_the_autocast_input_without_a_float32_copy(make_pipeline, make_trainer):
    """Under the trainer's autocast, peft's LoRA layers do not cast their input to the adapters' float32 (the
    autocast casts it back for the matmul): the same output, and less kept for the backward (no copy of each targeted
    layer's input). Outside the trainer's block they cast again."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    pipe = make_pipeline()
    trainer = make_trainer(pipeline=pipe, bf16=True, max_steps=1)
    trainer.train()  # accelerate wraps the forward in its autocast
    unet = pipe.unet
    layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, unet.config.in_channels, 8, 8, generator=generator)
    text = torch.randn(2, 6, unet.config.cross_attention_dim, generator=generator)

    def forward(cast: bool) -> tuple[torch.Tensor, int]:
        kept: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with trainer.mixed_precision_forward.running():
            assert not any(layer.cast_input_dtype_enabled for layer in layers)
            for layer in layers:
                layer.cast_input_dtype_enabled = cast
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = unet(sample, torch.tensor([10, 500]), encoder_hidden_states=text).sample
        return out.detach(), sum(kept.values())

    plain, plain_bytes = forward(cast=False)
    casting, casting_bytes = forward(cast=True)
    assert all(layer.cast_input_dtype_enabled for layer in layers)  # restored outside the block
    torch.testing.assert_close(plain, casting, rtol=0, atol=0)
    assert plain_bytes < casting_bytes, (plain_bytes, casting_bytes)


# ----------------------------------------------------------------------------------------------- several processes


def test_an_all_invalid_micro_batch_under_several_processes_joins_in_with_zero_weight(make_trainer, monkeypatch):
    """With several processes a micro-batch cannot be left out (the others wait in collectives): the last good one
    is replayed with weight zero, its metrics are not recorded; with no earlier good one a placeholder pair runs with
    weight zero (``PreferenceCollator.blank_batch``)."""
    from accelerate import Accelerator

    trainer = make_trainer(lora=False)
    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    collate = trainer.data_collator
    good = trainer._prepare_inputs(collate([trainer.train_dataset[i] for i in range(2)]))
    empty = trainer._prepare_inputs(collate([]))
    model = trainer.model
    model.train()
    first = trainer.compute_loss(model, empty)  # nothing to replay yet: the placeholder pair, weight zero
    assert first.item() == 0.0 and not trainer._metrics["train"]["implicit_acc"]
    good_loss = trainer.compute_loss(model, good)
    recorded = len(trainer._metrics["train"]["implicit_acc"])
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, empty)
    assert loss.item() == 0.0 and good_loss.item() > 0.0
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads), "the replay must run a real forward and backward"
    assert all(torch.count_nonzero(g) == 0 for g in grads)
    assert len(trainer._metrics["train"]["implicit_acc"]) == recorded


def test_global_safeguard_scope_sums_over_processes(make_trainer, monkeypatch):
    """``safeguard_scope="global"`` feeds the all-reduced sums to lambda; "local" never communicates."""
    from accelerate import Accelerator

    import trl_diffusion_sdpo.safeguards.output as trainer_module
    from trl_diffusion_sdpo.safeguards.output import lambda_from_sums, output_space_lambda, safeguard_sums

    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    seen = []

    def fake_all_reduce(tensor):  # another process with the sums (num, den) = (3, 1) over 100 elements
        seen.append(tensor.clone())
        return tensor + torch.tensor([3.0, 1.0, 100.0])

    monkeypatch.setattr(trainer_module, "all_reduce_sum", fake_all_reduce)
    gen = torch.Generator().manual_seed(0)
    from trl_diffusion_sdpo.objectives import PreferencePredictions

    shape = (2, 4, 4, 4)
    r = [torch.randn(shape, generator=gen) for _ in range(4)]
    predictions = PreferencePredictions(r[0], r[1], r[2], r[3], None, None)
    num, den = safeguard_sums(r[0] - r[2], r[1] - r[3])
    n = r[0].numel()
    for scope, expected in (("local", (num, den, n)), ("global", (num + 3.0, den + 1.0, n + 100))):
        lam = output_space_lambda(predictions, 0.5, 1.0, fake_all_reduce if scope == "global" else None)
        torch.testing.assert_close(lam, lambda_from_sums(expected[0], expected[1], 0.5, 1.0, expected[2]))
    assert len(seen) == 1
    # The trainer's safeguard hands the reduction to the stage with the global scope only.
    for scope in ("local", "global"):
        trainer = make_trainer(lora=True, safeguard_space="output", safeguard_scope=scope)
        inputs = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(2)]))
        seen.clear()
        trainer.model.train()
        trainer.compute_loss(trainer.model, inputs)
        assert len(seen) == (1 if scope == "global" else 0)


def test_pair_scores_stay_float32_where_deepspeed_casts_the_inputs(make_trainer, monkeypatch):
    """DeepSpeed's engine casts every floating batch tensor to its dtype, as transformers does; SmPO's raw scores must
    not lose their gaps to bf16 (steps of 1e-3 near 0.2)."""
    from types import SimpleNamespace

    from trl_diffusion_sdpo.engines import DeepSpeedEngine

    trainer = make_trainer(lora=True)
    plugin = SimpleNamespace(hf_ds_config=SimpleNamespace(dtype=lambda: torch.bfloat16))
    engine = DeepSpeedEngine(SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin)), stage=2)
    monkeypatch.setattr(trainer, "engine", engine)
    scores = torch.tensor([[0.2131, 0.2047], [0.1990, 0.2003]], dtype=torch.float32)
    inputs = trainer.place_inputs({"pair_scores": scores.clone(), "pixel_values": torch.ones(2, 3)})
    assert inputs["pixel_values"].dtype == torch.bfloat16  # the engine's cast still applies to model inputs
    assert inputs["pair_scores"].dtype == torch.float32
    torch.testing.assert_close(inputs["pair_scores"], scores, rtol=0, atol=0)


def test_pair_scores_reach_the_objective_exact_through_trainers_cast_of_deepspeed_inputs(make_trainer, monkeypatch):
    """Through Trainer's own training step, whose placement casts every floating input to DeepSpeed's dtype (a bf16
    round trip of each floating tensor stands in for it), the objective receives the collated pair scores bit for
    bit, in float32."""
    import trl_diffusion_sdpo.trainer as trainer_module

    trainer = make_trainer(lora=True)
    monkeypatch.setattr(trainer.engine, "input_dtype", lambda: torch.bfloat16)
    placed = trainer._prepare_inputs

    def cast_like_deepspeed(inputs):
        lossy = {
            k: v.to(torch.bfloat16).to(v.dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
            for k, v in inputs.items()
        }
        return placed(lossy)

    monkeypatch.setattr(trainer, "_prepare_inputs", cast_like_deepspeed)
    seen = []
    evaluate = trainer_module.evaluate_objective

    def spy(objective, predictions, pair_scores=None, **kwargs):
        seen.append(pair_scores)
        return evaluate(objective, predictions, pair_scores, **kwargs)

    monkeypatch.setattr(trainer_module, "evaluate_objective", spy)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    scores = torch.tensor([[0.2131, 0.2047], [0.1990, 0.2003]], dtype=torch.float32)
    assert not torch.equal(scores.to(torch.bfloat16).float(), scores)  # the cast would move them
    batch["pair_scores"] = scores.clone()
    trainer.current_gradient_accumulation_steps = 1  # what train() sets for each accumulation window
    trainer.model.train()
    trainer.training_step(trainer.model, batch)
    assert len(seen) == 1 and seen[0].dtype == torch.float32
    torch.testing.assert_close(seen[0], scores, rtol=0, atol=0)


def test_a_replayed_micro_batch_leaves_the_gradients_of_plain_diffusion_dpo_unchanged(make_trainer):
    """Through Trainer's own training step (plain Diffusion-DPO: Trainer runs the backward of the loss compute_loss
    returns), a replay with several processes runs a real forward and backward and adds nothing: ``.grad`` after it
    is ``.grad`` before it, bit for bit."""
    trainer = make_trainer(lora=True, safeguard_space="none")
    usable = trainer.batches

    def two_processes(inputs, mode, num_processes, process_index):  # this process as one of two
        return usable(inputs, mode, 2, process_index)

    trainer.batches = two_processes
    trainer.current_gradient_accumulation_steps = 2  # what train() sets for each accumulation window
    model = trainer.model
    model.train()
    collate = trainer.data_collator
    trainer.training_step(model, collate([trainer.train_dataset[i] for i in range(2)]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.grad.clone() for p in trainable]
    assert any(torch.count_nonzero(g) > 0 for g in before)  # the good micro-batch reached the weights
    replayed = trainer.training_step(model, collate([]))  # every row invalid: the last good one, weight zero
    assert replayed.item() == 0.0
    for p, grad in zip(trainable, before):
        torch.testing.assert_close(p.grad, grad, rtol=0, atol=0)
