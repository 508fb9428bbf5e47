"""The defaults that depend on the run: one table (model family x objective x LoRA/full tuning) and one function,
:func:`resolve_default`, that decides which of its entries wins; the learning-rate ranges the
start summary warns outside of; and what the choices that depend on the machine read (the fields they may set, the
data loading a run of preference pairs leaves unset), which the command line makes once it knows the device
(:func:`~.machine.machine_choices`, in :mod:`.machine`).

A config field left unset (``None``) takes its value here: ``learning_rate``, ``beta`` and ``safeguard_mu`` per model
family, objective and tuning, ``safeguard_space`` per run. The model families declare their own values as
data (``default_beta`` with ``beta_source``, ``authors_safeguard_mu`` with ``safeguard_mu_source``,
``default_learning_rate`` with ``learning_rate_source`` for LoRA, and the training mechanics a user may set,
:data:`FAMILY_MECHANICS`, which the families read back through :func:`resolve_default`); :func:`default_table`
reads them into entries beside the package's, and :func:`resolve_default` picks the most specific entry that matches
the run: a base model's own entry over its family's, a family's over the package's, an entry naming the objective
or the tuning over one that does not. A config resolves from its own table (``DiffusionSDPOConfig.defaults_table``,
:func:`default_table` here; a subclass with other defaults, such as the online config, overrides it). Every text
that states one of these defaults (the start summary, ``--help``, the docs, the shipped YAML comments) reads it from
here or is tested against it.

No field's value depends on the machine: the config holds the same values on a laptop and on a GPU node. What does
depend on it (data-loading workers, non-blocking copies, a progress bar or a line per log) is decided for the
trainer's own copy of the config, where the caller left it unset (:func:`~.machine.machine_choices`).

This module imports nothing of the package, so the config (the bottom layer) can resolve with it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "ANY",
    "DATA_WORKERS",
    "FAMILY_MECHANICS",
    "LEARNING_RATE_RANGES",
    "MACHINE_FIELDS",
    "PACKAGE_DEFAULTS",
    "POINT_BAND",
    "RESOLVED_FIELDS",
    "TINY_BASE",
    "DefaultEntry",
    "LearningRateRange",
    "ResolvedDefault",
    "data_loading_defaults",
    "default_table",
    "recommended_learning_rate",
    "resolve_default",
    "resolve_defaults",
    "resolved_config",
    "safeguard_default_sentence",
]

#: an entry's key that matches every family, objective or mode
ANY = "*"
#: the shipped CPU demo base (``trl-diffusion-sdpo:tiny``); classified as Stable Diffusion, with an entry of its own
TINY_BASE = "trl-diffusion-sdpo:tiny"
#: the shipped tiny base's folder (the name above loads it, :mod:`trl_diffusion_sdpo.families.loading`)
TINY_BASE_DIR = Path(__file__).resolve().parent.parent / "demo" / "base"
#: the fields resolved here, in the order the start summary lists them
RESOLVED_FIELDS = ("learning_rate", "beta", "safeguard_space", "safeguard_mu")


@dataclass(frozen=True)
class DefaultEntry:
    """One entry of the table: ``field`` takes ``value`` for runs of ``scope`` (``"*"``, ``"family <name>"`` or
    ``"base <id>"``) with ``objective`` (a ``loss_type`` or ``"*"``), ``tuning`` (``"lora"``, ``"full"`` or ``"*"``) in
    ``source`` says where the value comes from (a paper, a recipe, a measurement and its file)."""

    field: str
    value: Any
    source: str
    scope: str = ANY
    objective: str = ANY
    tuning: str = ANY

    def matches(self, field: str, family: str | None, base: str | None, objective: str, tuning: str = "lora") -> bool:
        return (
            self.field == field
            and self.scope in (ANY, f"family {family}", f"base {base}")
            and self.objective in (ANY, objective)
            and self.tuning in (ANY, tuning)
        )

    def specificity(self) -> tuple[int, int, int]:
        """A base's entry outranks a family's, which outranks the package's; then one naming the objective, then the
        tuning."""
        scope = 2 if self.scope.startswith("base ") else 1 if self.scope.startswith("family ") else 0
        return scope, int(self.objective != ANY), int(self.tuning != ANY)


@dataclass(frozen=True)
class ResolvedDefault:
    """A field's value for a run and where it comes from: ``given`` (set in the config) or the winning entry."""

    field: str
    value: Any
    source: str
    scope: str = ANY
    given: bool = False

    def text(self) -> str:
        """E.g. ``beta=100 (family flux: flow_grpo's SD3.5 Flow-DPO value ...)`` or ``beta=2000 (as given)``."""
        value = f"{self.value:g}" if isinstance(self.value, float) else str(self.value)
        if self.given:
            return f"{self.field}={value} (as given)"
        owner = "package default" if self.scope == ANY else self.scope
        return f"{self.field}={value} ({owner}: {self.source})"


# The authors' full tuning of SD1.5 and SDXL: their per-pair rate times the 2048 pairs of their optimizer step.
_AUTHORS_FULL = "Diffusion-DPO's {model} recipe, {per_pair} per pair x 2048 pairs (docs/{page}.md, docs/recipe.md)"


_SAFEGUARD_EVIDENCE = 'docs/safeguard.md, "Which setting"'
PACKAGE_DEFAULTS: tuple[DefaultEntry, ...] = (
    DefaultEntry(
        "learning_rate",
        1e-5,
        "the rate of the shipped SD1.5 and SDXL LoRA configs (docs/usage.md: 1e-5 to 1e-4 is typical for LoRA)",
    ),
    DefaultEntry(
        "learning_rate",
        2.048e-5,
        _AUTHORS_FULL.format(model="SD1.5", per_pair="1e-8", page="sd"),
        scope="family stable-diffusion",
        tuning="full",
    ),
    DefaultEntry(
        "learning_rate",
        2.048e-6,
        _AUTHORS_FULL.format(model="SDXL", per_pair="1e-9", page="sdxl"),
        scope="family stable-diffusion-xl",
        tuning="full",
    ),
    DefaultEntry(
        "beta",
        5000.0,
        "Diffusion-DPO's SD1.5 and SDXL launchers (Wallace et al., arXiv 2311.12908; the paper reports 2000 to 5000)",
    ),
    DefaultEntry(
        "safeguard_space",
        "output",
        "Diffusion-SDPO's safeguard, the authors' rule on the policy's residuals (Fu et al., arXiv 2511.03317)",
    ),
    DefaultEntry(
        "safeguard_mu",
        0.5,
        "the package's pick from its paired comparisons on the CPU demo: the output space at mu 0.5 paid about as "
        f"much as 0.9 where Diffusion-DPO's pathology bites and cost less where it does not ({_SAFEGUARD_EVIDENCE})",
    ),
    DefaultEntry(
        "safeguard_mu",
        0.5,
        "the shipped base's own paired comparisons (benchmarks/results/safeguard-comparison/"
        "cpu-safeguard-comparison-shipped-base.json, 10 seeds, 200 steps): output space at mu 0.5 +0.123 held-out "
        "reward against Diffusion-DPO at lr 2e-4 (mu 0.9: +0.127) and +0.010 at the demo's lr 2e-5 (mu 0.9: +0.008), "
        "where Diffusion-DPO's own reward falls by -0.010; mu 0.5 keeps Diffusion-DPO's implicit accuracy, mu 0.9 "
        "gives up 0.30 of it; the toy's evidence, not SD1.5's, holds on the toy",
        scope=f"base {TINY_BASE}",
    ),
)


#: the config fields whose unset value is a model family's training mechanics, and the attribute where the family
#: declares it (flow families: noise-level sampling, shift, prompt length, guidance embedding; every family that
#: inverts: the inversion grid's length). The family's comment beside each attribute names its recipe.
FAMILY_MECHANICS = {
    "flow_weighting_scheme": "default_weighting_scheme",
    "flow_shift": "default_flow_shift",
    "max_sequence_length": "default_max_sequence_length",
    "flux_guidance_scale": "default_guidance_scale",
    "inversion_steps": "default_inversion_steps",
}


def default_table(family: Any = None) -> tuple[DefaultEntry, ...]:
    """The package's entries and those ``family`` (a ``ModelFamily`` class or instance) declares as data:
    ``default_beta`` (with ``beta_source``), ``default_learning_rate`` (LoRA, with ``learning_rate_source``),
    ``authors_safeguard_mu`` (per ``loss_type``, ``"*"``: every one, with ``safeguard_mu_source``) and its training
    mechanics (:data:`FAMILY_MECHANICS`)."""
    if family is None:
        return PACKAGE_DEFAULTS
    scope = f"family {family.name}"
    entries = [
        DefaultEntry(field, getattr(family, attribute), f"{family.name}'s training recipe ({attribute})", scope)
        for field, attribute in FAMILY_MECHANICS.items()
        if hasattr(family, attribute)
    ]
    beta = getattr(family, "default_beta", None)
    if beta is not None:
        entries.append(DefaultEntry("beta", float(beta), family.beta_source, scope))
    rate = getattr(family, "default_learning_rate", None)
    if rate is not None:
        source = getattr(family, "learning_rate_source", f"{family.name}'s LoRA rate")
        entries.append(DefaultEntry("learning_rate", float(rate), source, scope, tuning="lora"))
    for objective, mu in getattr(family, "authors_safeguard_mu", {}).items():
        source = getattr(family, "safeguard_mu_source", "the Diffusion-SDPO authors (arXiv 2511.03317)")
        entries.append(DefaultEntry("safeguard_mu", mu, source, scope, objective))
    return PACKAGE_DEFAULTS + tuple(entries)


def base_id(name_or_path: Any) -> str | None:
    """The id of a base with entries of its own (:data:`TINY_BASE`) that ``name_or_path`` names or loads from."""
    if name_or_path is None:
        return None
    text = str(name_or_path)
    if text == TINY_BASE:
        return TINY_BASE
    try:
        return TINY_BASE if Path(text).resolve() == TINY_BASE_DIR else None
    except (OSError, ValueError):
        return None


def resolve_default(
    field: str,
    family: Any = None,
    objective: str = "dpo",
    base: Any = None,
    lora: bool = True,
    table: Sequence[DefaultEntry] | None = None,
) -> ResolvedDefault:
    """The value ``field`` takes when unset, for a run of ``family`` (class or instance; ``None``: the package's)
    with ``objective``, with LoRA (``lora``) or full tuning, on the base model ``base`` (a name or folder; the shipped
    tiny base has entries of its own): the most specific matching entry of ``table`` (``None``: :func:`default_table`
    of ``family``; a config passes its own, ``DiffusionSDPOConfig.default_for``). The one place that decides."""
    tuning = "lora" if lora else "full"
    name = None if family is None else family.name
    entries = default_table(family) if table is None else table
    matching = [e for e in entries if e.matches(field, name, base_id(base), objective, tuning)]
    if not matching:
        raise KeyError(f"no default for {field!r} ({name}, {objective}, {tuning})")
    best = max(matching, key=DefaultEntry.specificity)
    return ResolvedDefault(field, best.value, best.source, best.scope)


def resolve_defaults(
    config: Any, family: Any = None, base: Any = None, lora: bool = True
) -> dict[str, ResolvedDefault]:
    """Each of :data:`RESOLVED_FIELDS` for ``config`` trained with LoRA (``lora``) or in full: its value where set,
    else the config's own resolution (``config.default_for``, which reads the config's table). A field the config
    resolved when it was made (``config.defaulted``) keeps that resolution."""
    resolved = {}
    made = getattr(config, "defaulted", {})  # resolved when the config was made (its class's defaults)
    for field in RESOLVED_FIELDS:
        if field in made:
            resolved[field] = made[field]
            continue
        given = getattr(config, field, None)
        if given is not None:
            resolved[field] = ResolvedDefault(field, given, "as given", given=True)
            continue
        resolved[field] = config.default_for(field, family, base, lora)
    return resolved


def resolved_config(
    config: Any, family: Any = None, base: Any = None, lora: bool = True
) -> tuple[Any, dict[str, ResolvedDefault]]:
    """A copy of ``config`` with every unset field of :data:`RESOLVED_FIELDS` set (the caller's stays as given), and
    the resolutions."""
    resolved = resolve_defaults(config, family, base, lora)
    config = copy.copy(config)
    for field, value in resolved.items():
        setattr(config, field, value.value)
    return config, resolved


def safeguard_default_sentence() -> str:
    """What the safeguard does by default, from the package's table (``train --help`` prints it; the online
    command's is :func:`trl_diffusion_sdpo.online.defaults.safeguard_default_sentence`)."""
    space = resolve_default("safeguard_space")
    mu = resolve_default("safeguard_mu")
    return (
        f"The pairs train with the Diffusion-SDPO safeguard by default (safeguard_space {space.value}, mu the "
        f"model family's value, else {mu.value:g})."
    )


# A single published rate r recommends [r / POINT_BAND, r * POINT_BAND]: wide enough for the usual adjustments to batch
# size and data, narrow enough that a rate left at another recipe's value (the per-pair 1e-8 without scale_lr) stands
# out.
POINT_BAND = 10.0


@dataclass(frozen=True)
class LearningRateRange:
    """A recommended range of the effective learning rate (after ``scale_lr``), inclusive, and its source."""

    low: float
    high: float
    source: str

    @classmethod
    def around(cls, rate: float, source: str) -> LearningRateRange:
        """The band ``[rate / POINT_BAND, rate * POINT_BAND]`` around one published rate."""
        return cls(rate / POINT_BAND, rate * POINT_BAND, f"{source} ({rate:g}, within a factor {POINT_BAND:g})")

    def contains(self, rate: float) -> bool:
        return self.low <= rate <= self.high


_LORA_UNET = LearningRateRange(
    1e-5,
    1e-4,
    "docs/usage.md and docs/faq.md: 1e-5 to 1e-4 is typical for LoRA (sd15_lora.yaml and sdxl_lora.yaml use 1e-5)",
)
#: (family name, "lora" | "full") -> the range the docs publish for it; every other family's range is the band around
#: its own default rate (:func:`recommended_learning_rate`)
LEARNING_RATE_RANGES: dict[tuple[str, str], LearningRateRange] = {
    ("stable-diffusion", "lora"): _LORA_UNET,
    ("stable-diffusion-xl", "lora"): _LORA_UNET,
}


def recommended_learning_rate(family: Any, lora: bool) -> LearningRateRange | None:
    """The range the docs recommend for ``family`` (a ``ModelFamily`` class or instance) trained with LoRA
    (``lora``) or in full: a published range, else the band around the family's own default rate; ``None`` where the
    family has no rate of its own (a flow family's full tuning, a family registered outside the package without a
    rate), so the package's fallback is no recommendation."""
    published = LEARNING_RATE_RANGES.get((family.name, "lora" if lora else "full"))
    if published is not None:
        return published
    rate = resolve_default("learning_rate", family, lora=lora)
    return None if rate.scope == ANY else LearningRateRange.around(rate.value, rate.source)


#: data-loading worker processes where a GPU runs an offline step (at most the CPU cores each process has)
DATA_WORKERS = 4
#: the ``TrainingArguments`` fields whose choice depends on the machine or the output, made by the command line on its
#: copy of the config where the caller left them unset (:func:`~.machine.machine_choices`); the config itself, and so
#: a run built from Python, holds transformers' values whatever the machine
MACHINE_FIELDS = ("dataloader_num_workers", "accelerator_config", "disable_tqdm")


def data_loading_defaults(*, cuda: bool, cpus: int, processes: int = 1) -> dict[str, Any]:
    """What a run of preference pairs leaves unset of transformers' data loading takes: where a GPU runs the step,
    :data:`DATA_WORKERS` worker processes (at most ``cpus // processes``) read, decode and collate the next batches
    while the GPU trains on this one, and pinned batches are copied to it without waiting (accelerate's
    ``non_blocking``). On the CPU none: workers would take cores from the step. ``DiffusionSDPOConfig``'s
    ``data_loading_defaults`` returns this (the online config overrides it: its batches are prompts)."""
    return {
        "dataloader_num_workers": max(1, min(DATA_WORKERS, cpus // max(1, processes))) if cuda else 0,
        "non_blocking": cuda,
    }


def data_loading_sentence() -> str:
    """The data-loading defaults in one sentence (the config's docs and ``--help`` read it)."""
    return (
        "Unset (`None`): 0, transformers' default, whatever the machine (the same config is the same run); the "
        "command line chooses for the machine and its start summary prints the choice: where a GPU runs an offline "
        f"step {DATA_WORKERS} workers (at most the CPU cores per process), so the next batches are read, decoded and "
        "collated while the GPU trains, and with `accelerator_config` unset the pinned batches are copied to the GPU "
        "without waiting (`non_blocking`); on the CPU and online, 0 workers."
    )
