"""How ``train``, ``online``, ``cache`` and ``estimate-memory`` read a ``--config`` YAML file and flags: the file's
relative paths read from its folder, ``--resume_from_checkpoint``'s words, and every refusal (a config field's check,
an unknown flag or YAML key, with the closest known option) ended as argparse ends a bad flag."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import yaml
from trl import TrlParser

from ..config import DiffusionSDPOConfig, check_config
from ..config.messages import did_you_mean, file_syntax_error
from .argument_checks import resume_argument
from .command_parser import HIDDEN_OPTIONS, REFUSED_OPTIONS, known_options, unknown_options_message
from .config_paths import INPUT_PATH_KEYS, config_file_problem, resolve_config_paths

__all__ = [
    "HIDDEN_OPTIONS",
    "INPUT_PATH_KEYS",
    "REFUSED_OPTIONS",
    "ConfigFileParser",
    "add_config_argument",
    "did_you_mean",
    "known_options",
    "parse_or_exit",
    "resolve_config_paths",
    "resume_argument",
    "unknown_options_message",
]


class ConfigFileParser(TrlParser):
    """TRL's parser, reading a ``--config`` file's relative paths from the file's folder (:func:`resolve_config_paths`)
    and refusing a missing config file, or one that is not valid YAML (one line naming the file, line and column), as
    a usage error."""

    config_path: str | None = None

    def parse_args_and_config(self, args: Sequence[str] | None = None, *rest: Any, **options: Any) -> tuple:
        args = list(sys.argv[1:] if args is None else args)
        self.config_path = args[args.index("--config") + 1] if "--config" in args[:-1] else None
        problem = None if self.config_path is None else config_file_problem(self.config_path)
        if problem is not None:
            self.error(problem)
        try:
            return super().parse_args_and_config(args, *rest, **options)
        except yaml.YAMLError as err:  # TRL reads the file: its syntax error, where it is, not PyYAML's traceback
            self.error(file_syntax_error(self.config_path or "", err, "--config"))

    def set_defaults_with_config(self, **config: Any) -> list[str]:
        if self.config_path is not None:
            config = resolve_config_paths(config, self.config_path)
        return super().set_defaults_with_config(**config)


def add_config_argument(parser: TrlParser) -> None:
    """List ``--config`` in ``--help``: TrlParser reads it itself before argparse sees the flags."""
    parser.add_argument(
        "--config",
        metavar="FILE.yaml",
        default=argparse.SUPPRESS,
        help="YAML file of these options (keys are the flag names); flags given beside it override its values.",
    )


def parse_or_exit(parser: TrlParser, argv: Sequence[str] | None) -> tuple:
    """``parser.parse_args_and_config(argv)``; a value the argument classes refuse (a config field's check), an
    unknown flag or an unknown YAML key ends the command as argparse ends it on a bad flag: the message (with the
    closest known option for a misspelt one) and the usage on stderr, exit status 2, no traceback."""
    try:
        *parsed, from_config, from_flags = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True
        )
        # The config's rules, the chosen objective's included, before any model loads (after --help has exited).
        for args in parsed:
            if isinstance(args, DiffusionSDPOConfig):
                check_config(args)
    except ValueError as err:
        parser.error(str(err))
    unknown = unknown_options_message(parser, from_config, from_flags)
    if unknown:
        parser.error(unknown)
    return tuple(parsed)
