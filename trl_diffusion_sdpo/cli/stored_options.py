"""Make what the commands built on ``train``'s parser read without importing transformers, from their real parsers:
``estimate-memory``'s option table (:data:`~.option_table.OPTION_FILE`), the option tables of ``train``, ``online``
and ``cache`` (``help/<command>.json``, :func:`~.option_table.stored_table`) and the stored text of ``train --help``
and ``online --help`` (``help/<command>.txt``, :func:`~.help_topics.stored_help`):

    python -m trl_diffusion_sdpo.cli.stored_options   # rewrites them

``tests/memory/test_stored_option_table.py``, ``tests/training/test_cli_refusals.py`` and
``tests/training/test_cli_help.py`` compare the files with what this module makes now."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

from ..config import rules
from ..config.fields import DiffusionSDPOConfig
from ..online.config import OnlineDiffusionSDPOConfig
from . import cache_options, online_options, train_options
from .help_topics import stored_help_path
from .memory_parser import make_estimate_parser
from .memory_report import EstimateArguments
from .option_table import OPTION_FILE, STORED_COMMANDS, option_table, stored_table_path

__all__ = ["COMMAND_PARSERS", "generate", "generate_command", "help_text", "rules_read"]

#: each stored command's real parser, its argument classes, its config class, and the config's rules that the stored
#: parser leaves to the real one (:func:`rules_read` records what they read), each from the command's own module
COMMAND_PARSERS: dict[str, tuple[Callable[..., Any], tuple[type, ...], type, Callable[[Any], None]]] = {
    "train": (train_options.make_parser, train_options.ARGUMENT_TYPES, DiffusionSDPOConfig, rules.objective_check),
    "online": (
        online_options.make_online_parser,
        online_options.ARGUMENT_TYPES,
        OnlineDiffusionSDPOConfig,
        online_options.config_rules,
    ),
    "cache": (
        cache_options.make_cache_parser,
        (*train_options.ARGUMENT_TYPES, cache_options.CacheArguments),
        DiffusionSDPOConfig,
        rules.objective_check,
    ),
}
#: the commands whose plain ``--help`` is printed from its stored text
STORED_HELPS = ("train", "online")


def rules_read(config_class: type, left_rules: Callable[[Any], None]) -> list[str]:
    """The fields a config of ``config_class`` made with every default reads in ``left_rules``, the rules the stored
    parser does not check itself (:func:`~.option_table.read_or_refuse`): for ``DiffusionSDPOConfig`` its
    objective's (:data:`~..config.rules.objective_check`), which imports torch; for a command whose config the stored
    parser does not stand in for, every rule its module names (``online``'s:
    :func:`~.online_options.config_rules`). The rules pass on the defaults; given a value away from its default for
    none of these fields, they take the same steps and pass again, so the stored parser may refuse what comes after
    them."""
    read: set[str] = set()

    class Recording(config_class):  # the default config, each attribute the rules ask for written down
        def __getattribute__(self, name: str) -> Any:
            read.add(name)
            return object.__getattribute__(self, name)

    config = config_class()
    config.__class__ = Recording
    left_rules(config)
    return sorted(read & {spec.name for spec in dataclasses.fields(config_class)})


def generate() -> dict[str, Any]:
    """The table of ``estimate-memory``'s real parser for ``train``'s YAML files, as :data:`OPTION_FILE` holds it."""
    argument_types = (*train_options.ARGUMENT_TYPES, EstimateArguments)
    parser = make_estimate_parser("train")
    return option_table(parser, argument_types, rules_read(DiffusionSDPOConfig, rules.objective_check))


def generate_command(command: str) -> dict[str, Any]:
    """The table of ``command``'s real parser (one of :data:`~.option_table.STORED_COMMANDS`), as
    ``help/<command>.json`` holds it."""
    make, argument_types, config_class, left_rules = COMMAND_PARSERS[command]
    return option_table(make(), argument_types, rules_read(config_class, left_rules))


def help_text(command: str) -> str:
    """``command --help`` as its parser prints it (one of :data:`STORED_HELPS`)."""
    return COMMAND_PARSERS[command][0]().format_help()


def _json(table: dict[str, Any]) -> str:
    return json.dumps(table, indent=1) + "\n"


if __name__ == "__main__":
    OPTION_FILE.write_text(_json(generate()))
    print(f"wrote {OPTION_FILE}")
    for name in STORED_COMMANDS:
        stored_table_path(name).write_text(_json(generate_command(name)))
        print(f"wrote {stored_table_path(name)}")
    for name in STORED_HELPS:
        stored_help_path(name).write_text(help_text(name))
        print(f"wrote {stored_help_path(name)}")
