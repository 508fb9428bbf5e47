"""Command line: ``trl-diffusion-sdpo train --config x.yaml``, ``trl-diffusion-sdpo online --config x.yaml``,
``trl-diffusion-sdpo cache --config x.yaml``, ``trl-diffusion-sdpo estimate-memory --config x.yaml``,
``trl-diffusion-sdpo demo --output-dir DIR``, ``trl-diffusion-sdpo evaluate --base MODEL ...`` and
``trl-diffusion-sdpo export --lora DIR --base MODEL ...``, ``trl-diffusion-sdpo pairs --base MODEL ...``,
``trl-diffusion-sdpo reward-server --scorer NAME`` (also ``python -m trl_diffusion_sdpo ...``)."""

from __future__ import annotations

import argparse
import sys

# The options evaluate and pairs share live in their own module, which cli/pairs.py imports without importing this one.
from ..config.defaults import safeguard_default_sentence
from ..rewards.scorers.registry import OUTSIDE_SCORERS, register_outside_scorers
from .command_parser import CommandParser
from .sample import (
    add_base_argument,
    add_sampling_arguments,
    add_scorer_arg_argument,
    command_sampling_keywords,
    registered_lists,
    sampling_keywords,
    scorer_arguments,
    start_sampling_command,
)

__all__ = [
    "OUTSIDE_SCORERS",
    "add_sampling_arguments",
    "build_parser",
    "main",
    "register_outside_scorers",
    "sampling_keywords",
    "scorer_arguments",
]


#: the words that ask a command for its help, which runs nothing that draws a progress bar
HELP_WORDS = frozenset({"-h", "--help", "--help-all"})


def build_parser(evaluate_choices: tuple[list[str], list[str]] | None = None) -> argparse.ArgumentParser:
    """The command-line parser. ``evaluate_choices``: the registered scorers and prompt presets that ``evaluate
    --help`` lists (read from the evaluation package only when that command runs, see :func:`main`)."""
    parser = CommandParser(
        prog="trl-diffusion-sdpo",
        description="Preference tuning of text-to-image diffusion models with Diffusion-DPO and Diffusion-SDPO.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Its arguments are TRL's TrlParser's (see main and trl_diffusion_sdpo.cli.train).
    add_forwarded_command(
        commands,
        "train",
        "Train Diffusion-DPO / Diffusion-SDPO from a YAML config and flags (`train --help` lists them). "
        + safeguard_default_sentence(online=False).replace("%", "%%"),
    )
    add_forwarded_command(
        commands,
        "online",
        "Train online: the policy samples each prompt several times, reward functions score the samples, and the "
        "best and worst are trained on (`online --help` lists the options). "
        + safeguard_default_sentence(online=True).replace("%", "%%"),
    )
    from .demo import DESCRIPTION, add_demo_arguments

    demo = commands.add_parser(
        "demo",
        allow_abbrev=False,
        help="CPU demo: Diffusion-DPO and Diffusion-SDPO's safeguards from a tiny shipped model over several seeds, "
        "with 95%% intervals (minutes, offline).",
        description=DESCRIPTION,
    )
    add_demo_arguments(demo)
    add_evaluate_parser(commands, *(evaluate_choices or ([], [])))
    # Its own parser (trl_diffusion_sdpo.io.export) takes its arguments.
    add_forwarded_command(
        commands,
        "export",
        "Write a trained LoRA for AUTOMATIC1111/Forge, ComfyUI and kohya tools, or merge it into its base pipeline "
        "(--help for every option).",
    )
    from .pairs import add_pairs_parser

    add_pairs_parser(commands, *(evaluate_choices or ([], [])))
    # Its own parser (the training config's fields) takes its arguments.
    add_forwarded_command(
        commands,
        "cache",
        "Encode a preference dataset into a sharded, resumable latent cache, one shard per process under accelerate "
        "launch (--config x.yaml: the training YAML; --help for every option).",
    )
    # Its own parser (trl_diffusion_sdpo.cli.reward_server) takes its arguments.
    add_forwarded_command(
        commands,
        "reward-server",
        "Serve a registered scorer over HTTP for online training's reward_funcs (--scorer NAME --port 8000; needs "
        "the serve extra).",
    )
    add_forwarded_command(
        commands,
        "estimate-memory",
        "Estimate a run's per-process peak memory from the training YAML and flags, the model counted on the meta "
        "device (--engine, --num_processes, --json; --help for every option).",
    )
    return parser


def add_forwarded_command(commands, name: str, help: str) -> None:
    """A subcommand listed in ``--help`` whose arguments another parser takes: :func:`main` hands everything after
    ``name`` to it before this parser runs, so this one adds no ``-h`` of its own (``name --help`` reaches the
    command's parser)."""
    commands.add_parser(name, add_help=False, help=help, allow_abbrev=False)


def add_evaluate_parser(
    commands, scorers: list[str] | None = None, presets: list[str] | None = None
) -> argparse.ArgumentParser:
    """The ``evaluate`` subcommand: generate, score and compare a base model and its variants. ``scorers`` and
    ``presets`` (the registry's names) are listed in its help."""
    listed, presets_listed = registered_lists(scorers, presets)
    evaluate = commands.add_parser(
        "evaluate",
        allow_abbrev=False,
        help="Generate images for a prompt set from a base model and its variants, score them, compare.",
        description=(
            "Sample every model on the prompt set with the SDPO authors' protocol (Euler, 50 steps, guidance 8.5, "
            "native resolution, seed-0 noise for every prompt; images cached), score them, and write scores.csv, "
            "summary.csv/json (means with bootstrap 95% intervals), win_rates.csv/json, plots/ and grid.png. "
            "Models of every family: SD1.x/2.x and SDXL UNets, SD3/SD3.5 and FLUX.1 transformers (LoRA folders, "
            "full-tuning outputs with unet/ or transformer/, or whole pipelines). Edits: a prompt set with source "
            "images is sampled by the editing pipeline from each source and scored against the instruction (an "
            "editing scorer such as editreward also reads the source)."
        ),
    )
    add_base_argument(evaluate)
    evaluate.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="A variant: LoRA folder/file, a full-tuning output (pipeline folder, or a folder with "
        "unet/ or transformer/), a UNet or transformer folder, Hub id, or .pth UNet state dict "
        "(repeatable).",
    )
    evaluate.add_argument(
        "--prompts",
        default="partiprompts",
        help=f"Preset ({presets_listed}), a .txt file, or a dataset id/folder (default: %(default)s); a .jsonl file "
        "or dataset whose rows carry source_image or source_images is a set of edits, sampled by an editing pipeline "
        "(FLUX.1 Kontext, Qwen-Image-Edit, FLUX.2) with the sources as its image.",
    )
    evaluate.add_argument(
        "--scorer",
        action="append",
        default=None,
        metavar="NAME",
        help=f"Scorer ({listed}repeatable; default: pickscore).",
    )
    add_scorer_arg_argument(
        evaluate,
        "NAME.KEY=VALUE",
        "Argument of a scorer, e.g. pickscore.model=/path (VALUE parsed as JSON if it can be).",
    )
    evaluate.add_argument(
        "--output_dir", "--output-dir", default="evaluation", help="Output folder (default: %(default)s)."
    )
    evaluate.add_argument(
        "--seed", type=int, action="append", default=None, help="Noise seed (repeatable; default 0)."
    )
    evaluate.add_argument(
        "--bootstrap_resamples", "--bootstrap-resamples", type=int, default=1000, help="Bootstrap resamples."
    )
    add_sampling_arguments(evaluate)
    return evaluate


def run_evaluate(args: argparse.Namespace) -> int:
    from ..config.extras import ExtraNotInstalled
    from ..evaluation import evaluate
    from ..rewards.scorers.preflight import ScorerModelUnavailable, ScorerPromptError

    scorers = args.scorer or ["pickscore"]
    start_sampling_command(args)
    try:
        result = evaluate(
            args.base,
            args.model,
            scorers=scorers,
            seeds=args.seed or [0],
            scorer_kwargs=scorer_arguments(args.scorer_arg, scorers),
            n_resamples=args.bootstrap_resamples,
            **command_sampling_keywords(args),
        )
    except (ScorerModelUnavailable, ExtraNotInstalled, ScorerPromptError) as err:  # found before any generation
        print(f"trl-diffusion-sdpo evaluate: error: {err}", file=sys.stderr)
        return 2
    for row in result.summary:
        print(f"{row.model:>16} {row.metric:>12} {row.mean:.4f} [{row.ci_low:.4f}, {row.ci_high:.4f}] ({row.scale})")
    for row in result.win_rates:
        print(f"{row.model} vs {row.opponent} [{row.metric}]: win rate {row.win_rate:.3f} over {row.n}")
    print(f"Results in {args.output_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command ``argv`` names. ``--debug`` anywhere (or ``TRL_DIFFUSION_SDPO_DEBUG=1``) shows the traceback
    of an error a user can fix, which is otherwise one line (:func:`~trl_diffusion_sdpo.cli.console.run_command`)."""
    from .console import debug_requested, run_command

    argv, debug = debug_requested(list(sys.argv[1:] if argv is None else argv))
    prog = "trl-diffusion-sdpo" + (f" {argv[0]}" if argv and not argv[0].startswith("-") else "")
    return run_command(prog, lambda: run(argv), debug)


def run(argv: list[str]) -> int:
    """:func:`main` without its error handling."""
    if argv[:1] in (["train"], ["online"]) and argv[1:] in (["--help"], ["-h"]):
        # The stored text of the parser's help: building the parser imports transformers' TrainingArguments (seconds).
        from .help_topics import stored_help

        text = stored_help(argv[0])
        if text is not None:
            print(text, end="")
            raise SystemExit(0)  # as argparse's --help ends
    from .console import quiet_command_line

    # The command line's own process, before a command imports transformers (and, through its quantizers, torchao):
    # the libraries' known noise dropped and, off a terminal, their progress bars off (a help draws none: the
    # libraries stay unimported for it). The demo prints its own report and bars: the libraries' are off there too.
    # The only place the package changes another library's settings (with the demo module's ``python -m``).
    helped = bool(HELP_WORDS.intersection(argv))
    # estimate-memory loads nothing, so it draws no bars: the libraries stay unimported for it, as for a help
    bars = not helped and argv[:1] != ["estimate-memory"]
    quiet_command_line(progress_bars=bars, own_report=argv[:1] == ["demo"] and not helped)
    if argv[:1] == ["train"]:
        from .train import main as train

        train(argv[1:])
        return 0
    if argv[:1] == ["online"]:
        from .online import main as online

        online(argv[1:])
        return 0
    if argv[:1] == ["cache"]:
        from .cache import run_cache

        return run_cache(argv[1:])
    if argv[:1] == ["reward-server"]:
        from .reward_server import main as serve

        return serve(argv[1:])
    if argv[:1] == ["estimate-memory"]:
        from .memory import run_estimate_memory

        return run_estimate_memory(argv[1:])
    if argv[:1] == ["export"]:
        from .export import build_export_parser, run_export

        return run_export(build_export_parser().parse_args(argv[1:]))
    evaluate_choices = None
    if argv[:1] in (["evaluate"], ["pairs"]):  # the evaluation package is imported only for the commands using it
        from ..evaluation.prompts import PROMPT_PRESETS
        from ..rewards.scorers import available_scorers

        register_outside_scorers()
        evaluate_choices = (available_scorers(), list(PROMPT_PRESETS))
    args = build_parser(evaluate_choices).parse_args(argv)
    if args.command == "demo":
        from .demo import run_from_args

        return run_from_args(args)
    if args.command == "evaluate":
        return run_evaluate(args)
    if args.command == "pairs":
        from .pairs import run_pairs

        return run_pairs(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
