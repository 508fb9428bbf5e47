"""The masked preference loss: each denoising error is the mask's weighted mean over the latents, for policy and
reference alike, and the output-space safeguard's lambda is the authors' rule on the masked errors' gradients.

Every expected value is recomputed here with plain torch from the model's outputs and the batch's pixel mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers.common import changed_keys, snapshot
from tests.helpers.masked_pairs import masked_dataset, masked_rows
from trl_diffusion_sdpo.objectives import PreferencePredictions, diffusion_dpo_loss
from trl_diffusion_sdpo.safeguards.output import output_space_lambda
from trl_diffusion_sdpo.step.predictions import denoising_errors, evaluate_objective

MASKED = dict(loss_mask=True, random_flip=False, proportion_empty_prompts=0.0)


def perturbed_trainer(make_trainer, **overrides):
    """A trainer on the masked pairs whose LoRA B weights are random, so the policy differs from its reference."""
    trainer = make_trainer(train_dataset=masked_dataset(), **{**MASKED, **overrides})
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in trainer.model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return trainer


def first_predictions(trainer):
    """The first training micro-batch (as the dataloader gives it), its noised pair and the policy's and reference's
    predictions on it."""
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    noised = trainer.stages.noised_pair(trainer.model, batch, "train", 0)
    return batch, noised, trainer.stages.predict_noised(trainer.model, noised, False)


def latent_masks(pixel_mask: torch.Tensor, latent_side: int) -> torch.Tensor:
    """``[B, 2, 1, R, R]`` pixel masks to ``[B, 2, 1, h, h]``: the mean over each latent position's pixel block."""
    batch, _, _, side, _ = pixel_mask.shape
    pooled = F.avg_pool2d(pixel_mask.reshape(2 * batch, 1, side, side), side // latent_side)
    return pooled.reshape(batch, 2, 1, latent_side, latent_side)


def masked_mean_error(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    squared = (prediction.double() - target.double()) ** 2  # [B, C, h, w]
    weights = mask.double().expand_as(squared)
    return (weights * squared).sum(dim=(1, 2, 3)) / weights.sum(dim=(1, 2, 3))


def test_the_masked_loss_equals_an_independent_computation_from_the_models_outputs(make_trainer):
    trainer = perturbed_trainer(make_trainer)
    batch, _, predictions = first_predictions(trainer)
    masks = latent_masks(batch["loss_mask"], predictions.target_winner.shape[-1])
    winner_mask, loser_mask = masks[:, 0], masks[:, 1]
    expected = {
        "policy_winner": masked_mean_error(predictions.policy_winner, predictions.target_winner, winner_mask),
        "policy_loser": masked_mean_error(predictions.policy_loser, predictions.target_loser, loser_mask),
        "reference_winner": masked_mean_error(predictions.reference_winner, predictions.target_winner, winner_mask),
        "reference_loser": masked_mean_error(predictions.reference_loser, predictions.target_loser, loser_mask),
    }
    beta = trainer.args.beta
    policy_gap = expected["policy_winner"] - expected["policy_loser"]
    logits = -0.5 * beta * (policy_gap - (expected["reference_winner"] - expected["reference_loser"]))
    expected_loss = -F.logsigmoid(logits).mean()

    evaluation = evaluate_objective(trainer.objective_in_force(), predictions)
    for name, value in expected.items():
        torch.testing.assert_close(getattr(evaluation.errors, name).double(), value, rtol=1e-5, atol=0, msg=name)
    # beta = 5000 multiplies the errors' float32 rounding (about 1e-7 of an error near 1) into the logit
    torch.testing.assert_close(evaluation.loss.double(), expected_loss, rtol=2e-3, atol=1e-5)
    # The mask matters: over the whole image the errors are another number.
    whole = (predictions.policy_winner.double() - predictions.target_winner.double()).pow(2).mean(dim=(1, 2, 3))
    assert not torch.allclose(whole, expected["policy_winner"], rtol=1e-3)


def test_an_all_white_mask_trains_exactly_as_no_mask(make_trainer):
    """Two runs from one seed, on the same pairs: one with a white mask per row and ``loss_mask=True``, one without;
    every LoRA weight and every logged value agree bit for bit."""
    runs = []
    for dataset, masked in ((masked_dataset(fill=255), True), (masked_dataset(with_mask=False), False)):
        trainer = make_trainer(train_dataset=dataset, loss_mask=masked, max_steps=2)
        before = snapshot(trainer.model)
        trainer.train()
        after = snapshot(trainer.model)
        assert changed_keys(before, after)  # it trained
        logs = [{k: v for k, v in log.items() if not k.startswith("train_")} for log in trainer.state.log_history]
        runs.append((after, logs))
    (masked_weights, masked_logs), (plain_weights, plain_logs) = runs
    assert not changed_keys(masked_weights, plain_weights)
    assert masked_logs == plain_logs


def test_an_all_black_mask_is_refused_naming_the_row(make_trainer):
    rows = masked_rows(4)
    rows[2] = masked_rows(3, fill=0)[2]
    with pytest.raises(ValueError, match=r"row 2, column 'mask': the mask is all black"):
        make_trainer(train_dataset=masked_dataset(0).from_list(rows), **MASKED)


def test_a_zero_mask_gives_a_pair_no_gradient():
    """Where a mask is all zero (the data refuses such rows) the pair's errors and their gradients are zero."""
    generator = torch.Generator().manual_seed(1)
    shape = (2, 4, 4, 4)
    predictions = [torch.randn(shape, generator=generator, requires_grad=True) for _ in range(2)]
    targets = [torch.randn(shape, generator=generator) for _ in range(4)]
    mask = torch.ones(2, 1, 4, 4)
    mask[1] = 0.0  # the second pair: all black
    both = PreferencePredictions(
        predictions[0], predictions[1], targets[0], targets[1], targets[2], targets[3], mask, mask
    )
    errors = denoising_errors(both)
    assert errors.policy_winner[1] == 0 and errors.reference_loser[1] == 0
    diffusion_dpo_loss(errors, beta=100.0).loss.backward()
    assert torch.count_nonzero(predictions[0].grad[1]) == 0 and torch.count_nonzero(predictions[1].grad[1]) == 0
    assert torch.count_nonzero(predictions[0].grad[0]) > 0


def test_the_masked_lambda_is_the_rule_on_the_masked_errors_gradients(make_trainer):
    """lambda = clamp((1 - mu) |g_w|^2 / (-<g_w, h_l> + 1e-9), 0, 1), with g_w and h_l the gradients of the mean
    masked winner error and of minus the mean masked loser error with respect to the predictions (the authors'
    rule and epsilon), recomputed by autograd here."""
    trainer = perturbed_trainer(make_trainer)
    batch, _, predictions = first_predictions(trainer)
    masks = latent_masks(batch["loss_mask"], predictions.target_winner.shape[-1])
    winner = predictions.policy_winner.detach().double().requires_grad_(True)
    loser = predictions.policy_loser.detach().double().requires_grad_(True)
    (g_w,) = torch.autograd.grad(masked_mean_error(winner, predictions.target_winner, masks[:, 0]).mean(), winner)
    (h_l,) = torch.autograd.grad(-masked_mean_error(loser, predictions.target_loser, masks[:, 1]).mean(), loser)
    mu = 0.5
    den = -(g_w * h_l).sum()
    expected = ((1 - mu) * (g_w * g_w).sum() / (den + 1e-9)).clamp(0, 1) if den > 0 else torch.tensor(1.0)

    masked = output_space_lambda(predictions, mu)
    torch.testing.assert_close(masked.double(), expected, rtol=1e-4, atol=1e-7)
    unmasked = output_space_lambda(
        type(predictions)(**{**vars(predictions), "winner_mask": None, "loser_mask": None}), mu
    )
    assert not torch.isclose(unmasked.double(), expected, rtol=1e-3)  # the mask changes lambda here


def test_the_exact_safeguards_lambda_is_the_rule_on_the_masked_errors_parameter_gradients(make_trainer):
    """safeguard_space="parameter": lambda = clamp((1 - mu) |g_w|^2 / -<g_w, h_l>, 0, 1), with g_w and h_l the
    gradients in the LoRA weights of the loss through the winner's and the loser's masked error, recomputed here by
    autograd from the model's outputs."""
    trainer = perturbed_trainer(make_trainer, safeguard_space="parameter", safeguard_passes="two", safeguard_mu=0.5)
    batch, noised, _ = first_predictions(trainer)
    predictions = trainer.stages.predict_noised(trainer.model, noised, True)
    masks = latent_masks(batch["loss_mask"], predictions.target_winner.shape[-1])
    reference_gap = masked_mean_error(
        predictions.reference_winner, predictions.target_winner, masks[:, 0]
    ) - masked_mean_error(predictions.reference_loser, predictions.target_loser, masks[:, 1])

    def loss(winner: torch.Tensor, loser: torch.Tensor) -> torch.Tensor:
        gap = masked_mean_error(winner, predictions.target_winner, masks[:, 0]) - masked_mean_error(
            loser, predictions.target_loser, masks[:, 1]
        )
        return -F.logsigmoid(-0.5 * trainer.args.beta * (gap - reference_gap)).mean()

    weights = [p for p in trainer.model.parameters() if p.requires_grad]
    winner, loser = predictions.policy_winner, predictions.policy_loser
    g_w = torch.autograd.grad(loss(winner, loser.detach()), weights, retain_graph=True)
    h_l = torch.autograd.grad(loss(winner.detach(), loser), weights)
    rising = -sum((a.double() * b.double()).sum() for a, b in zip(g_w, h_l, strict=True))
    square = sum((a.double() ** 2).sum() for a in g_w)
    expected = ((1 - 0.5) * square / rising).clamp(0, 1) if rising > 0 else torch.tensor(1.0, dtype=torch.float64)

    evaluation, lam, _ = trainer.safeguard.backward_stage(
        trainer.model,
        lambda separate_branches: trainer.stages.predict_noised(trainer.model, noised, separate_branches),
        lambda branches: evaluate_objective(trainer.objective_in_force(), branches),
        torch.ones(()),
    )
    assert 0 < expected < 1  # the constraint is active on these pairs: lambda is the formula's, not a bound
    torch.testing.assert_close(lam.double(), expected, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(
        evaluation.errors.policy_winner.double(),
        masked_mean_error(winner, predictions.target_winner, masks[:, 0]),
        rtol=1e-5,
        atol=0,
    )
