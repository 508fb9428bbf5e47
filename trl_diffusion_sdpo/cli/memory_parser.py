"""``trl-diffusion-sdpo estimate-memory``'s real parser: the parser of the command whose YAML file it reads
(``train``'s, or another of :data:`ESTIMATED_COMMANDS`) with the estimate's options.
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
from .config_paths import config_command
from .help_topics import FIRST_HELP_OPTIONS
from .memory_report import EstimateArguments
from .parsing import parse_or_exit
from .train_options import DiffusionScriptArguments

__all__ = ["ESTIMATED_COMMANDS", "ParsedEstimate", "estimate_options", "make_estimate_parser", "parse_for_estimate"]

#: the commands whose YAML files ``estimate-memory`` reads (:func:`~.config_paths.config_command` chooses), each with
#: its argument classes and help topics, from the command's own module
ESTIMATED_COMMANDS: dict[str, tuple[tuple[type, ...], Any]] = {
    "train": (train_options.ARGUMENT_TYPES, train_options.train_topics),
    "online": (online_options.ARGUMENT_TYPES, online_options.online_topics),
}


def estimate_options(command: str = "train") -> set[str]:
    """The options of :func:`make_estimate_parser`'s parser: ``--`` and each field of its argument classes."""
    argument_types, _ = ESTIMATED_COMMANDS[command]
    return {f"--{f.name}" for cls in (*argument_types, EstimateArguments) for f in fields(cls)}


def make_estimate_parser(command: str = "train"):
    """The parser of ``command`` (one of :data:`ESTIMATED_COMMANDS`; :func:`~.train_options.make_parser`) with
    :class:`~.memory_report.EstimateArguments` under a topic of their own."""
    argument_types, topics = ESTIMATED_COMMANDS[command]
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
    read them, the command whose options it read them with, and the parsed arguments."""

    parser: argparse.ArgumentParser
    given: list[str]
    command: str
    args: Any
    model_args: Any
    diffusion_args: Any
    estimate_args: EstimateArguments

    def accepts(self, flags: list[str]) -> bool:
        """Whether the command's own parser takes these arguments with ``flags`` (a config's rules included)."""
        return _parses(self.parser, [*self.given, *flags])


def parse_for_estimate(argv: list[str]) -> ParsedEstimate:
    """``argv`` read by the real parser (that of the command whose YAML file ``--config`` names,
    :func:`~.config_paths.config_command`); exits on ``--help`` and with a usage error."""
    command = config_command(argv)
    parser = make_estimate_parser(command)
    # transformers refuses bf16 without a GPU unless use_cpu is set; the estimate reads the flag nowhere, and flags
    # given after this one still win
    given = ["--use_cpu", "true", *argv]
    parsed = parse_or_exit(parser, given)  # exits on --help
    # the arguments by their class (a command without the data's options, online's, takes their defaults)
    args, model_args, estimate_args = parsed[1], parsed[2], parsed[-1]
    diffusion_args = next((p for p in parsed if isinstance(p, DiffusionScriptArguments)), DiffusionScriptArguments())
    return ParsedEstimate(parser, given, command, args, model_args, diffusion_args, estimate_args)
