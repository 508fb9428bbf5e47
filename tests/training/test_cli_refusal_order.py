"""The early refusals (cli/refusals.py) keep the command's order: a value the config's rules that the stored table
does not decide (the chosen objective's, ``online``'s) refuse, or a reward function's name, is refused before a
missing dataset, an unknown option or a missing prompt file, in the words and exit status of the command's own
parser."""

from __future__ import annotations

import dataclasses

import pytest

from trl_diffusion_sdpo.cli.main import COMMANDS, main

TINY = "trl-diffusion-sdpo:tiny"

# (argv, the start of the error message the command's own parser gives first)
CASES = {
    "objective field before the dataset": (["train", "--beta", "-1", "--use_cpu"], "beta must be positive"),
    "objective field before an unknown option": (
        ["train", "--model_name_or_path", TINY, "--dataset_name", "pairs", "--beta", "0", "--learnin_rate", "1"],
        "beta must be positive",
    ),
    "objective's safeguard rule before the dataset": (
        ["train", "--loss_type", "sft", "--model_name_or_path", TINY],
        "loss_type='sft' trains on the winners only",
    ),
    "online rule before the prompts": (
        ["online", "--model_name_or_path", TINY, "--prompts", "none.txt", "--num_generations", "1"],
        "num_generations must be",
    ),
    "reward name before the prompts": (
        ["online", "--model_name_or_path", TINY, "--prompts", "none.txt", "--reward_funcs", "pickscor"],
        "--reward_funcs 'pickscor' is no registered scorer",
    ),
}


def _run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        status = main(argv)
    except SystemExit as done:
        status = done.code
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("INFO ")]
    return status, lines[-1] if lines else ""


@pytest.mark.parametrize("case", CASES)
def test_the_early_refusal_keeps_the_commands_order(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv, says = CASES[case]
    early = _run(argv, capsys)
    monkeypatch.setitem(COMMANDS, argv[0], dataclasses.replace(COMMANDS[argv[0]], refuse=None))
    own = _run(argv, capsys)
    assert early == own
    assert own[0] == 2 and own[1].startswith(f"trl-diffusion-sdpo {argv[0]}: error: {says}"), own
