"""Every command the top-level parser lists ends a parse error the same way: its own usage, then one line
``trl-diffusion-sdpo COMMAND: error: ...``, exit status 2, no traceback. A ``--config`` file that is not valid YAML is
named with its line and column; a misspelt option is named with the closest real one. The commands are enumerated
from the parser, so a new command is covered without touching this file."""

from __future__ import annotations

import argparse
import re

import pytest

from trl_diffusion_sdpo.cli.main import build_parser, main

TOP_USAGE = "usage: trl-diffusion-sdpo [-h] COMMAND"


def commands() -> list[str]:
    top = build_parser()
    subcommands = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    return list(subcommands.choices)


def run_cli(capsys, argv: list[str]) -> tuple[int, list[str], str]:
    """``trl-diffusion-sdpo ARGV`` in this process: its exit status, its non-blank stderr lines, its stdout."""
    try:
        code = main(argv)
    except SystemExit as exited:
        code = exited.code
    captured = capsys.readouterr()
    return code, [line for line in captured.err.splitlines() if line.strip()], captured.out


def test_the_commands_are_enumerated_from_the_parser():
    found = commands()
    assert {"train", "online", "cache", "estimate-memory", "demo", "export", "evaluate", "pairs"} <= set(found)


@pytest.mark.parametrize("command", commands())
def test_an_indented_key_in_the_config_is_one_line_naming_file_line_and_column(capsys, tmp_path, command):
    config = tmp_path / "run.yaml"
    lines = ["model_name_or_path: trl-diffusion-sdpo:tiny", "output_dir: out", "  resolution: 32"]
    config.write_text("\n".join(lines) + "\n")
    code, err, _ = run_cli(capsys, [command, "--config", str(config)])
    assert code == 2 and err and "Traceback" not in "\n".join(err), err
    if "unknown option --config" in err[-1]:
        return  # a command that reads no config file says so, as of any unknown option
    # the mapping's colon on the third line is where YAML finds a key inside a value (1-based, as editors count)
    where = f"{config}:3:{lines[2].index(':') + 1}"
    problem = "not valid YAML: mapping values are not allowed here"
    assert err[-1] == f"trl-diffusion-sdpo {command}: error: --config {where}: {problem}", err
    assert not any(line.startswith(TOP_USAGE) for line in err)


def test_every_command_that_takes_a_config_was_seen_reading_it(capsys, tmp_path):
    """The enumeration above is not empty-handed: the commands documented with ``--config`` read it."""
    config = tmp_path / "run.yaml"
    config.write_text("output_dir: out\n  resolution: 32\n")
    reading = []
    for command in commands():
        _, err, _ = run_cli(capsys, [command, "--config", str(config)])
        if "not valid YAML" in err[-1]:
            reading.append(command)
    assert {"train", "online", "cache", "estimate-memory"} <= set(reading)


def test_an_unclosed_quote_names_where_it_opened(capsys, tmp_path):
    config = tmp_path / "run.yaml"
    text = 'output_dir: out\nmodel_name_or_path: "trl-diffusion-sdpo:tiny\nresolution: 32\n'
    config.write_text(text)
    code, err, _ = run_cli(capsys, ["train", "--config", str(config)])
    quote = text.splitlines()[1].index('"') + 1
    assert code == 2 and "Traceback" not in "\n".join(err)
    assert err[-1].startswith(f"trl-diffusion-sdpo train: error: --config {config}:")
    assert err[-1].endswith(f"(while scanning a quoted scalar at 2:{quote})"), err[-1]


def test_a_valid_config_still_parses(tmp_path):
    from trl_diffusion_sdpo.cli.train import parse_args

    config = tmp_path / "run.yaml"
    config.write_text(f"output_dir: {tmp_path / 'out'}\nresolution: 48\n")
    _, training_args, _, _ = parse_args(["--config", str(config)])
    assert training_args.resolution == 48


def options_in_help(capsys, command: str) -> list[str]:
    """The ``--options`` that ``COMMAND --help`` lists, read from its text."""
    code, _, out = run_cli(capsys, [command, "--help"])
    assert code == 0, out
    return sorted(set(re.findall(r"(?<![\w-])--[a-z][a-z0-9]*(?:[_-][a-z0-9]+)*", out)))


def misspelt(option: str) -> str:
    """``option`` with a letter dropped from its middle: no prefix, so argparse could not take it for the option."""
    middle = len(option) // 2
    return option[:middle] + option[middle + 1 :]


@pytest.mark.parametrize("command", commands())
def test_a_misspelt_option_names_the_real_one_with_the_commands_own_usage(capsys, command):
    listed = options_in_help(capsys, command)
    assert listed, f"{command} --help lists no option"
    option = max(listed, key=len)  # the longest: a dropped letter leaves it the closest name
    typo = misspelt(option)
    assert typo not in listed
    code, err, _ = run_cli(capsys, [command, typo, "1"])
    assert code == 2, (command, err)
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith(f"trl-diffusion-sdpo {command}: error: "), err
    assert f"unknown option {typo} (did you mean {option}?)" in err[-1], err[-1]
    assert err[0].startswith(f"usage: trl-diffusion-sdpo {command} "), err[0]  # its own usage, not the top level's
    assert not any(line.startswith(TOP_USAGE) for line in err)


@pytest.mark.parametrize("command", ["export", "evaluate", "reward-server"])
def test_a_misspelt_required_option_is_named_beside_the_missing_one(capsys, command):
    """argparse finds the required option missing first; the misspelling that caused it is named too."""
    code, err, _ = run_cli(capsys, [command])
    assert code == 2
    required = re.search(r"the following arguments are required: (--[a-z_]+)", err[-1]).group(1)
    code, err, _ = run_cli(capsys, [command, misspelt(required), "x"])
    assert code == 2
    assert f"unknown option {misspelt(required)} (did you mean {required}?)" in err[-1], err[-1]
    assert "the following arguments are required" in err[-1]


def test_the_demo_module_names_a_misspelt_option_with_its_own_usage(capsys):
    from trl_diffusion_sdpo.cli.demo import build_parser as demo_parser

    with pytest.raises(SystemExit) as exited:
        demo_parser().parse_args(["--method", "dpo"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exited.value.code == 2
    assert err[0].startswith("usage: python -m trl_diffusion_sdpo.demo ")
    assert err[-1] == "python -m trl_diffusion_sdpo.demo: error: unknown option --method (did you mean --methods?)"


def test_a_known_option_with_a_bad_value_keeps_argparse_message(capsys):
    code, err, _ = run_cli(capsys, ["demo", "--seeds", "one"])
    assert code == 2
    assert err[-1] == "trl-diffusion-sdpo demo: error: argument --seeds: invalid int value: 'one'"


def test_a_known_option_written_with_equals_is_not_taken_for_a_misspelling(capsys):
    code, err, _ = run_cli(capsys, ["export", "--lora=run", "--formt", "kohya"])
    assert code == 2
    prefix = "trl-diffusion-sdpo export: error: unknown option --formt (did you mean --format?); "
    assert err[-1] == prefix + "the following arguments are required: --base, --output", err[-1]


@pytest.mark.parametrize("command", commands())
def test_a_misspelt_command_names_the_real_one(capsys, command):
    typo = misspelt(command)
    assert typo not in commands()
    code, err, _ = run_cli(capsys, [typo])
    assert code == 2, (command, err)
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith("trl-diffusion-sdpo: error: "), err
    assert err[-1].endswith(f"(did you mean {command}?)"), err[-1]
