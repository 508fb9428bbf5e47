"""Every command that writes a folder refuses one holding an earlier run's output before it reads any data or opens
any model file, in one line naming the folder and the one switch that allows it (``--overwrite`` on the command line,
``overwrite=True`` from Python: config/messages.py), and that switch does what it says. ``train`` and ``online``
ask the trainer's own check (io/run_files.py) before loading, so the line is the trainer's; resuming passes it."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
from transformers import TrainerState

from tests.checkpoint_kill_worker import build_trainer
from trl_diffusion_sdpo.cli import demo as demo_cli
from trl_diffusion_sdpo.cli import online as online_cli
from trl_diffusion_sdpo.cli import train as train_cli
from trl_diffusion_sdpo.cli.console import run_command
from trl_diffusion_sdpo.cli.main import main
from trl_diffusion_sdpo.config.messages import OVERWRITE_FLAG, OVERWRITE_OPTION, command_line, overwrite_advice
from trl_diffusion_sdpo.io.checkpoints import EarlierRunError, checkpoint_folders
from trl_diffusion_sdpo.io.run_files import check_new_run_folder, earlier_run_refusal

ROOT = Path(__file__).resolve().parents[2]


class _Loaded(Exception):
    """Raised where a command would read its data or open a model: the refusal let it through."""


def _loading(*args, **kwargs):
    raise _Loaded


@pytest.fixture
def nothing_loads(monkeypatch):
    """Every way ``train`` and ``online`` read data or open a model raises :class:`_Loaded` (not an error the
    command line turns into one line: a test that reaches one fails, or sees it where it expects it)."""
    import datasets
    from diffusers import DiffusionPipeline

    from trl_diffusion_sdpo.data import sharded_cache

    for module, name in [
        (train_cli, "load_train_split"),
        (train_cli, "load_split"),
        (train_cli, "early_stopping_split"),
        (train_cli, "build_pipeline"),
        (online_cli, "build_pipeline"),
        (online_cli, "load_prompt_dataset"),
        (sharded_cache, "load_sharded_latent_cache"),
        (datasets, "load_dataset"),
    ]:
        monkeypatch.setattr(module, name, _loading)
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", classmethod(_loading))


@pytest.fixture
def earlier_run(tmp_path) -> Path:
    """A folder another run left: a checkpoint, the weights and training_config.json."""
    out = tmp_path / "tiny-sdpo"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "pytorch_lora_weights.safetensors").write_bytes(b"weights")
    (out / "training_config.json").write_text("{}")
    return out


def _model(tmp_path: Path) -> str:
    """A pipeline folder whose files cannot be opened as one: a command that opens it fails."""
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "model_index.json").write_text("not json")
    return str(model)


def _train_argv(tmp_path: Path, out: Path) -> list[str]:
    data = tmp_path / "pairs"
    data.mkdir(exist_ok=True)
    return ["train", "--model_name_or_path", _model(tmp_path), "--dataset_name", str(data), "--output_dir", str(out)]


def _one_error_line(capsys, command: str) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines and not any("Traceback" in line for line in lines), lines
    assert lines[-1].startswith(f"trl-diffusion-sdpo {command}: error: "), lines[-1]
    return lines[-1].removeprefix(f"trl-diffusion-sdpo {command}: error: ")


def test_train_into_another_runs_folder_is_refused_before_the_data_or_the_model_loads(
    tmp_path, earlier_run, nothing_loads, capsys
):
    before = sorted(os.listdir(earlier_run))
    assert main(_train_argv(tmp_path, earlier_run)) == 2
    line = _one_error_line(capsys, "train")
    with command_line():  # the trainer's own refusal, worded for the command line
        expected = str(earlier_run_refusal(str(earlier_run), before))
    assert line == expected
    assert line.startswith(f"{earlier_run} holds another run's files (checkpoint-2, pytorch_lora_weights")
    assert f"pass {OVERWRITE_FLAG} to replace it" in line and "--resume_from_checkpoint true" in line
    assert sorted(os.listdir(earlier_run)) == before  # not even the lock was taken


@pytest.mark.parametrize("words", [[OVERWRITE_FLAG], ["--resume_from_checkpoint", "true"]])
def test_train_with_overwrite_or_resuming_goes_on_to_load(tmp_path, earlier_run, nothing_loads, capsys, words):
    with pytest.raises(_Loaded):
        main([*_train_argv(tmp_path, earlier_run), *words])


def test_train_into_a_new_or_unrelated_folder_goes_on_to_load(tmp_path, nothing_loads):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "notes.txt").write_text("mine")  # not a run's: a new run may write beside it
    for out in (tmp_path / "new", other):
        with pytest.raises(_Loaded):
            main(_train_argv(tmp_path, out))


def test_resuming_and_overwriting_together_are_refused_in_one_line(tmp_path, earlier_run, nothing_loads, capsys):
    argv = [*_train_argv(tmp_path, earlier_run), OVERWRITE_FLAG, "--resume_from_checkpoint", "true"]
    assert main(argv) == 2
    line = _one_error_line(capsys, "train")
    assert "--resume_from_checkpoint" in line and OVERWRITE_FLAG in line and "give one of them" in line


def test_online_into_another_runs_folder_is_refused_before_the_model_or_prompts_load(
    tmp_path, earlier_run, nothing_loads, capsys
):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("red square on white\n")
    argv = ["online", "--model_name_or_path", _model(tmp_path), "--prompts", str(prompts), "--reward_funcs", "colour"]
    argv += ["--output_dir", str(earlier_run), "--use_peft", "--use_cpu", "true", "--report_to", "none"]
    assert main(argv) == 2
    line = _one_error_line(capsys, "online")
    assert line.startswith(f"{earlier_run} holds another run's files") and f"pass {OVERWRITE_FLAG}" in line
    with pytest.raises(_Loaded):
        main([*argv, OVERWRITE_FLAG])


def test_the_demo_refuses_a_folder_holding_anything_before_the_base_loads_and_writes_with_overwrite(
    tmp_path, monkeypatch, capsys
):
    from trl_diffusion_sdpo.demo import run as run_module

    monkeypatch.setattr(run_module, "load_base", _loading)
    out = tmp_path / "demo-output"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["--quick", "--output-dir", str(out)]
    assert run_command("trl-diffusion-sdpo demo", lambda: demo_cli.main(argv)) == 2
    line = _one_error_line(capsys, "demo")
    assert line.startswith(f"{out} holds notes.txt, which the demo would replace.")
    assert f"Pass {OVERWRITE_FLAG} to write among them" in line
    with pytest.raises(_Loaded):
        run_command("trl-diffusion-sdpo demo", lambda: demo_cli.main([*argv, OVERWRITE_FLAG]))
    assert (out / "notes.txt").read_text() == "mine"


def test_a_python_run_with_overwrite_replaces_the_earlier_runs_checkpoints_and_weights(tmp_path):
    """From Python the refusal names ``train(overwrite=True)``; with it the earlier run's checkpoints are gone
    before the new run writes its own (a resume then finds only the new run's), and its weights are replaced."""
    out = str(tmp_path / "out")
    first = build_trainer(out, str(tmp_path / "tok"), max_steps=3)
    first.train()
    first.save_model(out)
    earlier_weights = Path(out, "pytorch_lora_weights.safetensors").read_bytes()
    assert [os.path.basename(f) for f in checkpoint_folders(out)] == ["checkpoint-3", "checkpoint-2"]

    second = build_trainer(out, str(tmp_path / "tok"), max_steps=1, learning_rate=5e-3)
    with pytest.raises(EarlierRunError, match=r"pass train\(overwrite=True\) to replace it"):
        second.train()
    with pytest.raises(ValueError, match=r"give one of them"):
        second.train(resume_from_checkpoint=True, overwrite=True)
    (Path(out) / "unet").mkdir()  # a pipeline's weights, which this LoRA run does not replace: kept
    (Path(out) / "unet" / "config.json").write_text("{}")
    second.train(overwrite=True)
    second.save_model(out)
    assert [os.path.basename(f) for f in checkpoint_folders(out)] == ["checkpoint-1"]
    assert (Path(out) / "unet" / "config.json").read_text() == "{}"
    state = json.loads(Path(out, "checkpoint-1", "trainer_state.json").read_text())
    assert state["max_steps"] == 1 and state["global_step"] == 1  # the new run's, not the earlier one's
    assert Path(out, "pytorch_lora_weights.safetensors").read_bytes() != earlier_weights
    assert check_new_run_folder(out, resumed=True) == []  # resuming into it needs no switch


def test_train_with_overwrite_trains_over_the_earlier_run_and_leaves_other_files(tmp_path, earlier_run, capsys):
    """The command line's switch reaches the trainer: the run trains and saves where the earlier one was, its
    checkpoint removed, its weights replaced; a file that is no run's stays."""
    from tests.helpers.cli_runs import FAST, pair_folders

    (earlier_run / "notes.txt").write_text("mine")
    data = pair_folders(tmp_path / "pairs")
    argv = ["train", "--model_name_or_path", "trl-diffusion-sdpo:tiny", "--dataset_name", str(data)]
    argv += ["--output_dir", str(earlier_run), "--save_strategy", "no", *FAST]
    assert main(argv) == 2  # refused without it
    capsys.readouterr()
    assert main([*argv, OVERWRITE_FLAG]) == 0
    assert not (earlier_run / "checkpoint-2").exists() and (earlier_run / "notes.txt").read_text() == "mine"
    assert (earlier_run / "pytorch_lora_weights.safetensors").stat().st_size > 1000  # this run's adapters
    assert json.loads((earlier_run / "training_config.json").read_text())["max_steps"] == 1


def test_cache_with_overwrite_writes_the_cache_among_other_files(tmp_path, capsys):
    """``cache``'s switch is train's field: it reaches the early refusal and the cache's build alike."""
    from tests.helpers.cli_runs import pair_folders
    from trl_diffusion_sdpo.data.sharded_cache import load_sharded_latent_cache

    folder = tmp_path / "latents"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    argv = ["cache", "--model_name_or_path", "trl-diffusion-sdpo:tiny", "--dataset_name", str(pair_folders(tmp_path))]
    argv += ["--output_dir", str(tmp_path / "run"), "--latent_cache", str(folder), "--resolution", "32", "--use_cpu"]
    assert main(argv) == 2
    assert f"{folder} holds notes.txt" in _one_error_line(capsys, "cache")
    assert main([*argv, OVERWRITE_FLAG]) == 0
    assert load_sharded_latent_cache(str(folder)).manifest["num_pairs"] == 4
    assert (folder / "notes.txt").read_text() == "mine"


def test_online_hands_the_switch_to_the_trainer(tmp_path, earlier_run, monkeypatch):
    """``online --overwrite`` reaches ``train(overwrite=True)`` (the model, prompts and trainer replaced by
    recorders: what the trainer does with it is tested above)."""
    seen = []

    class Trainer:
        def __init__(self, pipeline, model, args, *rest, **kwargs):
            self.args = args
            self.state = TrainerState()  # read for the exit status: an empty history, a run that trained

        def create_model_card(self, **kwargs):
            pass

        def add_callback(self, callback):
            pass

        def train(self, **kwargs):
            seen.append(kwargs)

        def save_model(self, output_dir):
            pass

    monkeypatch.setattr(online_cli, "build_pipeline", lambda *args: object())
    monkeypatch.setattr(online_cli, "peft_config_for", lambda *args: None)
    monkeypatch.setattr(online_cli, "load_prompt_dataset", lambda *args: None)
    monkeypatch.setattr(online_cli, "OnlineDiffusionSDPOTrainer", Trainer)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("red square on white\n")
    argv = ["online", "--model_name_or_path", "trl-diffusion-sdpo:tiny", "--prompts", str(prompts)]
    argv += ["--reward_funcs", "colour", "--output_dir", str(earlier_run), "--use_cpu", "true", "--report_to", "none"]
    assert main([*argv, OVERWRITE_FLAG]) == 0
    assert seen == [{"resume_from_checkpoint": None, "overwrite": True}]


# ------------------------------------------------------------------------------------------ one switch, one spelling


def test_every_command_that_writes_offers_the_one_switch():
    """The flag every writing command parses is the home's, and no command offers another spelling of it."""
    import argparse

    from trl_diffusion_sdpo.cli.cache import make_cache_parser
    from trl_diffusion_sdpo.cli.export import build_export_parser
    from trl_diffusion_sdpo.cli.main import build_parser

    assert OVERWRITE_FLAG == f"--{OVERWRITE_OPTION}"
    assert {f.name for f in dataclasses.fields(train_cli.OutputArguments)} == {OVERWRITE_OPTION}
    parsers: dict[str, argparse.ArgumentParser] = {
        "train": train_cli.make_parser(),
        "online": train_cli.make_parser(
            "online", online_cli.ARGUMENT_TYPES, online_cli.DESCRIPTION, "", online_cli.online_topics
        ),
        "cache": make_cache_parser(),
        "export": build_export_parser(),
        "demo": demo_cli.build_parser(),
    }
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parsers |= {name: commands.choices[name] for name in ("evaluate", "pairs")}
    for name, parser in parsers.items():
        options = {option for action in parser._actions for option in action.option_strings}
        assert OVERWRITE_FLAG in options, name
        assert not {o for o in options if "overwrite" in o} - {OVERWRITE_FLAG, OVERWRITE_FLAG.replace("_", "-")}, name


def test_the_docs_and_the_messages_name_the_switch_as_the_home_spells_it():
    """docs/reliability.md names the flag and the Python keyword as the home words them, and quotes the refusal as
    the trainer writes it; transformers' removed ``overwrite_output_dir`` is named nowhere."""
    text = (ROOT / "docs" / "reliability.md").read_text()
    with command_line():
        flag = overwrite_advice()
        refusal = str(earlier_run_refusal("tiny-sdpo", ["checkpoint-2", "training_config.json"]))
    assert f"`{flag}`" in text and f"`{overwrite_advice('train')}`" in text
    assert " ".join(refusal.split()) in " ".join(text.split())
    for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "trl_diffusion_sdpo").rglob("*.py")]:
        assert "overwrite_output_dir" not in path.read_text(), path
    assert "overwrite_output_dir" not in (ROOT / "trl_diffusion_sdpo" / "cli" / "help" / "train.txt").read_text()


def test_no_module_spells_the_switch_but_its_home():
    """Every flag and every Python advice of the switch comes from config/messages.py: no other module writes it."""
    spellings = [f"{quote}{word}{quote}" for word in (OVERWRITE_FLAG, f"{OVERWRITE_OPTION}=True") for quote in "\"'"]
    home = ROOT / "trl_diffusion_sdpo" / "config" / "messages.py"
    for path in (ROOT / "trl_diffusion_sdpo").rglob("*.py"):
        if path != home:
            text = path.read_text()
            assert not [s for s in spellings if s in text], path
