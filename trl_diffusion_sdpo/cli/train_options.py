"""``trl-diffusion-sdpo train``'s options and parser: the argument dataclasses, the help's topics and the checks of
the parsed arguments that need nothing loaded. ``train --help``, ``cache`` (whose parser is this one with its own
options) and ``estimate-memory`` (which reads a training YAML file with it) import this module and not the trainer,
the data or the model families; :mod:`.train` runs what it parses.

Parsed by TRL's ``TrlParser`` from TRL's ``ScriptArguments`` (dataset) and ``ModelConfig`` (model, dtype, LoRA through
``get_peft_config``), :class:`DiffusionScriptArguments` and :class:`~trl_diffusion_sdpo.DiffusionSDPOConfig` (every
``transformers.TrainingArguments`` field too). Flags override the YAML file; ``--help`` lists them all. How the
file and flags are read and refused: :mod:`.parsing`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from trl import ModelConfig, ScriptArguments, TrlParser

from ..config import DiffusionSDPOConfig
from ..config.docs import GROUPS
from ..config.fields import option
from ..config.rules import BASE_QUANTIZATIONS
from ..io.cpu_threads import THREADS_HELP, apply_threads
from .argument_checks import check_dataset_named, check_model_named, resume_argument
from .family_titles import FAMILY_TITLES
from .help_topics import (
    DATA_SOURCE_OPTIONS,
    FIRST_HELP_OPTIONS,
    MODEL_TOPIC,
    TRAINING_TOPIC,
    USAGE,
    group_by_topic,
    help_formatter,
)
from .parsing import HIDDEN_OPTIONS, ConfigFileParser, add_config_argument, parse_or_exit

__all__ = [
    "ARGUMENT_TYPES",
    "DESCRIPTION",
    "EPILOG",
    "FAMILY_TITLES",
    "DiffusionScriptArguments",
    "OutputArguments",
    "ProcessArguments",
    "TrainArguments",
    "ValidationArguments",
    "check_supported",
    "check_supported_model",
    "make_parser",
    "parse_args",
    "train_topics",
]


@dataclass
class ValidationArguments:
    """The validation grids while training: the command builds a
    :class:`~trl_diffusion_sdpo.callbacks.validation.ValidationCallback` from these (a Python user constructs one and
    passes it in ``callbacks=``)."""

    validation_prompts: list[str] | None = option(
        None,
        "Prompts sampled while training (off when unset): at step 0 (the base model) and every --validation_steps "
        "steps a grid of the policy's samples is saved as PNG under output_dir/validation/ and logged to every "
        "tracker in --report_to that takes images (docs/evaluation.md).",
    )
    validation_seeds: list[int] = field(
        default_factory=lambda: [0],
        metadata={"help": "One validation sample per prompt and seed; the same seeds every time."},
    )
    validation_steps: int = option(500, "Validate every this many optimizer steps.")
    validation_num_inference_steps: int = option(25, "Sampling steps of the validation grid.")
    validation_guidance_scale: float | None = option(
        None, "Guidance of the validation grid (diffusers' convention); unset: the model family's own."
    )
    validation_source_images: list[str] | None = option(
        None, "Editing families: one source image file per validation prompt, so the grid shows edits of it."
    )
    validation_scorers: list[str] = field(
        default_factory=list,
        metadata={"help": "Registered scorers (pickscore, clip, ...) whose means are logged as eval/reward/<name>."},
    )

    def validation_callbacks(self, trainer: Any) -> list:
        """The validation callback these options ask for (none without prompts), sampling ``trainer``'s pipeline."""
        if self.validation_prompts is None:
            return []
        # an option chosen at run time: the callback's scorers load transformers' CLIP models, not for a run without it
        from ..callbacks.validation import ValidationCallback

        return [
            ValidationCallback(
                prompts=self.validation_prompts,
                seeds=self.validation_seeds,
                num_inference_steps=self.validation_num_inference_steps,
                guidance_scale=self.validation_guidance_scale,
                every_n_steps=self.validation_steps,
                scorers=self.validation_scorers or None,
                sources=self.validation_source_images,
                trainer=trainer,
            )
        ]


@dataclass
class ProcessArguments:
    """The command's own process (from Python a user sets these with torch directly)."""

    threads: int | None = option(None, THREADS_HELP)

    def apply_to_process(self, training_args: Any) -> None:
        """Set the command's torch threads for a run on the CPU
        (:func:`~trl_diffusion_sdpo.io.cpu_threads.apply_threads`)."""
        apply_threads(self.threads, on_cpu=bool(training_args.use_cpu) or not torch.cuda.is_available())


@dataclass
class OutputArguments:
    """What the command may do to an ``--output_dir`` that holds another run (from Python: ``train(overwrite=True)``).
    The field's name is the one switch every command that writes takes (:data:`~..config.messages.OVERWRITE_OPTION`,
    which a test holds it to)."""

    overwrite: bool = option(
        False,
        "Start a new run in an --output_dir holding another run's files (refused otherwise, before anything loads): "
        "that run's checkpoints are removed when training starts, its weights, training_config.json and model card "
        "replaced when this run saves. Not with --resume_from_checkpoint, which continues it.",
    )


VALIDATION_TOPIC = (
    "Validation images while training",
    "Sample grids from the policy as it trains (a ValidationCallback; docs/evaluation.md).",
    [f.name for f in fields(ValidationArguments)],
)


@dataclass
class DiffusionScriptArguments(ValidationArguments, ProcessArguments, OutputArguments):
    """Options of ``trl-diffusion-sdpo train`` that neither TRL's ``ScriptArguments`` nor ``ModelConfig`` has: how the
    data is read and prepared, and the validation grids."""

    max_train_rows: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    vae_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A replacement VAE folder or Hub id (e.g. an fp16-safe SDXL VAE); by default the pipeline's own "
            "VAE, kept in float32 when its config sets force_upcast."
        },
    )
    vae_subfolder: str | None = field(default=None, metadata={"help": "Subfolder of vae_name_or_path, if any."})
    dataset_format: str = field(
        default="auto",
        metadata={
            "help": "How to read dataset_name: auto (detected), pair_folders, table (a JSONL/JSON/CSV/TSV of image "
            "paths), imagefolder, hpd (HPDv3/HPDv2 annotations), disk (save_to_disk) or hub (datasets.load_dataset). "
            "See docs/data.md.",
            "choices": ["auto", "pair_folders", "table", "imagefolder", "hpd", "disk", "hub"],
        },
    )
    dataset_columns: str = field(
        default="trl",
        metadata={
            "help": "The dataset's columns: trl (prompt, chosen, rejected) or pickapic (caption, jpg_0, jpg_1, "
            "label_0 as in yuvalkirstain/pickapic_v2; label_0 may hold vote_type words as in EditReward-Data), "
            "mapped to TRL's; ties and bad labels are skipped and counted. Other names: --rename_columns.",
            "choices": ["trl", "pickapic"],
        },
    )
    rename_columns: str | None = option(
        None,
        "Rename the dataset's columns to the ones training reads before anything else, as old:new pairs separated "
        "by commas (e.g. instruction:caption,source_img:source_image); docs/data.md lists the names.",
    )
    auto_mask: bool = option(
        False,
        "Derive each pair's loss mask from its two images (editing pairs, whose chosen and rejected images copy the "
        "source outside an edited region): white where any channel differs by more than --auto_mask_threshold, "
        "written to the mask column; then trained as --loss_mask. Both images of a pair must have one size.",
    )
    auto_mask_threshold: float = option(
        0.05,
        "--auto_mask: the smallest difference between the chosen and the rejected image, in any channel, as a "
        "fraction of the full intensity range (0.05 is about 13 of 255), that marks a pixel.",
    )
    mask_dilate: int = option(
        0,
        "Grow every loss mask (given or derived) by this many pixels at the images' size (a square max filter), "
        "so the edited region's border is trained too.",
    )
    ranking_pairs: str = field(
        default="all",
        metadata={
            "help": "How a ranked annotation record (several images per prompt, a rank each) becomes pairs: all "
            "(every two images of different rank) or best_worst (one pair per prompt).",
            "choices": ["all", "best_worst"],
        },
    )
    latent_cache: str | None = field(
        default=None,
        metadata={
            "help": "Train from this folder written by `trl-diffusion-sdpo cache` (read streamed; set max_steps) "
            "instead of encoding dataset_name's images."
        },
    )
    early_stopping_patience: int | None = field(
        default=None,
        metadata={
            "help": "Stop after this many evaluations without improving --metric_for_best_model (default "
            "implicit_acc, the held-out pairs' accuracy; transformers' EarlyStoppingCallback). Evaluates at the "
            "saves' strategy and interval and loads the best checkpoint at the end (--load_best_model_at_end); needs "
            "an eval split (--dataset_test_split), refused without one."
        },
    )
    base_quantization: str = field(
        default="none",
        metadata={
            "help": "Load the frozen base quantized and train LoRA on it (--use_peft): the denoiser and, unless "
            "training reads a latent cache, the text encoders. bnb-nf4 and bnb-int8 (bitsandbytes, a CUDA GPU; also "
            "--load_in_4bit / --load_in_8bit), torchao-int8, torchao-float8, quanto-int8, quanto-int4. See "
            "docs/quantization.md.",
            "choices": list(BASE_QUANTIZATIONS),
        },
    )


ARGUMENT_TYPES = (ScriptArguments, DiffusionSDPOConfig, ModelConfig, DiffusionScriptArguments)
TrainArguments = tuple[ScriptArguments, DiffusionSDPOConfig, ModelConfig, DiffusionScriptArguments]


DESCRIPTION = (
    "Train Diffusion-DPO / Diffusion-SDPO (LoRA or full tuning of an "
    + ", ".join(FAMILY_TITLES.values())
    + " pipeline) from a YAML file of these options (--config) and flags, which override the file. Saves to "
    "--output_dir: LoRA weights (pytorch_lora_weights.safetensors) or a whole pipeline, training_config.json and a "
    "model card (README.md)."
)
EPILOG = (
    "Examples: examples/configs/*.yaml (tiny_cpu, sd15_lora, sdxl_lora, sd3_lora, flux_lora, ...). A relative path in "
    "a --config file is read from the file's folder. Resume with --resume_from_checkpoint true (the newest complete "
    "checkpoint in --output_dir) or a checkpoint folder. Not offered: TRL ModelConfig's options for language models "
    "(--attn_implementation, --lora_target_parameters) are refused, and --lora_task_type is ignored (a denoiser's "
    "LoRA has no task head). --load_in_4bit, --load_in_8bit, --bnb_4bit_quant_type and --use_bnb_nested_quant "
    "quantize the frozen base (docs/quantization.md)."
)
# The LoRA settings of the shipped configs (examples/configs/*.yaml with use_peft), as --help states them: the value
# most files use (alpha: "rank", equal to the file's lora_r) and the files that differ. A test reads every shipped file
# against this table.
SHIPPED_LORA: dict[str, tuple[Any, dict[str, Any]]] = {
    "lora_r": (16, {"sd3_lora.yaml": 32, "tiny_cpu.yaml": 8, "online_tiny_cpu.yaml": 8}),
    "lora_alpha": ("rank", {"sd3_lora.yaml": 64}),
    "lora_dropout": (0.0, {}),
}


def shipped_lora_help(name: str, label: str) -> str:
    """``--<name>``'s help: TRL's default (``ModelConfig``'s), the shipped configs' values (:data:`SHIPPED_LORA`)."""
    common, differing = SHIPPED_LORA[name]
    files: dict[Any, list[str]] = {}
    for file, value in differing.items():
        files.setdefault(value, []).append(file)
    values = [f"use {name.removeprefix('lora_')} = {common}" if common == "rank" else f"use {common}"]
    values += [f"{' and '.join(names)} {value}" for value, names in files.items()]
    trl_default = next(f.default for f in fields(ModelConfig) if f.name == name)
    return f"{label} (TRL's default {trl_default}; the shipped configs {', '.join(values)})."


# TRL's ModelConfig help with the defaults this package uses in their place.
LORA_HELP = {
    "lora_r": shipped_lora_help("lora_r", "LoRA rank"),
    "lora_alpha": shipped_lora_help("lora_alpha", "LoRA alpha"),
    "lora_dropout": shipped_lora_help("lora_dropout", "LoRA dropout"),
    "lora_target_modules": "LoRA target modules. Default (None): the model family's, the attention projections "
    "to_q, to_k, to_v, to_out.0; SD3, FLUX.1 and Qwen-Image add add_q_proj, add_k_proj, add_v_proj, to_add_out, and "
    "FLUX.2 to_qkv_mlp_proj and its single blocks' output projection (docs/quickstart.md).",
}


# The data group's options about reading the rows; the rest of the group is about the images, the timesteps and the
# noising, listed under a topic of their own to keep each topic one screen.
READING_OPTIONS = (
    "rename_columns",
    "auto_mask",
    "auto_mask_threshold",
    "mask_dilate",
    "skip_invalid_rows",
    "cache_latents",
    "latent_cache_dir",
    "offload_frozen_modules",
)


def train_topics() -> list[tuple[str, str, Any]]:
    """``train --help``'s topics, in order: the model, the data, the config's groups, the training loop."""
    groups = {heading.replace("`", ""): names for heading, (_, names) in GROUPS.items()}
    data = groups.pop("Parameters that control the data")
    reading = [name for name in data if name in READING_OPTIONS]
    return [
        MODEL_TOPIC,
        (
            "Data",
            "Where the pairs come from and how they are read (docs/data.md).",
            {**DATA_SOURCE_OPTIONS, **dict.fromkeys(READING_OPTIONS)},
        ),
        ("Images, timesteps and noising", "", [name for name in data if name not in reading]),
        *((heading, "", names) for heading, names in groups.items()),
        VALIDATION_TOPIC,
        TRAINING_TOPIC,
    ]


def make_parser(
    prog: str = "trl-diffusion-sdpo train",
    argument_types: tuple[type, ...] = ARGUMENT_TYPES,
    description: str = DESCRIPTION,
    epilog: str = EPILOG,
    topics: Callable[[], list[tuple[str, str, Any]]] = train_topics,
    *,
    show_all: bool = False,
    first_help: Collection[str] = FIRST_HELP_OPTIONS,
) -> TrlParser:
    """TRL's ``TrlParser`` over ``argument_types`` (:data:`ARGUMENT_TYPES`), with the command's description, help
    corrections and options grouped by ``topics`` (:func:`~.help_topics.group_by_topic`): its help lists the options
    of ``first_help``, or with ``show_all`` every option, as ``--help_all`` does. Prefixes of option names are refused
    (``allow_abbrev`` off): ``--learning_rat`` is an unknown option, not ``--learning_rate``."""
    parser = ConfigFileParser(
        argument_types,
        prog=prog,
        description=description,
        epilog=epilog,
        usage=USAGE,
        allow_abbrev=False,
        formatter_class=help_formatter,
    )
    add_config_argument(parser)
    parser.add_argument(
        "--help_all",
        "--help-all",
        action=_FullHelp,
        full_parser=lambda: make_parser(prog, argument_types, description, epilog, topics, show_all=True),
        help="List every option, transformers' general ones included, and exit.",
    )
    for action in parser._actions:
        name = action.dest
        if name in HIDDEN_OPTIONS:
            action.help = argparse.SUPPRESS
        elif name in LORA_HELP:
            action.help = LORA_HELP[name] + " (default: %(default)s)"
        elif name == "resume_from_checkpoint":
            action.help = (
                "Resume training: true for the newest complete checkpoint in output_dir, or a checkpoint folder."
            )
        # HfArgumentParser copies a True-by-default bool's help onto its --no_X switch, which does the opposite.
        if any(option.startswith("--no_") for option in action.option_strings):
            action.help = f"Set {name} to False (see --{name})."
    group_by_topic(parser, topics(), show_all=show_all, first=first_help)
    return parser


class _FullHelp(argparse.Action):
    """``--help_all``: print the help of ``full_parser()`` (every option) and exit."""

    def __init__(self, option_strings: list[str], dest: str, full_parser: Callable[[], argparse.ArgumentParser], **kw):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kw)
        self.full_parser = full_parser

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        self.full_parser().print_help()
        parser.exit()


def parse_args(argv: Sequence[str] | None = None) -> TrainArguments:
    """``argv`` (``--config file.yaml`` plus flags) as the four argument dataclasses (:func:`parse_or_exit`)."""
    script_args, training_args, model_args, diffusion_args = parse_or_exit(make_parser(), argv)
    training_args.resume_from_checkpoint = resume_argument(training_args.resume_from_checkpoint)
    return script_args, training_args, model_args, diffusion_args


def check_supported(script_args: ScriptArguments, model_args: ModelConfig) -> None:
    """A dataset and a pipeline named, and none of TRL's language-model options set (:mod:`.refusals`, which the
    command line asks before the parser loads)."""
    check_dataset_named(script_args.dataset_name)
    check_supported_model(model_args)


def check_supported_model(model_args: ModelConfig) -> None:
    """A pipeline named, and none of TRL's language-model options set away from TRL's default."""
    check_model_named(model_args, {f.name: f.default for f in fields(ModelConfig)})
