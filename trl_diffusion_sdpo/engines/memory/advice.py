"""The fits verdict and, when a run does not fit, the cheapest change that makes it fit (``estimate-memory``).

The verdict plans with the estimate times the error measured for the run's family and tuning on a GPU
(:func:`~.measured.planning_error`). The advice runs the same estimate (:func:`~.estimate.estimate_memory`) and the
same verdict over every combination of the changes in :data:`CHANGES` that the run admits, and names the combination
that fits at the least cost: each change's cost ranks what it gives up. Changes that only slow a step (a latent
cache, offloading, activation checkpointing, fewer pairs per micro-batch) cost less together than one that changes
the numbers (an 8-bit optimizer, a quantized base), and those less than one that changes the model trained (LoRA
instead of full tuning, a lower resolution). Ties go to fewer changes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, replace

from .estimate import GPUS_GB, CardVerdict, MemoryEstimate, ModelSizes, RunShape, card_verdict, estimate_memory
from .measured import planning_error

__all__ = ["CHANGES", "Change", "FitAdvice", "changes_for", "fit_advice", "plan_verdict"]


def plan_verdict(total_bytes: int, gpu_gb: float | None, family: str, shape: RunShape) -> CardVerdict:
    """Whether ``total_bytes`` planned with the error measured for ``family``'s runs of ``shape``'s tuning and base
    fits a ``gpu_gb`` card; unset, the smallest of :data:`~.estimate.GPUS_GB` that fits (the largest, not fitting,
    when none does)."""
    lora = shape.lora_rank is not None
    error = planning_error(family, lora, bitsandbytes=shape.base_quantization.startswith("bnb"))
    plan = f"plus {error.percent}, {error.describe(family, lora)}"
    if gpu_gb is None:
        gpu_gb = next((gb for gb in GPUS_GB if card_verdict(total_bytes, gb, error.ratio).fits), GPUS_GB[-1])
    return card_verdict(total_bytes, gpu_gb, error.ratio, plan)


@dataclass(frozen=True)
class Change:
    """One change of a run that lowers its peak: the ``train`` flags that make it (as the command line spells them),
    what it gives up, its cost (the rank of what it gives up), the group of changes it excludes (one of a group at
    a time), how it changes the :class:`~.estimate.RunShape` the estimate reads, and the group a change of which it
    needs (a quantized base needs LoRA)."""

    flags: tuple[str, ...]
    gives_up: str
    cost: float
    group: str
    apply: Callable[[RunShape], RunShape]
    needs: str | None = None


def _batch_changes(shape: RunShape) -> Iterator[Change]:
    """Fewer pairs per micro-batch, as many more micro-batches accumulated: the same pairs per optimizer step."""
    pairs, halvings = shape.pairs // 2, 1
    while pairs >= 1:
        if shape.pairs % pairs == 0:
            factor = shape.pairs // pairs
            flags = ("--per_device_train_batch_size", str(pairs), "--gradient_accumulation_steps")
            yield Change(
                (*flags, str(shape.accumulation * factor)),
                f"{factor}x the micro-batches for the same pairs per step (slower steps)",
                2.5 + 0.1 * halvings,
                "batch",
                lambda s, pairs=pairs, factor=factor: replace(s, pairs=pairs, accumulation=s.accumulation * factor),
            )
        pairs, halvings = pairs // 2, halvings + 1


def changes_for(shape: RunShape) -> list[Change]:
    """The changes ``shape`` admits: each one not already made."""
    found: list[Change] = []
    if not (shape.latent_cache or shape.offload_frozen):
        cache = "nothing: the same training, the VAE and text encoders run once before it"
        found.append(Change(("--cache_latents", "true"), cache, 1, "frozen", lambda s: replace(s, latent_cache=True)))
        offload = "slower encoding: the frozen parts' layers copied to the GPU each step"
        offloaded = lambda s: replace(s, offload_frozen=True)  # noqa: E731
        found.append(Change(("--offload_frozen_modules", "true"), offload, 2, "frozen", offloaded))
    if not shape.activation_checkpointing:
        recompute = "slower steps: the blocks recomputed in the backward, the same gradients"
        found.append(
            Change(
                ("--activation_checkpointing", "true"),
                recompute,
                2,
                "checkpointing",
                lambda s: replace(s, activation_checkpointing=True),
            )
        )
    found.extend(_batch_changes(shape))
    if "8bit" not in shape.optim.lower():
        moments = "the optimizer's moments kept in 8 bits"
        eight_bit = lambda s: replace(s, optim="adamw_torch_8bit")  # noqa: E731
        found.append(Change(("--optim", "adamw_torch_8bit"), moments, 8, "optimizer", eight_bit))
    if shape.base_quantization == "none":
        for name, cost, bits in (("quanto-int8", 9, 8), ("quanto-int4", 10, 4)):
            found.append(
                Change(
                    ("--base_quantization", name),
                    f"the frozen base's linear weights at {bits} bits",
                    cost,
                    "base",
                    lambda s, name=name: replace(s, base_quantization=name),
                    needs=None if shape.lora_rank is not None else "tuning",
                )
            )
        if shape.lora_rank is None:
            lora = f"LoRA rank {shape.lora_r} trained instead of every weight"
            found.append(Change(("--use_peft", "true"), lora, 20, "tuning", lambda s: replace(s, lora_rank=s.lora_r)))
    if shape.resolution >= 512:
        half = shape.resolution // 2
        smaller = f"training at {half} px instead of {shape.resolution}: a different model"
        found.append(
            Change(("--resolution", str(half)), smaller, 40, "resolution", lambda s: replace(s, resolution=half))
        )
    return found


@dataclass(frozen=True)
class FitAdvice:
    """The cheapest combination of :data:`CHANGES` that fits (``changes`` empty and ``verdict`` the run's own when
    none does: ``fits`` is then false)."""

    changes: tuple[Change, ...]
    estimate: MemoryEstimate
    verdict: CardVerdict

    @property
    def fits(self) -> bool:
        return self.verdict.fits and bool(self.changes)

    @property
    def flags(self) -> list[str]:
        return [word for change in self.changes for word in change.flags]

    def sentence(self) -> str:
        card = f"a {self.verdict.gpu_gb:g} GB GPU"
        if not self.fits:
            return f"No combination of {', '.join(CHANGES)} makes it fit {card}."
        gives_up = "; ".join(f"{' '.join(c.flags)}: {c.gives_up}" for c in self.changes)
        found = self.verdict
        return (
            f"The least change that fits {card}: {' '.join(self.flags)} (the estimate {found.estimate_gib:.2f} GiB, "
            f"planned {found.planned_gib:.2f} GiB, {found.margin_gib:.2f} GiB to spare; it gives up {gives_up})."
        )

    def as_dict(self) -> dict:
        return {
            "flags": self.flags if self.fits else None,
            "gpu_gb": self.verdict.gpu_gb,
            "total_gib": round(self.estimate.total_gib, 3),
            "planned_gib": self.verdict.planned_gib,
            "margin_gib": self.verdict.margin_gib,
        }


#: the options the advice may change (the cost order of :func:`changes_for`), for the sentence of a run nothing fits
CHANGES = (
    "--cache_latents",
    "--offload_frozen_modules",
    "--activation_checkpointing",
    "--per_device_train_batch_size",
    "--optim",
    "--base_quantization",
    "--use_peft",
    "--resolution",
)


def _combinations(changes: list[Change]) -> Iterator[tuple[Change, ...]]:
    """Every combination with at most one change of each group, cheapest first (then fewer, then in order)."""
    combos = [
        combo
        for size in range(1, len(changes) + 1)
        for combo in itertools.combinations(changes, size)
        if len({c.group for c in combo}) == size and all(c.needs in (None, *(d.group for d in combo)) for c in combo)
    ]
    return iter(sorted(combos, key=lambda combo: (sum(c.cost for c in combo), len(combo))))


class _NoActivations(dict):
    """An activations memo that holds no activations for every shape: :func:`~.estimate.estimate_memory` with it
    counts the other terms only."""

    def __contains__(self, key: object) -> bool:
        return True

    def __getitem__(self, key: object) -> tuple[int, str]:
        return 0, "not counted"


def fit_advice(
    sizes: ModelSizes,
    shape: RunShape,
    gpu_gb: float,
    accepted: Callable[[list[str]], bool] | None = None,
    options: Collection[str] | None = None,
    activations_memo: dict[tuple, tuple[int, str]] | None = None,
) -> FitAdvice:
    """The cheapest combination of the changes ``shape`` admits (those whose flags are all in ``options``, the
    command's options, and whose flags, with those of the change they need, ``accepted`` takes: the command's parser
    accepts them) that makes the run fit a ``gpu_gb`` card, each combination estimated and planned as the run itself
    is (``activations_memo``: :func:`~.estimate.estimate_memory`'s, shared with the caller's other estimates)."""
    admitted = [c for c in changes_for(shape) if options is None or all(f in options for f in c.flags[::2])]
    needed = {c.group: c for c in admitted}
    changes = [
        c
        for c in admitted
        if (c.needs is None or c.needs in needed)
        and (accepted is None or accepted([*(needed[c.needs].flags if c.needs else ()), *c.flags]))
    ]
    # the meta forwards of this call (or the caller's), by the shape they depend on
    activations = {} if activations_memo is None else activations_memo

    def verdict_of(combo: tuple[Change, ...]) -> tuple[MemoryEstimate, CardVerdict]:
        changed = shape
        for change in combo:
            changed = change.apply(changed)
        # the other terms alone are a bound: where they do not fit, the activations (a UNet's meta forward) are
        # not counted
        bound = estimate_memory(sizes, changed, _NoActivations())
        verdict = plan_verdict(bound.total_bytes, gpu_gb, sizes.family, changed)
        if not verdict.fits:
            return bound, verdict
        estimate = estimate_memory(sizes, changed, activations)
        return estimate, plan_verdict(estimate.total_bytes, gpu_gb, sizes.family, changed)

    # the strongest change of each group together: where it does not fit, no combination does
    strongest = {c.group: c for c in sorted(changes, key=lambda c: c.cost)}
    estimate, verdict = verdict_of(tuple(strongest.values()))
    if not verdict.fits:
        return FitAdvice((), estimate, verdict)
    for combo in _combinations(changes):  # the strongest combination is among them: one fits
        estimate, verdict = verdict_of(combo)
        if verdict.fits:
            return FitAdvice(combo, estimate, verdict)
    return FitAdvice((), estimate, verdict)  # pragma: no cover
