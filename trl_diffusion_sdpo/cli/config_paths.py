"""A ``--config`` file as the parsers of ``train``, ``online``, ``cache`` and ``estimate-memory`` read it
(:mod:`.parsing`, :mod:`.option_table`): a file that must exist, its relative paths read from the file's folder
(:func:`resolve_config_paths`), and which command's options read it (:func:`config_command`); importing nothing
beyond the standard library, PyYAML and the package's light tables."""

from __future__ import annotations

import logging
import os
from typing import Any

import yaml

from ..online.defaults import ONLINE_FILE_KEYS

__all__ = [
    "FILE_SUFFIXES",
    "FILE_COMMANDS",
    "INPUT_PATH_KEYS",
    "config_command",
    "config_file_problem",
    "resolve_config_paths",
]

logger = logging.getLogger(__name__)

# Keys of a --config file that name files or folders to read, and whether the value may instead be a Hub id or a
# preset name (then a value found nowhere is left as it is; a value with a file suffix must exist).
INPUT_PATH_KEYS = {
    "model_name_or_path": True,
    "vae_name_or_path": True,
    "dataset_name": True,
    "prompts": True,
    "probe_prompts": True,
    "validation_source_images": False,
    "deepspeed": False,
}
FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".tsv", ".yaml", ".yml", ".png", ".jpg", ".jpeg", ".webp")
#: the commands beside ``train`` whose YAML files ``estimate-memory`` reads with their own options, each with the keys
#: only its files have, as the command's own package names them
FILE_COMMANDS: dict[str, tuple[str, ...]] = {"online": ONLINE_FILE_KEYS}


def config_file_problem(path: str) -> str | None:
    """Why ``--config path`` cannot be read (it is no file), or ``None``."""
    return None if os.path.isfile(path) else f"--config {path}: no such file"


def config_command(argv: list[str], default: str = "train") -> str:
    """The command whose options read the YAML file ``--config`` names in ``argv``: the first of
    :data:`FILE_COMMANDS` whose keys the file has, else ``default``."""
    if "--config" not in argv[:-1]:
        return default
    try:
        with open(argv[argv.index("--config") + 1]) as f:
            config = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return default  # the parser names the missing file, or where the YAML is broken
    if not isinstance(config, dict):
        return default
    return next((command for command, keys in FILE_COMMANDS.items() if any(key in config for key in keys)), default)


def resolve_config_paths(config: dict[str, Any], config_path: str, warn: bool = True) -> dict[str, Any]:
    """``config`` (a ``--config`` file's mapping) with each relative path of :data:`INPUT_PATH_KEYS` read from the
    file's folder, so a config works from any current folder. A path found only in the current folder is kept, with
    a warning (configs written before paths were read from their folder; ``warn=False``: none, where the file is read
    again). A value that must be a file (no Hub id or preset, or one with a file suffix) and exists in neither is
    refused, naming the key."""
    folder = os.path.dirname(os.path.abspath(config_path))
    resolved = dict(config)
    for key, may_be_a_name in INPUT_PATH_KEYS.items():
        value = config.get(key)
        if isinstance(value, list):
            resolved[key] = [_resolve_path(key, item, folder, config_path, may_be_a_name, warn) for item in value]
        elif isinstance(value, str):
            resolved[key] = _resolve_path(key, value, folder, config_path, may_be_a_name, warn)
    return resolved


def _resolve_path(key: str, value: Any, folder: str, config_path: str, may_be_a_name: bool, warn: bool) -> Any:
    if not isinstance(value, str) or not value or os.path.isabs(os.path.expanduser(value)):
        return value
    beside = os.path.normpath(os.path.join(folder, os.path.expanduser(value)))
    if os.path.exists(beside):
        return beside
    if os.path.exists(value):
        if not warn:
            return value
        logger.warning(
            "%s: %s is read from the current folder; relative paths in a --config file are read from the file's "
            "folder (%s), so the config works from anywhere: write it relative to that folder.",
            key,
            value,
            folder,
        )
        return value
    if may_be_a_name and not value.lower().endswith(FILE_SUFFIXES):
        return value  # a Hub id or a preset name
    raise ValueError(
        f"{key}: {value} in the --config file {config_path} does not exist: relative paths in a config file are read "
        f"from the file's folder ({folder}). Fix the path, relative to that folder or absolute."
    )
