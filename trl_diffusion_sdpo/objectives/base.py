"""Shared pieces of every preference objective: the tensors it receives, what it returns, and how it is built.

Notation (shared by every objective): for one pair the winner and loser latents are noised with ONE timestep ``t``
and ONE noise ``eps``; a network ``N`` predicts on both, and its per-sample denoising error on branch ``Y`` is

    e_N^Y = mean over C, H, W of (N(x_t^Y, t, c) - target^Y)^2.

With ``d_theta = e_theta^w - e_theta^l`` (policy) and ``d_ref = e_ref^w - e_ref^l`` (frozen reference), the
Diffusion-DPO logit (Wallace et al., arXiv 2311.12908) is

    u = -0.5 * beta * (d_theta - d_ref)

and the implicit reward prefers the winner when ``u > 0``.

An objective is an object built once with its hyperparameters (:func:`build_objective`) and called per micro-batch
with the full prediction tensors (:class:`PreferencePredictions`, for objectives such as DSPO that need more than
four scalars per pair) and the per-sample errors (:class:`DenoisingErrors`). Two rules make every objective compose
with the Diffusion-SDPO safeguard:

- the loser enters the loss ONLY through ``errors.policy_loser``, which may carry a straight-through gradient scale
  (value unchanged); an objective never recomputes the loser error from ``predictions.policy_loser``;
- the loss is a differentiable function of the tensors it receives, nothing cached, so the parameter-space
  safeguard can differentiate it with respect to detached copies of the policy predictions.

The class attributes tell the trainer what to run: ``requires_reference`` (False: no reference forward at all),
``uses_loser`` (False: the safeguard has nothing to scale), ``needs_pair_weights`` (True: the data path must supply
per-pair weights) and ``metric_names`` (the keys of ``ObjectiveOutput.metrics``, the same on every call).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

__all__ = [
    "DSPO_FORMS",
    "DenoisingErrors",
    "ObjectiveHyperparameters",
    "ObjectiveOutput",
    "PreferenceObjective",
    "PreferencePredictions",
    "build_objective",
    "denoising_error",
    "diffusion_dpo_logits",
    "implicit_accuracy",
    "per_pair",
    "register_objective",
    "registered_objectives",
    "reject_pair_weights",
    "require_choice",
    "require_open_unit",
    "require_positive",
    "require_positive_int",
]

DSPO_FORMS = ("sd15", "sdxl")


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
    """What an objective returns for one micro-batch.

    Attributes:
        loss: the scalar to minimise.
        logits: per-pair margin, shape ``[B]``, positive when the winner is preferred: the Diffusion-DPO logit ``u``
            where the objective has one, otherwise the quantity that plays its role (each objective documents it).
        metrics: detached per-step scalars worth logging, keyed by the objective's ``metric_names``.
    """

    loss: torch.Tensor
    logits: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def denoising_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean over all non-batch dims of (prediction - target)^2``, in float32, shape ``[B]``."""
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
    diff = prediction.float() - target.float()
    return diff.pow(2).flatten(1).mean(dim=1)


def diffusion_dpo_logits(errors: DenoisingErrors, beta: float) -> torch.Tensor:
    """``u = -0.5 * beta * ((e_theta^w - e_theta^l) - (e_ref^w - e_ref^l))``, shape ``[B]``.

    Shared by DPO, DSPO, DMPO and SmPO. The loser enters through ``errors.policy_loser`` only.
    """
    if errors.reference_winner is None or errors.reference_loser is None:
        raise ValueError("this objective needs the reference model's errors on both branches")
    policy_diff = errors.policy_winner - errors.policy_loser
    reference_diff = errors.reference_winner - errors.reference_loser
    return -0.5 * beta * (policy_diff - reference_diff)


def implicit_accuracy(logits: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs whose implicit reward prefers the winner (``u > 0``), ties (``u == 0``) counting half.

    Counting ties as half makes a policy identical to its reference (LoRA at initialisation) score 0.5, the value
    of a coin flip, instead of 0.
    """
    return ((logits > 0).float() + 0.5 * (logits == 0).float()).mean()


def _as_float(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return number


def require_positive(name: str, value: float) -> float:
    """``value`` as a float if it is finite and ``> 0``, else a ValueError naming ``name``."""
    number = _as_float(name, value)
    if number <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return number


def require_open_unit(name: str, value: float) -> float:
    """``value`` as a float if ``0 < value < 1``, else a ValueError naming ``name``."""
    number = _as_float(name, value)
    if not 0 < number < 1:
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {value!r}")
    return number


def require_positive_int(name: str, value: int) -> int:
    """``value`` if it is an integer ``>= 1``, else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def require_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``, else a ValueError naming ``name`` and listing them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


@dataclass(frozen=True)
class ObjectiveHyperparameters:
    """Every objective hyperparameter, validated together; each objective reads the ones it uses.

    Attributes:
        beta: scale of the Diffusion-DPO logit ``u`` (dpo, dspo, dmpo, smpo); finite, > 0.
        dmpo_alpha: DMPO's target ``q = 1 - alpha``; in (0, 1).
        dspo_form: which of the DSPO authors' forms, ``"sd15"`` or ``"sdxl"``.
        mapo_beta: MaPO's weight of the odds-ratio term; finite, > 0.
        mapo_snr_value: MaPO's ``g`` in ``f(e) = g*e / (exp(g*e) - 1)``; finite, > 0.
        num_train_timesteps: MaPO's ``T`` multiplying the margin (the scheduler's ``num_train_timesteps``); >= 1.
    """

    beta: float
    dmpo_alpha: float = 0.01
    dspo_form: str = "sd15"
    mapo_beta: float = 0.1
    mapo_snr_value: float = 0.5
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        object.__setattr__(self, "beta", require_positive("beta", self.beta))
        object.__setattr__(self, "dmpo_alpha", require_open_unit("dmpo_alpha", self.dmpo_alpha))
        require_choice("dspo_form", self.dspo_form, DSPO_FORMS)
        object.__setattr__(self, "mapo_beta", require_positive("mapo_beta", self.mapo_beta))
        object.__setattr__(self, "mapo_snr_value", require_positive("mapo_snr_value", self.mapo_snr_value))
        require_positive_int("num_train_timesteps", self.num_train_timesteps)


@runtime_checkable
class PreferenceObjective(Protocol):
    """What the trainer calls: an object carrying its hyperparameters, called once per micro-batch."""

    name: str
    requires_reference: bool
    uses_loser: bool
    needs_pair_weights: bool
    metric_names: tuple[str, ...]

    def __call__(
        self,
        predictions: PreferencePredictions,
        errors: DenoisingErrors,
        *,
        pair_weights: torch.Tensor | None = None,
    ) -> ObjectiveOutput: ...


# loss_type -> objective class; each class has ``name`` and ``from_hyperparameters(ObjectiveHyperparameters)``.
_REGISTRY: dict[str, type] = {}


def register_objective(cls: type) -> type:
    """Class decorator: make ``cls`` buildable as ``loss_type=cls.name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"an objective named {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def registered_objectives() -> tuple[str, ...]:
    """The valid ``loss_type`` names, in registration order."""
    return tuple(_REGISTRY)


def build_objective(
    loss_type: str,
    *,
    beta: float,
    dmpo_alpha: float = 0.01,
    dspo_form: str = "sd15",
    mapo_beta: float = 0.1,
    mapo_snr_value: float = 0.5,
    num_train_timesteps: int = 1000,
) -> PreferenceObjective:
    """Build the objective named ``loss_type`` with its hyperparameters (see :class:`ObjectiveHyperparameters`).

    Every hyperparameter is validated, also those the chosen objective does not use, so a bad value fails here
    with a ValueError naming the field, whatever ``loss_type`` is.
    """
    if loss_type not in _REGISTRY:
        raise ValueError(f"Unknown loss_type {loss_type!r}; choose one of {sorted(_REGISTRY)}")
    hyperparameters = ObjectiveHyperparameters(
        beta=beta,
        dmpo_alpha=dmpo_alpha,
        dspo_form=dspo_form,
        mapo_beta=mapo_beta,
        mapo_snr_value=mapo_snr_value,
        num_train_timesteps=num_train_timesteps,
    )
    return _REGISTRY[loss_type].from_hyperparameters(hyperparameters)


def reject_pair_weights(name: str, pair_weights: torch.Tensor | None) -> None:
    """Objectives that do not weight pairs refuse weights rather than silently ignore them."""
    if pair_weights is not None:
        raise ValueError(f"loss_type={name!r} does not take pair_weights; smoothed preferences need loss_type='smpo'")


def per_pair(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape per-pair ``values`` of shape ``[B]`` to broadcast against ``like`` of shape ``[B, ...]``."""
    return values.reshape(values.shape[0], *([1] * (like.dim() - 1)))
