"""The demo's command-line options, shared by ``trl-diffusion-sdpo demo`` and ``python -m trl_diffusion_sdpo.demo``.

:func:`add_demo_arguments` fills an ``argparse`` parser; :func:`~.demo_run.run_from_args` runs what the parsed options
ask for, loaded through the command registry (:data:`~.main.COMMANDS`) after the options are read, so that a
``--help`` loads none of the demo's training code.
"""

from __future__ import annotations

import argparse
import sys

from ..config._lazy import import_target
from ..config.messages import OVERWRITE_FLAG
from ..demo.methods import DEFAULT_GUARDS, DEFAULT_METHODS, GUARDS, METHODS
from .command_parser import CommandParser
from .console import quiet_command_line
from .main import COMMANDS

__all__ = ["add_demo_parser", "build_parser", "command", "main"]

DESCRIPTION = (
    "Train Diffusion-DPO and Diffusion-SDPO's output-space safeguard at the authors' mu (with --full also at two "
    "other mu, and the exact parameter-space safeguard) from the same tiny pretrained text-to-image model (shipped "
    "with the package) on the same preference pairs, over several training seeds, and report the held-out colour "
    "reward and the error deltas with 95% intervals in summary.json and a table; then, in the setting where "
    "Diffusion-DPO breaks (a 10x learning rate), Diffusion-DPO and the default safeguard (with --full each guard) on "
    "one seed, their held-out samples side by side in breaking_regime.png. CPU only, offline."
)


def add_demo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--output_dir",
        "--output-dir",
        default="demo-output",
        help="Where the figures and summary go (default: %(default)s).",
    )
    parser.add_argument(
        OVERWRITE_FLAG,
        action="store_true",
        help="Replace the files an earlier demo (or --pretrain) wrote into OUTPUT_DIR, or write among the other files "
        "it holds (without it, a folder holding anything is refused before anything loads).",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--full",
        action="store_true",
        help=f"The full comparison: every method ({' '.join(METHODS)}) instead of the default's "
        f"{' '.join(DEFAULT_METHODS)}, and every guard in the breaking regime, with the same seeds, pairs, steps and "
        "settings (the default's rows come out the same in both).",
    )
    size.add_argument(
        "--quick",
        action="store_true",
        help="A smoke run of the same code path with every method and guard, a few steps "
        "and two seeds (its numbers mean nothing).",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="Data seed: held-out prompts, preference pairs and evaluation noise (default: %(default)s).",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        metavar="SEED",
        help="Training seeds; every method trains once per seed (default: 0 1 2, or 0 1 with --quick).",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        choices=list(METHODS),
        metavar="METHOD",
        help=f"Methods to compare, in table order (default: {' '.join(DEFAULT_METHODS)}; with --full or --quick "
        f"all of {' '.join(METHODS)}).",
    )
    parser.add_argument(
        "--no_breaking_regime",
        "--no-breaking-regime",
        action="store_true",
        help=f"Skip the breaking regime: Diffusion-DPO and guards ({' '.join(DEFAULT_GUARDS)}; with --full or "
        f"--quick all of {' '.join(GUARDS)}) at the learning rate where Diffusion-DPO's held-out reward falls (lr "
        "2e-4, 50 steps of 2 pairs, one seed), drawn in breaking_regime.png.",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default: %(default)s; on a shared "
        "2-core machine one thread was faster than two). 0 leaves torch's default.",
    )
    parser.add_argument(
        "--pretrain",
        action="store_true",
        help="Instead of the demo: rebuild the base model from "
        "its recipe (minutes), check it against the stated thresholds, compare it with the shipped "
        "weights and save it to OUTPUT_DIR/base. With --quick, a few-step recipe (a smoke test).",
    )
    parser.add_argument(
        "--cache_dir",
        "--cache-dir",
        default=None,
        help="Cache of pretrained bases for recipes other than the "
        "shipped one (default: ${XDG_CACHE_HOME:-~/.cache}/trl-diffusion-sdpo/demo).",
    )
    parser.add_argument("--no_cache", "--no-cache", action="store_true", help="Do not read or write that cache.")
    return parser


def build_parser() -> argparse.ArgumentParser:
    return add_demo_arguments(CommandParser(prog="python -m trl_diffusion_sdpo.demo", description=DESCRIPTION))


def add_demo_parser(commands) -> argparse.ArgumentParser:
    """The ``demo`` subcommand of ``trl-diffusion-sdpo``."""
    demo = commands.add_parser(
        "demo",
        allow_abbrev=False,
        help="CPU demo: Diffusion-DPO and Diffusion-SDPO's safeguards from a tiny shipped model over several seeds, "
        "with 95%% intervals (offline).",
        description=DESCRIPTION,
    )
    return add_demo_arguments(demo)


def main(argv: list[str] | None = None) -> int:
    """The demo as ``argv`` asks, from Python: the caller's libraries are left as they are."""
    args = build_parser().parse_args(argv)  # exits here on --help
    return import_target(COMMANDS["demo"].run)(args)


def command(argv: list[str] | None = None) -> int:
    """``python -m trl_diffusion_sdpo.demo``: :func:`main` in the command line's own process, quieted first as
    ``trl-diffusion-sdpo demo`` is (the demo's report and bars only; nothing for a ``--help``)."""
    words = sys.argv[1:] if argv is None else argv
    helped = bool({"-h", "--help"}.intersection(words))
    quiet_command_line(progress_bars=not helped, own_report=not helped)
    return main(argv)


if __name__ == "__main__":
    sys.exit(command())
