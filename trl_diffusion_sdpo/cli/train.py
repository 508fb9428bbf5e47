"""``trl-diffusion-sdpo train``: Diffusion-DPO / Diffusion-SDPO from a YAML config and flags, for every model family.

    trl-diffusion-sdpo train --config examples/configs/sd15_lora.yaml
    trl-diffusion-sdpo train --model_name_or_path path/to/sdxl --dataset_name path/to/pairs --output_dir out \\
        --use_peft --lora_r 16 --lora_alpha 16 --safeguard_mu 0.6 --bf16
    accelerate launch --config_file examples/accelerate_configs/deepspeed_zero2.yaml --num_processes 8 \\
        -m trl_diffusion_sdpo train --config examples/configs/sd15_full.yaml

The options and their parser are :mod:`.train_options`' (``train --help`` imports that module, not this one); this
module runs what they parse: the data (:mod:`.data_options`), the pipeline (:mod:`.model_loading`) and the trainer.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from transformers import TrainerCallback

from ..callbacks.early_stopping import configure_early_stopping, early_stopping
from ..callbacks.health import ENDED_AT_START, start_weights_sentence
from ..callbacks.preemption import TRAINING_STOPS, PreemptionCallback
from ..config.machine import machine_choices
from ..data.sharded_cache import load_sharded_latent_cache
from ..io.console import on_terminal
from ..io.run_files import check_new_run_folder
from ..trainer import DiffusionSDPOTrainer
from .console import log_to_console
from .data_options import early_stopping_split, load_split, load_train_split
from .model_loading import base_quantization_for, build_pipeline, peft_config_for
from .parsing import INPUT_PATH_KEYS, REFUSED_OPTIONS, ConfigFileParser, parse_or_exit, resolve_config_paths
from .train_options import (
    ARGUMENT_TYPES,
    FAMILY_TITLES,
    SHIPPED_LORA,
    DiffusionScriptArguments,
    OutputArguments,
    ProcessArguments,
    TrainArguments,
    check_supported,
    check_supported_model,
    make_parser,
    parse_args,
    train_topics,
)

# The options' names are this module's too: the command's Python entry points (examples/train_*.py) import them here.
__all__ = [
    "ARGUMENT_TYPES",
    "ENDED_AT_START_STATUS",
    "FAMILY_TITLES",
    "INPUT_PATH_KEYS",
    "REFUSED_OPTIONS",
    "SHIPPED_LORA",
    "ConfigFileParser",
    "DiffusionScriptArguments",
    "OutputArguments",
    "ProcessArguments",
    "base_quantization_for",
    "build_pipeline",
    "check_supported",
    "check_supported_model",
    "early_stopping_split",
    "for_this_machine",
    "exit_status",
    "load_split",
    "load_train_split",
    "main",
    "stopped_or",
    "make_parser",
    "parse_args",
    "parse_or_exit",
    "peft_config_for",
    "resolve_config_paths",
    "run",
    "train",
    "train_save_and_push",
    "train_topics",
]


class ModelCardOnSave(TrainerCallback):
    """Rewrite ``output_dir/README.md`` at every checkpoint save, as TRL's trainers do, naming the dataset."""

    def __init__(self, trainer, dataset_name: str | None) -> None:
        self.trainer, self.dataset_name = trainer, dataset_name

    def on_save(self, args, state, control, **kwargs):
        self.trainer.create_model_card(dataset_name=self.dataset_name)  # writes on the main process only


def main(argv: Sequence[str] | None = None):
    """Train, save to ``output_dir`` and (with ``push_to_hub``) push; returns the trainer."""
    return train(parse_args(argv))  # exits here on --help


#: the exit status of a run whose result is the weights it started from (the rewind's ladder spent at the start),
#: unless ``--rewind_allow_start_weights``: a script chaining runs must not take it for a trained model
ENDED_AT_START_STATUS = 3


def run(arguments: TrainArguments) -> int:
    """``trl-diffusion-sdpo train`` once :func:`~.train_options.parse_args` has read its words (the command registry,
    :data:`~.main.COMMANDS`, parses with the options' module and runs this one): the exit status."""
    return stopped_or(lambda: exit_status(train(arguments)))


def stopped_or(run: Callable[[], int]) -> int:
    """``run()``'s exit status, or that of a run a signal stopped (75 preempted, 130 Ctrl-C:
    :data:`~..callbacks.preemption.TRAINING_STOPS`), which the callback logged: the process ends with it, no
    traceback."""
    try:
        return run()
    except TRAINING_STOPS as stopped:
        return stopped.exit_code


def exit_status(trainer) -> int:
    """0, or :data:`ENDED_AT_START_STATUS` where ``trainer``'s run ended on the weights it started from (its last log
    carries :data:`~..callbacks.health.ENDED_AT_START`) and its config does not allow that
    (``rewind_allow_start_weights``); such a run's last line on stderr says so either way."""
    history = trainer.state.log_history
    if not history or history[-1].get(ENDED_AT_START) != 1.0:
        return 0
    fired = next((int(e["step"]) for e in reversed(history) if "health/rewind_to" in e), trainer.state.global_step)
    allowed = trainer.args.rewind_allow_start_weights
    status = 0 if allowed else ENDED_AT_START_STATUS
    why = "rewind_allow_start_weights" if allowed else "--rewind_allow_start_weights true exits 0"
    print(f"trl-diffusion-sdpo: {start_weights_sentence(fired)}; exit status {status} ({why}).", file=sys.stderr)
    return status


def train(arguments: TrainArguments):
    """Train as the parsed ``arguments`` say, save to ``output_dir`` and (with ``push_to_hub``) push; the trainer."""
    script_args, training_args, model_args, diffusion_args = arguments
    log_to_console()
    diffusion_args.apply_to_process(training_args)
    check_supported(script_args, model_args)
    refuse_earlier_run(training_args, diffusion_args.overwrite)  # before the data and the model
    # Before the model loads: a data folder's problem is one line (the command line's), not a traceback after minutes
    # of loading.
    base_quantization_for(model_args, diffusion_args).check_usable()
    if diffusion_args.latent_cache:
        train_dataset = load_sharded_latent_cache(diffusion_args.latent_cache)
    else:
        train_dataset = load_train_split(script_args, diffusion_args, training_args)
    eval_dataset = None
    if diffusion_args.early_stopping_patience is not None:
        eval_dataset = early_stopping_split(script_args, training_args, diffusion_args)
        configure_early_stopping(training_args)
    elif training_args.eval_strategy != "no":
        eval_dataset = load_split(script_args, diffusion_args, script_args.dataset_test_split, training_args)
    pipeline = build_pipeline(model_args, diffusion_args)
    peft_config = peft_config_for(model_args, pipeline)
    training_args, machine = for_this_machine(training_args)
    trainer = DiffusionSDPOTrainer(
        pipeline,
        None,
        training_args,
        train_dataset,
        eval_dataset,
        peft_config=peft_config,
        callbacks=[
            *early_stopping(diffusion_args.early_stopping_patience),
            PreemptionCallback(),  # SIGTERM, SIGUSR1, Ctrl-C: a checkpoint, then exit 75 / 130
        ],
    )
    for validation in diffusion_args.validation_callbacks(trainer):  # they sample the trainer's pipeline
        trainer.add_callback(validation)
    trainer.machine_choices = machine  # the start summary prints them
    return train_save_and_push(trainer, script_args.dataset_name, diffusion_args.overwrite)


def for_this_machine(training_args: Any) -> tuple[Any, dict[str, Any]]:
    """A copy of ``training_args`` with what the command line chooses for this machine and output where the config
    leaves it unset (:func:`~..config.machine.machine_choices`: data workers and non-blocking copies where a GPU
    trains, a line per log off a terminal), and each choice with its reason for the start summary. A Python run
    keeps the config's values, whatever the machine."""
    return machine_choices(training_args, device_type=training_args.device.type, terminal=on_terminal())


def refuse_earlier_run(training_args: Any, overwrite: bool) -> None:
    """Refuse, before anything loads, an ``--output_dir`` holding another run's files that this run neither resumes
    nor overwrites (:func:`~..io.run_files.check_new_run_folder`, which the trainer asks again under the folder's
    lock): the same one line as the trainer's, seconds in, where a large model would load first."""
    resumed = training_args.resume_from_checkpoint not in (None, False)
    check_new_run_folder(training_args.output_dir, resumed, overwrite)


def train_save_and_push(trainer, dataset_name: str | None, overwrite: bool = False):
    """Train (resuming as ``resume_from_checkpoint`` says, or over another run's files with ``overwrite``), save to
    ``output_dir`` with a model card naming ``dataset_name`` and, with ``push_to_hub``, push; the trainer."""
    args = trainer.args
    if args.push_to_hub:  # the cards of checkpoint pushes name the dataset too
        trainer.create_model_card(dataset_name=dataset_name)
    trainer.add_callback(ModelCardOnSave(trainer, dataset_name))
    # a refusal: one line (the command line's)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint, overwrite=overwrite)
    trainer.save_model(args.output_dir)
    # As TRL's scripts: the saved model comes with its card (README.md: base model, dataset, method, settings).
    trainer.create_model_card(dataset_name=dataset_name)
    if args.push_to_hub:
        trainer.push_to_hub(dataset_name=dataset_name)
    return trainer
