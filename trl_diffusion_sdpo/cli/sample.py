"""What ``trl-diffusion-sdpo evaluate`` and ``... pairs`` do with the sampling flags they share
(:mod:`.sample_options`) when they run: the process set up for sampling, and the flags as the keywords
:func:`~trl_diffusion_sdpo.evaluation.evaluate` and :func:`~trl_diffusion_sdpo.evaluation.pairs.make_pairs` take."""

from __future__ import annotations

import argparse
from typing import Any

from ..evaluation.generation import GenerationSettings
from ..io.console import on_terminal
from ..io.cpu_threads import apply_threads
from ..rewards.scorers.base import resolve_device
from .console import log_to_console

__all__ = ["command_sampling_keywords", "sampling_keywords", "start_sampling_command"]


def sampling_keywords(args: argparse.Namespace) -> dict[str, Any]:
    """The keywords that :func:`~.sample_options.add_sampling_arguments`' flags set, named as
    :func:`~.evaluation.evaluate` and :func:`~.evaluation.pairs.make_pairs` both take them: the generation settings,
    the prompt-loading options, the batch sizes, the image cache, the device and the progress bars."""
    settings = GenerationSettings(
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        height=args.resolution,
        width=args.resolution,
        scheduler=args.scheduler,
        dtype=args.dtype,
        true_cfg_scale=args.true_cfg_scale,
    )
    options = {"column": args.prompt_column, "split": args.prompt_split, "path": args.prompt_path, "limit": args.limit}
    return {
        "settings": settings,
        "prompt_kwargs": {k: v for k, v in options.items() if v is not None},
        "batch_size": args.batch_size,
        "score_batch_size": args.score_batch_size,
        "cache_dir": args.cache_dir,
        "device": args.device,
        "progress": not args.no_progress,
        "overwrite": args.overwrite,
    }


def start_sampling_command(args: argparse.Namespace) -> None:
    """What ``evaluate`` and ``pairs`` set for their own process before loading anything, as ``train`` does: the
    package's INFO messages (the progress lines) on stderr, and ``--threads`` torch threads when it samples on the
    CPU (:func:`~trl_diffusion_sdpo.io.cpu_threads.apply_threads`; a GPU run leaves them alone)."""
    log_to_console()
    apply_threads(args.threads, on_cpu=resolve_device(args.device).type == "cpu")


def command_sampling_keywords(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`sampling_keywords` with ``--prompts`` and ``--output_dir``, which both commands declare, as a command
    passes them: off a terminal (a log file) the command's own bars are off, as the libraries' are (the command line's
    entry, :func:`~trl_diffusion_sdpo.cli.console.quiet_command_line`), so that a log file gets no bars redrawn with
    carriage returns."""
    keywords = {"prompts": args.prompts, "output_dir": args.output_dir, **sampling_keywords(args)}
    if not on_terminal():
        keywords["progress"] = False
    return keywords
