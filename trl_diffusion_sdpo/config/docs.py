""":class:`~.fields.DiffusionSDPOConfig`'s docstring, written from its fields when first read (``help()``, an IDE, the
API page; :class:`~._lazy.LazyDocstring`): each field's ``metadata["help"]`` is its documentation (``--help`` shows
the same text), grouped under TRL-style ``> Parameters that control ...`` headings by ``GROUPS``."""

from __future__ import annotations

import dataclasses
import json
import textwrap
from typing import Any

__all__ = ["GROUPS", "config_docstring"]

WIDTH = 119  # the package's line length

# heading -> (what the heading adds, the fields under it in order). Every field the config class declares (its own
# and the TrainingArguments defaults it changes) is under exactly one heading: config_docstring checks.
GROUPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "Parameters that control the objective": (
        "Each objective reads the fields below that it declares, by name, and owns their rules (its class in "
        "`trl_diffusion_sdpo/objectives/`): the chosen objective checks its own fields when the trainer (or the "
        "train command) is built.",
        (
            "beta",
            "loss_type",
            "dmpo_alpha",
            "dspo_form",
            "mapo_beta",
            "mapo_snr_value",
            "smpo_gamma",
            "smpo_score_min",
            "smpo_score_max",
        ),
    ),
    "Parameters that control the safeguard": (
        "",
        (
            "safeguard_mu",
            "safeguard_max_lambda",
            "safeguard_space",
            "safeguard_scope",
            "safeguard_passes",
        ),
    ),
    "Parameters that guard against collapse": (
        "",
        (
            "auto_beta",
            "auto_beta_target",
            "max_margin",
            "sft_weight",
            "safeguard_mu_step",
            "ema_decay",
            "on_pathology",
            "probe_steps",
            "probe_pairs",
            "probe_pairs_seed",
            "probe_noise_draws",
            "probe_alarm_rise",
            "probe_alarm_z",
            "rewind_max_times",
            "rewind_lr_factor",
            "rewind_allow_start_weights",
        ),
    ),
    "Parameters that control the data": (
        "",
        (
            "resolution",
            "source_resolution",
            "random_crop",
            "random_flip",
            "independent_augmentation",
            "num_frames",
            "frame_stride",
            "fixed_time_ids",
            "proportion_empty_prompts",
            "min_timestep",
            "max_timestep",
            "noising",
            "inversion_steps",
            "inversion_renoise",
            "inversion_network",
            "loss_mask",
            "skip_invalid_rows",
            "cache_latents",
            "latent_cache_dir",
            "offload_frozen_modules",
        ),
    ),
    "Parameters of the flow-matching families (SD3 / SD3.5, FLUX.1 and the other transformers)": (
        "",
        (
            "flow_weighting_scheme",
            "flow_logit_mean",
            "flow_logit_std",
            "flow_mode_scale",
            "flow_shift",
            "max_sequence_length",
            "flux_guidance_scale",
        ),
    ),
    "Parameters that control robustness": ("", ("on_nonfinite_loss",)),
    "Defaults changed from `TrainingArguments`": (
        "",
        (
            "scale_lr",
            "learning_rate",
            "lr_scheduler_type",
            "warmup_steps",
            "max_grad_norm",
            "weight_decay",
            "logging_steps",
            "remove_unused_columns",
            "dataloader_num_workers",
        ),
    ),
}


def config_docstring(cls: type, summary: str, groups: dict[str, tuple[str, tuple[str, ...]]] | None = None) -> str:
    """``summary``, then for each heading of ``groups`` (default ``GROUPS``) its text and an entry per field,
    ``name (`type`, *optional*, defaults to `value`):`` over the field's help. A field ``cls`` declares that no
    heading lists, or a listed name that is no field, raises ``TypeError`` (the docstring cannot be read: the tests
    read it)."""
    groups = GROUPS if groups is None else groups
    fields = {f.name: f for f in dataclasses.fields(cls)}
    declared = list(vars(cls).get("__annotations__", {}))
    listed = [name for _, names in groups.values() for name in names]
    unlisted = [name for name in declared if name not in listed]
    unknown = [name for name in listed if name not in fields]
    repeated = sorted({name for name in listed if listed.count(name) > 1})
    if unlisted or unknown or repeated:
        raise TypeError(
            f"the docstring's groups must list each field of {cls.__name__} once: not listed {unlisted}, not a field "
            f"{unknown}, listed twice {repeated}"
        )
    lines = [*summary.strip("\n").splitlines()]
    for heading, (text, names) in groups.items():
        lines += ["", f"> {heading}", ""]
        if text:
            lines += [*textwrap.wrap(text, WIDTH), ""]
        for name in names:
            lines.append(_entry_heading(fields[name]))
            lines += textwrap.wrap(
                " ".join(fields[name].metadata["help"].split()),
                WIDTH,
                initial_indent="    ",
                subsequent_indent="    ",
                break_on_hyphens=False,
            )
    return "\n".join(lines) + "\n"


# Fields whose annotation is wider than the values they take: the None in safeguard_mu's only makes transformers'
# argument parser read the flag as text ("auto" or a number).
DOCUMENTED_TYPES = {"safeguard_mu": "float | str"}


def _entry_heading(field: dataclasses.Field) -> str:
    """``name (`float`, *optional*, defaults to `5000.0`):``; ``str | None`` as ```str` or `None```."""
    written = DOCUMENTED_TYPES.get(field.name) or _type_name(field.type)
    kinds = " or ".join(f"`{kind.strip()}`" for kind in written.split("|"))
    default = field.default_factory() if field.default is dataclasses.MISSING else field.default
    return f"{field.name} ({kinds}, *optional*, defaults to `{_literal(default)}`):"


def _type_name(annotation: Any) -> str:
    """The annotation as written (``"str | None"``); transformers' argument parser replaces each field's string
    annotation by the type it resolves (``<class 'float'>``, ``typing.Optional[str]``) on the class itself."""
    if isinstance(annotation, str):
        return annotation
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "").replace("NoneType", "None")


def _literal(value: Any) -> str:
    """``value`` as Python reads it back, strings in double quotes as the Hugging Face docs write them."""
    value = getattr(value, "value", value)  # an enum (lr_scheduler_type): its value
    if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return json.dumps(value)
    return repr(value)
