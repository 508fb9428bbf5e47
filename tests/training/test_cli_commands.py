"""The command registry (``cli/main.py``'s ``COMMANDS``): every command names a parser and a runner that exist, of the
shape the command line calls them with, and every command's ``--help`` runs through ``main``."""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io

import pytest

from trl_diffusion_sdpo.cli.main import COMMANDS, build_parser, main
from trl_diffusion_sdpo.config._lazy import import_target


def _positional(function) -> tuple[int, int]:
    """How many positional arguments ``function`` takes at least, and at most (``-1``: any number)."""
    parameters = inspect.signature(function).parameters.values()
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = sum(p.kind in kinds and p.default is inspect.Parameter.empty for p in parameters)
    most = (
        -1
        if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters)
        else sum(p.kind in kinds for p in parameters)
    )
    return required, most


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_registered_target_resolves_to_a_function_of_the_shape_it_is_called_with(name):
    command = COMMANDS[name]
    targets = [command.run] + ([command.parse] if command.parse else [])
    for target in targets:
        module, _, attribute = target.partition(":")
        found = import_target(target)
        assert callable(found), target
        # the object defined there under that name (not another module's, re-exported)
        assert (found.__module__, found.__name__) == (module, attribute), target
    required, most = _positional(import_target(command.run))
    assert required <= 1 and most in (-1, 1, 2), command.run  # the parsed arguments (train's: all four in one tuple)
    if command.parse is None:
        return
    required, most = _positional(import_target(command.parse))
    if command.help is not None:  # its own parser: the words after the command's name
        assert required <= 1 and most >= 1, command.parse
    else:  # adds its subcommand to the command line's: the subparsers, and the scorers and presets it lists
        assert required <= 1 and (most == -1 or most >= (3 if command.lists_scorers else 1)), command.parse


def test_the_command_lines_parser_lists_the_registered_commands_in_order():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert list(commands.choices) == list(COMMANDS)
    listed = [action.dest for action in commands._choices_actions]
    assert listed == list(COMMANDS)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_commands_help_runs_through_main(name):
    with contextlib.redirect_stdout(io.StringIO()) as out, pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert f"trl-diffusion-sdpo {name}" in out.getvalue()
    assert "usage:" in out.getvalue().lower()


def test_the_user_errors_looked_up_by_name_are_the_packages_exception_classes():
    """console.py finds the heavy modules' user errors by name where their module is loaded: each name is a class."""
    from trl_diffusion_sdpo.cli.console import HEAVY_USER_ERRORS, user_error_status

    for target, status in HEAVY_USER_ERRORS.items():
        cls = import_target(target)
        assert isinstance(cls, type) and issubclass(cls, Exception), target
        assert user_error_status(cls.__new__(cls)) == status, target
