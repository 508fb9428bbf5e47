"""Resuming with a changed configuration: refuse what makes the checkpoint meaningless, apply and log what is safe.

A checkpoint holds ``training_config.json`` (the config as given) and ``run_identity.json`` (base model, denoiser
class, full or LoRA, the LoRA rank, alpha and target modules: what the weights in it are). On resume both are
compared with the new run's:

* refused (:class:`ResumeConfigError` naming each field, its old and new value): the model and the adapters
  (:data:`IDENTITY_FIELDS`), and the config fields of :func:`refused_fields` (the objective, every registered
  objective's hyperparameters, the safeguard, the resolution), whose change would make the resumed run a different
  experiment on top of weights trained for another one;
* applied and logged (WARNING): the learning rate (:data:`SCHEDULE_FIELDS`). transformers restores the optimizer's and
  the scheduler's state with the checkpoint, and with it the rate the run began with; when training begins the
  restored rates are multiplied by the new peak over the old (:func:`learning_rate_factor`, each the effective rate,
  after ``scale_lr``) through the optimizer's parameter groups and the scheduler's ``base_lrs``
  (:func:`~trl_diffusion_sdpo.callbacks.learning_rate.scale_learning_rate`), so the run goes on at the new
  schedule's rate for its step, a rewind's lowering kept;
* allowed and logged at INFO (:data:`SAFE_FIELDS`): step and epoch counts, logging, saving, evaluation, validation,
  Hub and loader settings, which only say how the run goes on;
* any other change is allowed with a WARNING naming it: the run continues, but is not the one the checkpoint began.
"""

from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING, Any

import torch

from ..objectives import objective_class, registered_objectives
from .resume_world import ResumeConfigError, plan_process_count_change, samples_seen
from .run_folder import RUN_IDENTITY_NAME, TRAINING_CONFIG_NAME

if TYPE_CHECKING:
    from transformers import Trainer

__all__ = [
    "IDENTITY_FIELDS",
    "REFUSED_FIELDS",
    "RUN_IDENTITY_NAME",
    "SAFE_FIELDS",
    "SCHEDULE_FIELDS",
    "ResumeConfigError",
    "check_resume_config",
    "learning_rate_factor",
    "read_run_identity",
    "refused_fields",
    "run_identity",
    "write_run_identity",
]

logger = logging.getLogger(__name__)

IDENTITY_FIELDS = ("base_model", "denoiser_class", "training", "lora_rank", "lora_alpha", "lora_target_modules")
# With the hyperparameters of every registered objective (refused_fields): they are the objectives' to declare.
REFUSED_FIELDS = frozenset(
    {
        "loss_type",
        "safeguard_mu",
        "safeguard_max_lambda",
        "safeguard_space",
        "safeguard_scope",
        "resolution",
    }
)
# Restored with the checkpoint's optimizer and scheduler states, then scaled to the new value when training begins.
SCHEDULE_FIELDS = frozenset({"learning_rate"})
SAFE_FIELDS = frozenset(
    {
        "max_steps",
        "num_train_epochs",
        "output_dir",
        "logging_dir",
        "logging_steps",
        "logging_strategy",
        "logging_first_step",
        "report_to",
        "run_name",
        "disable_tqdm",
        "save_steps",
        "save_strategy",
        "save_total_limit",
        "save_only_model",
        "eval_steps",
        "eval_strategy",
        "eval_delay",
        "per_device_eval_batch_size",
        "push_to_hub",
        "hub_model_id",
        "hub_strategy",
        "hub_private_repo",
        "hub_revision",
        "dataloader_num_workers",
        "dataloader_prefetch_factor",
        "dataloader_pin_memory",
        "dataloader_persistent_workers",
    }
)
# How a run was started, not a setting of the run: never listed as changed.
NOT_SETTINGS = frozenset({"resume_from_checkpoint"})


def refused_fields() -> frozenset[str]:
    """The config fields whose change refuses a resume: :data:`REFUSED_FIELDS` and the hyperparameters of every
    registered objective (each read from the config field of its name), one registered outside the package
    included."""
    declared = {
        name for loss_type in registered_objectives() for name in objective_class(loss_type).hyperparameter_names()
    }
    return REFUSED_FIELDS | declared


def model_class_name(module: torch.nn.Module) -> str:
    """The name of the model's own class. FSDP2's ``fully_shard`` swaps a module's class for a subclass named
    ``FSDP<name>`` (bases: ``FSDPModule`` and the class), which a resumed run does not have yet when its checkpoint
    is checked."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule)).__name__


def run_identity(trainer: Trainer) -> dict[str, Any]:
    """What the weights of this run's checkpoints are: base model, denoiser class, full or LoRA, the LoRA shape."""
    denoiser = trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
    identity: dict[str, Any] = {
        "base_model": getattr(trainer, "base_model_name", None),
        "denoiser_class": model_class_name(denoiser),
        "training": "lora" if getattr(trainer, "is_lora", False) else "full",
        "num_processes": trainer.accelerator.num_processes,
        "per_device_train_batch_size": trainer.args.per_device_train_batch_size,
        "gradient_accumulation_steps": trainer.args.gradient_accumulation_steps,
    }
    identity["global_batch_size"] = (
        identity["num_processes"] * identity["per_device_train_batch_size"] * identity["gradient_accumulation_steps"]
    )
    state = getattr(trainer, "state", None)
    if state is not None:  # see resume_world: the samples a resumed run skips
        identity["samples_seen"] = samples_seen(state.global_step, identity["global_batch_size"])
    peft_config = (getattr(denoiser, "peft_config", None) or {}).get("default")
    if peft_config is not None:
        targets = peft_config.target_modules
        identity.update(
            lora_rank=peft_config.r,
            lora_alpha=peft_config.lora_alpha,
            lora_target_modules=sorted(targets) if isinstance(targets, (set, list, tuple)) else targets,
        )
    return identity


def write_run_identity(trainer: Trainer, folder: str) -> None:
    with open(os.path.join(folder, RUN_IDENTITY_NAME), "w", encoding="utf-8") as f:
        json.dump(run_identity(trainer), f, indent=1, sort_keys=True)


def _read_json(path: str) -> dict[str, Any] | None:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_run_identity(checkpoint: str) -> dict[str, Any] | None:
    """The run identity :func:`write_run_identity` wrote into ``checkpoint`` (``None`` if it has none)."""
    return _read_json(os.path.join(checkpoint, RUN_IDENTITY_NAME))


def _describe(changes: list[tuple[str, Any, Any]]) -> str:
    return ", ".join(f"{name} ({old!r} -> {new!r})" for name, old, new in changes)


def check_resume_config(checkpoint: str, trainer: Trainer) -> list[str]:
    """Compare ``checkpoint``'s model and config with ``trainer``'s; returns the changed field names (logged).

    Raises:
        ResumeConfigError: a field of :data:`IDENTITY_FIELDS` or :func:`refused_fields` changed (all are named).
    """
    refused: list[tuple[str, Any, Any]] = []
    saved_identity = read_run_identity(checkpoint)
    identity = run_identity(trainer)
    if saved_identity is not None:
        for name in IDENTITY_FIELDS:
            if name in saved_identity and saved_identity.get(name) != identity.get(name):
                refused.append((name, saved_identity.get(name), identity.get(name)))
    saved = _read_json(os.path.join(checkpoint, TRAINING_CONFIG_NAME))
    if saved is None:
        logger.warning("%s has no %s: the resumed config cannot be compared", checkpoint, TRAINING_CONFIG_NAME)
        saved = {}
    given = getattr(trainer, "args_as_given", trainer.args)
    current = json.loads(given.to_json_string())
    family = getattr(trainer, "family", None)
    if family is not None:  # an unset beta or mu is the family's for the objective: compare the values the runs use
        for config in (saved, current):
            for name in ("beta", "safeguard_mu"):
                if name in config and config[name] is None:
                    loss_type = config.get("loss_type", "dpo")
                    base = getattr(trainer, "base_model_name", None)
                    config[name] = given.default_for(name, family, base, objective=loss_type).value  # its table
    safe, other, schedule, refused_names = [], [], [], refused_fields()
    for name in sorted(set(saved) & set(current)):
        old, new = saved[name], current[name]
        if old == new or name.startswith("_") or name in NOT_SETTINGS:
            continue
        change = (name, old, new)
        if name in refused_names:
            refused.append(change)
        elif name in SCHEDULE_FIELDS:
            schedule.append(change)
        elif name in SAFE_FIELDS:
            safe.append(change)
        else:
            other.append(change)
    if refused:
        raise ResumeConfigError(
            f"Cannot resume from {checkpoint}: {_describe(refused)} changed. The checkpoint's weights were trained "
            "for the old value(s), so the resumed run would be another experiment on top of them. Restore the old "
            "value(s), or start a new run (another output_dir, no resume_from_checkpoint) from these weights."
        )
    if schedule:
        logger.warning(
            "Resuming from %s with %s: the checkpoint's learning-rate schedule goes on with its rates multiplied by "
            "%.6g (the new peak over the old, after scale_lr) from the resumed step.",
            checkpoint,
            _describe(schedule),
            learning_rate_factor(checkpoint, trainer),
        )
    if safe:
        logger.info("Resuming from %s with changed settings, applied from now on: %s", checkpoint, _describe(safe))
    if other:
        logger.warning(
            "Resuming from %s with changed settings: %s. Allowed, but the resumed run is not the run the checkpoint "
            "began.",
            checkpoint,
            _describe(other),
        )
    if saved_identity is not None:  # another number of processes: the global batch must be kept (resume_world)
        trainer_state = _read_json(os.path.join(checkpoint, "trainer_state.json")) or {}
        change = plan_process_count_change(saved_identity, identity, trainer_state.get("global_step", 0))
        if change is not None:
            logger.warning(change.describe())
    return [name for name, _, _ in safe + schedule + other]


def learning_rate_factor(checkpoint: str, trainer: Trainer) -> float:
    """The new peak learning rate over the one ``checkpoint`` was trained at, each the effective rate (unset: the
    family's default for the objective and the tuning; with ``scale_lr`` times the pairs per optimizer step): what a
    resumed run multiplies its restored rates by. 1.0 where the rate is unchanged or the checkpoint holds no
    config."""
    saved = _read_json(os.path.join(checkpoint, TRAINING_CONFIG_NAME))
    if saved is None or "learning_rate" not in saved:
        return 1.0
    given = getattr(trainer, "args_as_given", trainer.args)
    current = json.loads(given.to_json_string())
    identity = run_identity(trainer)
    saved_batch = (read_run_identity(checkpoint) or {}).get("global_batch_size", identity["global_batch_size"])

    def effective(config: dict[str, Any], pairs_per_step: int) -> float:
        rate = config["learning_rate"]
        if rate is None:  # the family's, as the trainer resolves it
            base, family = getattr(trainer, "base_model_name", None), getattr(trainer, "family", None)
            rate = given.default_for(
                "learning_rate", family, base, lora=identity["training"] == "lora", objective=config.get("loss_type")
            ).value
        return float(rate) * (pairs_per_step if config.get("scale_lr") else 1)

    old, new = effective(saved, saved_batch), effective(current, identity["global_batch_size"])
    return 1.0 if old == new else new / old
