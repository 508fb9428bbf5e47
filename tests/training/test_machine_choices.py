"""The same config is the same run on every machine: the config's defaults and a trainer built from Python do not
depend on the CPU count, on CUDA or on whether stderr is a terminal. What is chosen per machine (data workers,
non-blocking copies, a line per log off a terminal) is the command line's, and its start summary prints it."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image
from transformers import PrinterCallback, ProgressCallback, TrainingArguments

from trl_diffusion_sdpo import DiffusionSDPOConfig
from trl_diffusion_sdpo.cli.train import main as train_main
from trl_diffusion_sdpo.config.defaults import MACHINE_FIELDS
from trl_diffusion_sdpo.config.machine import machine_choices
from trl_diffusion_sdpo.online.config import OnlineDiffusionSDPOConfig
from trl_diffusion_sdpo.testing import build_tiny_sd_pipeline

MACHINES = {
    "laptop": {"cpus": 2, "cuda": False, "terminal": True},
    "gpu node": {"cpus": 64, "cuda": True, "terminal": False},
}


def _pretend(monkeypatch, cpus: int, cuda: bool, terminal: bool) -> None:
    """Every way the package could read the machine answers as ``cpus``, ``cuda`` and ``terminal`` say."""
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    if hasattr(os, "sched_getaffinity"):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: int(cuda))
    monkeypatch.setattr("sys.stderr.isatty", lambda: terminal, raising=False)


def _machine_fields(config) -> dict:
    return {
        "dataloader_num_workers": config.dataloader_num_workers,
        "non_blocking": config.accelerator_config.non_blocking,
        "disable_tqdm": config.disable_tqdm,
        "dataloader_pin_memory": config.dataloader_pin_memory,
    }


@pytest.mark.parametrize("config_class", [DiffusionSDPOConfig, OnlineDiffusionSDPOConfig])
def test_the_configs_defaults_do_not_depend_on_the_machine(config_class, monkeypatch, tmp_path):
    seen = {}
    for name, machine in MACHINES.items():
        with monkeypatch.context() as patched:
            _pretend(patched, **machine)
            config = config_class(output_dir=str(tmp_path), use_cpu=True)
            seen[name] = (_machine_fields(config), config.to_dict())
    assert seen["laptop"] == seen["gpu node"]
    # transformers' own defaults, whatever the machine
    assert seen["laptop"][0] == _machine_fields(TrainingArguments(output_dir=str(tmp_path), use_cpu=True))
    assert seen["laptop"][0]["dataloader_num_workers"] == 0 and seen["laptop"][0]["non_blocking"] is False
    assert set(MACHINE_FIELDS) <= set(seen["laptop"][1])


def test_a_python_trainer_runs_the_config_as_given_off_a_terminal(make_trainer):
    """Under pytest stderr is no terminal: the command line would switch the bar to a line per log; a trainer built
    from Python keeps the config's values (transformers' bar, 0 workers, blocking copies) and chooses nothing."""
    trainer = make_trainer(max_steps=1, disable_tqdm=False, dataloader_num_workers=None)
    assert _machine_fields(trainer.args) == _machine_fields(trainer.args_as_given)
    assert (trainer.args.disable_tqdm, trainer.args.dataloader_num_workers) == (False, 0)
    kinds = [type(c) for c in trainer.callback_handler.callbacks]
    assert ProgressCallback in kinds and PrinterCallback not in kinds
    assert trainer.machine_choices == {}


def _png(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((36, 40, 3), color, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_command_line_chooses_for_the_machine_and_its_start_summary_prints_it(tmp_path: Path, caplog):
    pipe_dir, data_dir = tmp_path / "pipe", tmp_path / "pairs"
    build_tiny_sd_pipeline(seed=0, tokenizer_dir=str(tmp_path / "tok")).save_pretrained(pipe_dir)
    rng = np.random.default_rng(0)
    colors = [tuple(int(c) for c in rng.integers(0, 255, 3)) for _ in range(8)]
    Dataset.from_dict(
        {
            "caption": [f"shape {i}" for i in range(4)],
            "jpg_0": [_png(colors[2 * i]) for i in range(4)],
            "jpg_1": [_png(colors[2 * i + 1]) for i in range(4)],
            "label_0": [float(i % 2) for i in range(4)],
        }
    ).save_to_disk(str(data_dir))
    argv = [
        "--model_name_or_path", str(pipe_dir), "--dataset_name", str(data_dir), "--output_dir", str(tmp_path / "out"),
        "--use_peft", "--lora_r", "4", "--resolution", "32", "--per_device_train_batch_size", "2", "--max_steps", "1",
        "--report_to", "none", "--save_strategy", "no", "--use_cpu", "--bf16", "false",
    ]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="trl_diffusion_sdpo.io.run_summary"):
        trainer = train_main(argv)
    summary = next(r.getMessage() for r in caplog.records if "optimizer steps:" in r.getMessage())
    # the same choice the command line's function makes for this machine, computed here
    expected, _ = machine_choices(trainer.args_as_given, device_type="cpu", terminal=False)
    assert trainer.args.disable_tqdm is True and expected.disable_tqdm is True  # stderr is no terminal under pytest
    assert trainer.args.dataloader_num_workers == expected.dataloader_num_workers == 0
    assert set(trainer.machine_choices) == {"dataloader_num_workers", "non_blocking", "disable_tqdm"}
    assert "dataloader_num_workers=0 (this machine: cpu, offline," in summary
    assert "disable_tqdm=True (this machine: stderr is not a terminal" in summary
