"""The help of ``train``, ``online`` and the commands built on their parser, in two sizes. ``--help`` lists the options
a first run needs (:data:`FIRST_HELP_OPTIONS`: the model, the data, the output, the objective and its safeguard, the
rate, the steps, LoRA, resuming; a command's own options beside them), a few screens, and says how many more
``--help_all`` lists. ``--help_all`` lists every option by topic: the options of this package under the config's
docstring headings (:data:`~trl_diffusion_sdpo.config.docs.GROUPS`), the model, LoRA and data options of TRL's
``ModelConfig`` and ``ScriptArguments``, the ``transformers.TrainingArguments`` options a diffusion run sets, then
transformers' other general options. Language-model options (:data:`LANGUAGE_MODEL_OPTIONS`) are accepted but listed
nowhere.

The text a plain ``--help`` prints is stored in ``help/<command>.txt`` and printed without importing transformers
(:func:`stored_help`): building the parser imports ``TrainingArguments``, which takes seconds. A test checks the stored
text equals the parser's.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path

__all__ = [
    "FIRST_HELP_OPTIONS",
    "HELP_WIDTH",
    "LANGUAGE_MODEL_OPTIONS",
    "MODEL_TOPIC",
    "TRAINING_TOPIC",
    "TRANSFORMERS_DOCS",
    "USAGE",
    "group_by_topic",
    "help_formatter",
    "stored_help",
    "stored_help_path",
]

HELP_WIDTH = 100  # fixed, so the stored text is the parser's whatever the terminal
BRIEF_HELP_CHARS = 200  # a plain --help prints a longer help's first sentence (brief_help)
# where a help's first sentence ends (not inside "e.g." or "i.e.")
_SENTENCE_END = re.compile(r"(?<!e\.g\.)(?<!i\.e\.)(?<=[.!?])\s+(?=[A-Z`(])")
USAGE = "%(prog)s [--config FILE.yaml] [--OPTION VALUE ...]  (--help: the main options; --help_all: every option)"
TRANSFORMERS_DOCS = "https://huggingface.co/docs/transformers/main_classes/trainer#transformers.TrainingArguments"

# The options a plain --help lists (with --config and the helps, and a command's own topic), under their topics:
# what a first run sets. The one list of them; --help_all lists every option.
FIRST_HELP_OPTIONS = (
    # the model and LoRA
    "model_name_or_path",
    "use_peft",
    "lora_r",
    "lora_alpha",
    # the data, or online's prompts and rewards
    "dataset_name",
    "resolution",
    "prompts",
    "reward_funcs",
    "num_generations",
    # the objective and its safeguard
    "loss_type",
    "beta",
    "safeguard_space",
    "safeguard_mu",
    # the rate, the steps, the output and resuming
    "learning_rate",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "bf16",
    "output_dir",
    "overwrite",
    "save_steps",
    "resume_from_checkpoint",
    "report_to",
)

# Options of transformers' TrainingArguments and TRL's ScriptArguments that only language models read: accepted (a YAML
# file shared with a TRL script still parses) but listed nowhere, not even under --help_all.
LANGUAGE_MODEL_OPTIONS = (
    "average_tokens_across_devices",
    "include_num_input_tokens_seen",
    "ignore_bias_buffers",
    "label_smoothing_factor",
    "neftune_noise_alpha",
    "use_liger_kernel",
    "liger_kernel_config",
    "use_cache",
    "label_names",
    "length_column_name",
    "train_sampling_strategy",
    "include_for_metrics",
    "batch_eval_metrics",
    "eval_do_concat_batches",
    "eval_use_gather_object",
    "prediction_loss_only",
    "optim_target_modules",
    "torch_empty_cache_steps",
)

# title -> (text, {option: help}); a help of None keeps the dataclass's own.
MODEL_TOPIC = (
    "Model and LoRA",
    "The pipeline to train and its LoRA adapters (TRL's ModelConfig). Without --use_peft the whole denoiser is tuned.",
    {
        "model_name_or_path": "A diffusers pipeline folder or Hub id (trl-diffusion-sdpo:tiny: the shipped base).",
        "model_revision": "Hub revision of the pipeline (branch, tag or commit).",
        "dtype": "Weights' dtype when loading: auto, float32, bfloat16 or float16.",
        "vae_name_or_path": None,
        "vae_subfolder": None,
        "use_peft": "Train LoRA adapters on the denoiser instead of all its weights.",
        "lora_r": None,
        "lora_alpha": None,
        "lora_dropout": None,
        "lora_target_modules": None,
        "lora_modules_to_save": "Modules trained in full beside the adapters (peft's modules_to_save).",
        "use_rslora": "Rank-stabilised LoRA: scale the adapters by alpha / sqrt(r) instead of alpha / r.",
        "use_dora": "Weight-decomposed LoRA (DoRA).",
        "base_quantization": None,
        "load_in_4bit": "Load the frozen base in bitsandbytes 4-bit (bnb-nf4 unless --bnb_4bit_quant_type) for LoRA; "
        "a CUDA GPU.",
        "load_in_8bit": "Load the frozen base in bitsandbytes int8 for LoRA; a CUDA GPU.",
        "bnb_4bit_quant_type": "With --load_in_4bit: nf4 or fp4.",
        "use_bnb_nested_quant": "With --load_in_4bit: quantize the quantization constants too.",
    },
)
DATA_SOURCE_OPTIONS = {
    "dataset_name": "The preference pairs: a Hub id, a local data folder (pair folders, a JSONL/CSV of paths, an "
    "image folder, HPD annotations) or a save_to_disk folder; docs/data.md.",
    "dataset_config": "The dataset's configuration name (Hub datasets).",
    "dataset_train_split": "The training split.",
    "dataset_test_split": "The evaluation split (read with --eval_strategy).",
    "dataset_streaming": "Stream the training split instead of reading it whole.",
    "dataset_format": None,
    "dataset_columns": None,
    "ranking_pairs": None,
    "max_train_rows": None,
    "latent_cache": None,
}
TRAINING_TOPIC = (
    "Training, saving and logging (transformers' TrainingArguments)",
    f"The general options a diffusion run sets most; --help_all lists the others, documented at {TRANSFORMERS_DOCS}.",
    {
        "output_dir": "Where the weights, training_config.json, the model card and checkpoints go.",
        "overwrite": None,
        "max_steps": "Optimizer steps to train for (-1: --num_train_epochs epochs).",
        "num_train_epochs": "Epochs to train for when --max_steps is -1.",
        "per_device_train_batch_size": "Preference pairs per process per micro-batch.",
        "gradient_accumulation_steps": "Micro-batches per optimizer step.",
        "optim": "The optimizer (transformers' names: adamw_torch, adamw_8bit, adafactor, sgd, ...).",
        "adam_beta1": "AdamW's beta1.",
        "adam_beta2": "AdamW's beta2.",
        "bf16": "bf16 mixed precision (the trainable weights stay float32).",
        "fp16": "fp16 mixed precision (the trainable weights stay float32).",
        "activation_checkpointing": "Recompute the denoiser's activations in the backward pass to save memory.",
        "seed": "Seed of the LoRA init, the data order and every keyed draw.",
        "save_strategy": "When to save checkpoints: steps, epoch or no.",
        "save_steps": "Save a checkpoint every this many optimizer steps.",
        "save_total_limit": "Keep only this many newest checkpoints.",
        "resume_from_checkpoint": None,
        "eval_strategy": "When to evaluate on --dataset_test_split: no, steps or epoch.",
        "eval_steps": "Evaluate every this many optimizer steps.",
        "per_device_eval_batch_size": "Pairs per process per evaluation batch.",
        "metric_for_best_model": "The eval metric that picks the best checkpoint (e.g. implicit_acc).",
        "load_best_model_at_end": "Load the best checkpoint by --metric_for_best_model when training ends.",
        "early_stopping_patience": None,
        "report_to": "Trackers to log to (none, tensorboard, wandb, trackio, ...).",
        "run_name": "The run's name in the trackers.",
        "dataloader_num_workers": "Data-loading worker processes (0: load in the training process).",
        "use_cpu": "Train on the CPU even where a GPU is present.",
        "threads": None,
        "push_to_hub": "Push the weights and the model card to the Hub when training ends (and at each save).",
        "hub_model_id": "The Hub repository to push to.",
        "deepspeed": "A DeepSpeed config file (or use accelerate launch --config_file).",
    },
)


class _TopicFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """transformers' formatter (each help ends with its default), each option under its first name only (the
    ``--dash-form`` aliases transformers adds stay accepted); ``--help_all`` beside its dashed name, which the docs
    use too."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings or action.dest in ("help", "help_all"):
            return super()._format_action_invocation(action)
        if action.nargs == 0:
            return action.option_strings[0]
        return (
            f"{action.option_strings[0]} {self._format_args(action, self._get_default_metavar_for_optional(action))}"
        )


def help_formatter(prog: str) -> argparse.HelpFormatter:
    """The help's formatter at the fixed :data:`HELP_WIDTH`."""
    return _TopicFormatter(prog, width=HELP_WIDTH, max_help_position=36)


def group_by_topic(
    parser: argparse.ArgumentParser,
    topics: Sequence[tuple[str, str, Iterable[str] | dict[str, str | None]]],
    *,
    show_all: bool,
    first: Collection[str] = FIRST_HELP_OPTIONS,
) -> None:
    """Move the parser's options under one argument group per topic, in order; options no topic names go under a
    last group of transformers' general options. With ``show_all`` every option is listed; without it only the
    options in ``first`` (the ``--config`` and help flags always), each topic without one left out, and a last
    section counts the others, which ``--help_all`` lists. :data:`LANGUAGE_MODEL_OPTIONS` are never listed. A
    topic's ``{option: help}`` replaces an option's help where it gives one."""
    actions: dict[str, list[argparse.Action]] = {}  # a True-by-default bool has --x and --no_x, one dest
    for action in parser._actions:
        if action.option_strings:
            actions.setdefault(action.dest, []).append(action)
    # what --help_all lists: every option but the language models' and those hidden everywhere (HIDDEN_OPTIONS)
    listable = {name for name, group in actions.items() if name not in LANGUAGE_MODEL_OPTIONS}
    listable -= {name for name, group in actions.items() if all(a.help == argparse.SUPPRESS for a in group)}
    general = parser._optionals  # -h, --config, --help_all
    for group in parser._action_groups:
        group._group_actions[:] = []
    placed = {"help", "config", "help_all"}
    for name in ("help", "config", "help_all"):
        general._group_actions += actions.get(name, [])
    shown = set(placed)
    left_out: list[str] = []  # the topics a short help leaves out
    for title, text, names in topics:
        helps = names if isinstance(names, dict) else dict.fromkeys(names)
        helps = {name: help for name, help in helps.items() if name in actions and name not in placed}
        listed = [name for name in helps if show_all or name in first]
        group = parser.add_argument_group(title, text or None) if listed else general
        if not listed and any(name in listable for name in helps):
            left_out.append(title)
        for name, help in helps.items():
            for action in actions[name]:
                if help is not None and action.help != argparse.SUPPRESS and not _negation(action):
                    action.help = help
                if name not in listed:
                    action.help = argparse.SUPPRESS
                elif not show_all and action.help not in (None, argparse.SUPPRESS):
                    action.help = brief_help(action.help)
                group._group_actions.append(action)
            placed.add(name)
            shown.update(listed)
    rest = [name for name in actions if name not in placed]
    if show_all:
        group = parser.add_argument_group(
            "transformers' general options",
            f"Accepted by every command that trains; documented at {TRANSFORMERS_DOCS}.",
        )
    else:
        more = len(listable - shown)
        group = parser.add_argument_group(
            "More options",
            f"--help_all lists {more} more options and each option above in full: the rest of each topic above, "
            + (f"the topics {'; '.join(left_out)}, " if left_out else "")
            + f"and transformers' general options (documented at {TRANSFORMERS_DOCS}).",
        )
    for name in rest:
        for action in actions[name]:
            if name in LANGUAGE_MODEL_OPTIONS or not show_all:
                action.help = argparse.SUPPRESS
            group._group_actions.append(action)
    for group_actions in actions.values():
        for action in group_actions:
            if action.choices is not None and len(action.choices) > 8:  # --optim's 40 names would fill the screen
                action.metavar = "NAME"


def brief_help(text: str) -> str:
    """An option's help as a plain ``--help`` prints it: its first sentence, and where the help says what an unset
    value means (``Unset (`None`): ...``), that, up to its first parenthesis; the whole text where it is short."""
    if len(text) <= BRIEF_HELP_CHARS:
        return text
    brief = _SENTENCE_END.split(text, 1)[0]
    unset = re.search(r"Unset \(`None`\): (.*?)(?: \(|\.(?: |$))", text)
    return f"{brief} Unset: {unset.group(1)}." if unset else brief


def _negation(action: argparse.Action) -> bool:
    """A ``--no_x`` switch of a True-by-default bool (its help says so already)."""
    return any(option.startswith("--no_") for option in action.option_strings)


def stored_help_path(command: str) -> Path:
    return Path(__file__).with_name("help") / f"{command}.txt"


def stored_help(command: str) -> str | None:
    """The stored ``--help`` text of ``command`` (``train``, ``online``), or ``None`` when there is none."""
    path = stored_help_path(command)
    return path.read_text() if path.is_file() else None
