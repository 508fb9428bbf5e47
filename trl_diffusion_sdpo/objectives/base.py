"""Shared pieces of every preference objective: the tensors it receives, what it returns, and how it is built.

Notation (shared by every objective): for one pair the winner and loser latents are noised with ONE timestep ``t``
and ONE noise ``eps``; a network ``N`` predicts on both, and its per-sample denoising error on branch ``Y`` is

    e_N^Y = mean over C, H, W of (N(x_t^Y, t, c) - target^Y)^2,

or, with a loss mask ``m^Y`` (``loss_mask``: weights in [0, 1] at latent size, white where the
preference lives), the mask's weighted mean ``sum(m^Y * (N - target^Y)^2) / sum(m^Y)`` per sample
(:func:`denoising_error`), for policy and reference alike, so every objective over the errors trains on the region.

With ``d_theta = e_theta^w - e_theta^l`` (policy) and ``d_ref = e_ref^w - e_ref^l`` (frozen reference), the
Diffusion-DPO logit (Wallace et al., arXiv 2311.12908) is

    u = -0.5 * beta * (d_theta - d_ref)

and the implicit reward prefers the winner when ``u > 0``.

An objective is a frozen dataclass of its hyperparameters (:class:`PreferenceObjective`), built once
(:func:`objective_from_config` from the training config, or :func:`build_objective` by name) and called per
micro-batch with the full prediction tensors (:class:`PreferencePredictions`, for objectives such as DSPO that need
more than four scalars per pair), the per-sample errors (:class:`DenoisingErrors`) and, for objectives that weight
pairs, the data's pair scores. Two rules make every objective compose with the Diffusion-SDPO safeguard:

- the loser enters the loss ONLY through ``errors.policy_loser``, which may carry a straight-through gradient scale
  (value unchanged); an objective never recomputes the loser error from ``predictions.policy_loser``;
- the loss is a differentiable function of the tensors it receives, nothing cached, so the parameter-space
  safeguard can differentiate it with respect to detached copies of the policy predictions.
"""

from __future__ import annotations

import abc
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

import torch

from ..config._lazy import import_target
from ..config.checks import Choice, Range

__all__ = [
    "BUILT_IN_OBJECTIVES",
    "DenoisingErrors",
    "DiffusionDPOLogitObjective",
    "ObjectiveOutput",
    "PreferenceObjective",
    "PreferencePredictions",
    "build_objective",
    "check_objective_config",
    "denoising_error",
    "diffusion_dpo_logits",
    "hyperparameter",
    "implicit_accuracy",
    "objective_class",
    "objective_from_config",
    "per_pair",
    "register_objective",
    "registered_objectives",
]


@dataclass
class PreferencePredictions:
    """Network outputs and targets for a batch of pairs; every tensor has shape ``[B, C, H, W]`` (a video family's
    ``[B, C, F, H, W]``).

    ``winner_mask`` / ``loser_mask`` (``loss_mask``): each image's loss mask at latent size, float32
    weights in [0, 1] broadcastable to the predictions (``[B, 1, H, W]``, ``[B, 1, 1, H, W]``), or ``None``: the whole
    image counts.
    """

    policy_winner: torch.Tensor
    policy_loser: torch.Tensor
    target_winner: torch.Tensor
    target_loser: torch.Tensor
    reference_winner: torch.Tensor | None = None
    reference_loser: torch.Tensor | None = None
    winner_mask: torch.Tensor | None = None
    loser_mask: torch.Tensor | None = None


@dataclass
class DenoisingErrors:
    """Per-sample denoising errors (float32, shape ``[B]``) of the policy and, when present, the reference."""

    policy_winner: torch.Tensor
    policy_loser: torch.Tensor
    reference_winner: torch.Tensor | None = None
    reference_loser: torch.Tensor | None = None


def denoising_error(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """One entry of :class:`DenoisingErrors`: ``mean over all non-batch dims of (prediction - target)^2``, in
    float32, shape ``[B]``.

    With ``mask`` (weights broadcastable to ``prediction``), the masked mean of each sample,
    ``sum(m * (prediction - target)^2) / sum(m)`` over its elements (the mask broadcast over channels and frames): an
    all-ones mask gives the plain mean exactly. A sample whose mask is all zero has error 0 and no gradient.
    """
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
    diff = prediction.float() - target.float()
    if mask is None:
        return diff.pow(2).flatten(1).mean(dim=1)
    weights = mask.float().to(diff.device).expand_as(diff).flatten(1)
    # clamp: an all-zero mask gives 0 / 1, not 0 / 0 (such a sample is refused by the data, this keeps it finite)
    return (weights * diff.pow(2).flatten(1)).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-12)


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


def hyperparameter(check: Range | Choice, default: Any = MISSING) -> Any:
    """A hyperparameter field of an objective (a dataclass field): ``check`` is its rule, applied once when the
    objective is built (:meth:`PreferenceObjective.__post_init__`); ``default`` the paper's value, if it has one.

    The field's name is the config field it is read from (:func:`objective_from_config`), so a hyperparameter is
    added by declaring it here and documenting it in the config, nothing else.
    """
    return field(default=default, metadata={"check": check})


@dataclass(frozen=True)
class PreferenceObjective(abc.ABC):
    """What the trainer calls: a frozen dataclass of hyperparameters, called once per micro-batch.

    A subclass is a ``@dataclass(frozen=True)`` declaring each hyperparameter with :func:`hyperparameter` (its rule
    and default), sets the class attributes below, implements :meth:`loss` and registers itself with
    :func:`register_objective`. Every field is checked by its rule on construction, whichever way the objective is
    built; a rule that ties several fields extends ``__post_init__`` (after ``super().__post_init__()``).

    Class attributes: ``name`` (the ``loss_type``), ``requires_reference`` (False: no reference forward at all),
    ``uses_loser`` (False: the safeguard has nothing to scale), ``needs_pair_scores`` (True: every call needs the
    pair scores of the data), ``metric_names`` (the keys of ``ObjectiveOutput.metrics``, the same on every call),
    ``not_for_flow_matching`` (why the formula has no counterpart on flow-matching velocity errors, which the flow
    families then refuse; empty: it runs on them) and ``unet_scale_beta_warning`` (True: ``beta`` scales the
    Diffusion-DPO logit as in the UNet recipes, so a flow family warns about a UNet-scale value).
    """

    name: ClassVar[str]
    requires_reference: ClassVar[bool] = True
    uses_loser: ClassVar[bool] = True
    needs_pair_scores: ClassVar[bool] = False
    metric_names: ClassVar[tuple[str, ...]] = ()
    not_for_flow_matching: ClassVar[str] = ""
    unet_scale_beta_warning: ClassVar[bool] = False
    #: True: the loss reads the predictions themselves beyond the errors (DSPO), which a loss mask does not reach
    reads_predictions: ClassVar[bool] = False

    def __post_init__(self) -> None:
        for spec in fields(self):
            rule = spec.metadata.get("check")
            if rule is not None:  # frozen: the checked (float) value replaces the given one
                object.__setattr__(self, spec.name, rule.check(spec.name, getattr(self, spec.name)))

    @classmethod
    def hyperparameter_names(cls) -> tuple[str, ...]:
        """The names of the fields this objective declares, in declaration order."""
        return tuple(spec.name for spec in fields(cls))

    @classmethod
    def check_config(cls, config: Any) -> None:
        """Refuse, naming the field, a training config this objective cannot run: a bad value of a field it declares
        (read from the config field of the same name; ``None``, a default resolved per model family such as
        ``beta``, is left to its resolution), and what the run asks of it that it lacks (a loser for the safeguard, a
        reference, predictions a loss mask reaches, a logit the guards act on). An objective extends it for rules
        over several of its fields."""
        for spec in fields(cls):
            rule, value = spec.metadata.get("check"), getattr(config, spec.name, None)
            if rule is not None and value is not None:
                rule.check(spec.name, value)
        if config.safeguard_space != "none" and not cls.uses_loser:
            raise ValueError(
                f"loss_type={config.loss_type!r} trains on the winners only: there is no loser gradient for the "
                "safeguard to scale. Set safeguard_space='none'."
            )
        if getattr(config, "loss_mask", False) and cls.reads_predictions:
            raise ValueError(
                f"loss_mask masks the denoising errors, but loss_type={config.loss_type!r} also reads the whole "
                "predictions, which the mask would not reach. Use loss_type='dpo' (or another objective over the "
                "errors), or set loss_mask=False."
            )
        if config.inverts and config.inversion_network == "reference" and not cls.requires_reference:
            raise ValueError(
                f"inversion_network='reference' needs a reference model, and loss_type={config.loss_type!r} uses "
                "none; set inversion_network='policy' (as SmPO does) or noising='forward'."
            )
        if getattr(config, "safeguard_mu", None) == "auto" and not cls.requires_reference:
            raise ValueError(
                "safeguard_mu='auto' holds the winner's error at or below the reference's: "
                f"loss_type={config.loss_type!r} runs no reference. Give safeguard_mu a number, or use an objective "
                "with a reference (e.g. 'dpo')."
            )
        if getattr(cls, "beta_scales_logit", False):
            return
        on = {
            "auto_beta": getattr(config, "auto_beta", False),
            "max_margin": getattr(config, "max_margin", None) is not None,
            "sft_weight": bool(getattr(config, "sft_weight", 0.0)),
        }
        for name, used in on.items():
            if used and name not in cls.hyperparameter_names():  # an objective may declare a field of that name
                raise ValueError(
                    f"{name} acts on the Diffusion-DPO logit u = -0.5 * beta * m: it needs loss_type='dpo' or "
                    f"'smpo', got loss_type={config.loss_type!r}. Remove {name}, or change loss_type."
                )

    def __call__(
        self,
        predictions: PreferencePredictions,
        errors: DenoisingErrors,
        *,
        pair_scores: torch.Tensor | None = None,
    ) -> ObjectiveOutput:
        """The objective on one micro-batch. ``pair_scores [B, 2]`` are the data's (winner, loser) scores; only an
        objective with ``needs_pair_scores`` reads them (its :meth:`loss` takes them as a third argument), every other
        one ignores them."""
        if not self.needs_pair_scores:
            return self.loss(predictions, errors)
        if pair_scores is None:
            raise ValueError(
                f"loss_type={self.name!r} needs pair_scores (the (winner, loser) scores of each pair); the dataset "
                "must provide a score for each image of a pair"
            )
        return self.loss(predictions, errors, pair_scores)

    @abc.abstractmethod
    def loss(self, predictions: PreferencePredictions, errors: DenoisingErrors) -> ObjectiveOutput:
        """The objective's loss, logits and metrics (see the class's formula)."""


@dataclass(frozen=True)
class DiffusionDPOLogitObjective(PreferenceObjective):
    """Base of the objectives over the Diffusion-DPO logit ``u`` (:func:`diffusion_dpo_logits`), scaled by ``beta``.

    Attributes:
        beta: scale of ``u``; finite, > 0 (no default here: ``beta=None`` in the config resolves per model family,
            :mod:`trl_diffusion_sdpo.config.defaults`).
    """

    beta: float = hyperparameter(Range(0, low_open=True, hint="Leave it unset for the model family's value."))


# loss_type -> objective class, for the objectives whose module has been imported.
_REGISTRY: dict[str, type[PreferenceObjective]] = {}

_HERE = __name__.rpartition(".")[0]
#: The built-in objectives, ``loss_type`` -> ``"module:class"``: each module is imported when its objective is chosen
#: (and registers its class with :func:`register_objective`), so a run loads the objective it trains with.
BUILT_IN_OBJECTIVES: dict[str, str] = {
    "dmpo": f"{_HERE}.dmpo:DMPOObjective",
    "dpo": f"{_HERE}.dpo:DiffusionDPOObjective",
    "dspo": f"{_HERE}.dspo:DSPOObjective",
    "mapo": f"{_HERE}.mapo:MaPOObjective",
    "sft": f"{_HERE}.sft:SFTObjective",
    "smpo": f"{_HERE}.smpo:SmoothedPreferenceObjective",
}


def register_objective(cls: type[PreferenceObjective]) -> type[PreferenceObjective]:
    """Class decorator: make ``cls`` (a :class:`PreferenceObjective` dataclass) buildable as ``loss_type=cls.name``."""
    # ``__dataclass_params__`` in the class's own namespace: decorated itself, not only inheriting a dataclass (whose
    # fields would then miss the ones this class declares).
    if not (isinstance(cls, type) and issubclass(cls, PreferenceObjective) and "__dataclass_params__" in vars(cls)):
        raise TypeError(f"{cls!r} must be a PreferenceObjective subclass decorated with @dataclass(frozen=True)")
    built_in = BUILT_IN_OBJECTIVES.get(cls.name)
    if cls.name in _REGISTRY or (built_in is not None and built_in != f"{cls.__module__}:{cls.__qualname__}"):
        raise ValueError(f"an objective named {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def registered_objectives() -> tuple[str, ...]:
    """The valid ``loss_type`` names: the built-in ones, then the others in registration order (none imported)."""
    return (*BUILT_IN_OBJECTIVES, *(name for name in _REGISTRY if name not in BUILT_IN_OBJECTIVES))


def objective_class(loss_type: str) -> type[PreferenceObjective]:
    """The objective class registered as ``loss_type`` (a built-in one's module imported), or a ValueError listing
    the registered names."""
    loss_type = Choice(registered_objectives()).check("loss_type", loss_type)
    if loss_type not in _REGISTRY:
        import_target(BUILT_IN_OBJECTIVES[loss_type])
    return _REGISTRY[loss_type]


def build_objective(loss_type: str, **hyperparameters: Any) -> PreferenceObjective:
    """Build the objective named ``loss_type`` from its hyperparameters (each objective's fields: its class).

    A name the objective does not declare is refused with a ValueError naming it and listing the objective's
    fields (``beta`` for ``"mapo"``, whose weight is ``mapo_beta``, would otherwise be silently ignored); a bad value
    fails with a ValueError naming the field.
    """
    cls = objective_class(loss_type)
    known = cls.hyperparameter_names()
    unknown = [name for name in hyperparameters if name not in known]
    if unknown:
        raise ValueError(
            f"loss_type={loss_type!r} has no hyperparameter {', '.join(map(repr, unknown))}; its hyperparameters "
            f"are {list(known)}"
        )
    return cls(**hyperparameters)


def objective_from_config(config: Any, *, num_train_timesteps: int) -> PreferenceObjective:
    """The objective ``config.loss_type`` names, each of its fields read from the config field of the same name.

    ``num_train_timesteps`` (the scheduler's, MaPO's ``T``) is not a config field: it is given here. A field the
    config does not have keeps the objective's default.
    """
    cls = objective_class(config.loss_type)
    return cls(**_values_from(cls, config, num_train_timesteps=num_train_timesteps))


def check_objective_config(config: Any) -> None:
    """Check ``config`` by the objective ``config.loss_type`` names (:meth:`PreferenceObjective.check_config`): its
    own fields, and what the run asks of it. Another objective's fields are not read (a ``dmpo_alpha`` with
    ``loss_type="dpo"`` is never used, so never refused). The config calls it when it is made
    (:func:`trl_diffusion_sdpo.config.rules.check_config`)."""
    objective_class(config.loss_type).check_config(config)


def _values_from(cls: type[PreferenceObjective], config: Any, **given: Any) -> dict[str, Any]:
    """The values of ``cls``'s fields: from ``given``, else from the config field of the same name, else left out
    (the field's default)."""
    values = {}
    for name in cls.hyperparameter_names():
        if name in given:
            values[name] = given[name]
        elif hasattr(config, name):
            values[name] = getattr(config, name)
    return values


def per_pair(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape per-pair ``values`` of shape ``[B]`` to broadcast against ``like`` of shape ``[B, ...]``."""
    return values.reshape(values.shape[0], *([1] * (like.dim() - 1)))
