"""The rules of :class:`~.fields.DiffusionSDPOConfig`'s values, checked in this order when a config is made:

- ``FIELD_RULES``: one field's range or options (:class:`~trl_diffusion_sdpo.config.checks.Range`,
  :class:`~trl_diffusion_sdpo.config.checks.Choice`);
- ``CROSS_FIELD_RULES``: what a field's range cannot say (several fields together, or a multiple of 8);
- the chosen objective's own rules: ``loss_type`` and the hyperparameters it declares are the objective's
  (``PreferenceObjective.check_config``), asked through :data:`objective_check`.

The config imports nothing above it. The objectives sit above it (they read its value checks), so the package's root
module, which Python runs before any of its modules, connects :data:`objective_check` to them
(:func:`connect_objective_check`): every config made in any process asks the objective, whatever was imported
before it, and only the chosen objective's module need load.

Each rule raises a ``ValueError`` naming the field, the value and what to change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .checks import Choice, Range

__all__ = [
    "BASE_QUANTIZATIONS",
    "CROSS_FIELD_RULES",
    "DSPO_FORM_CHOICES",
    "FIELD_RULES",
    "INVERSION_NETWORKS",
    "NOISING_MODES",
    "NONFINITE_ACTIONS",
    "PATHOLOGY_ACTIONS",
    "SAFEGUARD_PASSES",
    "SAFEGUARD_SCOPES",
    "SAFEGUARD_SPACES",
    "CrossFieldRule",
    "FLOW_SHIFTS",
    "FLOW_WEIGHTING_SCHEMES",
    "check_config",
    "check_field_rules",
    "connect_objective_check",
]

# How the frozen base may be quantized (--base_quantization): the choice is the config's, the loading is families'.
BASE_QUANTIZATIONS = ("none", "bnb-nf4", "bnb-int8", "torchao-int8", "torchao-float8", "quanto-int8", "quanto-int4")

# The options of the config's choice fields: the fields' ``choices`` (what ``--help`` lists) and their checks.
# ``"none"``: Diffusion-DPO (no safeguard).
SAFEGUARD_SPACES = ("none", "output", "parameter", "update")
SAFEGUARD_SCOPES = ("local", "global", "pair")
SAFEGUARD_PASSES = ("one", "two")
NONFINITE_ACTIONS = ("skip", "raise")
PATHOLOGY_ACTIONS = ("warn", "escalate", "stop", "safeguard", "rewind")
# Kept equal to families.inversion's NOISING_MODES / INVERSION_NETWORKS and objectives.dspo's DSPO_FORMS (tests
# check): ``--help`` lists them, and the config imports no family or objective. The objective checks dspo_form.
NOISING_MODES = ("forward", "inversion")
INVERSION_NETWORKS = ("policy", "reference")
DSPO_FORM_CHOICES = ("sd15", "sdxl")
# How the flow families draw and weight the noise level, and shift it (families.flow reads these).
FLOW_WEIGHTING_SCHEMES = ("logit_normal", "mode", "none", "sigma_sqrt", "cosmap")
FLOW_SHIFTS = ("scheduler", "resolution", "none")

FIELD_RULES: dict[str, Range | Choice] = {
    # the safeguard
    "safeguard_space": Choice(SAFEGUARD_SPACES),
    "safeguard_scope": Choice(SAFEGUARD_SCOPES),
    "safeguard_passes": Choice(SAFEGUARD_PASSES),
    "safeguard_mu": Range(0, 1, optional=True, or_auto=True, hint="Or 'auto', or unset: the family's value."),
    "safeguard_max_lambda": Range(0, low_open=True, hint="The authors use 1.0."),
    # the guards
    "auto_beta_target": Range(0, 0.5, low_open=True, high_open=True, hint="SimpleTuner uses 0.2."),
    "safeguard_mu_step": Range(0, low_open=True),
    "ema_decay": Range(0, 1, high_open=True, optional=True, hint="0.999 to 0.9999 are usual; None turns it off."),
    "on_pathology": Choice(PATHOLOGY_ACTIONS),
    "probe_steps": Range(1, integer=True, optional=True, hint="None turns the held-out probe off."),
    "probe_pairs": Range(1, integer=True, hint="At least the number of processes."),
    "probe_pairs_seed": Range(0, integer=True, optional=True, hint="None: the run's seed."),
    "probe_noise_draws": Range(1, integer=True),
    "rewind_max_times": Range(0, integer=True, hint="0 stops at the first alarm."),
    "rewind_lr_factor": Range(0, 1, low_open=True, hint="1 keeps the learning rate."),
    # the data
    "resolution": Range(0, low_open=True, integer=True, hint="It must be a multiple of 8 (the VAE downsamples by 8)"),
    "num_frames": Range(1, integer=True, optional=True, hint="Wan needs 4k + 1 frames (81, 33, 17, ...)."),
    "frame_stride": Range(1, integer=True),
    "proportion_empty_prompts": Range(0, 1, hint="The authors drop 0.2 of the prompts."),
    "min_timestep": Range(0, integer=True),
    "max_timestep": Range(1, integer=True, optional=True, hint="None uses the scheduler's num_train_timesteps."),
    "noising": Choice(NOISING_MODES, optional=True),
    "inversion_steps": Range(1, integer=True, optional=True, hint="SmPO: 5 for SD1.5, 10 for SDXL."),
    "inversion_renoise": Range(1, integer=True, hint="SmPO evaluates twice per step (ReNoise)."),
    "inversion_network": Choice(INVERSION_NETWORKS),
    # the flow-matching families
    "flow_logit_std": Range(0, low_open=True),
    "max_sequence_length": Range(1, integer=True, optional=True, hint="None uses the family's default."),
    "flow_weighting_scheme": Choice(FLOW_WEIGHTING_SCHEMES, optional=True),
    "flow_shift": Choice(FLOW_SHIFTS, optional=True),
    # TrainingArguments fields that fail late (inside torch, or as NaN weights) when wrong
    "learning_rate": Range(
        0,
        optional=True,
        hint="LoRA typically 1e-5 to 1e-4; the authors' full tuning 2.048e-5 (SD1.5); unset: the family's",
    ),
    "weight_decay": Range(0, hint="The SDPO authors use 0.01."),
    "adam_beta1": Range(0, 1, high_open=True),
    "adam_beta2": Range(0, 1, high_open=True),
    "adam_epsilon": Range(0, low_open=True),
    "max_grad_norm": Range(hint="0 or less turns clipping off; the authors clip at 1.0."),
    "warmup_steps": Range(0),
    "num_train_epochs": Range(0),
    "max_steps": Range(hint="-1 trains for num_train_epochs.", integer=True),
    "per_device_train_batch_size": Range(1, integer=True),
    "per_device_eval_batch_size": Range(1, integer=True),
    "gradient_accumulation_steps": Range(1, integer=True),
    "seed": Range(0, integer=True),
    # robustness
    "on_nonfinite_loss": Choice(NONFINITE_ACTIONS),
}


@dataclass(frozen=True)
class CrossFieldRule:
    """A rule over the values of ``fields`` together: ``broken(config)`` is true when they break it, and
    ``message(config)`` then says why and what to change. Checked after every field's own rule has passed."""

    fields: tuple[str, ...]
    broken: Callable[[Any], bool]
    message: Callable[[Any], str]

    def check(self, config: Any) -> None:
        if self.broken(config):
            raise ValueError(self.message(config))


def _safeguarded(config: Any, space: str | None = None, scope: str | None = None) -> bool:
    """The safeguard is on (in ``space`` and with ``scope`` where given): a safeguard field is read only then."""
    return (
        config.safeguard_space != "none"
        and space in (None, config.safeguard_space)
        and scope in (None, config.safeguard_scope)
    )


def _bitsandbytes_8bit(optim: Any) -> bool:
    """transformers' ``optim`` names of bitsandbytes' 8-bit optimizers (``adamw_bnb_8bit``, ``adamw_8bit``,
    ``paged_adamw_8bit``, ``lion_8bit``, ...): every 8-bit one but torchao's ``adamw_torch_8bit`` and GaLore's."""
    name = str(getattr(optim, "value", optim))
    return "8bit" in name and not name.startswith(("adamw_torch", "galore"))


CROSS_FIELD_RULES: tuple[CrossFieldRule, ...] = (
    CrossFieldRule(
        ("scale_lr", "learning_rate"),
        lambda c: c.scale_lr and c.learning_rate is None,
        lambda c: (
            "scale_lr=True reads learning_rate as a rate per pair (the authors' 1e-8 for SD1.5), which has no "
            "default: give learning_rate, or leave scale_lr=False for the model family's rate."
        ),
    ),
    CrossFieldRule(
        ("deepspeed", "learning_rate"),
        lambda c: bool(c.deepspeed) and c.learning_rate is None,
        lambda c: (
            "learning_rate unset with deepspeed=<config file>: transformers writes learning_rate into the DeepSpeed "
            "config when the config is made, before the model family that decides the default is known. Give "
            "learning_rate (the family's default: docs/families.md), or launch DeepSpeed with accelerate launch "
            "--config_file."
        ),
    ),
    CrossFieldRule(
        ("resolution",),
        lambda c: c.resolution % 8 != 0,
        lambda c: f"resolution must be a positive multiple of 8 (the VAE downsamples by 8), got {c.resolution}",
    ),
    CrossFieldRule(
        ("min_timestep", "max_timestep"),
        lambda c: c.max_timestep is not None and c.max_timestep <= c.min_timestep,
        lambda c: f"max_timestep ({c.max_timestep}) must be larger than min_timestep ({c.min_timestep})",
    ),
    CrossFieldRule(
        ("cache_latents", "random_crop"),
        lambda c: c.cache_latents and c.random_crop,
        lambda c: (
            "cache_latents=True cannot be combined with random_crop=True: each step would need a new crop of the "
            "pixels, which cached latents no longer hold. Use the center crop (random_crop=False), crop the "
            "images before training, or set cache_latents=False."
        ),
    ),
    CrossFieldRule(
        ("remove_unused_columns",),
        lambda c: c.remove_unused_columns,
        lambda c: "remove_unused_columns=True would drop the image columns; leave it False",
    ),
    CrossFieldRule(
        ("safeguard_space", "gradient_accumulation_steps"),
        lambda c: _safeguarded(c, space="update") and c.gradient_accumulation_steps != 1,
        lambda c: (
            "safeguard_space='update' needs gradient_accumulation_steps=1: lambda is chosen on the optimizer's "
            "update, which depends on the whole accumulated gradient, known only at the last micro-batch. "
            "Raise per_device_train_batch_size instead, or use safeguard_space='parameter'."
        ),
    ),
    CrossFieldRule(
        ("optim", "use_cpu"),
        lambda c: c.use_cpu and _bitsandbytes_8bit(c.optim),
        lambda c: (
            f"optim={getattr(c.optim, 'value', c.optim)!r} is a bitsandbytes 8-bit optimizer, which runs on a CUDA "
            "GPU; with use_cpu=True use optim='adamw_torch_8bit' (torchao's 8-bit AdamW) or 'adamw_torch'."
        ),
    ),
    CrossFieldRule(
        ("safeguard_space", "optim"),
        lambda c: _safeguarded(c, space="update") and "8bit" in str(getattr(c.optim, "value", c.optim)),
        lambda c: (
            f"safeguard_space='update' predicts the optimizer's next update from its float32 moments; optim="
            f"{getattr(c.optim, 'value', c.optim)!r} keeps them block-quantized to 8 bits, an update it cannot "
            "reproduce. Use safeguard_space='parameter' (or 'output') with an 8-bit optimizer, or optim='adamw_torch'."
        ),
    ),
    CrossFieldRule(
        ("safeguard_scope", "safeguard_space"),
        lambda c: _safeguarded(c, scope="pair") and c.safeguard_space != "parameter",
        lambda c: (
            f"safeguard_scope='pair' chooses one lambda per pair from that pair's parameter gradients: it needs "
            f"safeguard_space='parameter', got {c.safeguard_space!r}"
        ),
    ),
    CrossFieldRule(
        ("safeguard_scope", "safeguard_passes"),
        lambda c: _safeguarded(c, scope="pair") and c.safeguard_passes != "one",
        lambda c: "safeguard_scope='pair' needs safeguard_passes='one': its per-pair gradients come from it",
    ),
    CrossFieldRule(
        ("safeguard_mu", "safeguard_space"),
        lambda c: c.safeguard_mu == "auto" and not _safeguarded(c),
        lambda c: "safeguard_mu='auto' adapts the safeguard's margin: it needs a safeguard_space other than 'none'",
    ),
    CrossFieldRule(
        ("on_pathology", "safeguard_space"),
        lambda c: c.on_pathology == "safeguard" and _safeguarded(c),
        lambda c: (
            "on_pathology='safeguard' trains as Diffusion-DPO until the alarm fires, then turns the safeguard on: "
            "it needs safeguard_space='none' (or use on_pathology='escalate' to raise the mu of a safeguard already "
            "on)"
        ),
    ),
    CrossFieldRule(
        ("on_pathology", "safeguard_space"),
        lambda c: c.on_pathology == "escalate" and not _safeguarded(c),
        lambda c: (
            "on_pathology='escalate' raises the safeguard's mu: it needs a safeguard_space other than 'none' (or use "
            "on_pathology='stop')"
        ),
    ),
    CrossFieldRule(
        ("on_pathology", "probe_steps"),
        lambda c: c.on_pathology == "rewind" and not c.probe_steps,
        lambda c: (
            "on_pathology='rewind' reads the held-out probe: set probe_steps (its share of the training time: "
            "docs/safeguard.md)"
        ),
    ),
)


def _no_objective_check(config: Any) -> None:
    raise RuntimeError(
        "the objectives' check is not connected: trl_diffusion_sdpo/__init__.py connects it when the package loads"
    )


#: asks the objective ``config.loss_type`` names to check ``config`` (its own fields, and what the run asks of it);
#: set by :func:`connect_objective_check`
objective_check: Callable[[Any], None] = _no_objective_check


def connect_objective_check(check: Callable[[Any], None]) -> None:
    """Let :func:`check_config` ask the chosen objective through ``check`` (the package's root module connects the
    objectives' ``check_objective_config``)."""
    global objective_check
    objective_check = check


def check_config(config: Any) -> None:
    """Every rule of ``config``: each field's own and those over several fields (:func:`check_field_rules`), then the
    chosen objective's (:data:`objective_check`). The config runs this when it is made; the trainer runs it again
    when it is built (a field may have been changed since)."""
    check_field_rules(config)
    objective_check(config)


def check_field_rules(config: Any) -> None:
    """The rules of ``config`` that import nothing (the command line asks them before torch loads): each field's own
    (``FIELD_RULES``), then the rules over several fields (``CROSS_FIELD_RULES``)."""
    for name, rule in FIELD_RULES.items():
        rule.check(name, getattr(config, name))
    for cross_rule in CROSS_FIELD_RULES:
        cross_rule.check(config)
