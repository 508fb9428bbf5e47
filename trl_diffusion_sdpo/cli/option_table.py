"""The options of the commands built on ``train``'s parser, stored so that a command reads a run's YAML file and flags
without importing transformers (whose ``TrainingArguments`` ``train``'s parser is built on): ``estimate-memory``
answers from them, and ``train``, ``online``, ``cache`` and ``estimate-memory`` refuse from them what their real
parser refuses, before anything heavy loads (:func:`read_or_refuse`, :mod:`.refusals`).

:func:`option_table` writes down each option of a real parser: its spellings, the argument class it belongs to, its
type, default, choices and ``nargs``, and the names its unknown-option errors suggest from. :data:`OPTION_FILE` holds
that table for ``estimate-memory`` (:func:`~.memory_parser.make_estimate_parser`: ``train``'s options and the
estimate's own) and ``help/<command>.json`` for ``train``, ``online`` and ``cache`` (:func:`stored_table`);
:mod:`.stored_options` makes them:

    python -m trl_diffusion_sdpo.cli.stored_options   # rewrites the stored tables and helps

:func:`parse_stored` reads ``--config`` and flags with a standard-library parser built from the file, as TRL's
parser reads them (the YAML file's values become the options' defaults, flags override them), then runs the config's
own rules (:func:`~trl_diffusion_sdpo.config.rules.check_config`). It answers ``None`` for anything it does not
decide the way the real parser would (an unknown option, a value refused, a help flag, an option whose type only
transformers reads, an option whose value transformers or TRL rewrite when the arguments are made): the caller then
parses with the real parser, whose answer, or refusal, is the command's. :func:`read_or_refuse` reads the same way
and refuses, with the real parser's usage and message, what the real parser would refuse first: a missing or broken
``--config`` file, a value an option's type or choices refuse, a config rule (those that import nothing), an unknown
option or YAML key. ``tests/memory/test_stored_option_table.py`` and ``tests/training/test_cli_refusals.py``
regenerate the tables from the real parsers and compare.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import enum
import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

from ..config import rules as config_rules
from ..config.defaults import ResolvedDefault, resolve_default, resolve_defaults
from ..config.messages import file_syntax_error
from ..config.rules import check_config, check_field_rules
from ..config.trl_habits import loss_type_name
from .command_parser import known_options, unknown_names_message
from .config_paths import config_file_problem, resolve_config_paths
from .help_topics import USAGE

__all__ = [
    "OPTION_FILE",
    "StoredArguments",
    "option_table",
    "parse_stored",
    "read_or_refuse",
    "refusing_parser",
    "stored_table",
]

#: the stored table of ``estimate-memory``'s options for ``train``'s YAML files
OPTION_FILE = Path(__file__).with_name("estimate_options.json")
#: the commands whose stored table is ``help/<command>.json`` (beside the stored text of their ``--help``)
STORED_COMMANDS = ("train", "online", "cache")

# the types the stored parser converts; an option of another type (a dict, transformers' own classes) is left to the
# real parser
_SIMPLE_TYPES = {"str": str, "int": int, "float": float}
# options whose value the real parser's argument classes rewrite in their __post_init__ (TRL's ModelConfig makes a
# one-item lora_target_modules a string; transformers' TrainingArguments mirrors gradient_checkpointing and
# activation_checkpointing, and refuses bf16 with fp16): given away from their defaults, the real parser reads them
_REWRITTEN = ("lora_target_modules", "gradient_checkpointing", "load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type")
_HELP = ("-h", "--help", "--help_all", "--help-all")


def _plain(value: Any) -> Any:
    """``value`` as JSON holds it (an enum by its value); ``TypeError`` where it has no JSON form."""
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, (list, tuple, type({}.keys()))):
        return [_plain(item) for item in value]
    json.dumps(value)
    return value


def _kind(action: argparse.Action) -> str:
    if isinstance(action, argparse._StoreFalseAction):
        return "store_false"
    name = getattr(action.type, "__name__", None)
    if action.choices is not None and name == "<lambda>":
        return "choice"  # HfArgumentParser's make_choice_type_function: the choice whose str() the value is
    if name == "string_to_bool":
        return "bool"
    return name if name in _SIMPLE_TYPES else "other"


def option_table(
    parser: argparse.ArgumentParser, argument_types: Sequence[type], rules_read: Sequence[str] = ()
) -> dict[str, Any]:
    """The table of ``parser``'s options (built by HfArgumentParser over ``argument_types``): each option's
    spellings, destination, argument class (its index in ``argument_types``), kind (str, int, float, bool, choice,
    store_false, other), ``nargs``, ``const``, default and choices; ``rules_read``: the fields the config's rules
    that :func:`read_or_refuse` does not check itself read (:func:`~.stored_options.rules_read`)."""
    owner = {f.name: i for i, cls in reversed(list(enumerate(argument_types))) for f in dataclasses.fields(cls)}
    options = []
    for action in parser._actions:
        if action.dest not in owner or not action.option_strings:
            continue  # --help, --help_all, --config: read before the stored parser runs
        kind = _kind(action)
        try:
            default, choices = _plain(action.default), _plain(action.choices) if action.choices else None
        except TypeError:
            default, choices, kind = None, None, "other"
        options.append(
            {
                "options": list(action.option_strings),
                "dest": action.dest,
                "group": owner[action.dest],
                "kind": kind,
                "nargs": action.nargs if kind != "store_false" else None,
                "const": _plain(action.const) if kind == "bool" else None,
                "default": default,
                "choices": choices,
            }
        )
    return {
        "generated_by": "python -m trl_diffusion_sdpo.cli.stored_options",
        "prog": parser.prog,
        "argument_types": [cls.__name__ for cls in argument_types],
        "known": known_options(parser),
        "options": options,
        "rules_read": sorted(rules_read),
    }


@functools.cache
def _table() -> dict[str, Any]:
    return json.loads(OPTION_FILE.read_text())


def stored_table_path(command: str) -> Path:
    """Where the stored table of ``command`` (one of :data:`STORED_COMMANDS`) is."""
    return Path(__file__).with_name("help") / f"{command}.json"


@functools.cache
def stored_table(command: str) -> dict[str, Any]:
    """The stored table of ``command``'s real parser: ``estimate-memory``'s (:data:`OPTION_FILE`), or
    ``help/<command>.json`` for :data:`STORED_COMMANDS`."""
    if command == "estimate-memory":
        return _table()
    return json.loads(stored_table_path(command).read_text())


def _string_to_bool(value: Any) -> bool:
    """A bool option's value as HfArgumentParser reads it, refused in its words (transformers' ``string_to_bool``)."""
    if isinstance(value, bool):
        return value
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(
        f"Truthy value expected: got {value} but expected one of yes/no, true/false, t/f, y/n, 1/0 (case insensitive)."
    )


def _choice(choices: list[Any]):  # noqa: ANN202
    by_text = {str(choice): choice for choice in choices}
    return lambda value: by_text.get(value, value)


class _Refused(Exception):
    """The stored parser does not decide these arguments: the real parser reads them."""


class _StoredParser(argparse.ArgumentParser):
    def error(self, message: str):  # noqa: ANN201
        raise _Refused(message)


def _stored_parser(
    options: list[dict[str, Any]], config: dict[str, Any], parser: argparse.ArgumentParser | None = None
) -> argparse.ArgumentParser:
    """A standard-library parser of the stored options (on ``parser``, or one that raises where it would refuse), the
    YAML file's values as their defaults (TRL's ``set_defaults_with_config``)."""
    parser = parser or _StoredParser(add_help=False, allow_abbrev=False)
    for entry in options:
        default = config.get(entry["dest"], entry["default"])
        if entry["kind"] == "store_false":
            parser.add_argument(*entry["options"], dest=entry["dest"], action="store_false", default=default)
            continue
        kind = entry["kind"]
        convert = {"bool": _string_to_bool, "choice": _choice(entry["choices"] or [])}.get(kind) or _SIMPLE_TYPES.get(
            kind, str
        )
        parser.add_argument(
            *entry["options"],
            dest=entry["dest"],
            type=convert,
            nargs=entry["nargs"],
            const=entry["const"],
            default=default,
            choices=entry["choices"],
        )
    return parser


class StoredArguments(SimpleNamespace):
    """One argument class's values as the stored parser read them; a config's also answer what the config's rules
    ask of :class:`~trl_diffusion_sdpo.config.DiffusionSDPOConfig` beside its fields (``default_for``, from the
    package's table as the class's own; ``safeguarded``, ``inverts``: ``tests/memory/test_stored_option_table.py``
    holds them to the class's). They stand in for that class only: a subclass's rules are left to the real parser."""

    def default_for(
        self, field: str, family: Any = None, base: Any = None, lora: bool = True, objective: str | None = None
    ) -> ResolvedDefault:
        return resolve_default(field, family, self.loss_type if objective is None else objective, base, lora)

    @property
    def safeguarded(self) -> bool:
        return self.safeguard_space != "none"

    @property
    def inverts(self) -> bool:
        return self.noising == "inversion" or (self.noising is None and self.loss_type == "smpo")


def parse_stored(argv: Sequence[str]) -> tuple[StoredArguments, ...] | None:
    """``argv`` (``--config FILE.yaml`` and flags of ``train``'s options and the estimate's) read by the stored table,
    one :class:`StoredArguments` per argument class of the real parser, the config's rules checked; ``None`` where the
    real parser must read them (see the module's docstring), or where they are refused."""
    argv = list(argv)
    if any(word in _HELP for word in argv):
        return None
    table = _table()
    config: dict[str, Any] = {}
    try:
        if "--config" in argv:
            at = argv.index("--config")
            path = argv[at + 1]
            del argv[at : at + 2]
            with open(path) as f:
                config = yaml.safe_load(f)
            if not isinstance(config, dict) or "env" in config:
                return None
            config = resolve_config_paths(config, path)
        options = table["options"]
        if set(config) - {entry["dest"] for entry in options}:
            return None  # an unknown YAML key: refused, with the closest option, by the real parser
        namespace, unknown = _stored_parser(options, config).parse_known_args(argv)
    except (_Refused, OSError, IndexError, ValueError, yaml.YAMLError, argparse.ArgumentError):
        return None
    values = vars(namespace)
    words = {word.split("=", 1)[0] for word in argv}  # --option value, or --option=value
    given = {**config, **{entry["dest"]: None for entry in options if set(entry["options"]) & words}}
    if unknown or any(entry["kind"] == "other" and entry["dest"] in given for entry in options):
        return None
    defaults = {entry["dest"]: entry["default"] for entry in options}
    if any(values[name] != defaults[name] for name in _REWRITTEN if name in values):
        return None
    if values.get("bf16") and values.get("fp16"):
        return None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return None  # a launched process: the config's launch checks read the machine
    groups = [
        StoredArguments(**{e["dest"]: values[e["dest"]] for e in options if e["group"] == i})
        for i in range(len(table["argument_types"]))
    ]
    config_args = groups[table["argument_types"].index("DiffusionSDPOConfig")]
    # what DiffusionSDPOConfig's __post_init__ makes of them before its rules: TRL's loss_type, a number given as
    # text, the safeguard space resolved by its table
    try:
        config_args.loss_type = loss_type_name(config_args.loss_type)
    except ValueError:
        return None
    mu = config_args.safeguard_mu
    if isinstance(mu, str) and mu != "auto":
        try:
            config_args.safeguard_mu = float(mu)
        except ValueError:
            return None
    if config_args.safeguard_space is None:
        config_args.safeguard_space = resolve_defaults(config_args)["safeguard_space"].value
    try:
        check_config(config_args)
    except ValueError:
        return None
    return tuple(groups)


def _given(options: list[dict[str, Any]], config: dict[str, Any], argv: Sequence[str]) -> set[str]:
    """The options the YAML file or the flags set (``--option value``, or ``--option=value``)."""
    words = {word.split("=", 1)[0] for word in argv}
    return set(config) | {entry["dest"] for entry in options if set(entry["options"]) & words}


def refusing_parser(table: dict[str, Any]) -> argparse.ArgumentParser:
    """A parser whose ``error`` is the real parser's of ``table``: its usage, ``prog: error: message``, exit status
    2."""
    return argparse.ArgumentParser(prog=table["prog"], usage=USAGE, add_help=False, allow_abbrev=False)


def read_or_refuse(
    argv: Sequence[str], table: dict[str, Any], check_rules: bool = True
) -> tuple[StoredArguments, ...] | None:
    """``argv`` (``--config FILE.yaml`` and flags) read as the real parser of ``table`` (:func:`stored_table`) reads
    it, each step's refusal its own, in the real parser's order and words: the usage and ``prog: error: message`` on
    stderr, exit status 2 (argparse's). Refused: a ``--config`` file that is missing, not YAML or no mapping, or
    names a relative path that does not exist; a value an option's type or choices refuse (the file's too); with
    ``check_rules``, a rule of the config that imports nothing (:func:`~..config.rules.check_field_rules`, the first
    the config's own checks ask), then the chosen objective's (:data:`~..config.rules.objective_check`, asked only
    where a field it reads, the table's ``rules_read``, is given: its module imports torch); an unknown option or YAML
    key, with the closest known one. The values read, one :class:`StoredArguments` per argument class, where nothing
    is refused; ``None`` where the real parser must read the rest (a help flag, an ``env`` section, an option whose
    type only transformers reads, without ``check_rules`` a value the config's rules read, a launched process, whose
    launch check reads the machine, ``bf16`` with ``fp16``)."""
    argv = list(argv)
    if any(word in _HELP for word in argv):
        return None
    parser = refusing_parser(table)
    parser.add_argument("--config", default=argparse.SUPPRESS)  # TRL reads --config FILE; --config=FILE is a flag
    config: dict[str, Any] = {}
    if "--config" in argv[:-1]:
        at = argv.index("--config")
        path = argv[at + 1]
        del argv[at : at + 2]
        problem = config_file_problem(path)
        if problem is not None:
            parser.error(problem)
        try:
            with open(path) as f:
                config = yaml.safe_load(f)
        except yaml.YAMLError as err:
            parser.error(file_syntax_error(path, err, "--config"))
        except (OSError, ValueError):  # unreadable, or not text: the real parser's own answer
            return None
        if not isinstance(config, dict):
            parser.error(f"Config file {path} must contain a YAML mapping.")  # TRL's words
        if "env" in config or not all(isinstance(key, str) for key in config):
            return None  # TRL sets the section's variables in this process: the real parser reads such a file
        try:
            config = resolve_config_paths(config, path, warn=False)  # the real parser warns, once
        except ValueError as err:
            parser.error(str(err))
    elif "--config" in argv:
        return None
    options = table["options"]
    namespace, unknown = _stored_parser(options, config, parser).parse_known_args(argv)  # exits on a bad value
    if any(entry["kind"] == "other" and entry["dest"] in _given(options, config, argv) for entry in options):
        return None  # its type is transformers' to apply, which may refuse the value first
    values = vars(namespace)
    names = table["argument_types"]
    groups = tuple(
        StoredArguments(**{e["dest"]: values[e["dest"]] for e in options if e["group"] == i})
        for i in range(len(names))
    )
    # Given no value away from its default for a field they read, the rules left unchecked below take the steps
    # they take on the defaults, and pass: what comes after them may be refused here.
    defaults = {entry["dest"]: entry["default"] for entry in options}
    rules_given = any(values[name] != defaults[name] for name in table["rules_read"])
    # the rules of DiffusionSDPOConfig itself, which StoredArguments stands in for (it resolves an unset safeguard
    # space from the same table)
    if check_rules and "DiffusionSDPOConfig" in names:
        config_args = groups[names.index("DiffusionSDPOConfig")]
        # what DiffusionSDPOConfig's __post_init__ makes of them before its rules: TRL's loss_type, a number given as
        # text, the safeguard space resolved by its table
        try:
            config_args.loss_type = loss_type_name(config_args.loss_type)
        except ValueError as err:
            parser.error(str(err))
        mu = config_args.safeguard_mu
        if isinstance(mu, str) and mu != "auto":
            with contextlib.suppress(ValueError):
                config_args.safeguard_mu = float(mu)
        if config_args.safeguard_space is None:
            config_args.safeguard_space = resolve_defaults(config_args)["safeguard_space"].value
        try:
            check_field_rules(config_args)
            if rules_given:  # the chosen objective's rules, which come next: its module imports torch
                config_rules.objective_check(config_args)
        except ValueError as err:
            parser.error(str(err))
    elif rules_given:
        return None  # the config's rules, which the real parser asks first, may refuse these values
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return None  # a launched process: the config's launch check, asked next, reads the machine
    if values.get("bf16") and values.get("fp16"):
        return None  # transformers refuses them together when the arguments are made, before any word is refused
    # TrlParser hands back a YAML key no option reads as ["--key", "value"]
    read = {entry["dest"] for entry in options} | {"help", "help_all", "config"}
    from_config = [item for key, value in config.items() if key not in read for item in (f"--{key}", str(value))]
    message = unknown_names_message(table["known"], from_config, unknown)
    if message:
        parser.error(message)
    return groups
