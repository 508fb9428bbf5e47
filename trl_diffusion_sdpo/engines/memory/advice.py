"""The fits verdict and, when a run does not fit, the cheapest change that makes it fit (``estimate-memory``).

The verdict plans with the estimate times the error measured for the run's family and tuning on a GPU
(:func:`~.measured.planning_error`). The advice runs the same estimate (:func:`~.estimate.estimate_memory`) and the
same verdict over every combination of the changes in :data:`CHANGES` that the run admits, and names the combination
that fits at the least cost: each change's cost ranks what it gives up. Changes that only slow a step (a latent
cache, offloading, activation checkpointing, fewer pairs per micro-batch) cost less together than one that changes
the numbers (an 8-bit optimizer, a quantized base), and those less than one that changes the model trained (LoRA
instead of full tuning, a lower resolution). Ties go to fewer changes.

Where no combination fits, the advice names what comes closest: the combination with the lowest planned peak, and by
how much it is over the card. It also names the fewest GPUs (up to :data:`MAX_SHARDED_GPUS`) that fit the run under
ZeRO-3 or FSDP2, the engines that shard everything of the denoiser (:func:`~.estimate.estimate_memory`'s sharded
terms), adding at most the changes that train the same model with the same numbers (:data:`SAME_TRAINING`), the
cheapest that fits at that count.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, replace

from .estimate import GPUS_GB, CardVerdict, MemoryEstimate, ModelSizes, RunShape, card_verdict, estimate_memory
from .measured import planning_error

__all__ = [
    "CHANGES",
    "MAX_SHARDED_GPUS",
    "SAME_TRAINING",
    "SHARDED_ENGINES",
    "Change",
    "FitAdvice",
    "ShardedFit",
    "changes_for",
    "fit_advice",
    "plan_verdict",
]

#: the most GPUs (one process each) the advice tries to shard a run over when no combination fits one
MAX_SHARDED_GPUS = 64
#: the engines that shard the denoiser's weights, gradients and optimizer state over the processes
SHARDED_ENGINES = ("fsdp2", "zero3")
#: the groups of changes that only slow a step (the same model trained with the same numbers): the ones the sharded
#: answer may add
SAME_TRAINING = ("frozen", "checkpointing", "batch")


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
class ShardedFit:
    """The fewest processes (GPUs) of ``engine`` that fit a run, with ``changes`` (of :data:`SAME_TRAINING`, the
    cheapest that fit at that count; none where the run fits as it is): the per-process estimate and its verdict."""

    engine: str
    num_processes: int
    changes: tuple[Change, ...]
    estimate: MemoryEstimate
    verdict: CardVerdict
    #: the other engines of :data:`SHARDED_ENGINES` that fit at this count with the same changes
    also: tuple[str, ...] = ()

    @property
    def flags(self) -> list[str]:
        changes = [word for change in self.changes for word in change.flags]
        return ["--engine", self.engine, "--num_processes", str(self.num_processes), *changes]

    def _figures(self) -> str:
        found = self.verdict
        also = "".join(f" (or --engine {engine})" for engine in self.also)
        return (
            f"{' '.join(self.flags)}{also} (the estimate {found.estimate_gib:.2f} GiB per process, planned "
            f"{found.planned_gib:.2f} GiB, {found.margin_gib:.2f} GiB to spare)"
        )

    def sentence(self) -> str:
        return f"Sharded over {self.num_processes} GPUs of {self.verdict.gpu_gb:g} GB, it fits: {self._figures()}."

    def full_tuning_sentence(self, processes: int) -> str:
        """The sentence naming this as the full-tuning setting that fits, for a run asked on ``processes``."""
        where = f"on its {processes} GPUs" if processes == self.num_processes else f"over {self.num_processes} GPUs"
        return f"Full tuning, as asked, fits {where} of {self.verdict.gpu_gb:g} GB: {self._figures()}."

    def as_dict(self) -> dict:
        return {
            "flags": self.flags,
            "engine": self.engine,
            "also_engines": list(self.also),
            "num_processes": self.num_processes,
            "total_gib": round(self.estimate.total_gib, 3),
            "planned_gib": self.verdict.planned_gib,
            "margin_gib": self.verdict.margin_gib,
        }


@dataclass(frozen=True)
class FitAdvice:
    """The cheapest combination of :data:`CHANGES` that fits. Where none does, ``changes`` is empty (``fits`` false)
    and ``closest`` holds the combination with the lowest planned peak (``estimate`` and ``verdict`` are then its;
    the run's own where it admits no change), and ``sharded`` the fewest GPUs up to :data:`MAX_SHARDED_GPUS` that
    fit it under :data:`SHARDED_ENGINES` (``None`` where none does)."""

    changes: tuple[Change, ...]
    estimate: MemoryEstimate
    verdict: CardVerdict
    closest: tuple[Change, ...] = ()
    sharded: ShardedFit | None = None
    #: where full tuning was asked and the least change trains LoRA instead: the full-tuning setting that fits (the
    #: fewest processes from the run's own, sharded, :func:`_fewest_gpus`); ``None`` otherwise, or where none does
    full_tuning: ShardedFit | None = None
    #: the processes the run was asked on
    num_processes: int = 1

    @property
    def fits(self) -> bool:
        return self.verdict.fits and bool(self.changes)

    @property
    def flags(self) -> list[str]:
        return [word for change in self.changes for word in change.flags]

    @property
    def closest_flags(self) -> list[str]:
        return [word for change in self.closest for word in change.flags]

    def sentence(self) -> str:
        card = f"a {self.verdict.gpu_gb:g} GB GPU"
        found = self.verdict
        if not self.fits:
            text = f"No combination of {', '.join(CHANGES)} makes it fit {card}."
            if self.closest:
                text += (
                    f" The closest: {' '.join(self.closest_flags)} (the estimate {found.estimate_gib:.2f} GiB, "
                    f"planned {found.planned_gib:.2f} GiB, {-found.margin_gib:.2f} GiB over)."
                )
            if self.sharded is not None:
                return f"{text} {self.sharded.sentence()}"
            engines = " or ".join(engine.upper().replace("ZERO", "ZeRO-") for engine in SHARDED_ENGINES)
            return (
                f"{text} Sharded with {engines} over up to {MAX_SHARDED_GPUS} GPUs (adding only changes that slow a "
                "step), it does not fit either."
            )
        gives_up = "; ".join(f"{' '.join(c.flags)}: {c.gives_up}" for c in self.changes)
        least = (
            f"The least change that fits {card}: {' '.join(self.flags)} (the estimate {found.estimate_gib:.2f} GiB, "
            f"planned {found.planned_gib:.2f} GiB, {found.margin_gib:.2f} GiB to spare; it gives up {gives_up})."
        )
        if self.full_tuning is None:
            return least
        return f"{self.full_tuning.full_tuning_sentence(self.num_processes)} {least}"

    def as_dict(self) -> dict:
        found = {
            "flags": self.flags if self.fits else None,
            "gpu_gb": self.verdict.gpu_gb,
            "total_gib": round(self.estimate.total_gib, 3),
            "planned_gib": self.verdict.planned_gib,
            "margin_gib": self.verdict.margin_gib,
        }
        if self.fits:
            return {**found, "full_tuning": None if self.full_tuning is None else self.full_tuning.as_dict()}
        return {
            **found,
            "closest": self.closest_flags or None,
            "sharded": None if self.sharded is None else self.sharded.as_dict(),
            "sharded_max_gpus": MAX_SHARDED_GPUS,
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

    def verdict_of(
        combo: tuple[Change, ...], run: RunShape = shape, bounded: bool = True
    ) -> tuple[MemoryEstimate, CardVerdict]:
        changed = run
        for change in combo:
            changed = change.apply(changed)
        # the other terms alone are a bound: where they do not fit, the activations (a UNet's meta forward) are
        # not counted (``bounded``; a figure that is printed counts them)
        if bounded:
            bound = estimate_memory(sizes, changed, _NoActivations())
            verdict = plan_verdict(bound.total_bytes, gpu_gb, sizes.family, changed)
            if not verdict.fits:
                return bound, verdict
        estimate = estimate_memory(sizes, changed, activations)
        return estimate, plan_verdict(estimate.total_bytes, gpu_gb, sizes.family, changed)

    # the strongest change of each group together: where it does not fit, no combination does
    estimate, verdict = verdict_of(_strongest(changes))
    if not verdict.fits:
        closest = _closest(changes, verdict_of)
        estimate, verdict = verdict_of(closest, bounded=False)
        sharded = _fewest_gpus(shape, changes, verdict_of)
        return FitAdvice((), estimate, verdict, closest, sharded, num_processes=shape.num_processes)
    for combo in _combinations(changes):  # the strongest combination is among them: one fits
        estimate, verdict = verdict_of(combo)
        if verdict.fits:
            # full tuning asked, LoRA advised: also the full-tuning setting, sharded from the run's own count up
            full = None
            if shape.lora_rank is None and any(c.group == "tuning" for c in combo):
                full = _fewest_gpus(shape, changes, verdict_of, fewest=max(2, shape.num_processes))
            return FitAdvice(combo, estimate, verdict, full_tuning=full, num_processes=shape.num_processes)
    return FitAdvice((), estimate, verdict)  # pragma: no cover


def _cost(combo: tuple[Change, ...]) -> float:
    return sum(c.cost for c in combo)


def _strongest(changes: list[Change]) -> tuple[Change, ...]:
    """The strongest change of each group (its costliest, which lowers the peak most) together."""
    return tuple({c.group: c for c in sorted(changes, key=lambda c: c.cost)}.values())


def _closest(
    changes: list[Change], verdict_of: Callable[..., tuple[MemoryEstimate, CardVerdict]]
) -> tuple[Change, ...]:
    """The combination of ``changes`` with the lowest planned peak (then the cheapest, then the fewest changes), or
    ``()`` where there is none. Each combination's bound (its peak without the activations) is planned first, and
    only those whose bound is not above the lowest peak found get their activations counted."""
    bounded = [(verdict_of(combo)[1].planned_gib, combo) for combo in _combinations(changes)]
    best: tuple[tuple[float, float, int], tuple[Change, ...]] | None = None
    for bound, combo in sorted(bounded, key=lambda entry: entry[0]):
        if best is not None and bound > best[0][0]:
            break  # every later bound is higher still: no later combination comes closer
        key = (verdict_of(combo, bounded=False)[1].planned_gib, _cost(combo), len(combo))
        if best is None or key < best[0]:
            best = key, combo
    return () if best is None else best[1]


def _fewest_gpus(
    shape: RunShape,
    changes: list[Change],
    verdict_of: Callable[[tuple[Change, ...], RunShape], tuple[MemoryEstimate, CardVerdict]],
    fewest: int = 2,
) -> ShardedFit | None:
    """The fewest processes, ``fewest`` to :data:`MAX_SHARDED_GPUS`, of one of :data:`SHARDED_ENGINES` that fit
    ``shape`` as it is or with the cheapest combination of its ``changes`` of :data:`SAME_TRAINING` (each estimated
    by ``verdict_of``); ``None`` where no count does. A count fits when the strongest such combination does (the
    lowest peak), and more processes never raise a per-process peak: the first count that fits is the fewest. Where
    both engines fit with the same changes, the first is named and the other given as ``also``."""
    same = [c for c in changes if c.group in SAME_TRAINING]
    strongest = _strongest(same)
    for processes in range(fewest, MAX_SHARDED_GPUS + 1):
        found = []
        for engine in SHARDED_ENGINES:
            run = replace(shape, engine=engine, num_processes=processes)
            if not verdict_of(strongest, run)[1].fits:
                continue
            combo = next(c for c in ((), *_combinations(same)) if verdict_of(c, run)[1].fits)
            found.append((_cost(combo), len(combo), SHARDED_ENGINES.index(engine), engine, combo, run))
        if found:
            best = min(found, key=lambda entry: entry[:3])
            *_, engine, combo, run = best
            also = tuple(entry[3] for entry in found if entry is not best and entry[4] == combo)
            estimate, verdict = verdict_of(combo, run, False)
            return ShardedFit(engine, processes, combo, estimate, verdict, also)
    return None
