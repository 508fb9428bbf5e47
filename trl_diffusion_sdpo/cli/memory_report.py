"""What ``trl-diffusion-sdpo estimate-memory`` prints for a run, whichever parser read its arguments: the stored
option table (:mod:`.memory`, no transformers) or the real one (:mod:`.memory_parser`); and the command's own options.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from ..engines.memory import (
    ENGINES,
    GIB,
    GPUS_GB,
    USABLE_SHARE,
    CardVerdict,
    MemoryEstimate,
    RunShape,
    estimate_memory,
)
from ..engines.memory.advice import SHARDED_ENGINES, fit_advice, plan_verdict
from ..engines.memory.measured import planning_error

__all__ = ["EstimateArguments", "answer", "format_estimate", "shape", "verdict_line"]

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
            "help": "Print one JSON object: total_gib (the per-process peak) and its terms, gpu_gb, fits, planned_gib "
            "(the peak planned with the error measured on a GPU), plan and margin_source (that error and the "
            "measurement it comes from), margin_gib (the GPU's usable GiB minus the planned peak) and advice (null "
            "when the run fits; else the least change's flags and figures, full_tuning (the full-tuning setting "
            "named before LoRA), and where nothing fits the closest combination and sharded, the fewest GPUs up to "
            f"sharded_max_gpus under {' or '.join(SHARDED_ENGINES)}). docs/memory.md says what each field holds."
        },
    )


def _safeguard(args: Any, engine: str) -> str:
    """The safeguard's memory term: the exact rule's one pass, or its per-branch passes where they run (asked for, or
    a compiled denoiser, which the one pass's per-layer taps cannot run in, except the update space under DeepSpeed,
    whose per-branch passes would leave the winner's gradient inside the engine), as
    ``ParameterSpaceBackward._decide`` decides."""
    space = args.safeguard_space
    if space in ("parameter", "update"):
        compiled = getattr(args, "torch_compile", False) and not (space == "update" and engine.startswith("zero"))
        return "two_pass" if args.safeguard_passes == "two" or compiled else "one_pass"
    return space


def shape(
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
        safeguard=_safeguard(args, estimate_args.engine),
        update_space=args.safeguard_space == "update",
        weight_decay=bool(args.weight_decay),
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


def answer(
    sizes: Any,
    shape: RunShape,
    estimate_args: Any,
    model: str,
    accepted: Callable[[list[str]], bool],
    options: Collection[str],
) -> str:
    """What the command prints: the estimate, the verdict and, where the run does not fit, the advice (the changes
    ``accepted`` takes among ``options``, the command's)."""
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
            "margin_source": planning_error(
                sizes.family, shape.lora_rank is not None, bitsandbytes=shape.base_quantization.startswith("bnb")
            ).as_dict(),
            "advice": None if advice is None else advice.as_dict(),
        }
        return json.dumps({"model": model, "family": sizes.family, **estimate.as_dict(), **card})
    line = verdict_line(found, estimate_args.gpu is not None)
    return f"{format_estimate(estimate, shape, model)}\n{line if advice is None else f'{line} {advice.sentence()}'}"
