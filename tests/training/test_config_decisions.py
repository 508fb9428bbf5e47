"""What differs between runs is the config's to answer: the defaults table, the data loading, the safeguard the
pathology alarm switches to and the remedies it names are methods of ``DiffusionSDPOConfig`` that a subclass
overrides (the online config does, from ``trl_diffusion_sdpo.online.defaults``). The offline modules (the defaults'
resolution, the machine choices, the alarm's switch and remedies, the resume check) ask the config: a config class
they have never heard of gets its own answers through the trainer, and the online tables reach no offline config."""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.common import fast_config_values, lora_config
from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer
from trl_diffusion_sdpo.callbacks import health
from trl_diffusion_sdpo.config.defaults import DefaultEntry, resolve_defaults
from trl_diffusion_sdpo.config.machine import machine_choices
from trl_diffusion_sdpo.config.pathology import SWITCH_TO, pair_remedies
from trl_diffusion_sdpo.io.resume_check import check_resume_config
from trl_diffusion_sdpo.io.saving import TRAINING_CONFIG_NAME
from trl_diffusion_sdpo.online import defaults as online_defaults
from trl_diffusion_sdpo.online.config import OnlineDiffusionSDPOConfig

PACKAGE = Path(__file__).resolve().parents[2] / "trl_diffusion_sdpo"

# A third kind of run, with evidence of its own: every value differs from both the offline and the online tables.
THIRD_ENTRIES = (
    DefaultEntry("beta", 1234.0, "the third table"),
    DefaultEntry("learning_rate", 3.5e-5, "the third table"),
    DefaultEntry("safeguard_space", "none", "the third table"),
    DefaultEntry("safeguard_mu", 0.7, "the third table"),
)
THIRD_LOADING = {"dataloader_num_workers": 3, "non_blocking": False, "run": "third"}
THIRD_SWITCH = {"safeguard_space": "output", "safeguard_mu": 0.8}
THIRD_REMEDIES = ["a third remedy"]


class ThirdConfig(DiffusionSDPOConfig):
    """Overrides each decision with its own table, as the online config does with its."""

    def defaults_table(self, family: Any = None) -> tuple[DefaultEntry, ...]:
        ours = {entry.field for entry in THIRD_ENTRIES}
        return tuple(e for e in super().defaults_table(family) if e.field not in ours) + THIRD_ENTRIES

    def data_loading_defaults(self, *, cuda: bool, cpus: int, processes: int = 1) -> dict[str, Any]:
        return dict(THIRD_LOADING)

    def pathology_switch(self) -> tuple[dict[str, Any] | None, str]:
        return dict(THIRD_SWITCH), "the third table's evidence"

    def pathology_remedies(self) -> list[str]:
        return list(THIRD_REMEDIES)


def test_a_third_config_class_gets_its_own_decisions_through_the_trainer(make_pipeline, pickapic_dataset, tmp_path):
    # every field the config or the machine resolves left unset
    values = {**fast_config_values(str(tmp_path / "out")), "learning_rate": None, "dataloader_num_workers": None}
    config = ThirdConfig(**values, on_pathology="safeguard")
    assert config.safeguard_space == "none"  # resolved from its table when it was made
    trainer = DiffusionSDPOTrainer(
        make_pipeline(), args=config, train_dataset=pickapic_dataset, peft_config=lora_config()
    )
    # the defaults the trainer resolved for the SD family (whose own beta and rate the third table replaces)
    resolved = {name: value.value for name, value in trainer.resolved_defaults.items()}
    assert resolved == {"learning_rate": 3.5e-5, "beta": 1234.0, "safeguard_space": "none", "safeguard_mu": 0.7}
    assert (trainer.args.beta, trainer.args.learning_rate, trainer.args.safeguard_mu) == (1234.0, 3.5e-5, 0.7)
    # the data loading is the command line's choice for the machine, from the config's own table; the trainer keeps
    # the config's value
    assert trainer.args.dataloader_num_workers == config.dataloader_num_workers == 0 and trainer.machine_choices == {}
    chosen, choices = machine_choices(config, device_type="cpu", terminal=True, cpus=32, processes=1)
    assert chosen.dataloader_num_workers == 3 and choices["dataloader_num_workers"].value == 3
    assert ", third, " in choices["dataloader_num_workers"].source
    # the safeguard the alarm switches to, built when the trainer is, and the remedies it names
    dormant = health.switched_config(trainer.args)
    assert (dormant.safeguard_space, dormant.safeguard_mu) == ("output", 0.8)
    assert trainer.dormant_safeguard is not None
    assert health.switch_target(trainer.args) == THIRD_SWITCH
    assert health.remedies(trainer.args) == THIRD_REMEDIES
    # the resume check resolves an unset beta and mu from the same table: a run that gave the table's values is
    # this run (the offline table's beta would refuse the resume as a changed objective)
    checkpoint = tmp_path / "checkpoint-1"
    checkpoint.mkdir()
    saved = json.loads(config.to_json_string())
    assert saved["beta"] is None and saved["safeguard_mu"] is None
    saved.update(beta=1234.0, safeguard_mu=0.7)
    (checkpoint / TRAINING_CONFIG_NAME).write_text(json.dumps(saved))
    assert check_resume_config(os.fspath(checkpoint), trainer) == []


def test_the_offline_config_keeps_its_answers_and_the_online_ones_come_from_online(tmp_path, monkeypatch):
    offline = DiffusionSDPOConfig(output_dir=str(tmp_path), use_cpu=True)
    online = OnlineDiffusionSDPOConfig(output_dir=str(tmp_path), use_cpu=True)
    # the online config's answers are the online tables
    space = next(e.value for e in online_defaults.ONLINE_DEFAULTS if e.field == "safeguard_space")
    assert online.safeguard_space == space == "none"
    assert online.data_loading_defaults(cuda=True, cpus=32) == online_defaults.ONLINE_DATA_LOADING
    assert online.pathology_switch() == (online_defaults.ONLINE_SWITCH_TO, online_defaults.NO_ONLINE_SWITCH)
    assert online.pathology_remedies() == online_defaults.online_remedies(online)
    # the offline config's answers, with the online module imported
    expected_offline = {
        "space": "output",
        "loading": {"dataloader_num_workers": 4, "non_blocking": True, "run": "offline"},
        "switch": SWITCH_TO,
        "remedies": pair_remedies(offline),
    }

    def answers(config: DiffusionSDPOConfig) -> dict[str, Any]:
        return {
            "space": resolve_defaults(config)["safeguard_space"].value,
            "loading": config.data_loading_defaults(cuda=True, cpus=32),
            "switch": health.switch_target(config),
            "remedies": health.remedies(config),
        }

    assert answers(offline) == expected_offline
    # other online tables: the online config takes them, the offline config never sees them
    monkeypatch.setattr(
        online_defaults, "ONLINE_DEFAULTS", (DefaultEntry("safeguard_space", "update", "another online table"),)
    )
    monkeypatch.setattr(
        online_defaults, "ONLINE_DATA_LOADING", {**online_defaults.ONLINE_DATA_LOADING, "dataloader_num_workers": 7}
    )
    monkeypatch.setattr(online_defaults, "ONLINE_SWITCH_TO", {"safeguard_space": "parameter", "safeguard_mu": 0.6})
    monkeypatch.setattr(online_defaults, "online_remedies", lambda args: ["another online remedy"])
    fresh = OnlineDiffusionSDPOConfig(output_dir=str(tmp_path), use_cpu=True)
    assert fresh.safeguard_space == "update"
    assert answers(fresh) == {
        "space": "update",
        "loading": {"dataloader_num_workers": 7, "non_blocking": False, "run": "online"},
        "switch": {"safeguard_space": "parameter", "safeguard_mu": 0.6},
        "remedies": ["another online remedy"],
    }
    chosen, _ = machine_choices(fresh, device_type="cuda", terminal=True, cpus=32, processes=1)
    assert chosen.dataloader_num_workers == 7
    assert answers(DiffusionSDPOConfig(output_dir=str(tmp_path), use_cpu=True)) == expected_offline


_REGIME_NAMES = {"regime", "defaults_regime", "is_online"}


def _regime_reads(source: str) -> list[tuple[int, str]]:
    """``x.regime``, ``x.defaults_regime``, ``x.is_online`` (loaded) or ``getattr(x, "<one of them>")``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in _REGIME_NAMES and isinstance(node.ctx, ast.Load):
            found.append((node.lineno, node.attr))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "getattr"
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and node.args[1].value in _REGIME_NAMES
        ):
            found.append((node.lineno, node.args[1].value))
    return found


@pytest.mark.parametrize("source", ["a = config.regime", "b = getattr(args, 'defaults_regime')()", "c = x.is_online"])
def test_the_scan_finds_each_form_of_a_regime_read(source):
    assert len(_regime_reads(source)) == 1


def test_no_module_outside_online_reads_a_regime_attribute():
    found = {
        str(path.relative_to(PACKAGE)): reads
        for path in sorted(PACKAGE.rglob("*.py"))
        if (PACKAGE / "online") not in path.parents and (reads := _regime_reads(path.read_text()))
    }
    assert not found, f"ask the config's methods (default_for, pathology_switch, ...) instead: {found}"
