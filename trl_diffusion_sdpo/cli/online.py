"""``trl-diffusion-sdpo online``: online Diffusion-DPO / Diffusion-SDPO from a YAML config and flags.

    trl-diffusion-sdpo online --config examples/configs/online_tiny_cpu.yaml
    trl-diffusion-sdpo online --model_name_or_path path/to/sd15 --prompts prompts.txt --reward_funcs pickscore \\
        --num_generations 4 --use_peft --output_dir out

Parsed by TRL's ``TrlParser`` as ``train`` is (:mod:`.train`), over :class:`OnlinePromptArguments`,
:class:`~trl_diffusion_sdpo.online.OnlineDiffusionSDPOConfig` and TRL's ``ModelConfig``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, fields

from trl import ModelConfig

from ..config.defaults import safeguard_default_sentence
from ..config.fields import option
from ..online.config import _GROUPS as ONLINE_GROUPS
from ..online.config import OnlineDiffusionSDPOConfig
from .parsing import parse_or_exit, resume_argument
from .train import (
    DiffusionScriptArguments,
    OutputArguments,
    ProcessArguments,
    ValidationArguments,
    build_pipeline,
    check_supported_model,
    make_parser,
    refuse_earlier_run,
    train_save_and_push,
    train_topics,
)

__all__ = ["OnlinePromptArguments", "load_prompt_dataset", "main", "parse_args"]


@dataclass
class OnlinePromptArguments(ValidationArguments, ProcessArguments, OutputArguments):
    """Where the prompts come from, and the validation grids."""

    prompts: str | None = option(
        None,
        "The prompts to sample: a preset name (as `evaluate --prompts` takes), a .txt file (one prompt a line), a "
        ".jsonl file or a dataset id/folder with a prompt column (`--prompt_column`); for an editing model each row "
        "also holds its source image (`source_image`) or images (`source_images`).",
    )
    prompt_column: str = option("prompt", "The prompt column of a dataset of prompts.")
    prompt_split: str | None = option(None, "The split of a Hub dataset of prompts.")
    max_prompts: int | None = option(None, "Use only the first N prompts.")
    probe_prompts: str | None = option(
        None,
        "The held-out probe's prompts (with --probe_steps), in any form --prompts takes; its first --probe_pairs are "
        "paired once before training. Unset: --probe_pairs prompts are held back from --prompts.",
    )


ARGUMENT_TYPES = (OnlinePromptArguments, OnlineDiffusionSDPOConfig, ModelConfig)
DESCRIPTION = (
    "Online Diffusion-DPO / Diffusion-SDPO: the policy samples --num_generations images per prompt, --reward_funcs "
    "score them, the best and worst of each prompt (or every pair above --reward_margin) are trained on, and the "
    "next prompts are sampled from the updated policy. " + safeguard_default_sentence(online=True) + " Saves to "
    "--output_dir as `train` does."
)
EPILOG = (
    "Example: examples/configs/online_tiny_cpu.yaml (the shipped tiny base and the demo's colour reward, CPU). A "
    "relative path in a --config file (--prompts) is read from the file's folder."
)


def online_topics() -> list:
    """``online --help``'s topics: the prompts, the rewards, generation and reference, then ``train``'s."""
    elsewhere = {f.name for f in (*fields(ValidationArguments), *fields(OutputArguments))}  # train's topics
    prompts = ("Prompts", "", [f.name for f in fields(OnlinePromptArguments) if f.name not in elsewhere])
    online = [(heading, text, names) for heading, (text, names) in ONLINE_GROUPS.items()]
    return [prompts, *online, *train_topics()]


def parse_args(argv: Sequence[str] | None = None):
    """``argv`` as the three argument dataclasses; exits with a usage error on a bad value or unknown flag."""
    parser = make_parser("trl-diffusion-sdpo online", ARGUMENT_TYPES, DESCRIPTION, EPILOG, online_topics)
    prompt_args, training_args, model_args = parse_or_exit(parser, argv)
    training_args.resume_from_checkpoint = resume_argument(training_args.resume_from_checkpoint)
    from ..rewards.functions import check_reward_names

    try:  # a misspelt scorer, before any model loads
        check_reward_names(training_args.reward_funcs or [])
    except ValueError as err:
        parser.error(str(err))
    if prompt_args.prompts is None:
        parser.error("--prompts is required: a preset, a .txt file, a .jsonl file or a dataset with a prompt column.")
    for flag, prompts in (("--prompts", prompt_args.prompts), ("--probe_prompts", prompt_args.probe_prompts)):
        if prompts and prompts.lower().endswith((".txt", ".jsonl", ".json", ".csv")) and not os.path.exists(prompts):
            parser.error(f"{flag} {prompts} does not exist (a relative path is read from the current folder)")
    if prompt_args.probe_prompts and not training_args.probe_steps:
        parser.error("--probe_prompts are the held-out probe's: set --probe_steps too, or drop --probe_prompts")
    return prompt_args, training_args, model_args


def load_prompt_dataset(args: OnlinePromptArguments, column: str | None = None, source: str | None = None):
    """The prompts as a ``datasets.Dataset`` with a ``prompt`` column (through the evaluation's prompt loader;
    ``column``: a dataset's prompt column, ``--prompt_column``; ``source``: another source than ``--prompts``, read
    whole, as ``--probe_prompts`` is)."""
    from datasets import Dataset

    from ..evaluation.prompts import load_prompt_set

    if source is None:
        prompts = load_prompt_set(args.prompts, column=column, split=args.prompt_split, limit=args.max_prompts)
    else:
        prompts = load_prompt_set(source, column=column, split=args.prompt_split)
    if not prompts or isinstance(prompts[0], str):
        return Dataset.from_dict({"prompt": list(prompts)})
    # edits: each instruction with its source(s), in one column for every row (source_images where one has several)
    if any(edit.column == "source_images" for edit in prompts):
        return Dataset.from_dict(
            {"prompt": [e.prompt for e in prompts], "source_images": [list(e.images()) for e in prompts]}
        )
    return Dataset.from_dict({"prompt": [e.prompt for e in prompts], "source_image": [e.images()[0] for e in prompts]})


def main(argv: Sequence[str] | None = None):
    """Train online, save to ``output_dir`` with a model card naming the rewards, and (``push_to_hub``) push."""
    prompt_args, training_args, model_args = parse_args(argv)  # exits here on --help
    from .console import log_to_console

    log_to_console()
    prompt_args.apply_to_process(training_args)
    check_supported_model(model_args)
    refuse_earlier_run(training_args, prompt_args.overwrite)  # before the trainer's modules, the model and the prompts
    from ..online.trainer import OnlineDiffusionSDPOTrainer
    from .train import peft_config_for

    pipeline = build_pipeline(model_args, DiffusionScriptArguments())
    peft_config = peft_config_for(model_args, pipeline)
    probe_prompts = None
    if prompt_args.probe_prompts:
        probe_prompts = load_prompt_dataset(prompt_args, prompt_args.prompt_column, prompt_args.probe_prompts)
    trainer = OnlineDiffusionSDPOTrainer(
        pipeline,
        None,
        training_args,
        load_prompt_dataset(prompt_args, prompt_args.prompt_column),
        probe_prompts,
        peft_config=peft_config,
        callbacks=prompt_args.validation_callbacks(),
    )
    return train_save_and_push(trainer, prompt_args.prompts, prompt_args.overwrite)
