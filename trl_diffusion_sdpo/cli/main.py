"""Command line: ``trl-diffusion-sdpo train --config x.yaml``, ``trl-diffusion-sdpo online --config x.yaml``,
``trl-diffusion-sdpo cache --config x.yaml``, ``trl-diffusion-sdpo estimate-memory --config x.yaml``,
``trl-diffusion-sdpo demo --output-dir DIR``, ``trl-diffusion-sdpo evaluate --base MODEL ...`` and
``trl-diffusion-sdpo export --lora DIR --base MODEL ...``, ``trl-diffusion-sdpo pairs --base MODEL ...``,
``trl-diffusion-sdpo reward-server --scorer NAME`` (also ``python -m trl_diffusion_sdpo ...``)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from .. import evaluation  # a lazy package: its prompt presets are read, and their module imported, for two commands
from ..config._lazy import import_target
from ..config.defaults import safeguard_default_sentence
from ..online.defaults import safeguard_default_sentence as online_safeguard_sentence
from ..rewards.scorers import available_scorers
from ..rewards.scorers.registry import OUTSIDE_SCORERS, register_outside_scorers
from .command_parser import CommandParser
from .console import debug_requested, filter_known_noise, quiet_command_line, run_command
from .help_topics import stored_help
from .sample_options import add_sampling_arguments, scorer_arguments

__all__ = [
    "COMMANDS",
    "OUTSIDE_SCORERS",
    "Command",
    "add_sampling_arguments",
    "build_parser",
    "main",
    "register_outside_scorers",
    "scorer_arguments",
]


#: the words that ask a command for its help, which runs nothing that draws a progress bar
HELP_WORDS = frozenset({"-h", "--help", "--help-all"})


@dataclass(frozen=True)
class Command:
    """A command of ``trl-diffusion-sdpo``: where its parser and its runner live, as ``"package.module:attribute"``
    (imported with :func:`~trl_diffusion_sdpo.config._lazy.import_target` when the command is chosen, as the model
    families, objectives and engines are), so that a command loads its own modules and no other's, and a ``--help``
    loads no runner.

    A command with ``help`` has a parser of its own: ``trl-diffusion-sdpo --help`` lists it with that line, and the
    words after its name go to ``parse`` (which returns the parsed arguments and exits on ``--help``; without one,
    the runner takes the words), then the parsed arguments to ``run``. A command without ``help`` is parsed by the
    command line's own parser: ``parse`` adds it to the subcommands (with the registered scorers and prompt presets
    where ``lists_scorers``), ``run`` takes the parsed namespace. ``run`` returns the exit status.

    ``refuse`` (a command whose parser or runner imports torch or transformers): a function of the words after the
    command's name, asked first, that refuses what the command would refuse before loading anything, in its words,
    with nothing heavy imported (:mod:`.refusals`); a ``--help`` skips it."""

    run: str
    parse: str | None = None
    help: str | None = None
    lists_scorers: bool = False
    refuse: str | None = None


# In the order ``trl-diffusion-sdpo --help`` lists them.
COMMANDS: dict[str, Command] = {
    # TRL's TrlParser takes its arguments (trl_diffusion_sdpo.cli.train_options).
    "train": Command(
        run="trl_diffusion_sdpo.cli.train:run",
        parse="trl_diffusion_sdpo.cli.train_options:parse_args",
        refuse="trl_diffusion_sdpo.cli.refusals:refuse_train",
        help="Train Diffusion-DPO / Diffusion-SDPO from a YAML config and flags (`train --help` lists them). "
        + safeguard_default_sentence().replace("%", "%%"),
    ),
    "online": Command(
        run="trl_diffusion_sdpo.cli.online:run",
        parse="trl_diffusion_sdpo.cli.online_options:parse_args",
        refuse="trl_diffusion_sdpo.cli.refusals:refuse_online",
        help="Train online: the policy samples each prompt several times, reward functions score the samples, and "
        "the best and worst are trained on (`online --help` lists the options). "
        + online_safeguard_sentence().replace("%", "%%"),
    ),
    "demo": Command(
        run="trl_diffusion_sdpo.cli.demo_run:run_from_args", parse="trl_diffusion_sdpo.cli.demo:add_demo_parser"
    ),
    "evaluate": Command(
        run="trl_diffusion_sdpo.cli.evaluate:run_evaluate",
        parse="trl_diffusion_sdpo.cli.evaluate_options:add_evaluate_parser",
        lists_scorers=True,
    ),
    # Its own parser (trl_diffusion_sdpo.io.export_names' formats) takes its arguments.
    "export": Command(
        run="trl_diffusion_sdpo.cli.export:run_export",
        parse="trl_diffusion_sdpo.cli.export_options:parse_args",
        help="Write a trained LoRA for AUTOMATIC1111/Forge, ComfyUI and kohya tools, or merge it into its base "
        "pipeline (--help for every option).",
    ),
    "pairs": Command(
        run="trl_diffusion_sdpo.cli.pairs:run_pairs",
        parse="trl_diffusion_sdpo.cli.pairs_options:add_pairs_parser",
        lists_scorers=True,
    ),
    # Its own parser (the training config's fields) takes its arguments.
    "cache": Command(
        run="trl_diffusion_sdpo.cli.cache:build_cache",
        parse="trl_diffusion_sdpo.cli.cache_options:parse_cache_args",
        refuse="trl_diffusion_sdpo.cli.refusals:refuse_cache",
        help="Encode a preference dataset into a sharded, resumable latent cache, one shard per process under "
        "accelerate launch (--config x.yaml: the training YAML; --help for every option).",
    ),
    "reward-server": Command(
        run="trl_diffusion_sdpo.cli.reward_server:serve",
        parse="trl_diffusion_sdpo.cli.reward_server_options:parse_args",
        help="Serve a registered scorer over HTTP for online training's reward_funcs (--scorer NAME --port 8000; "
        "needs the serve extra).",
    ),
    # The stored option table reads its arguments where it can, else train's parser (trl_diffusion_sdpo.cli.memory).
    "estimate-memory": Command(
        run="trl_diffusion_sdpo.cli.memory:run_estimate_memory",
        refuse="trl_diffusion_sdpo.cli.refusals:refuse_estimate",
        help="Estimate a run's per-process peak memory from the training YAML and flags, the model counted on the "
        "meta device (--engine, --num_processes, --json; --help for every option).",
    ),
}


def build_parser(evaluate_choices: tuple[list[str], list[str]] | None = None) -> argparse.ArgumentParser:
    """The command-line parser. ``evaluate_choices``: the registered scorers and prompt presets that ``evaluate
    --help`` and ``pairs --help`` list (read only when one of those commands runs, see :func:`run`)."""
    parser = CommandParser(
        prog="trl-diffusion-sdpo",
        description="Preference tuning of text-to-image diffusion models with Diffusion-DPO and Diffusion-SDPO.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        if command.help is not None:
            add_forwarded_command(commands, name, command.help)
        elif command.lists_scorers:
            import_target(command.parse)(commands, *(evaluate_choices or ([], [])))
        else:
            import_target(command.parse)(commands)
    return parser


def add_forwarded_command(commands, name: str, help: str) -> None:
    """A subcommand listed in ``--help`` whose arguments another parser takes: :func:`run` hands everything after
    ``name`` to it before this parser runs, so this one adds no ``-h`` of its own (``name --help`` reaches the
    command's parser)."""
    commands.add_parser(name, add_help=False, help=help, allow_abbrev=False)


def main(argv: list[str] | None = None) -> int:
    """Run the command ``argv`` names. ``--debug`` anywhere (or ``TRL_DIFFUSION_SDPO_DEBUG=1``) shows the traceback
    of an error a user can fix, which is otherwise one line (:func:`~trl_diffusion_sdpo.cli.console.run_command`)."""
    argv, debug = debug_requested(list(sys.argv[1:] if argv is None else argv))
    prog = "trl-diffusion-sdpo" + (f" {argv[0]}" if argv and not argv[0].startswith("-") else "")
    return run_command(prog, lambda: run(argv), debug)


def run(argv: list[str]) -> int:
    """:func:`main` without its error handling: the command's entry in :data:`COMMANDS`, looked up and run."""
    if argv[:1] in (["train"], ["online"]) and argv[1:] in (["--help"], ["-h"]):
        # The stored text of the parser's help: building the parser imports transformers' TrainingArguments (seconds).
        text = stored_help(argv[0])
        if text is not None:
            print(text, end="")
            raise SystemExit(0)  # as argparse's --help ends
    # The command line's own process, before a command imports transformers (and, through its quantizers, torchao):
    # the libraries' known noise dropped now, and, once the words are parsed (so that a refusal or a help imports no
    # library), off a terminal their progress bars off. The demo prints its own report and bars: the libraries' are
    # off there too. The only place the package changes another library's settings (with the demo module's
    # ``python -m``).
    filter_known_noise()
    helped = bool(HELP_WORDS.intersection(argv))
    # estimate-memory loads nothing, so it draws no bars: the libraries stay unimported for it, as for a help
    bars = not helped and argv[:1] != ["estimate-memory"]
    command = COMMANDS.get(argv[0]) if argv else None
    if command is not None and command.refuse is not None and not helped:
        import_target(command.refuse)(argv[1:])  # before the parser and the runner import anything heavy
    if command is not None and command.help is not None:  # a parser of its own takes the words after its name
        words = argv[1:]
        arguments = words if command.parse is None else import_target(command.parse)(words)
        quiet_command_line(progress_bars=bars, own_report=False)
        return import_target(command.run)(arguments)
    evaluate_choices = None
    if command is not None and command.lists_scorers:  # the scorers outside the package are found for these only
        register_outside_scorers()
        evaluate_choices = (available_scorers(), list(evaluation.PROMPT_PRESETS))
    args = build_parser(evaluate_choices).parse_args(argv)
    quiet_command_line(progress_bars=bars, own_report=args.command == "demo")
    return import_target(COMMANDS[args.command].run)(args)


if __name__ == "__main__":
    sys.exit(main())
