"""What the commands say agrees with what the user typed and with what sits beside it: a misspelt scorer gets the
closest registered one (as a misspelt flag does), advice names flags on the command line and keyword arguments from
Python, ``--help`` states the shipped configs' LoRA values, a model card names a local base."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from datasets import Dataset

from trl_diffusion_sdpo.cli import parsing, train
from trl_diffusion_sdpo.cli.main import main
from trl_diffusion_sdpo.config import messages
from trl_diffusion_sdpo.config.messages import command_line
from trl_diffusion_sdpo.data.pickapic import pickapic_to_trl
from trl_diffusion_sdpo.families.loading import SHIPPED_MODELS
from trl_diffusion_sdpo.io.hub import build_model_card
from trl_diffusion_sdpo.rewards.functions import RewardFunctions, check_reward_names

ROOT = Path(__file__).resolve().parents[2]
ONLINE_TINY = ROOT / "examples" / "configs" / "online_tiny_cpu.yaml"


def _last_error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert "Traceback" not in "\n".join(lines)
    return lines[-1]


# ----------------------------------------------------------------------------------------- did you mean


def test_flags_and_scorer_names_share_one_suggestion():
    assert parsing.did_you_mean is messages.did_you_mean
    assert messages.did_you_mean("color", ["clip", "colour", "pickscore"], "") == " (did you mean colour?)"
    assert messages.did_you_mean("zzz", ["clip", "colour"]) == ""


def test_a_misspelt_reward_function_gets_the_closest_scorer_before_any_model_loads(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"^reward_funcs 'color' is no registered scorer \(did you mean colour\?\)"):
        RewardFunctions(["color"])
    with command_line(), pytest.raises(ValueError, match=r"^--reward_funcs 'color' is no registered scorer \(did"):
        check_reward_names(["color"])
    check_reward_names(["colour", "http://127.0.0.1:9/v1/score", print])  # a scorer, a server and a callable
    with pytest.raises(SystemExit) as exited:  # a usage error, as argparse ends a bad flag
        main(["online", "--config", str(ONLINE_TINY), "--reward_funcs", "color", "--output_dir", str(tmp_path)])
    line = _last_error(capsys)
    assert exited.value.code == 2 and "--reward_funcs 'color' is no registered scorer (did you mean colour?)" in line


def test_a_misspelt_scorer_gets_the_closest_one_in_evaluate_and_reward_server(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("red square on white\n")
    code = main(["evaluate", "--base", "trl-diffusion-sdpo:tiny", "--prompts", str(prompts), "--scorer", "colur"])
    assert code == 2 and "--scorer 'colur' is no registered scorer (did you mean colour?)" in _last_error(capsys)
    with pytest.raises(SystemExit, match=r"--scorer 'color' is no registered scorer \(did you mean colour\?\)"):
        main(["reward-server", "--scorer", "color"])


# ------------------------------------------------------------------------------------- flags or keywords


def test_data_advice_names_the_flag_on_the_command_line_and_the_keyword_from_python():
    trl_rows = Dataset.from_dict({"prompt": ["a"], "chosen": ["x.png"], "rejected": ["y.png"]})
    with pytest.raises(ValueError, match=r"\(rename_columns\).* rejected with dataset_columns='trl'$"):
        pickapic_to_trl(trl_rows)
    with command_line(), pytest.raises(ValueError, match=r"\(--rename_columns\).* with --dataset_columns trl$"):
        pickapic_to_trl(trl_rows)


# ----------------------------------------------------------------------------------- texts and the files


def _shipped_lora_configs() -> dict[str, dict]:
    configs = {}
    for path in sorted((ROOT / "examples" / "configs").glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        if config.get("use_peft"):
            configs[path.name] = config
    return configs


@pytest.mark.parametrize("name", sorted(train.SHIPPED_LORA))
def test_help_states_the_shipped_configs_lora_values(name):
    """Every shipped LoRA config's value is the one --help states for it: the common value, or its file's."""
    common, differing = train.SHIPPED_LORA[name]
    configs = _shipped_lora_configs()
    assert set(differing) <= set(configs), "the help names a file that is not a shipped LoRA config"
    for file, config in configs.items():
        stated = differing.get(file, common)
        value = config[name]
        assert value == (config["lora_r"] if stated == "rank" else stated), f"{file}: {name}={value}, help: {stated}"
    help_text = next(a.help for a in train.make_parser()._actions if a.dest == name)
    for file, value in differing.items():
        assert file in help_text and str(value) in help_text


def test_the_model_card_names_a_local_base_and_loads_it_in_the_usage(tmp_path):
    common = dict(is_lora=True, method="Diffusion-DPO", hyperparameters={}, tags=[], model_family="stable-diffusion")
    card = str(build_model_card(base_model=str(tmp_path), model_name="m", **common))
    assert "<the base pipeline>" not in card
    assert f"fine-tuned from the local pipeline `{tmp_path}`" in card
    assert f'DiffusionPipeline.from_pretrained("{tmp_path}")' in card
    shipped = str(SHIPPED_MODELS["trl-diffusion-sdpo:tiny"])
    card = str(build_model_card(base_model=shipped, model_name="m", **common))
    assert f"`{shipped}` (the shipped base `trl-diffusion-sdpo:tiny`)" in card
