"""``trl-diffusion-sdpo online``: the shipped config trains the tiny base on the colour reward, flags override it,
and bad input ends with a usage error naming the option."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from trl_diffusion_sdpo.cli import main

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "examples" / "configs" / "online_tiny_cpu.yaml"


def test_the_shipped_config_trains_the_tiny_base_online_and_saves_a_card_naming_the_reward(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the config names its prompt file relative to the repository, as the README runs it
    out = tmp_path / "online"
    assert main(["online", "--config", str(CONFIG), "--max_steps", "2", "--output_dir", str(out)]) == 0
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    assert weights and all(key.startswith("unet.") for key in weights)
    saved = json.loads((out / "training_config.json").read_text())
    assert saved["reward_funcs"] == ["colour"] and saved["num_generations"] == 4 and saved["max_steps"] == 2
    card = (out / "README.md").read_text()
    assert "| `reward_funcs` | `colour` |" in card and "OnlineDiffusionSDPOTrainer" in card


def test_help_lists_the_generation_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["online", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in ("--prompts", "--reward_funcs", "--num_generations", "--pair_mode", "--ref_update_steps"):
        assert option in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--num_generatoins", "4"], "did you mean --num_generations"),
        (["--num_generations", "1"], "num_generations must be >= 2"),
        (["--model_name_or_path", "trl-diffusion-sdpo:tiny"], "--prompts is required"),
    ],
)
def test_bad_flags_end_with_a_usage_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["online", "--output_dir", "unused", *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
