"""What ``train``, ``online``, ``cache`` and ``estimate-memory`` refuse before torch, transformers, diffusers or
``datasets`` load, in the words and order of the refusal the command would reach seconds later: the command line asks
the command's function here first (:data:`~.main.COMMANDS`' ``refuse``), so that a misspelt flag, a broken YAML file
or a path that does not exist ends the command at once.

Read from the stored tables of the real parsers (:func:`~.option_table.read_or_refuse`): the ``--config`` file (it
exists, is YAML and a mapping, its relative paths exist), each value an option's type or choices refuse, the config's
rules that import nothing, then the chosen objective's (which load torch, and only where a field they read is given),
unknown options and YAML keys. Then the checks each command makes of its parsed arguments
before it loads anything (:mod:`.argument_checks`, which the commands' own modules ask too: a pipeline and a dataset
named, ``online``'s prompts, ``cache``'s folder), an ``--output_dir`` holding another run
(:func:`~..io.run_folder.check_new_run_folder`), a dataset (``train``) or a pipeline (``online``, which looks for it
before reading anything) written as a local path that does not exist (:mod:`~..data.names`). What needs a library,
the Hub or a model (a reward function's name, ``online``'s rules where a field they read is given, a launched
process's check of the machine, a quantization backend, a Hub id, the rows of the data, which ``train`` reads before
it looks for the pipeline) is left to the command, with everything after it, which refuses it as before.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ..data.errors import DatasetNotFoundError
from ..data.names import (
    HUB_ID,
    PIPELINE_FILES,
    hub_dataset_problem,
    looks_local,
    model_name_problem,
    model_not_found_message,
    not_found_message,
)
from ..io.run_folder import check_new_run_folder
from .argument_checks import (
    LATENT_CACHE_REQUIRED,
    check_dataset_named,
    check_model_named,
    prompt_sources_problem,
    resume_argument,
)
from .command_parser import REFUSED_OPTIONS
from .config_paths import config_command
from .option_table import read_or_refuse, refusing_parser, stored_table

__all__ = ["refuse_cache", "refuse_estimate", "refuse_online", "refuse_train"]


def _model_defaults(table: dict[str, Any]) -> dict[str, Any]:
    return {entry["dest"]: entry["default"] for entry in table["options"] if entry["dest"] in REFUSED_OPTIONS}


def _refuse_missing_dataset(name: str) -> None:
    """The data loader's refusal of a dataset name that does not exist and can only be a local path (or is no Hub id):
    no cache or Hub is asked for it (:func:`~..data.formats.load_preference_data`)."""
    if not os.path.exists(name) and (looks_local(name) or not HUB_ID.match(name)):
        raise DatasetNotFoundError(not_found_message(name, hub_dataset_problem(name)))


def _refuse_missing_model(name: str) -> None:
    """The pipeline loader's refusal of a model name that can only be a local path and leads nowhere
    (:func:`~..data.model_names.check_model_exists`); any other name (a Hub id, a shipped model's short name, which
    never reads as a path) is left to it."""
    if looks_local(name):
        problem = model_name_problem(name, PIPELINE_FILES)
        if problem is not None:
            raise FileNotFoundError(model_not_found_message(name, "--model_name_or_path", problem))


def refuse_train(argv: Sequence[str]) -> None:
    """``train``'s refusals, in its order: the parser's, a dataset and a pipeline named, the output folder, the data
    (a local path that does not exist)."""
    table = stored_table("train")
    parsed = read_or_refuse(argv, table)
    if parsed is None:
        return
    script_args, training_args, model_args, diffusion_args = parsed
    check_dataset_named(script_args.dataset_name)
    check_model_named(model_args, _model_defaults(table))
    if training_args.output_dir is None:
        return  # transformers names the folder (trainer_output) when the arguments are made
    resumed = resume_argument(training_args.resume_from_checkpoint) not in (None, False)
    check_new_run_folder(training_args.output_dir, resumed, diffusion_args.overwrite)
    if diffusion_args.base_quantization != "none" or model_args.load_in_4bit or model_args.load_in_8bit:
        return  # the quantization backend is checked next, which needs its library
    if diffusion_args.latent_cache:
        return  # the cache is read instead of the data, by its own reader
    if diffusion_args.dataset_format in ("auto", "hub") and not diffusion_args.rename_columns:
        _refuse_missing_dataset(script_args.dataset_name)
    # The data is read next, which may refuse a row before the pipeline is looked for: the pipeline is the command's.


def refuse_online(argv: Sequence[str]) -> None:
    """``online``'s refusals, in its order: the parser's (the config's rules are its own: where a value they read is
    given, the command refuses the rest), the prompts (where no reward function is named: the names are the
    command's to check first), a pipeline named, the output folder, the pipeline (a local path that does not
    exist)."""
    table = stored_table("online")
    parsed = read_or_refuse(argv, table, check_rules=False)
    if parsed is None:
        return
    prompt_args, training_args, model_args = parsed
    if training_args.reward_funcs:
        return  # the reward functions' names are checked next, from the registry of scorers, which the command loads
    problem = prompt_sources_problem(prompt_args.prompts, prompt_args.probe_prompts, training_args.probe_steps)
    if problem is not None:
        refusing_parser(table).error(problem)
    check_model_named(model_args, _model_defaults(table))
    if training_args.output_dir is None:
        return  # transformers names the folder (trainer_output) when the arguments are made
    resumed = resume_argument(training_args.resume_from_checkpoint) not in (None, False)
    check_new_run_folder(training_args.output_dir, resumed, prompt_args.overwrite)
    if model_args.load_in_4bit or model_args.load_in_8bit:
        return  # the quantization backend is checked next, which needs its library
    _refuse_missing_model(model_args.model_name_or_path)


def refuse_cache(argv: Sequence[str]) -> None:
    """``cache``'s refusals: the parser's, a dataset and a pipeline named, the cache's folder given."""
    table = stored_table("cache")
    parsed = read_or_refuse(argv, table)
    if parsed is None:
        return
    script_args, _, model_args, diffusion_args, _ = parsed
    check_dataset_named(script_args.dataset_name)
    check_model_named(model_args, _model_defaults(table))
    if not diffusion_args.latent_cache:
        refusing_parser(table).error(LATENT_CACHE_REQUIRED)


def refuse_estimate(argv: Sequence[str]) -> None:
    """``estimate-memory``'s parser's refusals (its words as it reads them, ``--use_cpu true`` first) where it reads
    ``train``'s options, whose stored table it has; the words of another command's YAML file, which it reads with that
    command's options (:func:`~.config_paths.config_command`), are left to it."""
    given = ["--use_cpu", "true", *argv]
    if config_command(given) == "train":
        read_or_refuse(given, stored_table("estimate-memory"))
