"""A ``--config`` file's relative paths, read from the file's folder (:func:`resolve_config_paths`): for the parsers of
``train``, ``online``, ``cache`` and ``estimate-memory`` (:mod:`.parsing`, :mod:`.option_table`), importing nothing
beyond the standard library."""

from __future__ import annotations

import logging
import os
from typing import Any

__all__ = ["FILE_SUFFIXES", "INPUT_PATH_KEYS", "resolve_config_paths"]

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


def resolve_config_paths(config: dict[str, Any], config_path: str) -> dict[str, Any]:
    """``config`` (a ``--config`` file's mapping) with each relative path of :data:`INPUT_PATH_KEYS` read from the
    file's folder, so a config works from any current folder. A path found only in the current folder is kept, with
    a warning (configs written before paths were read from their folder). A value that must be a file (no Hub id or
    preset, or one with a file suffix) and exists in neither is refused, naming the key."""
    folder = os.path.dirname(os.path.abspath(config_path))
    resolved = dict(config)
    for key, may_be_a_name in INPUT_PATH_KEYS.items():
        value = config.get(key)
        if isinstance(value, list):
            resolved[key] = [_resolve_path(key, item, folder, config_path, may_be_a_name) for item in value]
        elif isinstance(value, str):
            resolved[key] = _resolve_path(key, value, folder, config_path, may_be_a_name)
    return resolved


def _resolve_path(key: str, value: Any, folder: str, config_path: str, may_be_a_name: bool) -> Any:
    if not isinstance(value, str) or not value or os.path.isabs(os.path.expanduser(value)):
        return value
    beside = os.path.normpath(os.path.join(folder, os.path.expanduser(value)))
    if os.path.exists(beside):
        return beside
    if os.path.exists(value):
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
