"""Config fields that must reach the training step, checked through what the step does (public API only).

Each test trains a tiny pipeline for a few steps and watches the step from outside: the logged metrics, the
gradient handed to the optimizer (``on_pre_optimizer_step``), the denoiser's inputs (a forward pre-hook), the VAE's
inputs, and the weights left after ``train()``. A field that is accepted by the config but dropped on its way to the
step (the cap on lambda, the timestep range, the keyed draws, reloading the best checkpoint) fails here.
"""

from __future__ import annotations

import io

import pytest
import torch
from datasets import Dataset
from PIL import Image
from transformers import TrainerCallback

from trl_diffusion_sdpo import DiffusionSDPOTrainer

# ------------------------------------------------------------------------------------------------ helpers


class GradientsBeforeTheOptimizer(TrainerCallback):
    """The trainable parameters' gradients as the optimizer receives them, once per optimizer step."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.steps.append({n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None})


class StepMarks(TrainerCallback):
    """Where each optimizer step begins in lists that hooks append to."""

    def __init__(self, *calls: list) -> None:
        self.calls = calls
        self.starts: list[tuple[int, ...]] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.starts.append(tuple(len(c) for c in self.calls))

    def per_step(self, which: int = 0) -> list[list]:
        calls = self.calls[which]
        bounds = [*(s[which] for s in self.starts), len(calls)]
        return [calls[a:b] for a, b in zip(bounds, bounds[1:])]


class WeightsAfterEachStep(TrainerCallback):
    """The trainable parameters after each optimizer step, by global step."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.by_step: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, args, state, control, **kwargs):
        self.by_step[state.global_step] = trainable(self.model)


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def step_logs(trainer: DiffusionSDPOTrainer) -> list[dict]:
    return [h for h in trainer.state.log_history if "loss" in h]


def capture_denoiser_inputs(model: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
    """Record ``sample``, ``timestep`` and ``encoder_hidden_states`` of every call of ``model`` (the policy)."""
    calls: list[dict[str, torch.Tensor]] = []

    def hook(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        calls.append(
            {
                "sample": sample.detach().clone(),
                "timestep": torch.as_tensor(timestep).detach().clone().reshape(-1),
                "encoder_hidden_states": kwargs["encoder_hidden_states"].detach().clone(),
            }
        )

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return calls


# --------------------------------------------------------------------------------- (a) safeguard_max_lambda


@pytest.mark.parametrize(  # one space by default: the cap is one clamp on the lambda either space logs
    "space", ["output", pytest.param("parameter", marks=pytest.mark.slow)]
)
def test_safeguard_max_lambda_caps_the_logged_lambda_and_the_gradient_of_the_step(make_trainer, space):
    """At the first step (policy == reference) the uncapped lambda of these tiny models is about 0.10 in both spaces
    (mu = 0.9). Caps of 0.06, 0.04 and 0.02 all bind: the logged lambda is the cap, and the gradient handed to the
    optimizer is ``g_w + cap * h_l`` (the Diffusion-DPO gradient with its loser term scaled by the cap), so equally
    spaced caps give equally spaced gradients: ``g(0.06) - g(0.04) == g(0.04) - g(0.02) != 0``."""
    uncapped = make_trainer(lora=False, max_steps=1, safeguard_space=space, safeguard_mu=0.9, max_grad_norm=0.0)
    uncapped.train()
    assert step_logs(uncapped)[0]["safeguard/lambda_min"] > 0.07  # every cap below binds

    gradients = {}
    for cap in (0.06, 0.04, 0.02):
        trainer = make_trainer(
            lora=False,
            max_steps=1,
            safeguard_space=space,
            safeguard_mu=0.9,
            safeguard_max_lambda=cap,
            max_grad_norm=0.0,
            optim="sgd",
        )
        captured = GradientsBeforeTheOptimizer(trainer.model)
        trainer.add_callback(captured)
        trainer.train()
        log = step_logs(trainer)[0]
        assert log["safeguard/lambda_max"] == pytest.approx(cap, rel=1e-6)
        assert log["safeguard/lambda_min"] == pytest.approx(cap, rel=1e-6)
        assert len(captured.steps) == 1
        gradients[cap] = captured.steps[0]

    names = sorted(gradients[0.06])
    assert names and all(sorted(g) == names for g in gradients.values())
    upper = torch.cat([(gradients[0.06][n] - gradients[0.04][n]).reshape(-1) for n in names])
    lower = torch.cat([(gradients[0.04][n] - gradients[0.02][n]).reshape(-1) for n in names])
    full = torch.cat([gradients[0.04][n].reshape(-1) for n in names])
    assert lower.norm() > 1e-3 * full.norm()  # the cap changed the step's gradient ...
    torch.testing.assert_close(upper, lower, rtol=0, atol=1e-4 * lower.abs().max().item())  # ... linearly in it


# --------------------------------------------------------------------------------- (b) min_timestep / max_timestep


def test_min_and_max_timestep_bound_the_timesteps_the_denoiser_is_called_with(make_trainer):
    """``[min_timestep, max_timestep)``, max exclusive: with [300, 302) every draw is 300 or 301, and both occur."""
    trainer = make_trainer(lora=False, max_steps=4, per_device_train_batch_size=3, min_timestep=300, max_timestep=302)
    calls = capture_denoiser_inputs(trainer.model)
    trainer.train()
    timesteps = torch.cat([c["timestep"] for c in calls])
    assert timesteps.numel() >= 4 * 3
    assert set(timesteps.tolist()) == {300, 301}


def test_the_default_timestep_range_spans_the_scheduler(make_trainer):
    trainer = make_trainer(lora=False, max_steps=4, per_device_train_batch_size=3)
    calls = capture_denoiser_inputs(trainer.model)
    trainer.train()
    timesteps = torch.cat([c["timestep"] for c in calls])
    assert timesteps.min() >= 0 and timesteps.max() < trainer.noiser.num_train_timesteps
    assert timesteps.max() - timesteps.min() > 300  # not a narrow band


# --------------------------------------------------------------------------------- (c) keyed draws


def _striped(left: tuple[int, int, int], right: tuple[int, int, int], size: tuple[int, int] = (48, 40)) -> bytes:
    """A PNG whose left half is ``left`` and right half ``right``: a horizontal flip shows."""
    image = Image.new("RGB", size, left)
    image.paste(Image.new("RGB", (size[0] - size[0] // 2, size[1]), right), (size[0] // 2, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _identical_pairs(n: int) -> Dataset:
    """``n`` copies of one pair (red|blue winner, green|yellow loser): whatever the sampler picks, a step sees the
    same pairs, so the denoiser's inputs differ between steps only through the step's random draws."""
    row = {
        "caption": "a striped picture",
        "jpg_0": _striped((220, 20, 20), (20, 20, 220)),
        "jpg_1": _striped((20, 200, 20), (230, 230, 20)),
        "label_0": 1.0,
        "label_1": 0.0,
    }
    return Dataset.from_list([dict(row) for _ in range(n)])


PAIRS, STEPS = 4, 4


def _run_with_draws(make_trainer, seed: int) -> dict[str, list[torch.Tensor]]:
    """Train ``STEPS`` steps of ``PAIRS`` identical pairs; per step: the timesteps, the noised samples, the winners'
    flips (seen at the VAE's input) and which prompts were dropped (seen at the denoiser's input)."""
    trainer = make_trainer(
        lora=False,
        train_dataset=_identical_pairs(PAIRS),
        max_steps=STEPS,
        per_device_train_batch_size=PAIRS,
        random_flip=True,
        proportion_empty_prompts=0.5,
        min_timestep=990,
        max_timestep=1000,
        seed=seed,
    )
    family = trainer.family
    with torch.no_grad():
        tokenize = family.prompt_tokenizer()
        empty = family.encode_prompts(tokenize([""])).encoder_hidden_states[0]
        caption = family.encode_prompts(tokenize(["a striped picture"])).encoder_hidden_states[0]
    denoiser_calls = capture_denoiser_inputs(trainer.model)
    pixels: list[torch.Tensor] = []
    family.vae.encoder.register_forward_pre_hook(lambda module, args: pixels.append(args[0].detach().clone()))
    steps = StepMarks(denoiser_calls, pixels)
    trainer.add_callback(steps)
    trainer.train()

    draws: dict[str, list[torch.Tensor]] = {"timestep": [], "sample": [], "flip": [], "dropped": []}
    for calls in steps.per_step(0):
        assert calls, "a step without a denoiser call"
        draws["timestep"].append(torch.cat([c["timestep"] for c in calls]))
        draws["sample"].append(torch.cat([c["sample"] for c in calls]))
        hidden = torch.cat([c["encoder_hidden_states"] for c in calls])
        is_empty = torch.tensor([torch.allclose(h, empty, atol=1e-5) for h in hidden])
        is_caption = torch.tensor([torch.allclose(h, caption, atol=1e-5) for h in hidden])
        assert bool((is_empty ^ is_caption).all()), "a row that is neither the caption nor the empty prompt"
        draws["dropped"].append(is_empty)
    for step_pixels in steps.per_step(1):
        images = torch.cat(step_pixels)  # [2B, 3, H, W]: winners, then losers
        winners = images[:PAIRS]
        half = winners.shape[-1] // 2
        red_left, red_right = winners[:, 0, :, :half].mean((1, 2)), winners[:, 0, :, half:].mean((1, 2))
        draws["flip"].append(red_left < red_right)  # the red half moved to the right: mirrored
    assert all(len(v) == STEPS for v in draws.values())
    return draws


@pytest.fixture(scope="module")
def seed_0_draws() -> dict[str, dict[str, list[torch.Tensor]]]:
    """The draws of the seed-0 run (:func:`_run_with_draws`), made once per module by the first test that asks (the
    test that reproduces them makes its second seed-0 run apart)."""
    return {}


def _seed_0_draws(seed_0_draws: dict, make_trainer) -> dict[str, list[torch.Tensor]]:
    if "run" not in seed_0_draws:
        seed_0_draws["run"] = _run_with_draws(make_trainer, seed=0)
    return seed_0_draws["run"]


def test_keyed_draws_change_from_step_to_step(make_trainer, seed_0_draws):
    draws = _seed_0_draws(seed_0_draws, make_trainer)
    # Timesteps: fresh per step (10 values from [990, 1000) per pair).
    for a in range(STEPS):
        for b in range(a + 1, STEPS):
            assert not torch.equal(draws["timestep"][a], draws["timestep"][b]), f"steps {a} and {b}: same timesteps"
    # Flips and prompt dropout (4 pairs, 4 steps): not the same pattern every step.
    assert len({tuple(f.tolist()) for f in draws["flip"]}) > 1, "the same flips every step"
    assert len({tuple(d.tolist()) for d in draws["dropped"]}) > 1, "the same prompt dropout every step"
    assert any(f.any() and not f.all() for f in draws["flip"])  # flips are drawn per pair
    # Noise: at timesteps >= 990 the noised sample is ~ noise (sqrt(alpha_bar) < 0.1), so two steps' samples of the
    # same pairs differ by about sqrt(2) standard deviations; a repeated noise would leave only the small latent term.
    for a in range(STEPS - 1):
        assert (draws["sample"][a] - draws["sample"][a + 1]).std() > 0.7, f"steps {a} and {a + 1}: same noise"


def test_keyed_draws_are_reproduced_by_the_same_seed_and_changed_by_another(make_trainer, seed_0_draws):
    first = _seed_0_draws(seed_0_draws, make_trainer)
    second, other = (_run_with_draws(make_trainer, seed=s) for s in (0, 1))  # a second seed-0 run of its own
    for name in first:
        for a, b in zip(first[name], second[name]):
            assert torch.equal(a, b), f"{name}: the same seed drew differently"
    assert not torch.equal(torch.stack(first["timestep"]), torch.stack(other["timestep"]))
    assert not torch.equal(torch.stack(first["sample"]), torch.stack(other["sample"]))


# --------------------------------------------------------------------------------- (d) load_best_model_at_end


class EarliestEvaluationIsBest(TrainerCallback):
    """Adds ``eval_earliness = -global_step`` to each evaluation's metrics (the dict that best-model tracking reads),
    so that with ``metric_for_best_model="earliness"`` the first evaluation is the best by construction."""

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metrics["eval_earliness"] = -float(state.global_step)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_load_best_model_at_end_leaves_the_best_checkpoints_weights_not_the_last_steps(
    make_trainer, pickapic_dataset, tmp_path, lora
):
    """Evaluate and save at steps 1 and 2, the first evaluation being the best: after ``train()`` the weights are
    step 1's (those in checkpoint-1), not step 2's."""
    trainer = make_trainer(
        lora=lora,
        max_steps=2,
        eval_dataset=pickapic_dataset,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="earliness",
        greater_is_better=True,
    )
    weights = WeightsAfterEachStep(trainer.model)
    trainer.add_callback(weights)
    trainer.add_callback(EarliestEvaluationIsBest())
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-1")
    assert (tmp_path / "out" / "checkpoint-2").is_dir()  # the last checkpoint was written too

    final = trainable(trainer.model)
    best, last = weights.by_step[1], weights.by_step[2]
    assert final.keys() == best.keys() and final
    assert any(not torch.equal(best[n], last[n]) for n in best)  # step 2 trained something
    for name in best:
        torch.testing.assert_close(final[name], best[name], rtol=0, atol=0, msg=name)
    if not lora:  # and they are the weights in the best checkpoint's files
        from safetensors.torch import load_file

        files = sorted((tmp_path / "out" / "checkpoint-1" / "unet").glob("*.safetensors"))
        saved = {k: v for f in files for k, v in load_file(f).items()}
        assert files and saved.keys() >= final.keys()
        for name, value in final.items():
            torch.testing.assert_close(saved[name], value, rtol=0, atol=0, msg=name)
