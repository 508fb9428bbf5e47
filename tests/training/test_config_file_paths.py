"""A ``--config`` file's relative paths are read from the file's folder, so a config works from any current folder;
a path that exists nowhere is a usage error naming the key, not a traceback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from trl_diffusion_sdpo.cli import online, train

ROOT = Path(__file__).resolve().parents[2]


def usage_error(capsys, parse, argv) -> str:
    with pytest.raises(SystemExit) as info:
        parse(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


def test_the_shipped_online_config_reads_its_prompts_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository root
    prompt_args, _, _ = online.parse_args(["--config", str(ROOT / "examples" / "configs" / "online_tiny_cpu.yaml")])
    assert Path(prompt_args.prompts) == ROOT / "examples" / "prompts" / "tiny_shapes.txt"
    prompts = online.load_prompt_dataset(prompt_args)["prompt"]
    assert prompts and prompts[0] in (ROOT / "examples" / "prompts" / "tiny_shapes.txt").read_text()


def test_relative_paths_are_read_from_the_config_files_folder(tmp_path, monkeypatch):
    (tmp_path / "project" / "data" / "pairs").mkdir(parents=True)
    (tmp_path / "project" / "configs").mkdir()
    config = tmp_path / "project" / "configs" / "run.yaml"
    config.write_text("model_name_or_path: trl-diffusion-sdpo:tiny\ndataset_name: ../data/pairs\noutput_dir: out\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    script_args, training_args, model_args, _ = train.parse_args(["--config", os.path.relpath(config)])
    assert script_args.dataset_name == str(tmp_path / "project" / "data" / "pairs")
    assert model_args.model_name_or_path == "trl-diffusion-sdpo:tiny"  # a name, not a path: as given
    assert training_args.output_dir == "out"  # an output stays relative to the current folder


def test_a_hub_id_is_left_as_it_is(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("dataset_name: yuvalkirstain/pickapic_v2\nmodel_name_or_path: org/model\noutput_dir: out\n")
    script_args, _, model_args, _ = train.parse_args(["--config", str(config)])
    assert script_args.dataset_name == "yuvalkirstain/pickapic_v2" and model_args.model_name_or_path == "org/model"


def test_a_missing_file_in_a_config_is_a_usage_error_naming_the_key(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("model_name_or_path: trl-diffusion-sdpo:tiny\nprompts: prompts/missing.txt\noutput_dir: out\n")
    err = usage_error(capsys, online.parse_args, ["--config", str(config)])
    assert f"prompts: prompts/missing.txt in the --config file {config} does not exist" in err
    assert f"read from the file's folder ({tmp_path})" in err
    assert "Traceback" not in err


def test_a_missing_prompt_file_flag_and_a_missing_config_file_are_usage_errors(tmp_path, capsys):
    err = usage_error(capsys, online.parse_args, ["--prompts", "nowhere.txt", "--output_dir", str(tmp_path)])
    assert "--prompts nowhere.txt does not exist" in err
    err = usage_error(capsys, train.parse_args, ["--config", str(tmp_path / "absent.yaml")])
    assert f"--config {tmp_path / 'absent.yaml'}: no such file" in err
