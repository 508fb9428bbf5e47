"""The helps of ``train``, ``online`` and the commands built on their parser: ``--help`` lists the options a first run
sets (help_topics.FIRST_HELP_OPTIONS, the one list of them, and a command's own options), a few screens, and names
``--help_all``, which lists every option by topic; a plain ``train --help`` and ``online --help`` print their stored
text without importing transformers. ``evaluate --help`` names the image families of the family registry.

Rewrite the stored texts after a help changes with ``python -m trl_diffusion_sdpo.cli.stored_options``.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from trl_diffusion_sdpo.cli import cache_options, family_titles, memory_parser, online_options, train_options
from trl_diffusion_sdpo.cli.command_parser import HIDDEN_OPTIONS
from trl_diffusion_sdpo.cli.evaluate_options import add_evaluate_parser
from trl_diffusion_sdpo.cli.help_topics import (
    FIRST_HELP_OPTIONS,
    LANGUAGE_MODEL_OPTIONS,
    stored_help,
    stored_help_path,
)
from trl_diffusion_sdpo.cli.main import main
from trl_diffusion_sdpo.cli.memory_report import EstimateArguments
from trl_diffusion_sdpo.cli.stored_options import help_text
from trl_diffusion_sdpo.config.docs import GROUPS
from trl_diffusion_sdpo.families.registry import registered_families

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ("train", "online")  # the helps printed from their stored text
# each command built on train's parser: its parser, and its own options, which its plain --help lists too
PARSERS = {
    "train": (train_options.make_parser, ()),
    "online": (online_options.make_online_parser, ()),
    "cache": (
        cache_options.make_cache_parser,
        (*(f.name for f in fields(cache_options.CacheArguments)), "latent_cache"),
    ),
    "estimate-memory": (memory_parser.make_estimate_parser, tuple(f.name for f in fields(EstimateArguments))),
}
SHORT_HELP_LINES = 120  # "a few screens"


def parser_of(command: str, show_all: bool = False) -> argparse.ArgumentParser:
    """``command``'s parser, or with ``show_all`` the one its ``--help_all`` prints."""
    parser = PARSERS[command][0]()
    return next(a for a in parser._actions if a.dest == "help_all").full_parser() if show_all else parser


def help_of(command: str, show_all: bool = False) -> str:
    return parser_of(command, show_all).format_help()


def sections(text: str) -> dict[str, str]:
    """The help's sections by title (a line ending in ``:`` at column 0)."""
    found: dict[str, list[str]] = {}
    title = None
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            title = line[:-1]
            found[title] = []
        elif title is not None:
            found[title].append(line)
    return {title: "\n".join(lines) for title, lines in found.items()}


def listed_options(text: str) -> set[str]:
    """The options a help lists, each by the first spelling of its line (``  --name ...``)."""
    return {match for match in re.findall(r"^  (?:-h, )?(--[\w-]+)", text, flags=re.MULTILINE)}


def listable(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each option the parser reads that a help may list (not a language model's, not one hidden everywhere), by
    destination: its first ``--`` spelling."""
    found: dict[str, str] = {}
    for action in parser._actions:
        if not action.option_strings or action.dest in LANGUAGE_MODEL_OPTIONS or action.dest in HIDDEN_OPTIONS:
            continue
        found.setdefault(action.dest, next(o for o in action.option_strings if o.startswith("--")))
    return found


@pytest.mark.parametrize("command", COMMANDS)
def test_the_stored_help_is_the_parsers(command):
    assert stored_help(command) == help_text(command) == parser_of(command).format_help(), (
        f"{stored_help_path(command)} is stale: rewrite it with `python -m trl_diffusion_sdpo.cli.stored_options`"
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_no_option_help_is_mangled_by_argparse_formatting(command):
    """argparse formats each help with ``%``: a bare ``1% above`` prints the option's whole record instead."""
    for text in (help_of(command, show_all=True), help_of(command)):
        assert "'option_strings'" not in text and "<argparse." not in text


@pytest.mark.parametrize("command", COMMANDS)
def test_help_prints_the_stored_text_without_importing_transformers(command):
    code = (
        "import sys\n"
        "from trl_diffusion_sdpo.cli.main import main\n"
        "try:\n"
        f"    main([{command!r}, '--help'])\n"
        "except SystemExit as done:\n"
        "    assert done.code == 0\n"
        "print('transformers loaded:', 'transformers' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.endswith("transformers loaded: False\n")
    assert done.stdout.removesuffix("transformers loaded: False\n") == stored_help(command)


@pytest.mark.parametrize("command", list(PARSERS))
def test_help_all_lists_every_option_by_topic_and_none_of_the_language_models(command):
    """Every option the parser reads is in ``--help_all`` (but the language models' and those refused), under the
    config's headings and the model, data and training topics; transformers' general options only there."""
    parser = parser_of(command)
    full = help_of(command, show_all=True)
    missing = {dest: first for dest, first in listable(parser).items() if first not in listed_options(full)}
    assert not missing, missing
    found = sections(full)
    for heading in GROUPS:
        if heading != "Parameters that control the data":
            assert heading.replace("`", "") in found, heading
    assert {"Model and LoRA", "Data", "Training, saving and logging (transformers' TrainingArguments)"} <= set(found)
    assert "--safeguard_space" in found["Parameters that control the safeguard"]
    assert "--lora_r" in found["Model and LoRA"] and "--resolution" in found["Images, timesteps and noising"]
    assert "huggingface.co/docs/transformers" in found["transformers' general options"]
    short = help_of(command)
    for option in LANGUAGE_MODEL_OPTIONS:
        assert f"--{option} " not in short and f"--{option} " not in full, option
    assert "--ddp_timeout" not in short and "--ddp_timeout" in found["transformers' general options"]


@pytest.mark.parametrize("command", list(PARSERS))
def test_the_plain_help_lists_the_first_runs_options_and_counts_the_rest_for_help_all(command):
    """``--help`` lists what FIRST_HELP_OPTIONS names (and the command's own options), no other, in a few screens;
    the rest it counts, and names ``--help_all`` for them."""
    parser = parser_of(command)
    options = listable(parser)
    own = PARSERS[command][1]
    expected = {options[name] for name in (*FIRST_HELP_OPTIONS, *own, "help", "config", "help_all") if name in options}
    short = help_of(command)
    assert listed_options(short) == expected
    assert len(short.splitlines()) <= SHORT_HELP_LINES, len(short.splitlines())
    more = int(re.search(r"--help_all lists (\d+) more options", " ".join(short.split())).group(1))
    assert more == len(listable(parser)) - len(expected)
    assert "--help_all" in sections(short)["options"]  # the flag itself, listed


@pytest.mark.parametrize("command", COMMANDS)
def test_main_prints_the_plain_help_and_help_all_the_full_one(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0 and capsys.readouterr().out == help_of(command)
    with pytest.raises(SystemExit) as done:
        main([command, "--help_all"])
    assert done.value.code == 0 and capsys.readouterr().out == help_of(command, show_all=True)


def test_the_description_names_every_registered_family():
    assert set(train_options.FAMILY_TITLES) == {family.name for family in registered_families()}
    for title in train_options.FAMILY_TITLES.values():
        assert title in train_options.DESCRIPTION


def _evaluate_help() -> str:
    """``evaluate --help``'s description (the help prints it wrapped, breaking lines at hyphens too)."""
    commands = argparse.ArgumentParser().add_subparsers()
    return add_evaluate_parser(commands).description


def test_evaluate_help_names_the_image_families_the_registry_holds():
    """``evaluate`` samples images: every registered family but the video ones (a family's ``video``), named as the
    train help names them."""
    video = {family.name for family in registered_families() if family.video}
    assert family_titles.VIDEO_FAMILIES == video
    text = _evaluate_help()
    for family in registered_families():
        title = family_titles.FAMILY_TITLES[family.name]
        assert bool(re.search(rf"(?<![\w.-]){re.escape(title)}(?![\w-])", text)) != family.video, family.name


def test_a_family_added_to_the_table_appears_in_the_evaluate_help(monkeypatch):
    """The list is made from the family table when the parser is built, not written out."""
    monkeypatch.setitem(family_titles.FAMILY_TITLES, "new-family", "NewFamily-9")
    assert "NewFamily-9" in _evaluate_help()
    monkeypatch.setattr(family_titles, "VIDEO_FAMILIES", family_titles.VIDEO_FAMILIES | {"new-family"})
    assert "NewFamily-9" not in _evaluate_help()
