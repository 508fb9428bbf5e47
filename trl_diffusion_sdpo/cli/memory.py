"""``trl-diffusion-sdpo estimate-memory --config x.yaml [flags] [--json]``: the per-process peak memory of the run the
same ``train`` arguments describe, before anything loads (:mod:`.memory`).

    trl-diffusion-sdpo estimate-memory --config examples/configs/sdxl_full.yaml --engine zero2 --num_processes 8
    trl-diffusion-sdpo estimate-memory --config examples/configs/qwen_image_lora.yaml --base_quantization quanto-int4
    trl-diffusion-sdpo estimate-memory --config examples/configs/flux2_klein_lora.yaml --gpu 24 --json

The engine and the process count come from ``accelerate launch``, not the training YAML: give them here. An
``online`` command's YAML file (one with ``prompts`` or ``reward_funcs``) is read with that command's options.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, fields
from typing import Any

from ..engines.memory import ENGINES, GIB, GPUS_GB, USABLE_SHARE, CardVerdict, MemoryEstimate, RunShape

__all__ = ["EstimateArguments", "estimate_options", "make_estimate_parser", "run_estimate_memory", "run_shape"]

# The prompt tokens a UNet attends to (CLIP's); SD3 adds T5's max_sequence_length (77 by default) to CLIP's 77, the
# other flow families take max_sequence_length (512 by default).
CLIP_TOKENS = 77


@dataclass
class EstimateArguments:
    """Options of ``trl-diffusion-sdpo estimate-memory`` beside the ``train`` command's (whose YAML file it reads)."""

    engine: str = field(
        default="ddp",
        metadata={
            "help": "The engine accelerate launches (examples/accelerate_configs): ddp (also one process), zero1, "
            "zero2, zero3 (DeepSpeed) or fsdp2.",
            "choices": list(ENGINES),
        },
    )
    num_processes: int = field(default=1, metadata={"help": "Processes (GPUs) the run is launched on."})
    gpu: float | None = field(
        default=None,
        metadata={
            "help": f"A GPU's memory in GB (e.g. 24): whether the run fits it, its peak planned as the estimate "
            f"plus the error measured for the family on a GPU, keeping {(1 - USABLE_SHARE) * 100:.0f}%% free, and "
            "where it does not, the least change of its flags that makes it fit. "
            f"Unset: the smallest of {', '.join(map(str, GPUS_GB))} GB that fits."
        },
    )
    json: bool = field(
        default=False,
        metadata={
            "help": "Print one JSON object: total_gib (the per-process peak), gpu_gb, fits, planned_gib (the peak "
            "planned with the measured error), plan (where that error comes from) and margin_gib (the GPU's usable "
            "GiB minus the planned peak) and advice (null when the run fits; else the flags of the least change "
            "that fits, null when none does, with its total_gib, planned_gib and margin_gib)."
        },
    )


def _argument_types(online: bool) -> tuple[tuple[type, ...], Any]:
    from . import online as online_command
    from . import train as train_command

    if online:
        return online_command.ARGUMENT_TYPES, online_command.online_topics
    return train_command.ARGUMENT_TYPES, train_command.train_topics


def estimate_options(online: bool = False) -> set[str]:
    """The options of :func:`make_estimate_parser`'s parser: ``--`` and each field of its argument classes."""
    argument_types, _ = _argument_types(online)
    return {f"--{f.name}" for cls in (*argument_types, EstimateArguments) for f in fields(cls)}


def make_estimate_parser(online: bool = False):
    """``train``'s parser (:func:`~.train.make_parser`), or ``online``'s, with :class:`EstimateArguments`
    under a topic of their own."""
    from . import train as train_command

    argument_types, topics = _argument_types(online)
    return train_command.make_parser(
        "trl-diffusion-sdpo estimate-memory",
        (*argument_types, EstimateArguments),
        "Estimate the per-process peak memory of a training run (weights, gradients, optimizer state, activations, "
        "the reference, the safeguard, the frozen parts) from the training YAML (--config) and flags, counting the "
        "model on the meta device: nothing is downloaded or loaded. See docs/memory.md.",
        "",
        lambda: [("Estimate", "", [f.name for f in fields(EstimateArguments)]), *topics()],
    )


def _safeguard(args: Any) -> str:
    space = args.safeguard_space
    if space in ("parameter", "update"):
        return "two_pass" if args.safeguard_passes == "two" else "one_pass"
    return space


def run_shape(
    args: Any, model_args: Any, diffusion_args: Any, estimate_args: EstimateArguments, family: str
) -> RunShape:
    """The :class:`~trl_diffusion_sdpo.engines.memory.RunShape` of the parsed ``train`` arguments and the engine
    options."""
    from ..engines.memory import family_lora_targets
    from ..families.preparation import wants_gradient_checkpointing
    from .train import base_quantization_for

    targets = model_args.lora_target_modules
    if isinstance(targets, str):  # TRL's ModelConfig makes a one-item list its item
        targets = (targets,)
    return _shape(
        args,
        model_args,
        estimate_args,
        family,
        lora_targets=tuple(targets or family_lora_targets(family)),
        base_quantization=base_quantization_for(model_args, diffusion_args).name,
        checkpointing=wants_gradient_checkpointing(args),
        latent_cache=bool(args.cache_latents or diffusion_args.latent_cache),
    )


def _shape(
    args: Any,
    model_args: Any,
    estimate_args: Any,
    family: str,
    *,
    lora_targets: tuple[str, ...],
    base_quantization: str,
    checkpointing: bool,
    latent_cache: bool,
) -> RunShape:
    half = args.bf16 or args.fp16 or model_args.dtype in ("bfloat16", "float16")
    lora = model_args.use_peft
    if family in ("stable-diffusion", "stable-diffusion-xl"):
        prompt_tokens = CLIP_TOKENS
    elif family == "stable-diffusion-3":
        prompt_tokens = CLIP_TOKENS + (args.max_sequence_length or CLIP_TOKENS)
    else:
        prompt_tokens = args.max_sequence_length or 512
    return RunShape(
        pairs=args.per_device_train_batch_size,
        resolution=args.resolution,
        frames=args.num_frames or 1,
        prompt_tokens=prompt_tokens,
        dtype_bytes=2 if half else 4,
        lora_rank=model_args.lora_r if lora else None,
        lora_targets=lora_targets,
        base_quantization=base_quantization,
        optim=str(getattr(args.optim, "value", args.optim)),
        engine=estimate_args.engine,
        num_processes=estimate_args.num_processes,
        activation_checkpointing=checkpointing,
        latent_cache=latent_cache,
        offload_frozen=args.offload_frozen_modules,
        safeguard=_safeguard(args),
        lora_r=model_args.lora_r,
        accumulation=args.gradient_accumulation_steps,
    )


def verdict_line(found: CardVerdict, asked: bool) -> str:
    """The verdict in one line; without ``--gpu`` it names the smallest card that fits."""
    if asked or not found.fits:
        suffix = "" if asked else f" (the largest of {', '.join(map(str, GPUS_GB))} GB)"
        return found.sentence().replace(" GPU:", f" GPU{suffix}:", 1)
    return found.sentence().replace(" GPU:", f" GPU (the smallest of {', '.join(map(str, GPUS_GB))} GB that fits):", 1)


def format_estimate(estimate: MemoryEstimate, shape: RunShape, model: str) -> str:
    """The estimate as a table, one term per line."""
    tuning = f"LoRA rank {shape.lora_rank}" if shape.lora_rank is not None else "full tuning"
    if shape.base_quantization != "none":
        tuning += f" on a {shape.base_quantization} base"
    lines = [
        f"{model}: {tuning}, {shape.pairs} pairs x {shape.resolution} px per process, "
        f"{'bf16/fp16' if shape.dtype_bytes == 2 else 'float32'}, {shape.engine} over {shape.num_processes} "
        f"process(es){', activation checkpointing' if shape.activation_checkpointing else ''}"
        f"{', latent cache' if shape.latent_cache else ''}",
    ]
    unit, scale = ("GiB", GIB) if estimate.total_bytes >= GIB else ("MiB", 2**20)
    for name, value in estimate.components.items():
        lines.append(f"  {name.replace('_', ' '):<22} {value / scale:9.2f} {unit}")
    lines.append(f"  {'total per process':<22} {estimate.total_bytes / scale:9.2f} {unit}")
    lines.append(f"  activations: {estimate.method['activations']}")
    return "\n".join(lines)


# Keys only an ``online`` command's YAML file has: such a file is read with that command's options.
ONLINE_KEYS = ("prompts", "reward_funcs", "num_generations")


def is_online_config(argv: list[str]) -> bool:
    """Whether ``--config`` names an ``online`` command's YAML file (one with any of :data:`ONLINE_KEYS`)."""
    if "--config" not in argv[:-1]:
        return False
    import yaml

    try:
        with open(argv[argv.index("--config") + 1]) as f:
            config = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return False  # the parser names the missing file, or where the YAML is broken
    return isinstance(config, dict) and any(key in config for key in ONLINE_KEYS)


def _parses(parser: Any, argv: list[str]) -> bool:
    """Whether ``parser`` takes ``argv`` (a config's rules included), its refusal kept off stderr."""
    import contextlib
    import io

    from .parsing import parse_or_exit

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            parse_or_exit(parser, argv)
    except SystemExit:
        return False
    return True


def _answer(
    sizes: Any,
    shape: RunShape,
    estimate_args: Any,
    model: str,
    accepted: Callable[[list[str]], bool],
    options: Collection[str],
) -> str:
    """What the command prints: the estimate, the verdict and, where the run does not fit, the advice (the changes
    ``accepted`` takes among ``options``, the command's)."""
    from ..engines.memory import estimate_memory
    from ..engines.memory.advice import fit_advice, plan_verdict

    memo: dict[tuple, tuple[int, str]] = {}  # the meta forwards of this call, shared with the advice's
    estimate = estimate_memory(sizes, shape, memo)
    found = plan_verdict(estimate.total_bytes, estimate_args.gpu, sizes.family, shape)
    advice = None
    if not found.fits:
        advice = fit_advice(sizes, shape, found.gpu_gb, accepted=accepted, options=options, activations_memo=memo)
    if estimate_args.json:
        card = {
            "gpu_gb": found.gpu_gb,
            "fits": found.fits,
            "margin_gib": found.margin_gib,
            "planned_gib": found.planned_gib,
            "plan": found.plan,
            "advice": None if advice is None else advice.as_dict(),
        }
        return json.dumps({"model": model, "family": sizes.family, **estimate.as_dict(), **card})
    line = verdict_line(found, estimate_args.gpu is not None)
    return f"{format_estimate(estimate, shape, model)}\n{line if advice is None else f'{line} {advice.sentence()}'}"


def _stored_answer(argv: list[str]) -> str | None:
    """The command's output for ``argv`` from the stored option table (:mod:`.option_table`) and the known models'
    stored counts (:mod:`~trl_diffusion_sdpo.engines.memory.stored`), nothing of transformers or diffusers imported;
    ``None`` where either lacks what the run needs (the real parser and the model built on the meta device answer
    then)."""
    from ..engines.memory.stored import NotStored, stored_model_sizes
    from .command_parser import REFUSED_OPTIONS
    from .option_table import _table, parse_stored

    given = ["--use_cpu", "true", *argv]
    parsed = None if is_online_config(argv) else parse_stored(given)
    if parsed is None:
        return None
    _, args, model_args, diffusion_args, estimate_args = parsed
    defaults = {entry["dest"]: entry["default"] for entry in _table()["options"]}
    if (
        model_args.model_name_or_path is None
        or any(getattr(model_args, name) != defaults[name] for name in REFUSED_OPTIONS)
        or model_args.dtype not in (None, "auto", "float32", "bfloat16", "float16")
        or estimate_args.num_processes < 1
        or (estimate_args.gpu is not None and estimate_args.gpu <= 0)
    ):
        return None  # refused: by the real parser's words
    sizes = stored_model_sizes(model_args.model_name_or_path)
    if sizes is None:
        return None
    shape = _shape(
        args,
        model_args,
        estimate_args,
        sizes.family,
        lora_targets=sizes.counts.family_lora_targets,
        base_quantization=diffusion_args.base_quantization,
        checkpointing=bool(args.activation_checkpointing),
        latent_cache=bool(args.cache_latents or diffusion_args.latent_cache),
    )
    options = {f"--{name}" for name in defaults}
    accepted = lambda flags: parse_stored([*given, *flags]) is not None  # noqa: E731
    try:
        return _answer(sizes, shape, estimate_args, model_args.model_name_or_path, accepted, options)
    except (NotStored, ValueError):
        return None


def run_estimate_memory(argv: list[str] | None = None, stored: bool = True) -> int:
    """``trl-diffusion-sdpo estimate-memory``: parse ``argv`` and print the estimate; returns the exit status.
    ``stored``: answer from the stored option table and model counts where they hold the run (the same output, in a
    fraction of the time), else with the real parser and the model built on the meta device."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if stored:
        answer = _stored_answer(argv)
        if answer is not None:
            print(answer)
            return 0
    from ..engines.memory import model_sizes
    from .parsing import parse_or_exit
    from .train import DiffusionScriptArguments, check_supported_model

    online = is_online_config(argv)
    parser = make_estimate_parser(online)
    # transformers refuses bf16 without a GPU unless use_cpu is set; the estimate reads the flag nowhere, and flags
    # given after this one still win
    given = ["--use_cpu", "true", *argv]
    parsed = parse_or_exit(parser, given)  # exits on --help
    if online:
        _, args, model_args, estimate_args = parsed
        diffusion_args = DiffusionScriptArguments()
    else:
        _, args, model_args, diffusion_args, estimate_args = parsed
    try:
        check_supported_model(model_args)
        if estimate_args.num_processes < 1:
            raise ValueError(f"--num_processes must be at least 1, got {estimate_args.num_processes}")
        if estimate_args.gpu is not None and estimate_args.gpu <= 0:
            raise ValueError(f"--gpu is a GPU's memory in GB, e.g. 24; got {estimate_args.gpu}")
        sizes = model_sizes(model_args.model_name_or_path)
        shape = run_shape(args, model_args, diffusion_args, estimate_args, sizes.family)
        # the changes the command's own parser takes for this run (a config's rules included)
        accepted = lambda flags: _parses(parser, [*given, *flags])  # noqa: E731
        print(_answer(sizes, shape, estimate_args, model_args.model_name_or_path, accepted, estimate_options(online)))
    except ValueError as err:
        parser.error(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(run_estimate_memory())
