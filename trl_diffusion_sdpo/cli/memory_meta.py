"""``trl-diffusion-sdpo estimate-memory`` with the model counted on the meta device, for the arguments the real parser
read (:mod:`.memory_parser`): where the stored model counts lack the model or the stored options the run."""

from __future__ import annotations

from typing import Any

from ..engines.memory import RunShape, family_lora_targets, model_sizes
from ..families.preparation import wants_gradient_checkpointing
from .memory_parser import ParsedEstimate, estimate_options
from .memory_report import EstimateArguments, answer, shape
from .model_loading import base_quantization_for
from .train_options import check_supported_model

__all__ = ["estimate_on_meta", "run_shape"]


def run_shape(
    args: Any, model_args: Any, diffusion_args: Any, estimate_args: EstimateArguments, family: str
) -> RunShape:
    """The :class:`~trl_diffusion_sdpo.engines.memory.RunShape` of the parsed ``train`` arguments and the engine
    options."""
    targets = model_args.lora_target_modules
    if isinstance(targets, str):  # TRL's ModelConfig makes a one-item list its item
        targets = (targets,)
    return shape(
        args,
        model_args,
        estimate_args,
        family,
        lora_targets=tuple(targets or family_lora_targets(family)),
        base_quantization=base_quantization_for(model_args, diffusion_args).name,
        checkpointing=wants_gradient_checkpointing(args),
        latent_cache=bool(args.cache_latents or diffusion_args.latent_cache),
    )


def estimate_on_meta(parsed: ParsedEstimate) -> int:
    """Print the estimate of the ``parsed`` run, the model built on the meta device; the exit status (a refusal is
    the parser's usage error)."""
    model_args, estimate_args = parsed.model_args, parsed.estimate_args
    try:
        check_supported_model(model_args)
        if estimate_args.num_processes < 1:
            raise ValueError(f"--num_processes must be at least 1, got {estimate_args.num_processes}")
        if estimate_args.gpu is not None and estimate_args.gpu <= 0:
            raise ValueError(f"--gpu is a GPU's memory in GB, e.g. 24; got {estimate_args.gpu}")
        sizes = model_sizes(model_args.model_name_or_path)
        run = run_shape(parsed.args, model_args, parsed.diffusion_args, estimate_args, sizes.family)
        # the changes the command's own parser takes for this run (a config's rules included)
        options = estimate_options(parsed.command)
        print(answer(sizes, run, estimate_args, model_args.model_name_or_path, parsed.accepts, options))
    except ValueError as err:
        parsed.parser.error(str(err))
    return 0
