"""How every command names an option it does not know: ``unknown option --formt (did you mean --format?)``, after the
command's own usage, exit status 2. :class:`CommandParser` is the argparse parser of the commands argparse reads
(``demo``, ``evaluate``, ``pairs``, ``export``, ``reward-server`` and the top level); ``train``, ``online``, ``cache``
and ``estimate-memory`` read theirs with TRL's parser and end through :func:`unknown_options_message` too
(:func:`~trl_diffusion_sdpo.cli.parsing.parse_or_exit`). Imports argparse only: ``--help`` stays quick."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from ..config.messages import did_you_mean
from ..config.trl_refusals import trl_name_refusal

__all__ = [
    "HIDDEN_OPTIONS",
    "REFUSED_OPTIONS",
    "CommandParser",
    "known_options",
    "unknown_names_message",
    "unknown_options_message",
]

# TRL ModelConfig options for language models that a diffusion pipeline refuses (check_supported) or ignores: kept
# parseable (a YAML file shared with a TRL script still gets a clear refusal) but left out of --help.
REFUSED_OPTIONS = ("attn_implementation", "lora_target_parameters")
HIDDEN_OPTIONS = (*REFUSED_OPTIONS, "lora_task_type")


def known_options(parser: argparse.ArgumentParser) -> list[str]:
    """The option names the parser accepts and lists (``--help``), without the leading ``--``."""
    names = []
    for action in parser._actions:
        if action.help == argparse.SUPPRESS and action.dest in HIDDEN_OPTIONS:
            continue
        names += [option[2:] for option in action.option_strings if option.startswith("--")]
    return names


def unknown_options_message(
    parser: argparse.ArgumentParser, from_config: Sequence[str], from_flags: Sequence[str]
) -> str | None:
    """What the parser left unused, each with the closest known option: the YAML keys (TrlParser hands them back as
    ``["--key", "value", ...]``) and the command-line words (an unknown flag, or a value with no flag)."""
    return unknown_names_message(known_options(parser), from_config, from_flags)


def unknown_names_message(known: Sequence[str], from_config: Sequence[str], from_flags: Sequence[str]) -> str | None:
    """:func:`unknown_options_message` with the ``known`` option names (without ``--``) given: a parser's, or its
    stored table's (:mod:`.option_table`)."""
    problems = []
    for key in from_config[::2]:
        name = key[2:]
        # TRL's name with no counterpart here says what takes its place: the closest name would be another setting
        refusal = trl_name_refusal(name)
        problems.append(
            f"the --config file's key {refusal}"
            if refusal
            else f"unknown key {name!r} in the --config file{did_you_mean(name, known, '')}"
        )
    value_of_unknown = False  # the word after an unknown ``--flag`` is taken as its value
    for word in from_flags:
        if word.startswith("--"):
            name = word[2:].split("=", 1)[0]
            refusal = trl_name_refusal(name.replace("-", "_"))
            problems.append(f"--{refusal}" if refusal else f"unknown option --{name}{did_you_mean(name, known)}")
            value_of_unknown = "=" not in word
        elif word.startswith("-") and len(word) > 1 and not _is_number(word):
            problems.append(f"unknown option {word}")
            value_of_unknown = True
        elif value_of_unknown:
            value_of_unknown = False
        else:
            problems.append(f"unexpected argument {word!r}")
    return "; ".join(problems) or None


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


class CommandParser(argparse.ArgumentParser):
    """argparse's parser, as every command's: prefixes of options refused (``allow_abbrev`` off), and a word it does
    not know refused by the parser of the command it was given to, with that command's usage and the closest known
    option. argparse itself leaves a subcommand's unknown words to the top level, whose error prints the top-level
    usage and says only "unrecognized arguments"; and it reports a missing required option before an unknown one, so
    ``--bas x`` would read as "--base is required" only."""

    def __init__(self, *args: Any, allow_abbrev: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, allow_abbrev=allow_abbrev, **kwargs)
        self._words: list[str] = []
        self._commands: argparse.Action | None = None

    def add_subparsers(self, **kwargs: Any):
        self._commands = super().add_subparsers(**kwargs)
        return self._commands

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None):
        # the words this parser reads, for error(): a subcommand's parser is called here by the top level's
        self._words = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(self._words, namespace)

    def parse_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None):
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            parser = self._command_parser(namespace)
            parser.refuse(unknown_options_message(parser, (), extras) or "")
        return namespace

    def _command_parser(self, namespace: argparse.Namespace) -> argparse.ArgumentParser:
        """The parser of the subcommand ``namespace`` names (itself where it has none): the words left over were
        that command's."""
        if self._commands is None or self._commands.dest is argparse.SUPPRESS:
            return self
        chosen = self._commands.choices.get(getattr(namespace, self._commands.dest, None))
        return chosen if isinstance(chosen, argparse.ArgumentParser) else self

    def refuse(self, message: str) -> NoReturn:
        """argparse's error as it is: the usage, ``prog: error: message``, exit status 2."""
        super().error(message)

    def error(self, message: str) -> NoReturn:
        """argparse's error, the unknown options among this command's words named first, each with the closest
        known option (a misspelt required option is the likely cause of a "required" error)."""
        if self._commands is not None:
            self.refuse(message + self._closest_command())
        typos = unknown_options_message(self, (), self._unknown_words())
        self.refuse(f"{typos}; {message}" if typos else message)

    def _closest_command(self) -> str:
        """`` (did you mean train?)`` for a misspelt command name (argparse lists every choice, names none)."""
        names = list(self._commands.choices) if self._commands is not None else []
        given = next((word for word in self._words if not word.startswith("-")), None)
        return "" if given is None or given in names else did_you_mean(given, names, "")

    def _unknown_words(self) -> list[str]:
        known = {option for action in self._actions for option in action.option_strings}
        return [
            word
            for word in self._words
            if word.startswith("-") and word != "--" and not _is_number(word) and word.split("=", 1)[0] not in known
        ]
