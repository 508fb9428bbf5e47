"""A command refuses what it can refuse without torch, transformers, diffusers or ``datasets`` before it imports them
(cli/refusals.py, from the stored tables of the real parsers): a misspelt flag or YAML key, a broken or missing YAML
file, a value an option refuses, a config rule, a data or model path that does not exist, an output folder holding
another run; and every command reading argparse words (export, evaluate, pairs) parses them first. The refusal is
the one the command gave before, in the same words and exit status; what the real parser accepts, the early checks
let through."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers.cli_runs import FAST, pair_folders
from trl_diffusion_sdpo.cli import refusals
from trl_diffusion_sdpo.cli.main import COMMANDS, main
from trl_diffusion_sdpo.cli.option_table import STORED_COMMANDS, stored_table
from trl_diffusion_sdpo.cli.stored_options import generate_command
from trl_diffusion_sdpo.families.loading import SHIPPED_MODELS

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "examples" / "configs"
TINY = "trl-diffusion-sdpo:tiny"
HEAVY = ("torch", "transformers", "diffusers", "datasets")


@pytest.fixture
def place(tmp_path) -> dict[str, str]:
    """A folder with what the cases name: pairs, an earlier run's output folder, YAML files broken and misspelt."""
    pairs = pair_folders(tmp_path / "pairs")
    earlier = tmp_path / "earlier"
    (earlier / "checkpoint-2").mkdir(parents=True)
    (earlier / "training_config.json").write_text("{}")
    broken = tmp_path / "broken.yaml"
    broken.write_text(f"model_name_or_path: {TINY}\nlearning_rate: [1e-4\nmax_steps: 3\n")
    typo = tmp_path / "typo.yaml"
    typo.write_text(f"model_name_or_path: {TINY}\nlearnin_rate: 1.0e-4\n")
    return {
        "dir": str(tmp_path),
        "pairs": str(pairs),
        "earlier": str(earlier),
        "broken": str(broken),
        "typo": str(typo),
    }


def _train(*flags: str) -> list[str]:
    return ["train", "--model_name_or_path", TINY, "--dataset_name", "{pairs}", "--output_dir", "{dir}/out", *flags]


# (argv, exit status, what the error line says); {name} is a path of the `place` fixture
CASES = {
    "misspelt flag": (
        _train("--learning_rat", "1e-4"),
        2,
        "unknown option --learning_rat (did you mean --learning_rate?)",
    ),
    "broken YAML": (["train", "--config", "{broken}"], 2, "--config {broken}:3:10: not valid YAML: expected ','"),
    "misspelt YAML key": (
        ["train", "--config", "{typo}"],
        2,
        "unknown key 'learnin_rate' in the --config file (did you mean learning_rate?)",
    ),
    "missing YAML file": (["train", "--config", "{dir}/none.yaml"], 2, "--config {dir}/none.yaml: no such file"),
    "refused choice": (
        _train("--safeguard_space", "nowhere"),
        2,
        "argument --safeguard_space/--safeguard-space: invalid",
    ),
    "refused number": (
        _train("--max_steps", "many"),
        2,
        "argument --max_steps/--max-steps: invalid int value: 'many'",
    ),
    "config rule": (_train("--resolution", "33"), 2, "resolution must be a positive multiple of 8"),
    "no dataset": (["train", "--model_name_or_path", TINY], 2, "--dataset_name is required"),
    "data folder": (
        ["train", "--model_name_or_path", TINY, "--dataset_name", "{dir}/no-pairs", "--output_dir", "{dir}/out"],
        1,
        "dataset_name {dir}/no-pairs: no such file or folder",
    ),
    "model folder": (
        ["online", "--model_name_or_path", "{dir}/no-model", "--prompts", "partiprompts", "--output_dir", "{dir}/o"],
        2,
        "--model_name_or_path {dir}/no-model: no such folder",
    ),
    "earlier run": (_train("--output_dir", "{earlier}"), 2, "{earlier} holds another run's files"),
    "online prompts": (
        ["online", "--model_name_or_path", TINY, "--prompts", "{dir}/none.txt"],
        2,
        "--prompts {dir}/none.txt does not exist",
    ),
    "online flag": (["online", "--num_generatoins", "4"], 2, "did you mean --num_generations?"),
    "cache folder": (
        ["cache", "--model_name_or_path", TINY, "--dataset_name", "{pairs}"],
        2,
        "--latent_cache FOLDER is required",
    ),
    "estimate flag": (
        ["estimate-memory", "--model_name_or_path", TINY, "--lora_rr", "4"],
        2,
        "did you mean --lora_r?",
    ),
    "export flag": (["export", "--lora", "x", "--bse", "y"], 2, "unknown option --bse (did you mean --base?)"),
    "export choice": (
        ["export", "--lora", "x", "--base", "y", "--output", "z", "--format", "kohy"],
        2,
        "argument --format: invalid choice: 'kohy'",
    ),
    "evaluate flag": (["evaluate", "--base", "x", "--scorr", "pickscore"], 2, "did you mean --scorer?"),
    "pairs flag": (["pairs", "--base", "x", "--promts", "p.txt"], 2, "did you mean --prompts?"),
}


def _fill(argv: list[str], place: dict[str, str]) -> list[str]:
    return [word.format(**place) for word in argv]


def _run_fresh(cases: dict[str, list[str]], cwd: str) -> dict[str, dict]:
    """Each case through ``main`` in one fresh interpreter (this one has long imported torch): its exit status, its
    last line on stderr, and which of the heavy libraries were imported once it had ended."""
    code = textwrap.dedent(
        f"""
        import contextlib, io, json, sys
        from trl_diffusion_sdpo.cli.main import main
        found = {{}}
        for name, argv in json.loads(sys.argv[1]).items():
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                try:
                    status = main(argv)
                except SystemExit as done:
                    status = done.code
            lines = [line for line in err.getvalue().splitlines() if line.strip()]
            heavy = [m for m in {HEAVY!r} if m in sys.modules]
            found[name] = {{"status": status, "line": lines[-1] if lines else "", "heavy": heavy}}
        print(json.dumps(found))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(cases)], capture_output=True, text=True, timeout=300, cwd=cwd, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_each_refusal_names_its_cause_before_torch_transformers_diffusers_or_datasets_load(place):
    results = _run_fresh({name: _fill(argv, place) for name, (argv, _, _) in CASES.items()}, place["dir"])
    for name, (_, status, says) in CASES.items():
        result = results[name]
        assert result["status"] == status, (name, result)
        assert says.format(**place) in result["line"], (name, result["line"])
        assert result["line"].startswith(f"trl-diffusion-sdpo {CASES[name][0][0]}: error: "), (name, result["line"])
        assert result["heavy"] == [], (name, result["heavy"])  # none loaded by this case or any before it


@pytest.mark.parametrize("command", STORED_COMMANDS)
def test_the_stored_tables_are_the_real_parsers(command):
    """``help/<command>.json`` equals the table made from the command's real parser now: an option added, removed
    or changed there fails here until the file is regenerated (python -m trl_diffusion_sdpo.cli.stored_options)."""
    stored = stored_table(command)
    fresh = json.loads(json.dumps(generate_command(command)))
    assert [e["dest"] for e in stored["options"]] == [e["dest"] for e in fresh["options"]]
    assert stored == fresh


def _main(argv: list[str], capsys) -> tuple[int, str]:
    try:
        status = main(argv)
    except SystemExit as done:
        status = done.code
    err = capsys.readouterr().err
    return status, err


# The refusals the command itself made before (its real parser, its own checks), compared word for word.
SAME_AS_BEFORE = [
    "misspelt flag",
    "broken YAML",
    "misspelt YAML key",
    "missing YAML file",
    "refused choice",
    "refused number",
    "config rule",
    "no dataset",
    "data folder",
    "model folder",
    "earlier run",
    "online prompts",
    "online flag",
    "cache folder",
    "estimate flag",
]


@pytest.mark.parametrize("case", SAME_AS_BEFORE)
def test_the_early_refusal_is_the_one_the_command_makes_without_it(case, place, capsys, monkeypatch):
    """The same exit status and words as the command's own parser and checks, which run where the early refusal is
    taken away (the usage line included, for a parser's refusal)."""
    monkeypatch.chdir(place["dir"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv, status, _ = CASES[case]
    argv = _fill(argv, place)
    early = _main(argv, capsys)
    command = argv[0]
    monkeypatch.setitem(COMMANDS, command, dataclasses.replace(COMMANDS[command], refuse=None))
    own = _main(argv, capsys)
    assert early[0] == own[0] == status
    early_lines = early[1].splitlines()
    own_lines = [line for line in own[1].splitlines() if not line.startswith("INFO ")]  # the data's progress
    assert early_lines[-1] == own_lines[-1]
    if early_lines[0].startswith("usage: "):
        assert early_lines == own_lines


def _shipped_configs(online: bool) -> list[Path]:
    return [path for path in sorted(CONFIGS.glob("*.yaml")) if path.name.startswith("online_") == online]


@pytest.mark.parametrize("path", _shipped_configs(online=False), ids=lambda p: p.name)
def test_a_shipped_training_config_is_let_through(path, place):
    """What the real parser reads (every shipped config, with a dataset and a new output folder), the early checks do
    not refuse; nor ``cache`` and ``estimate-memory`` on the same file."""
    words = ["--config", str(path), "--dataset_name", place["pairs"], "--output_dir", f"{place['dir']}/new"]
    refusals.refuse_train(words)
    refusals.refuse_cache([*words, "--latent_cache", f"{place['dir']}/cache"])
    refusals.refuse_estimate(["--config", str(path)])


@pytest.mark.parametrize("path", _shipped_configs(online=True), ids=lambda p: p.name)
def test_a_shipped_online_config_is_let_through(path, place):
    refusals.refuse_online(["--config", str(path), "--output_dir", f"{place['dir']}/new"])
    refusals.refuse_estimate(["--config", str(path)])


@pytest.mark.parametrize(
    "flags",
    [
        ["--use_peft", "--no_random_flip", "--lora_target_modules", "to_q", "to_k", "--bf16", "false"],
        ["--safeguard_mu", "auto", "--report_to", "none", "--learning_rate=3e-5", "--resume_from_checkpoint", "true"],
        ["--safeguard_mu", "0.5", "--safeguard_space", "parameter", "--optim", "adamw_torch_8bit", "--fsdp", ""],
        ["--validation_prompts", "a", "b", "--validation_seeds", "0", "1", "--threads", "2", "--overwrite"],
    ],
)
def test_flags_the_real_parser_reads_are_let_through(flags, place):
    from trl_diffusion_sdpo.cli.train_options import parse_args

    words = ["--model_name_or_path", TINY, "--dataset_name", place["pairs"], "--output_dir", f"{place['dir']}/o"]
    parse_args([*words, *flags])  # the real parser takes them
    refusals.refuse_train([*words, *flags])


def test_no_shipped_model_name_reads_as_a_local_path():
    """The early model check asks only about a name that can only be a local path: a shipped model's short name
    (resolved by the loader, which imports torch) never is one, so the check never refuses it."""
    from trl_diffusion_sdpo.data.names import looks_local

    for name in SHIPPED_MODELS:
        assert not looks_local(name), name
        refusals.refuse_online(["--model_name_or_path", name, "--prompts", "partiprompts", "--output_dir", "x"])


def test_train_leaves_a_missing_pipeline_to_the_command_which_reads_the_data_first(place):
    """``train`` reads the data before it looks for the pipeline, so a bad row is named before a pipeline path that
    does not exist: the early checks leave that path to the command."""
    no_model = f"{place['dir']}/no-model"
    refusals.refuse_train(["--model_name_or_path", no_model, "--dataset_name", place["pairs"], "--output_dir", "o"])


def test_a_resumed_run_into_its_own_folder_is_let_through(place):
    refusals.refuse_train(_fill(_train("--output_dir", "{earlier}", "--resume_from_checkpoint", "true"), place)[1:])


def test_fast_flags_are_let_through(place):
    refusals.refuse_train(_fill(_train(*FAST), place)[1:])


def test_the_stored_tables_ship_in_the_wheel():
    """The package data setuptools reads from pyproject.toml holds every stored table: an installed command refuses
    from them too."""
    import fnmatch
    import warnings

    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    from trl_diffusion_sdpo.cli.option_table import stored_table_path

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = apply_configuration(Distribution(), ROOT / "pyproject.toml").package_data
    for command in STORED_COMMANDS:
        path = stored_table_path(command).relative_to(ROOT / "trl_diffusion_sdpo" / "cli")
        assert any(fnmatch.fnmatch(str(path), pattern) for pattern in data["trl_diffusion_sdpo.cli"]), path
