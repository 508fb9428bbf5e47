"""The policy's and the reference's predictions of a noised pair, their denoising errors and the objective on them.

The frozen reference model of Diffusion-DPO is, with LoRA, the policy itself with its adapters disabled (no second
copy of the weights), or a frozen copy of the initial denoiser (UNet or transformer; :mod:`.frozen_reference`, loaded
when :func:`build_reference` chooses it: by full tuning or a given ``ref_model``). A reference predicts under
``torch.no_grad``, in the policy's precision, autocast and train/eval mode (so that at step 0 it computes exactly
what the policy computes); it never receives gradients or optimizer updates. How the network is called (argument
names, FLUX's latent packing) comes from the model family as ``call``.

* predictions: the policy's and the reference's, in one forward pass over both branches or one per branch
  (:func:`predict_pairs`);
* errors and objective: :func:`denoising_errors`, :func:`evaluate_objective` (the formulas are in
  :mod:`trl_diffusion_sdpo.objectives`), with the loser error's gradient weighted where a safeguard asks
  (:func:`scale_gradient`); with a loss mask (``loss_mask [B, 2, 1, H, W]`` in the batch, flipped and
  cropped with its images, brought to latent size by the family), each error is the mask's weighted mean;
* metrics: what a micro-batch's errors and objective record, kept on the device and reduced over every process once
  per log (:func:`record_metrics`).
"""

from __future__ import annotations

import abc
import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

from collections.abc import MutableMapping, Sequence

from .. import families
from ..config._lazy import import_target
from ..families import ModelFamily, NoisedPair, PromptEmbeddings, is_quantized
from ..objectives import (
    DenoisingErrors,
    ObjectiveOutput,
    PreferenceObjective,
    PreferencePredictions,
    denoising_error,
    implicit_accuracy,
)

__all__ = [
    "QUARTILE_METRICS",
    "build_reference",
    "denoising_errors",
    "DisabledAdaptersReference",
    "evaluate_objective",
    "Evaluation",
    "finish_margin_quartiles",
    "metric_names",
    "metric_stores",
    "predict_pairs",
    "record_margin_quartiles",
    "record_metrics",
    "record_step_metrics",
    "reduce_logged_metrics",
    "reduce_metrics",
    "Reference",
    "reference_for",
    "scale_gradient",
    "step_metric_names",
]

logger = logging.getLogger(__name__)

# The frozen copy's module, imported when a reference of that kind is built: a LoRA run never loads it.
FROZEN_COPY = "trl_diffusion_sdpo.step.frozen_reference"

DenoiserCall = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, dict], torch.Tensor]


def _positional_denoiser_call(
    model: torch.nn.Module, sample: torch.Tensor, timestep: torch.Tensor, conditioning: dict
) -> torch.Tensor:
    """``model(sample, timestep, **conditioning)``, as a UNet is called (the default when no family call is given)."""
    return model(sample, timestep, **conditioning, return_dict=False)[0]


@contextlib.contextmanager
def disabled_adapters(denoiser: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run ``denoiser`` without its LoRA adapters inside the block; they are re-enabled even if the block raises."""
    denoiser.disable_adapters()
    try:
        yield denoiser
    finally:
        denoiser.enable_adapters()


class Reference(abc.ABC):
    """Interface: ``predict(sample, timestep, **conditioning) -> prediction`` without autograd."""

    shares_policy_weights: bool = False
    call: DenoiserCall = staticmethod(_positional_denoiser_call)

    @abc.abstractmethod
    def predict(self, sample: torch.Tensor, timestep: torch.Tensor, **conditioning) -> torch.Tensor:
        """The reference's prediction for ``sample`` at ``timestep``, without autograd."""


class DisabledAdaptersReference(Reference):
    """The policy denoiser with its LoRA adapters switched off for the duration of the call."""

    shares_policy_weights = True

    def __init__(self, get_denoiser: Callable[[], torch.nn.Module], call: DenoiserCall | None = None) -> None:
        # A getter, not the module: the trainer may wrap or move the policy after construction.
        self.get_denoiser = get_denoiser
        if call is not None:
            self.call = call

    @torch.no_grad()
    def predict(self, sample: torch.Tensor, timestep: torch.Tensor, **conditioning) -> torch.Tensor:
        with disabled_adapters(self.get_denoiser()) as denoiser:
            return self.call(denoiser, sample, timestep, conditioning)


def build_reference(
    policy_denoiser: torch.nn.Module,
    ref_model: torch.nn.Module | DiffusionPipeline | None,
    uses_lora: bool,
    get_policy: Callable[[], torch.nn.Module] | None = None,
    call: DenoiserCall | None = None,
) -> Reference:
    """Choose the reference: ``ref_model`` if given, else disabled adapters (LoRA) or a frozen copy (full tuning).

    Call before adding LoRA adapters when a frozen copy is wanted, so the copy holds only the base weights.
    """
    if ref_model is None and uses_lora:
        return DisabledAdaptersReference(get_policy or (lambda: policy_denoiser), call)
    # a frozen copy, or ref_model's denoiser: its module, loaded by a run that holds one
    return import_target(f"{FROZEN_COPY}:frozen_reference")(policy_denoiser, ref_model, call)


def reference_for(
    objective,
    family,
    ref_model: torch.nn.Module | DiffusionPipeline | None,
    peft_config,
    get_policy: Callable[[], torch.nn.Module] | None = None,
) -> Reference | None:
    """The reference ``objective`` needs for ``family``'s denoiser, or ``None`` for reference-free objectives (MaPO,
    SFT: no copy in memory, no forward pass). Call before adding LoRA adapters (see :func:`build_reference`)."""
    denoiser = family.denoiser
    # A quantized base trains LoRA only: refused here, before a full-tuning reference would deep-copy it.
    if is_quantized(denoiser):  # the quantization module is loaded for a quantized base only
        families.check_quantized_base_training(denoiser, family.denoiser_name, peft_config)
    if peft_config is not None and ref_model is None and bool(getattr(denoiser, "peft_config", None)):
        raise ValueError(
            f"The {family.denoiser_name} already carries LoRA adapters; pass an explicit ref_model or a clean model"
        )
    if not objective.requires_reference:
        if ref_model is not None:
            logger.warning("loss_type=%r needs no reference model; the ref_model passed is not used", objective.name)
        return None
    return build_reference(
        denoiser, ref_model, uses_lora=peft_config is not None, get_policy=get_policy, call=family.call_denoiser
    )


# ------------------------------------------------------------------ paired predictions, errors, objective


def predict_pairs(
    policy: torch.nn.Module,
    reference: Callable[..., torch.Tensor] | None,
    family: ModelFamily,
    noised: NoisedPair,
    prompt_embeds: PromptEmbeddings,
    time_ids: torch.Tensor | None,
    separate_branches: bool = False,
    loss_mask: torch.Tensor | None = None,
) -> PreferencePredictions:
    """Predictions of ``policy`` (and ``reference``, if given) on the ``2B`` rows of ``noised``.

    ``prompt_embeds`` holds one embedding per pair (shared by its two images); ``time_ids`` ``[2B, 6]`` or ``None``;
    ``loss_mask`` ``[2B, 1, ..., h, w]`` (each image's, at latent size) or ``None``.
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
        winner_mask=None if loss_mask is None else loss_mask[:batch],
        loser_mask=None if loss_mask is None else loss_mask[batch:],
    )


def _winner_and_loser(outputs: list[torch.Tensor], batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The winner and loser predictions from one pass per branch, or from one pass over both."""
    if len(outputs) == 2:
        return outputs[0], outputs[1]
    return outputs[0][:batch], outputs[0][batch:]


def denoising_errors(predictions: PreferencePredictions) -> DenoisingErrors:
    """Per-sample float32 errors ``mean_CHW (prediction - target)^2`` of the policy and, if present, the reference;
    with loss masks, each branch's masked mean under its image's mask, policy and reference alike."""
    winner_mask, loser_mask = predictions.winner_mask, predictions.loser_mask
    errors = DenoisingErrors(
        policy_winner=denoising_error(predictions.policy_winner, predictions.target_winner, winner_mask),
        policy_loser=denoising_error(predictions.policy_loser, predictions.target_loser, loser_mask),
    )
    if predictions.reference_winner is not None:
        errors.reference_winner = denoising_error(predictions.reference_winner, predictions.target_winner, winner_mask)
        errors.reference_loser = denoising_error(predictions.reference_loser, predictions.target_loser, loser_mask)
    return errors


@dataclass
class Evaluation:
    """A micro-batch's errors and its objective's output on them (``loss`` is the objective's)."""

    errors: DenoisingErrors
    output: ObjectiveOutput

    @property
    def loss(self) -> torch.Tensor:
        return self.output.loss


def scale_gradient(value: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Straight-through gradient scaling: returns ``value`` unchanged, with its gradient multiplied by ``scale``.

    ``value.detach() + scale * (value - value.detach())``: the forward value is exactly ``value`` and
    ``d out / d value = scale``.
    """
    detached = value.detach()
    return detached + scale * (value - detached)


def evaluate_objective(
    objective: PreferenceObjective,
    predictions: PreferencePredictions,
    pair_scores: torch.Tensor | None = None,
    errors: DenoisingErrors | None = None,
    loser_weight: torch.Tensor | None = None,
) -> Evaluation:
    """errors -> objective: the per-sample errors of ``predictions`` (or ``errors`` where the caller formed them) and
    ``objective`` on them. ``loser_weight`` (the output-space safeguard's ``lambda``) scales the gradient of the
    policy's loser errors and leaves their values, so the loss and its metrics are Diffusion-DPO's."""
    errors = denoising_errors(predictions) if errors is None else errors
    if loser_weight is not None:
        errors.policy_loser = scale_gradient(errors.policy_loser, loser_weight)
    return Evaluation(errors, objective(predictions, errors, pair_scores=pair_scores))


Stored = MutableMapping[str, list[torch.Tensor]]


def metric_names(objective: PreferenceObjective, safeguard_names: Sequence[str] = ()) -> list[str]:
    """The metrics every micro-batch records: the data's, the objective's and the safeguard's (its
    ``metric_names``), the same list on every process, since they are reduced together."""
    names = ["data/skipped_rows", "implicit_acc", "margin", "mse/policy_winner", "mse/policy_loser"]
    if objective.requires_reference:
        names += ["mse/ref_winner", "mse/ref_loser", "delta/winner", "delta/loser"]
    names += list(getattr(objective, "metric_names", ()))  # a user's objective may declare none
    return names + list(safeguard_names)


def record_metrics(
    stored: Stored,
    errors: DenoisingErrors,
    output: ObjectiveOutput,
    lambdas: dict[str, torch.Tensor | None],
) -> None:
    """Append one micro-batch's metrics to ``stored`` (detached device tensors)."""
    stored["implicit_acc"].append(implicit_accuracy(output.logits.detach()))
    stored["margin"].append(output.logits.detach().float().mean())  # the mean logit u (the objective's margin)
    for name, value in output.metrics.items():
        stored[name].append(value.detach().float().mean())
    stored["mse/policy_winner"].append(errors.policy_winner.detach().mean())
    stored["mse/policy_loser"].append(errors.policy_loser.detach().mean())
    if errors.reference_winner is not None:
        stored["mse/ref_winner"].append(errors.reference_winner.mean())
        stored["mse/ref_loser"].append(errors.reference_loser.mean())
        stored["delta/winner"].append((errors.policy_winner.detach() - errors.reference_winner).mean())
        stored["delta/loser"].append((errors.policy_loser.detach() - errors.reference_loser).mean())
    for name, lam in lambdas.items():
        if lam is not None:
            stored[name].append(lam)


def reduce_metrics(
    stored: Stored,
    names: list[str],
    max_lambda: float,
    device: torch.device | str,
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
    all_gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Means over the micro-batches of all processes since the last log, and ``stored`` cleared.

    ``data/skipped_rows`` is summed; each ``safeguard/*lambda`` gives ``_mean``, ``_min``, ``_max`` and the fraction
    of micro-batches below ``max_lambda`` (``safeguard/engaged`` for the rule in force, ``<name>_engaged`` for the
    other). ``all_reduce_sum`` and ``all_gather`` (``None`` on one process) combine the processes' partial sums.
    """
    lambdas = [n for n in names if n.startswith("safeguard/") and n.endswith("lambda")]
    # per metric: sum and count; per lambda: the count below max_lambda (engaged), and -min and max
    sums = torch.zeros(len(names) + len(lambdas), device=device)
    counts = torch.zeros_like(sums)
    extremes = torch.full((2 * len(lambdas),), -torch.inf, device=device)
    for i, name in enumerate(names):
        values = stored.get(name)
        if not values:
            continue
        stacked = torch.cat([v.detach().float().reshape(-1).to(device) for v in values])  # the pair scope: a vector
        sums[i], counts[i] = stacked.sum(), stacked.numel()
        if name in lambdas:
            k = lambdas.index(name)
            sums[len(names) + k] = (stacked < max_lambda).float().sum()
            counts[len(names) + k] = stacked.numel()
            extremes[2 * k], extremes[2 * k + 1] = -stacked.min(), stacked.max()
    stored.clear()
    if all_reduce_sum is not None:
        totals = all_reduce_sum(torch.stack([sums, counts]))
        sums, counts = totals[0], totals[1]
    if all_gather is not None:
        extremes = all_gather(extremes.reshape(1, -1)).amax(dim=0)
    sums, counts, extremes = sums.tolist(), counts.tolist(), extremes.tolist()  # the one host sync
    reduced: dict[str, float] = {}
    for i, name in enumerate(names):
        if counts[i] == 0:
            continue
        if name == "data/skipped_rows":
            reduced[name] = sums[i]
        elif name in lambdas:
            k = lambdas.index(name)
            reduced[f"{name}_mean"] = sums[i] / counts[i]
            reduced[f"{name}_min"] = -extremes[2 * k]
            reduced[f"{name}_max"] = extremes[2 * k + 1]
            engaged = "safeguard/engaged" if name == "safeguard/lambda" else f"{name}_engaged"
            reduced[engaged] = sums[len(names) + k] / counts[len(names) + k]
        else:
            reduced[name] = sums[i] / counts[i]
    return reduced


QUARTILES = 4
#: the recorded metrics (sum and count per quartile), reduced with the others and replaced by ``margin/t_q{q}``
QUARTILE_METRICS = tuple(f"margin/t_q{q}_{part}" for q in range(1, QUARTILES + 1) for part in ("sum", "count"))


def record_margin_quartiles(
    stored: MutableMapping[str, list[torch.Tensor]],
    logits: torch.Tensor,
    timesteps: torch.Tensor,
    num_train_timesteps: int,
) -> None:
    """Append one micro-batch's per-quartile sums and counts of ``logits`` (``[B]``) by ``timesteps`` (``[B]``)."""
    quartile = (timesteps.detach().float() * QUARTILES / num_train_timesteps).floor().clamp(0, QUARTILES - 1)
    u = logits.detach().float()
    for q in range(QUARTILES):
        inside = (quartile == q).float()
        stored[f"margin/t_q{q + 1}_sum"].append((u * inside).sum())
        stored[f"margin/t_q{q + 1}_count"].append(inside.sum())


def finish_margin_quartiles(reduced: dict[str, float]) -> None:
    """Replace the reduced sums and counts in ``reduced`` by ``margin/t_q{q}`` (quartiles without pairs left out)."""
    for q in range(1, QUARTILES + 1):
        total, count = reduced.pop(f"margin/t_q{q}_sum", None), reduced.pop(f"margin/t_q{q}_count", None)
        if total is not None and count:
            reduced[f"margin/t_q{q}"] = total / count


def step_metric_names(objective: PreferenceObjective, safeguard_names: Sequence[str] = ()) -> list[str]:
    """What the trainer's step records: :func:`metric_names` and the margin's quartile sums and counts."""
    return metric_names(objective, safeguard_names) + list(QUARTILE_METRICS)


def record_step_metrics(
    stored: Stored,
    evaluation: Evaluation,
    lambdas: dict[str, torch.Tensor | None],
    noised: Any,
    num_train_timesteps: int,
) -> None:
    """A training micro-batch's metrics (:func:`record_metrics`) and its margin by timestep quartile
    (:func:`record_margin_quartiles`): ``evaluation`` its errors and objective, ``lambdas`` each ``lambda`` a
    safeguard chose by metric name, ``noised`` its noised pair."""
    record_metrics(stored, evaluation.errors, evaluation.output, lambdas)
    timesteps = noised.noised.timesteps[: noised.num_pairs]  # a pair's two images share one timestep
    record_margin_quartiles(stored, evaluation.output.logits, timesteps, num_train_timesteps)


def metric_stores() -> dict[str, defaultdict[str, list[torch.Tensor]]]:
    """Empty stores of recorded metrics, one per mode (``train``, ``eval``)."""
    return {"train": defaultdict(list), "eval": defaultdict(list)}


def reduce_logged_metrics(stored: Stored, names: list[str], args: Any, accelerator: Any) -> dict[str, float]:
    """:func:`reduce_metrics` over ``accelerator``'s processes (no collective on one), with ``args``'s
    ``safeguard_max_lambda`` and device, and the margin's quartiles finished (:func:`finish_margin_quartiles`)."""
    several = accelerator.num_processes > 1
    reduced = reduce_metrics(
        stored,
        names,
        args.safeguard_max_lambda,
        args.device,
        (lambda t: accelerator.reduce(t, reduction="sum")) if several else None,
        accelerator.gather if several else None,
    )
    finish_margin_quartiles(reduced)
    return reduced
