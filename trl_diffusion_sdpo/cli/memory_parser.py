"""``trl-diffusion-sdpo estimate-memory`` the slow way: ``train``'s real parser (or ``online``'s) with the estimate's
options, and the model counted on the meta device. :mod:`.memory` answers from the stored tables where they hold the
run and imports this module (transformers, diffusers) only where they do not.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import fields
from typing import Any

from ..engines.memory import RunShape, family_lora_targets, model_sizes
from ..families.preparation import wants_gradient_checkpointing
from . import online_options, train_options
from .memory_report import EstimateArguments, answer, is_online_config, shape
from .model_loading import base_quantization_for
from .parsing import parse_or_exit
from .train_options import DiffusionScriptArguments, check_supported_model

__all__ = ["estimate_options", "estimate_with_parser", "make_estimate_parser", "run_shape"]


def _argument_types(online: bool) -> tuple[tuple[type, ...], Any]:
    if online:
        return online_options.ARGUMENT_TYPES, online_options.online_topics
    return train_options.ARGUMENT_TYPES, train_options.train_topics


def estimate_options(online: bool = False) -> set[str]:
    """The options of :func:`make_estimate_parser`'s parser: ``--`` and each field of its argument classes."""
    argument_types, _ = _argument_types(online)
    return {f"--{f.name}" for cls in (*argument_types, EstimateArguments) for f in fields(cls)}


def make_estimate_parser(online: bool = False):
    """``train``'s parser (:func:`~.train_options.make_parser`), or ``online``'s, with
    :class:`~.memory_report.EstimateArguments` under a topic of their own."""
    argument_types, topics = _argument_types(online)
    return train_options.make_parser(
        "trl-diffusion-sdpo estimate-memory",
        (*argument_types, EstimateArguments),
        "Estimate the per-process peak memory of a training run (weights, gradients, optimizer state, activations, "
        "the reference, the safeguard, the frozen parts) from the training YAML (--config) and flags, counting the "
        "model on the meta device: nothing is downloaded or loaded. See docs/memory.md.",
        "",
        lambda: [("Estimate", "", [f.name for f in fields(EstimateArguments)]), *topics()],
    )


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


def _parses(parser: Any, argv: list[str]) -> bool:
    """Whether ``parser`` takes ``argv`` (a config's rules included), its refusal kept off stderr."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            parse_or_exit(parser, argv)
    except SystemExit:
        return False
    return True


def estimate_with_parser(argv: list[str]) -> int:
    """``estimate-memory`` for ``argv`` read by the real parser, the model built on the meta device; the exit
    status."""
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
        run = run_shape(args, model_args, diffusion_args, estimate_args, sizes.family)
        # the changes the command's own parser takes for this run (a config's rules included)
        accepted = lambda flags: _parses(parser, [*given, *flags])  # noqa: E731
        print(answer(sizes, run, estimate_args, model_args.model_name_or_path, accepted, estimate_options(online)))
    except ValueError as err:
        parser.error(str(err))
    return 0
