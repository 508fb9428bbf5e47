"""``train --help`` and ``online --help``: by topic, one screen each, without the language-model options, printed from
the stored text without importing transformers; ``--help_all`` lists transformers' general options too.

Run this file as a script to rewrite the stored texts after a help changes:
``python tests/training/test_cli_help.py``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trl_diffusion_sdpo.cli import online_options, train_options
from trl_diffusion_sdpo.cli.help_topics import LANGUAGE_MODEL_OPTIONS, stored_help, stored_help_path
from trl_diffusion_sdpo.config.docs import GROUPS
from trl_diffusion_sdpo.families.registry import registered_families

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ("train", "online")


def parser_of(command: str, show_all: bool = False):
    if command == "train":
        return train_options.make_parser(show_all=show_all)
    return train_options.make_parser(
        "trl-diffusion-sdpo online",
        online_options.ARGUMENT_TYPES,
        online_options.DESCRIPTION,
        online_options.EPILOG,
        online_options.online_topics,
        show_all=show_all,
    )


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


@pytest.mark.parametrize("command", COMMANDS)
def test_the_stored_help_is_the_parsers(command):
    assert stored_help(command) == parser_of(command).format_help(), (
        f"{stored_help_path(command)} is stale: rewrite it with `python tests/training/test_cli_help.py`"
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_no_option_help_is_mangled_by_argparse_formatting(command):
    """argparse formats each help with ``%``: a bare ``1% above`` prints the option's whole record instead."""
    text = parser_of(command, show_all=True).format_help()
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


@pytest.mark.parametrize("command", COMMANDS)
def test_help_groups_the_options_by_topic_and_hides_the_language_model_ones(command):
    text = parser_of(command).format_help()
    found = sections(text)
    for heading in GROUPS:
        if heading != "Parameters that control the data":
            assert heading.replace("`", "") in found, heading
    assert {"Model and LoRA", "Data", "Training, saving and logging (transformers' TrainingArguments)"} <= set(found)
    assert "--safeguard_space" in found["Parameters that control the safeguard"]
    assert "--lora_r" in found["Model and LoRA"] and "--resolution" in found["Images, timesteps and noising"]
    assert "--cache_latents" in found["Data"] and "--skip_invalid_rows" in found["Data"]
    if command == "train":
        assert "--dataset_name" in found["Data"]
    else:
        assert (
            "--prompts" in found["Prompts"] and "--num_generations" in found["Parameters that control the generation"]
        )
    full = parser_of(command, show_all=True).format_help()
    for option in LANGUAGE_MODEL_OPTIONS:
        assert f"--{option} " not in text and f"--{option} " not in full, option
    # transformers' general options: named in --help_all only, with a pointer to their docs in both
    assert "--ddp_timeout" not in text and "--ddp_timeout" in full
    assert "more options, listed by --help_all" in text and "--help_all" in text
    assert "huggingface.co/docs/transformers" in found["transformers' general options"]
    assert len(text.splitlines()) < len(full.splitlines())


def test_the_description_names_every_registered_family():
    assert set(train_options.FAMILY_TITLES) == {family.name for family in registered_families()}
    for title in train_options.FAMILY_TITLES.values():
        assert title in train_options.DESCRIPTION


if __name__ == "__main__":  # rewrite the stored texts
    for name in COMMANDS:
        stored_help_path(name).write_text(parser_of(name).format_help())
        print("wrote", stored_help_path(name))
