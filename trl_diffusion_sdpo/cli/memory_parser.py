"""``trl-diffusion-sdpo estimate-memory``'s real parser: ``train``'s (or ``online``'s) with the estimate's options.
:mod:`.memory` answers from the stored tables where they hold the run and reads the arguments with this parser
(transformers) only where they do not; then :mod:`.memory_meta` counts the model on the meta device.
"""

from __future__ import annotations

import argparse
import contextlib
import io
from dataclasses import dataclass, fields
from typing import Any

from . import online_options, train_options
from .help_topics import FIRST_HELP_OPTIONS
from .memory_report import EstimateArguments, is_online_config
from .parsing import parse_or_exit
from .train_options import DiffusionScriptArguments

__all__ = ["ParsedEstimate", "estimate_options", "make_estimate_parser", "parse_for_estimate"]


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
        # its help: the estimate's own options beside the first run's
        first_help=(*FIRST_HELP_OPTIONS, *(f.name for f in fields(EstimateArguments))),
    )


def _parses(parser: Any, argv: list[str]) -> bool:
    """Whether ``parser`` takes ``argv`` (a config's rules included), its refusal kept off stderr."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            parse_or_exit(parser, argv)
    except SystemExit:
        return False
    return True


@dataclass
class ParsedEstimate:
    """``estimate-memory``'s words read by the real parser: the parser (whose error a refusal is), the words as it
    read them, whether an ``online`` YAML file's options, and the parsed arguments."""

    parser: argparse.ArgumentParser
    given: list[str]
    online: bool
    args: Any
    model_args: Any
    diffusion_args: Any
    estimate_args: EstimateArguments

    def accepts(self, flags: list[str]) -> bool:
        """Whether the command's own parser takes these arguments with ``flags`` (a config's rules included)."""
        return _parses(self.parser, [*self.given, *flags])


def parse_for_estimate(argv: list[str]) -> ParsedEstimate:
    """``argv`` read by the real parser (``online``'s where ``--config`` is an online YAML file); exits on ``--help``
    and with a usage error."""
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
    return ParsedEstimate(parser, given, online, args, model_args, diffusion_args, estimate_args)
