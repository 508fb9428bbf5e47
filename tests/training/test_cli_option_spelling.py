"""Every command's options have one spelling, TRL's: words joined by underscores (``--output_dir``), whatever the
command; a dashed alias (``--output-dir``) may stand beside it and reaches the same option."""

from __future__ import annotations

import argparse

import pytest

from trl_diffusion_sdpo.cli import cache, export, main, memory_parser, online, reward_server, train


def _subcommand(name: str) -> argparse.ArgumentParser:
    parser = main.build_parser((["pickscore"], ["partiprompts"]))
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return commands.choices[name]


PARSERS = {
    "train": lambda: train.make_parser(show_all=True),
    "online": lambda: train.make_parser(
        "trl-diffusion-sdpo online", online.ARGUMENT_TYPES, online.DESCRIPTION, online.EPILOG, online.online_topics
    ),
    "cache": cache.make_cache_parser,
    "estimate-memory": memory_parser.make_estimate_parser,
    "export": export.build_export_parser,
    "reward-server": reward_server.build_parser,
    "evaluate": lambda: _subcommand("evaluate"),
    "pairs": lambda: _subcommand("pairs"),
    "demo": lambda: _subcommand("demo"),
}


def test_every_command_is_checked():
    """The table above covers every command the top-level parser lists."""
    parser = main.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) == set(PARSERS)


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_every_option_has_an_underscore_spelling(command):
    parser = PARSERS[command]()
    missing = []
    for action in parser._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        for option in longs:
            if "-" in option[2:] and option[:2] + option[2:].replace("-", "_") not in longs:
                missing.append(option)
    assert not missing, f"{command}: options with only a dashed spelling: {missing}"


@pytest.mark.parametrize(
    ("command", "words", "dest", "value"),
    [
        ("reward-server", ["--scorer", "colour", "--max_batch_size", "4"], "max_batch_size", 4),
        ("reward-server", ["--scorer", "colour", "--max-batch-size", "4"], "max_batch_size", 4),
        ("evaluate", ["--base", "b", "--output_dir", "out"], "output_dir", "out"),
        ("evaluate", ["--base", "b", "--output-dir", "out"], "output_dir", "out"),
        ("pairs", ["--base", "b", "--num_images", "3"], "num_images", 3),
        ("demo", ["--no_breaking_regime"], "no_breaking_regime", True),
    ],
)
def test_both_spellings_reach_the_same_option(command, words, dest, value):
    assert getattr(PARSERS[command]().parse_args(words), dest) == value
