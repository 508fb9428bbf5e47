"""The checks ``train``, ``online`` and ``cache`` make of their parsed arguments before anything loads, importing
nothing heavy: the commands' option modules ask them after their real parser has read the words, and the command
line asks them before that, on the stored parser's values (:mod:`.refusals`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .command_parser import REFUSED_OPTIONS

__all__ = [
    "LATENT_CACHE_REQUIRED",
    "check_dataset_named",
    "check_model_named",
    "prompt_sources_problem",
    "resume_argument",
]

_TRUE = {"true", "yes", "1"}
_FALSE = {"false", "no", "0", "none", ""}
#: ``cache``'s refusal without a folder to write
LATENT_CACHE_REQUIRED = "--latent_cache FOLDER is required: where the cache is written (or resumed)"
# the prompt files ``online`` reads by their suffix, which must exist (any other value may be a preset or a dataset)
PROMPT_FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".csv")


def resume_argument(value: str | bool | None) -> str | bool | None:
    """``--resume_from_checkpoint`` as users write it: ``true`` / ``false`` (any case, from a flag or a YAML file)
    become booleans; anything else is a checkpoint folder."""
    if isinstance(value, str) and value.strip().lower() in _TRUE:
        return True
    if isinstance(value, str) and value.strip().lower() in _FALSE:
        return None
    return value


def check_dataset_named(dataset_name: str | None) -> None:
    """A ``ValueError`` where no dataset is named."""
    if dataset_name is None:
        raise ValueError("--dataset_name is required: a Hub id, a local data folder or a save_to_disk folder.")


def check_model_named(model_args: Any, defaults: Mapping[str, Any]) -> None:
    """A pipeline named, and none of TRL's language-model options (:data:`~.command_parser.REFUSED_OPTIONS`) set away
    from its ``defaults`` (TRL's ``ModelConfig``'s): such an option alone would otherwise be ignored."""
    if model_args.model_name_or_path is None:
        raise ValueError("--model_name_or_path is required: a diffusers pipeline folder or Hub id.")
    given = [name for name in REFUSED_OPTIONS if getattr(model_args, name) != defaults[name]]
    if given:
        raise ValueError(
            f"ModelConfig option(s) {given} apply to transformers language models and are not supported for "
            "diffusion pipelines; remove them."
        )


def prompt_sources_problem(prompts: str | None, probe_prompts: str | None, probe_steps: int | None) -> str | None:
    """What ``online`` refuses in its prompts before anything loads: none given, a prompt file that does not exist,
    probe prompts without the probe; ``None`` where there is nothing to refuse."""
    if prompts is None:
        return "--prompts is required: a preset, a .txt file, a .jsonl file or a dataset with a prompt column."
    for flag, source in (("--prompts", prompts), ("--probe_prompts", probe_prompts)):
        if source and source.lower().endswith(PROMPT_FILE_SUFFIXES) and not os.path.exists(source):
            return f"{flag} {source} does not exist (a relative path is read from the current folder)"
    if probe_prompts and not probe_steps:
        return "--probe_prompts are the held-out probe's: set --probe_steps too, or drop --probe_prompts"
    return None
