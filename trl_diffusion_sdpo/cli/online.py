"""``trl-diffusion-sdpo online``: online Diffusion-DPO / Diffusion-SDPO from a YAML config and flags.

    trl-diffusion-sdpo online --config examples/configs/online_tiny_cpu.yaml
    trl-diffusion-sdpo online --model_name_or_path path/to/sd15 --prompts prompts.txt --reward_funcs pickscore \\
        --num_generations 4 --use_peft --output_dir out

Parsed by TRL's ``TrlParser`` as ``train`` is, over :class:`~.online_options.OnlinePromptArguments`,
:class:`~trl_diffusion_sdpo.online.OnlineDiffusionSDPOConfig` and TRL's ``ModelConfig`` (:mod:`.online_options`, which
``online --help`` imports instead of this module); this module reads the prompts, loads the pipeline and trains.
"""

from __future__ import annotations

from collections.abc import Sequence

from datasets import Dataset
from trl import ModelConfig

from ..callbacks.preemption import PreemptionCallback
from ..evaluation.prompts import load_prompt_set
from ..online.config import OnlineDiffusionSDPOConfig
from ..online.trainer import OnlineDiffusionSDPOTrainer
from .console import log_to_console
from .model_loading import build_pipeline, peft_config_for
from .online_options import ARGUMENT_TYPES, DESCRIPTION, EPILOG, OnlinePromptArguments, online_topics, parse_args
from .train import exit_status, for_this_machine, refuse_earlier_run, stopped_or, train_save_and_push
from .train_options import DiffusionScriptArguments, check_supported_model

# The options' names are this module's too (the command's Python entry points import them here).
__all__ = [
    "ARGUMENT_TYPES",
    "DESCRIPTION",
    "EPILOG",
    "OnlinePromptArguments",
    "load_prompt_dataset",
    "main",
    "online_topics",
    "parse_args",
    "run",
    "train_online",
]


def load_prompt_dataset(args: OnlinePromptArguments, column: str | None = None, source: str | None = None):
    """The prompts as a ``datasets.Dataset`` with a ``prompt`` column (through the evaluation's prompt loader;
    ``column``: a dataset's prompt column, ``--prompt_column``; ``source``: another source than ``--prompts``, read
    whole, as ``--probe_prompts`` is)."""
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
    return train_online(parse_args(argv))  # exits here on --help


def run(arguments: tuple[OnlinePromptArguments, OnlineDiffusionSDPOConfig, ModelConfig]) -> int:
    """``trl-diffusion-sdpo online`` once :func:`~.online_options.parse_args` has read its words (the command
    registry's runner, :data:`~.main.COMMANDS`): the exit status."""
    return stopped_or(lambda: exit_status(train_online(arguments)))


def train_online(arguments: tuple[OnlinePromptArguments, OnlineDiffusionSDPOConfig, ModelConfig]):
    """Train online as the parsed ``arguments`` say, save and (``push_to_hub``) push; the trainer."""
    prompt_args, training_args, model_args = arguments
    log_to_console()
    prompt_args.apply_to_process(training_args)
    check_supported_model(model_args)
    refuse_earlier_run(training_args, prompt_args.overwrite)  # before the model and the prompts
    pipeline = build_pipeline(model_args, DiffusionScriptArguments())
    peft_config = peft_config_for(model_args, pipeline)
    probe_prompts = None
    if prompt_args.probe_prompts:
        probe_prompts = load_prompt_dataset(prompt_args, prompt_args.prompt_column, prompt_args.probe_prompts)
    training_args, machine = for_this_machine(training_args)
    trainer = OnlineDiffusionSDPOTrainer(
        pipeline,
        None,
        training_args,
        load_prompt_dataset(prompt_args, prompt_args.prompt_column),
        probe_prompts,
        peft_config=peft_config,
        callbacks=[PreemptionCallback()],  # a checkpoint, then exit 75 / 130
    )
    for validation in prompt_args.validation_callbacks(trainer):  # they sample the trainer's pipeline
        trainer.add_callback(validation)
    trainer.machine_choices = machine  # the start summary prints them
    return train_save_and_push(trainer, prompt_args.prompts, prompt_args.overwrite)
