"""``trl-diffusion-sdpo online``'s options and parser: where the prompts come from, the online config and TRL's
``ModelConfig``, read by ``train``'s parser (:mod:`.train_options`) with their own topics. ``estimate-memory`` reads an
online YAML file with them; :mod:`.online` runs what they parse.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

from trl import ModelConfig

from ..config import rules
from ..config.fields import option
from ..online.config import _GROUPS as ONLINE_GROUPS
from ..online.config import OnlineDiffusionSDPOConfig, check_online_config
from ..online.defaults import safeguard_default_sentence
from ..rewards.functions import check_reward_names
from .argument_checks import prompt_sources_problem, resume_argument
from .parsing import parse_or_exit
from .train_options import OutputArguments, ProcessArguments, ValidationArguments, make_parser, train_topics

__all__ = [
    "ARGUMENT_TYPES",
    "DESCRIPTION",
    "EPILOG",
    "OnlinePromptArguments",
    "config_rules",
    "make_online_parser",
    "online_topics",
    "parse_args",
]


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
    "next prompts are sampled from the updated policy. " + safeguard_default_sentence() + " Saves to "
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


def config_rules(config: OnlineDiffusionSDPOConfig) -> None:
    """The online config's rules that the stored parser leaves to the real one (``refusals.refuse_online`` reads the
    stored table without them): every rule its ``__post_init__`` asks but the launch's, the offline config's
    (:func:`~trl_diffusion_sdpo.config.rules.check_config`) then the generation's."""
    rules.check_config(config)
    check_online_config(config)


def make_online_parser():
    """``online``'s parser: ``train``'s (:func:`~.train_options.make_parser`) over its own argument classes and
    topics."""
    return make_parser("trl-diffusion-sdpo online", ARGUMENT_TYPES, DESCRIPTION, EPILOG, online_topics)


def parse_args(argv: Sequence[str] | None = None):
    """``argv`` as the three argument dataclasses; exits with a usage error on a bad value or unknown flag."""
    parser = make_online_parser()
    prompt_args, training_args, model_args = parse_or_exit(parser, argv)
    training_args.resume_from_checkpoint = resume_argument(training_args.resume_from_checkpoint)
    try:  # a misspelt scorer, before any model loads
        check_reward_names(training_args.reward_funcs or [])
    except ValueError as err:
        parser.error(str(err))
    problem = prompt_sources_problem(prompt_args.prompts, prompt_args.probe_prompts, training_args.probe_steps)
    if problem is not None:
        parser.error(problem)
    return prompt_args, training_args, model_args
