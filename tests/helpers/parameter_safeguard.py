"""Explicit branch gradients, drifted policies and float64 lambdas of the exact rule."""

from __future__ import annotations

import numpy as np
import torch

from trl_diffusion_sdpo.objectives import DenoisingErrors, PreferencePredictions, denoising_error
from trl_diffusion_sdpo.step.stages import MicroBatchDraws


def replay_draws(trainer) -> None:
    """Fresh keyed draws with the trainer's settings: the next micro-batch draws what its step's first one drew."""
    draws = trainer.stages.draws
    trainer.stages.draws = MicroBatchDraws(
        draws.seed,
        draws.rows_per_process["train"],
        draws.rows_per_process["eval"],
        draws.process_index,
        draws.num_processes,
        draws.device,
    )


def float64_lambda(g_w: list[torch.Tensor], h_l: list[torch.Tensor], mu: float, max_lambda: float = 1.0) -> float:
    """The issue's rule written out in float64 numpy, with ``g_l = -h_l`` (errors' sign convention)."""
    w = np.concatenate([g.detach().double().cpu().numpy().ravel() for g in g_w])
    g_l = -np.concatenate([h.detach().double().cpu().numpy().ravel() for h in h_l])
    dot = float(w @ g_l)
    if dot <= 0:
        return max_lambda
    return float(np.clip((1 - mu) * float(w @ w) / dot, 0.0, max_lambda))


def _trainer_inputs(trainer, n: int = 2):
    return trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(n)]))


def _drift(model, scale: float = 0.02) -> None:
    """Move the policy away from the reference so that u != 0 and the branches get different weights."""
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=gen).to(p.device))


def _explicit_branch_gradients(trainer, inputs, separate_branches: bool = False):
    """``g_w`` and ``h_l`` by two ``torch.autograd.grad`` calls on the trainer's own predictions (same draws), from
    one forward pass over both branches (the step's default) or one per branch (``safeguard_passes="two"``)."""
    replay_draws(trainer)
    policy = trainer.model
    params = [p for p in policy.parameters() if p.requires_grad]
    predictions = trainer.stages.predict(
        policy, inputs, "train", trainer.state.global_step, separate_branches=separate_branches
    )

    def loss_of(pred_w, pred_l):
        branch = PreferencePredictions(
            pred_w,
            pred_l,
            predictions.target_winner,
            predictions.target_loser,
            predictions.reference_winner,
            predictions.reference_loser,
        )
        errors = DenoisingErrors(
            denoising_error(pred_w, branch.target_winner),
            denoising_error(pred_l, branch.target_loser),
            denoising_error(branch.reference_winner, branch.target_winner),
            denoising_error(branch.reference_loser, branch.target_loser),
        )
        return trainer.objective(branch, errors).loss

    g_w = torch.autograd.grad(
        loss_of(predictions.policy_winner, predictions.policy_loser.detach()), params, retain_graph=True
    )
    h_l = torch.autograd.grad(loss_of(predictions.policy_winner.detach(), predictions.policy_loser), params)
    return params, list(g_w), list(h_l)
