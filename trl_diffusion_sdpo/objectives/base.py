"""Preference objectives over denoising errors, as pure functions over tensors.

Notation (shared by every objective): for one pair the winner and loser latents are noised with ONE timestep ``t``
and ONE noise ``eps``; a network ``N`` predicts on both, and its per-sample denoising error on branch ``Y`` is

    e_N^Y = mean over C, H, W of (N(x_t^Y, t, c) - target^Y)^2.

With ``d_theta = e_theta^w - e_theta^l`` (policy) and ``d_ref = e_ref^w - e_ref^l`` (frozen reference), the
Diffusion-DPO logit (Wallace et al., arXiv 2311.12908) is

    u = -0.5 * beta * (d_theta - d_ref)

and the implicit reward prefers the winner when ``u > 0``.

An objective receives the full prediction tensors (:class:`PreferencePredictions`, for objectives such as DSPO that
need more than four scalars per pair) together with the per-sample errors (:class:`DenoisingErrors`, whose loser
policy error may already carry the safeguard's gradient scale) and returns the loss and the logits. Objectives
that need no reference (MaPO) declare ``requires_reference = False`` so the trainer can skip the reference forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

__all__ = [
    "DenoisingErrors",
    "DiffusionDPOObjective",
    "ObjectiveOutput",
    "PreferenceObjective",
    "PreferencePredictions",
    "OBJECTIVES",
    "denoising_error",
    "diffusion_dpo_logits",
    "diffusion_dpo_loss",
    "get_objective",
    "implicit_accuracy",
]


@dataclass
class PreferencePredictions:
    """Network outputs and targets for a batch of pairs; every tensor has shape ``[B, C, H, W]``."""

    policy_winner: torch.Tensor
    policy_loser: torch.Tensor
    target_winner: torch.Tensor
    target_loser: torch.Tensor
    reference_winner: torch.Tensor | None = None
    reference_loser: torch.Tensor | None = None


@dataclass
class DenoisingErrors:
    """Per-sample denoising errors (float32, shape ``[B]``) of the policy and, when present, the reference."""

    policy_winner: torch.Tensor
    policy_loser: torch.Tensor
    reference_winner: torch.Tensor | None = None
    reference_loser: torch.Tensor | None = None


@dataclass
class ObjectiveOutput:
    """``loss`` is the scalar to minimise; ``logits`` is the per-pair implicit-reward margin ``u`` (shape ``[B]``)."""

    loss: torch.Tensor
    logits: torch.Tensor


def denoising_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean over all non-batch dims of (prediction - target)^2``, in float32, shape ``[B]``."""
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
    diff = prediction.float() - target.float()
    return diff.pow(2).flatten(1).mean(dim=1)


def diffusion_dpo_logits(errors: DenoisingErrors, beta: float) -> torch.Tensor:
    """``u = -0.5 * beta * ((e_theta^w - e_theta^l) - (e_ref^w - e_ref^l))``, shape ``[B]``."""
    if errors.reference_winner is None or errors.reference_loser is None:
        raise ValueError("Diffusion-DPO needs the reference model's errors on both branches")
    policy_diff = errors.policy_winner - errors.policy_loser
    reference_diff = errors.reference_winner - errors.reference_loser
    return -0.5 * beta * (policy_diff - reference_diff)


def diffusion_dpo_loss(
    errors: DenoisingErrors, beta: float, pair_weights: torch.Tensor | None = None
) -> ObjectiveOutput:
    """Diffusion-DPO: ``loss = mean_i(-logsigmoid(w_i * u_i))`` with ``w_i = 1`` unless ``pair_weights`` is given.

    The mean is taken AFTER the log-sigmoid (an early public script averaged ``u`` first, which was a bug).
    ``pair_weights`` multiplies each pair's logit, as SmPO's smoothed preferences do with ``gamma * (2p - 1)``.
    """
    logits = diffusion_dpo_logits(errors, beta)
    weighted = logits if pair_weights is None else logits * pair_weights.to(logits.dtype)
    return ObjectiveOutput(loss=-F.logsigmoid(weighted).mean(), logits=logits)


def implicit_accuracy(logits: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs whose implicit reward prefers the winner (``u > 0``), ties (``u == 0``) counting half.

    Counting ties as half makes a policy identical to its reference (LoRA at initialisation) score 0.5, the value
    of a coin flip, instead of 0.
    """
    return ((logits > 0).float() + 0.5 * (logits == 0).float()).mean()


class PreferenceObjective(Protocol):
    """What the trainer calls. ``requires_reference`` tells it whether to run the reference forward at all."""

    name: str
    requires_reference: bool

    def __call__(
        self,
        predictions: PreferencePredictions,
        errors: DenoisingErrors,
        *,
        beta: float,
        pair_weights: torch.Tensor | None = None,
    ) -> ObjectiveOutput: ...


class DiffusionDPOObjective:
    """Diffusion-DPO (Wallace et al., 2023), see :func:`diffusion_dpo_loss`."""

    name = "dpo"
    requires_reference = True
    uses_loser = True
    needs_pair_weights = False

    def __init__(self, beta: float = 5000.0) -> None:
        self.beta = beta

    def __call__(
        self,
        predictions: PreferencePredictions,
        errors: DenoisingErrors,
        *,
        pair_weights: torch.Tensor | None = None,
    ) -> ObjectiveOutput:
        return diffusion_dpo_loss(errors, self.beta, pair_weights)


OBJECTIVES: dict[str, type] = {"dpo": DiffusionDPOObjective}


def build_objective(loss_type: str, *, beta: float, **hyperparameters) -> PreferenceObjective:
    """The objective named ``loss_type`` with its hyperparameters."""
    if loss_type not in OBJECTIVES:
        raise ValueError(f"Unknown loss_type {loss_type!r}; choose one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[loss_type](beta=beta)


def get_objective(name: str, beta: float = 5000.0) -> PreferenceObjective:
    """Look up an objective by its ``loss_type`` name."""
    return build_objective(name, beta=beta)
