"""Stages 3 and 4 of the step: the policy's and the reference's predictions on a noised pair, and their errors.

The policy predicts either in one forward pass over winners and losers together (the output-space safeguard and
plain objectives) or in one pass per branch (the parameter-space safeguard, which backpropagates each branch on its
own). The reference, when the objective needs one, runs without autograd in the same shape of passes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..families import ModelFamily, PromptEmbeddings
from ..objectives import DenoisingErrors, PreferencePredictions, denoising_error
from .noising import NoisedPair

__all__ = ["denoising_errors", "predict_pairs"]


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
    both = None if separate_branches else family.unet_conditioning(prompt_embeds.repeat(2), time_ids)
    if separate_branches:
        outputs = []
        for rows in (slice(0, batch), slice(batch, 2 * batch)):
            conditioning = family.unet_conditioning(prompt_embeds, None if time_ids is None else time_ids[rows])
            outputs.append(policy(noised.noisy[rows], noised.timesteps[rows], **conditioning, return_dict=False)[0])
        policy_winner, policy_loser = outputs
    else:
        prediction = policy(noised.noisy, noised.timesteps, **both, return_dict=False)[0]
        policy_winner, policy_loser = prediction[:batch], prediction[batch:]
    reference_winner = reference_loser = None
    if reference is not None and separate_branches:
        # Per branch like the policy: the same batch shapes give the same float rounding, so a policy equal to its
        # reference (LoRA at initialisation) has exactly u = 0; beta = 5000 would amplify a 1e-7 difference.
        ref_predictions = []
        for rows in (slice(0, batch), slice(batch, 2 * batch)):
            conditioning = family.unet_conditioning(prompt_embeds, None if time_ids is None else time_ids[rows])
            ref_predictions.append(reference(noised.noisy[rows], noised.timesteps[rows], **conditioning))
        reference_winner, reference_loser = ref_predictions
    elif reference is not None:
        ref_prediction = reference(noised.noisy, noised.timesteps, **both)
        reference_winner, reference_loser = ref_prediction[:batch], ref_prediction[batch:]
    return PreferencePredictions(
        policy_winner=policy_winner,
        policy_loser=policy_loser,
        target_winner=noised.target[:batch],
        target_loser=noised.target[batch:],
        reference_winner=reference_winner,
        reference_loser=reference_loser,
    )


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
