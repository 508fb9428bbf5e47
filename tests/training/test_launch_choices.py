"""A multi-process launch without CUDA: the config never changes a field for the machine. Where accelerate could not
join the processes (each would train alone, or disagree with DeepSpeed on their number) it refuses when made, naming
the flag that fixes it; the command line prints that as its one error line; the docs name the same flags. (A config
that accepts such a launch needs the other processes: the slow distributed tier makes those.)"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from trl_diffusion_sdpo.cli.main import main
from trl_diffusion_sdpo.config import DiffusionSDPOConfig
from trl_diffusion_sdpo.config.fields import cpu_launch_problem

DOCS = Path(__file__).resolve().parents[2] / "docs" / "distributed.md"


@pytest.fixture
def two_cpu_processes(monkeypatch):
    """This process as one of two launched on a machine without CUDA (nothing else of a launch is needed: the config
    refuses before transformers sets up the processes)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("ACCELERATE_USE_CPU", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def launch(**fields) -> SimpleNamespace:
    return SimpleNamespace(**{"deepspeed": None, "ddp_backend": None, "use_cpu": False, **fields})


def test_one_process_keeps_transformers_values(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config = DiffusionSDPOConfig(output_dir=str(tmp_path), report_to="none")
    assert config.use_cpu is False and config.ddp_backend is None
    assert not hasattr(config, "launch_choices")


def test_two_cpu_processes_without_the_cpu_mode_are_refused_naming_the_flag(tmp_path, two_cpu_processes):
    with pytest.raises(ValueError, match=re.escape("Set use_cpu=True (--use_cpu true)")) as raised:
        DiffusionSDPOConfig(output_dir=str(tmp_path), report_to="none")
    assert "2 processes" in str(raised.value) and "no gradient sync" in str(raised.value)


def test_the_cpu_mode_by_field_or_by_accelerate_launch_is_accepted(two_cpu_processes, monkeypatch):
    assert cpu_launch_problem(launch(use_cpu=True)) is None
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # accelerate launch --cpu
    assert cpu_launch_problem(launch()) is None


def test_deepspeed_on_cpu_processes_needs_the_gloo_backend(two_cpu_processes, monkeypatch):
    message = cpu_launch_problem(launch(deepspeed="zero2.json"))
    assert message and "ddp_backend='gloo' (--ddp_backend gloo)" in message
    assert cpu_launch_problem(launch(deepspeed="zero2.json", ddp_backend="gloo")) is None
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # accelerate launch --use_deepspeed
    assert "--ddp_backend gloo" in cpu_launch_problem(launch())
    assert cpu_launch_problem(launch(ddp_backend="gloo")) is None


def test_nothing_is_refused_with_cuda_or_one_process(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu_launch_problem(launch()) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert cpu_launch_problem(launch()) is None


def test_the_command_line_prints_the_refusal_as_its_error_line(two_cpu_processes, tmp_path, capsys):
    argv = ["train", "--model_name_or_path", "trl-diffusion-sdpo:tiny", "--dataset_name", str(tmp_path / "pairs")]
    argv += ["--report_to", "none"]
    with pytest.raises(SystemExit) as exited:  # argparse's own exit, as for any option it refuses
        main([*argv, "--output_dir", str(tmp_path / "out")])
    assert exited.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert not any("Traceback" in line for line in lines)
    assert lines[-1].startswith("trl-diffusion-sdpo train: error: 2 processes were launched"), lines[-1]
    assert "Set use_cpu=True (--use_cpu true)" in lines[-1]


def test_the_docs_name_each_flag_the_refusals_name(two_cpu_processes):
    docs = DOCS.read_text(encoding="utf-8")
    for message in (cpu_launch_problem(launch()), cpu_launch_problem(launch(deepspeed="ds.json"))):
        for flag in re.findall(r"\((--[a-z_]+ [a-z]+)\)", message) + re.findall(r"`([^`]+)`", message):
            assert f"`{flag}`" in docs, flag
