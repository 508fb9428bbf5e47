"""Stages 3 and 4 of the step: the policy's and the reference's predictions on a noised pair, and their errors.

The policy predicts either in one forward pass over winners and losers together (the output-space safeguard and
plain objectives, and the parameter-space safeguard by default) or in one pass per branch (the parameter-space
safeguard with ``safeguard_passes="two"`` or where the engine cannot split the gradients in one pass, which
backpropagates each branch on its own). The reference, when the objective needs one, runs without autograd in the
same shape of passes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..families import ModelFamily, NoisedPair, PromptEmbeddings
from ..objectives import (
    DenoisingErrors,
    ObjectiveOutput,
    PreferenceObjective,
    PreferencePredictions,
    denoising_error,
)
from .safeguard import scale_gradient

__all__ = ["Evaluation", "denoising_errors", "evaluate_objective", "predict_pairs"]


def predict_pairs(
    policy: torch.nn.Module,
    reference: Callable[..., torch.Tensor] | None,
    family: ModelFamily,
    noised: NoisedPair,
    prompt_embeds: PromptEmbeddings,
    time_ids: torch.Tensor | None,
    separate_branches: bool = False,
) -> PreferencePredictions:
    """Predictions of ``policy`` (and ``reference``, if given) on the ``2B`` rows of ``noised``.

    ``prompt_embeds`` holds one embedding per pair (shared by its two images); ``time_ids`` ``[2B, 6]`` or ``None``.
    """
    batch = noised.noisy.shape[0] // 2
    # The passes over the rows, each with its conditioning, built once and shared by policy and reference. The
    # reference runs in the same shapes as the policy: the same float rounding, so a policy equal to its reference
    # (LoRA at initialisation) has exactly u = 0 (beta = 5000 would amplify a 1e-7 difference).
    if separate_branches:
        passes = [
            (rows, family.denoiser_conditioning(prompt_embeds, None if time_ids is None else time_ids[rows]))
            for rows in (slice(0, batch), slice(batch, 2 * batch))
        ]
    else:
        passes = [(slice(0, 2 * batch), family.denoiser_conditioning(prompt_embeds.repeat(2), time_ids))]
    # Kept as separate outputs, never concatenated: each branch's backward must reach only its own graph.
    outputs = [family.call_denoiser(policy, noised.noisy[r], noised.timesteps[r], c) for r, c in passes]
    policy_winner, policy_loser = _winner_and_loser(outputs, batch)
    reference_winner = reference_loser = None
    if reference is not None:
        ref_outputs = [reference(noised.noisy[r], noised.timesteps[r], **c) for r, c in passes]
        reference_winner, reference_loser = _winner_and_loser(ref_outputs, batch)
    target_winner, target_loser = noised.target[:batch], noised.target[batch:]
    if noised.loss_weight is not None:
        # A weighted squared error w * (pred - target)^2 is the plain error of sqrt(w) * pred and sqrt(w) * target.
        root = noised.loss_weight.sqrt().view(-1, *([1] * (noised.target.dim() - 1)))
        policy_winner = policy_winner * root[:batch].to(policy_winner)
        policy_loser = policy_loser * root[batch:].to(policy_loser)
        target_winner, target_loser = target_winner * root[:batch], target_loser * root[batch:]
        if reference is not None:
            reference_winner = reference_winner * root[:batch].to(reference_winner)
            reference_loser = reference_loser * root[batch:].to(reference_loser)
    return PreferencePredictions(
        policy_winner=policy_winner,
        policy_loser=policy_loser,
        target_winner=target_winner,
        target_loser=target_loser,
        reference_winner=reference_winner,
        reference_loser=reference_loser,
    )


def _winner_and_loser(outputs: list[torch.Tensor], batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The winner and loser predictions from one pass per branch, or from one pass over both."""
    if len(outputs) == 2:
        return outputs[0], outputs[1]
    return outputs[0][:batch], outputs[0][batch:]


def denoising_errors(predictions: PreferencePredictions) -> DenoisingErrors:
    """Per-sample float32 errors ``mean_CHW (prediction - target)^2`` of the policy and, if present, the reference."""
    errors = DenoisingErrors(
        policy_winner=denoising_error(predictions.policy_winner, predictions.target_winner),
        policy_loser=denoising_error(predictions.policy_loser, predictions.target_loser),
    )
    if predictions.reference_winner is not None:
        errors.reference_winner = denoising_error(predictions.reference_winner, predictions.target_winner)
        errors.reference_loser = denoising_error(predictions.reference_loser, predictions.target_loser)
    return errors


@dataclass
class Evaluation:
    """A micro-batch's errors and its objective's output on them (``loss`` is the objective's)."""

    errors: DenoisingErrors
    output: ObjectiveOutput

    @property
    def loss(self) -> torch.Tensor:
        return self.output.loss


def evaluate_objective(
    objective: PreferenceObjective,
    predictions: PreferencePredictions,
    pair_scores: torch.Tensor | None = None,
    loser_scale: torch.Tensor | None = None,
) -> Evaluation:
    """errors -> objective: the per-sample errors of ``predictions`` and ``objective`` on them; ``loser_scale`` scales
    the gradient of the policy loser's error, not its value (the output-space safeguard's ``lambda``)."""
    errors = denoising_errors(predictions)
    if loser_scale is not None:
        errors.policy_loser = scale_gradient(errors.policy_loser, loser_scale)
    return Evaluation(errors, objective(predictions, errors, pair_scores=pair_scores))
