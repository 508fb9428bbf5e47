"""What a run will do, said once when training starts: the effective learning rate and how ``scale_lr`` made it, the
schedule, the pairs per optimizer step, the objective and safeguard, the engine and the precision, how many training
images are resized or cropped to ``resolution`` and from what size, each default with its source and each choice made
for the machine with its reason; and a warning for each setting that quietly defeats a run (a warmup longer than half
the run, a learning rate outside the range the docs recommend for the family).

:class:`StartSummary` is a ``TrainerCallback``: at ``on_train_begin`` the step count is known (``state.max_steps``).
When training ends it logs what the run's warnings and alarms said and did (:func:`.run_events.run_events`: the start's
warnings, each alarm, each rewind and each switch of the safeguard), which the model card records too.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback

from ..config.defaults import recommended_learning_rate
from ..config.trl_habits import weak_beta_warning
from ..objectives import objective_class
from .cpu_threads import threads_text
from .run_events import run_events

__all__ = ["pairs_per_step"]

logger = logging.getLogger(__name__)

# Schedulers whose rate ignores warmup_steps.
_NO_WARMUP = ("constant", "reduce_lr_on_plateau")


def pairs_per_step(args: Any) -> int:
    """Pairs per optimizer step: ``processes * per_device_train_batch_size * gradient_accumulation_steps``."""
    return args.world_size * args.per_device_train_batch_size * args.gradient_accumulation_steps


def learning_rate_text(given: Any, effective_rate: float) -> str:
    """The peak learning rate and how it was made, e.g. ``1e-04 = 1e-06 x 100 pairs per optimizer step (1 process x
    25 per device x 4 accumulation; scale_lr)``; ``given`` is the config as the user gave it (before ``scale_lr``)."""
    if not given.scale_lr:
        origin = "as given" if given.learning_rate is not None else "unset: the default below"
        return f"{effective_rate:.3g} ({origin}; scale_lr=False)"
    return (
        f"{effective_rate:.3g} = {given.learning_rate:.3g} x {pairs_per_step(given)} pairs per optimizer step "
        f"({given.world_size} process(es) x {given.per_device_train_batch_size} per device x "
        f"{given.gradient_accumulation_steps} accumulation; scale_lr)"
    )


def _objective_text(args: Any) -> str:
    if args.safeguard_space == "none":
        return "Diffusion-DPO (no safeguard)" if args.loss_type == "dpo" else f"{args.loss_type} (no safeguard)"
    method = "Diffusion-SDPO" if args.loss_type == "dpo" else f"{args.loss_type} with the Diffusion-SDPO safeguard"
    mu = args.safeguard_mu if isinstance(args.safeguard_mu, str) else f"{args.safeguard_mu:g}"  # or "auto"
    return (
        f"{method}: safeguard mu={mu}, {args.safeguard_space} space, {args.safeguard_scope} scope "
        f"({_lambda_text(args)})"
    )


def _lambda_text(args: Any) -> str:
    """Which samples one ``lambda`` covers under ``safeguard_scope`` on this run's processes."""
    if args.safeguard_scope == "pair":
        return "one lambda per pair"
    if args.world_size == 1:
        return "one lambda per micro-batch; one process, so local and global scope agree"
    if args.safeguard_scope == "global":
        return f"one lambda per global micro-batch, its sums reduced over {args.world_size} processes"
    return f"one lambda per process's micro-batch, {args.world_size} processes each with its own"


def _precision_text(args: Any) -> str:
    if args.bf16:
        return "bf16 mixed precision (trainable weights float32)"
    if args.fp16:
        return "fp16 mixed precision (trainable weights float32)"
    return "float32"


def _on_cpu(effective: Any) -> bool:
    device = getattr(effective, "device", None)
    return getattr(device, "type", None) == "cpu"


def start_summary(
    given: Any,
    effective: Any,
    family_name: str,
    lora: bool,
    engine: Any,
    max_steps: int,
    defaults: dict[str, Any] | None = None,
    data_report: Any = None,
) -> str:
    """The start summary, one block: ``given`` is the config as given, ``effective`` as ``transformers.Trainer`` sees
    it (:func:`~trl_diffusion_sdpo.families.preparation.training_arguments`: the scaled rate, the resolved defaults);
    ``defaults`` the resolutions of :func:`~trl_diffusion_sdpo.config.defaults.resolve_defaults` and the choices of
    :func:`~trl_diffusion_sdpo.config.machine.machine_choices`, each printed with its source; ``data_report`` the
    training data's :class:`~trl_diffusion_sdpo.data.DataReport`, whose images resized or cropped to ``resolution``
    are counted (:meth:`~trl_diffusion_sdpo.data.DataReport.resize_text`)."""
    warmup = effective.get_warmup_steps(max_steps)
    schedule = effective.lr_scheduler_type
    schedule = getattr(schedule, "value", schedule)
    warmup_text = "no warmup" if warmup == 0 or schedule in _NO_WARMUP else f"{warmup} warmup steps"
    return "\n".join(
        [
            f"Training {family_name} ({'LoRA' if lora else 'full tuning'}) for {max_steps} optimizer steps:",
            f"  peak learning rate {learning_rate_text(given, effective.learning_rate)}",
            f"  schedule {schedule}, {warmup_text}; {pairs_per_step(given)} pairs per optimizer step",
            f"  objective {_objective_text(effective)}, beta {effective.beta:g}",
            f"  engine {engine!r}, {_precision_text(given)}{_compile_text(effective)}",
            *([f"  {threads_text()}"] if _on_cpu(effective) else []),
            *([f"  {resized}"] if (resized := _resize_text(effective, data_report)) else []),
            *(f"  {line}" for line in _default_lines(effective, defaults or {})),
        ]
    )


def _compile_text(args: Any) -> str:
    """With ``torch_compile``, the compiler's backend and mode as transformers resolved them (``inductor`` unless
    ``torch_compile_backend`` names another): what the run's first steps pay and how its losses compare with eager's
    depend on it (docs/usage.md, "Compiling the step")."""
    if not getattr(args, "torch_compile", False):
        return ""
    mode = getattr(args, "torch_compile_mode", None) or "default"
    return f", compiled (torch_compile_backend {args.torch_compile_backend}, torch_compile_mode {mode})"


def _resize_text(effective: Any, data_report: Any) -> str:
    """The training images resized or cropped to the run's ``resolution``, from the sizes the data's validation read
    (``""`` without a report, or when every image is used at its own size)."""
    if data_report is None:
        return ""
    return data_report.resize_text(effective.resolution, effective.random_crop)


def _default_lines(effective: Any, defaults: dict[str, Any]) -> list[str]:
    """Each resolved default with its source, except a ``safeguard_mu`` that does not run: with
    ``safeguard_space="none"`` no step reads it (``on_pathology="safeguard"`` switches to a ``mu`` of its own), so
    its source would justify a value the run never uses; one given there is named as unused."""
    lines = []
    for field, resolution in defaults.items():
        if field == "safeguard_mu" and effective.safeguard_space == "none":
            if resolution.given:
                lines.append(f"{resolution.text()}: unused, safeguard_space=none runs no safeguard")
            continue
        lines.append(resolution.text())
    return lines


def start_warnings(given: Any, effective: Any, family: Any, lora: bool, max_steps: int) -> list[str]:
    """The settings that quietly defeat a run, each as a message saying what to change."""
    warnings = []
    rate = effective.learning_rate
    warmup = effective.get_warmup_steps(max_steps)
    schedule = getattr(effective.lr_scheduler_type, "value", effective.lr_scheduler_type)
    if schedule not in _NO_WARMUP and max_steps > 0 and warmup > max_steps / 2:
        # The optimizer step s (1-based) runs at rate * (s - 1) / warmup: the last one at (max_steps - 1) / warmup.
        reached = rate * min(1.0, (max_steps - 1) / warmup)
        suggestion = "0" if max_steps < 20 else f"0 or {max_steps // 10}"
        warnings.append(
            f"warmup_steps={warmup} covers more than half of the {max_steps} optimizer steps: with {schedule} the "
            f"learning rate climbs linearly towards {rate:.3g} and the last step runs at {reached:.3g}. Set "
            f"warmup_steps to a small part of the run (e.g. {suggestion})."
        )
    # TRL's beta (0.1) is on another scale: the Diffusion-DPO logit multiplies a difference of squared errors
    if objective_class(effective.loss_type).unet_scale_beta_warning:
        family_beta = effective.default_for("beta", family, lora=lora)
        weak = weak_beta_warning(effective.beta, family.name, family_beta.value, family_beta.source)
        if weak is not None:
            warnings.append(weak)
    recommended = recommended_learning_rate(family, lora)
    if recommended is not None and not recommended.contains(rate):
        warnings.append(
            f"The peak learning rate {learning_rate_text(given, rate)} is outside the range recommended for "
            f"{family.name} {'LoRA' if lora else 'full tuning'}: {recommended.low:.3g} to {recommended.high:.3g} "
            f"({recommended.source})."
        )
    return warnings


class StartSummary(TrainerCallback):
    """Logs :func:`start_summary` (INFO) and each of :func:`start_warnings` (WARNING) when training starts, and
    :func:`.run_events.run_events` (INFO) when it ends, on the main process. The warnings it logged are kept
    (:attr:`warnings`) for the run's record, which :func:`.run_events.run_events` finds among the trainer's
    callbacks (``trainer.callbacks_of``)."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.warnings: list[str] = []  # the start's warnings, as logged

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        trainer = self.trainer
        given, max_steps, lora = trainer.args_as_given, state.max_steps, trainer.is_lora
        defaults = {**getattr(trainer, "resolved_defaults", {}), **getattr(trainer, "machine_choices", {})}
        report = getattr(trainer, "train_data_report", None)
        summary = start_summary(given, args, trainer.family.name, lora, trainer.engine, max_steps, defaults, report)
        probe = trainer.probe  # the held-out pairs (probe_steps, or a probe added), and its alarm (the rewind)
        alarm = trainer.probe_alarm
        line = None if probe is None else probe.summary() + ("" if alarm is None else f"; {alarm.summary()}")
        logger.info(summary if line is None else f"{summary}\n  {line}")
        self.warnings = start_warnings(given, args, trainer.family, lora, max_steps)
        for message in self.warnings:
            logger.warning(message)

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        events = run_events(self.trainer)  # every warning and alarm, and what the alarms did
        if events:
            logger.info("Training ended at step %d. %s", state.global_step, " ".join(events))
