"""``trl-diffusion-sdpo online``: the shipped config trains the tiny base on the colour reward, flags override it,
and bad input ends with a usage error naming the option."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from trl_diffusion_sdpo.cli.main import main

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


@pytest.mark.parametrize("name", ["online_flux_kontext_edit", "online_wan"])
def test_the_shipped_editing_and_video_online_configs_parse_for_the_online_command(name):
    """The real-model online examples: FLUX.1 Kontext edits scored by EditReward (an editing scorer: it reads the
    prompts' sources), Wan clips scored by PickScore on video_reward_frames frames each."""
    from trl_diffusion_sdpo.cli.online import parse_args
    from trl_diffusion_sdpo.online import OnlineDiffusionSDPOConfig

    config_path = ROOT / "examples" / "configs" / f"{name}.yaml"
    prompt_args, config, model_args = parse_args(["--config", str(config_path), "--use_cpu", "--bf16", "false"])
    assert isinstance(config, OnlineDiffusionSDPOConfig) and not config.safeguarded and model_args.use_peft
    assert config.num_generations == 4 and config.pair_mode == "best-worst"
    if name == "online_wan":
        assert model_args.model_name_or_path.startswith("Wan-AI/") and config.reward_funcs == ["pickscore"]
        assert config.num_frames == 33 and config.video_reward_frames == 4
    else:
        assert "Kontext" in model_args.model_name_or_path and config.reward_funcs == ["editreward"]
        assert config.num_frames is None and prompt_args.prompts


def test_the_online_command_reads_edits_with_their_sources(tmp_path):
    """An edit set (.jsonl with source_image paths) becomes a prompt dataset with a source_image column; a row with
    several sources makes it source_images for every row."""
    from PIL import Image

    from trl_diffusion_sdpo.cli.online import OnlinePromptArguments, load_prompt_dataset

    for colour in ("red", "blue"):
        Image.new("RGB", (8, 8), colour).save(tmp_path / f"{colour}.png")
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"prompt": "make it green", "source_image": "red.png"}) + "\n")
    data = load_prompt_dataset(OnlinePromptArguments(prompts=str(one)))
    assert data.column_names == ["prompt", "source_image"] and data[0]["source_image"].getpixel((0, 0)) == (255, 0, 0)
    several = tmp_path / "several.jsonl"
    rows = [
        {"prompt": "swap", "source_images": ["red.png", "blue.png"]},
        {"prompt": "make it green", "source_image": "blue.png"},
    ]
    several.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = load_prompt_dataset(OnlinePromptArguments(prompts=str(several)))
    assert data.column_names == ["prompt", "source_images"] and [len(r) for r in data["source_images"]] == [2, 1]


def test_help_lists_the_generation_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["online", "--help_all"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in ("--prompts", "--reward_funcs", "--num_generations", "--pair_mode", "--ref_update_steps"):
        assert option in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--num_generatoins", "4"], "did you mean --num_generations"),
        # the prompts and the pipeline given: the command line asks for them before its libraries load, the rule after
        (
            ["--prompts", "partiprompts", "--model_name_or_path", "trl-diffusion-sdpo:tiny", "--num_generations", "1"],
            "num_generations must be >= 2",
        ),
        (["--model_name_or_path", "trl-diffusion-sdpo:tiny"], "--prompts is required"),
    ],
)
def test_bad_flags_end_with_a_usage_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["online", "--output_dir", "unused", *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, space, mu",
    [
        ([], "none", None),  # the online default: online Diffusion-DPO
        (["--safeguard_mu", "0.5"], "output", 0.5),  # a margin asks for the safeguard
        (["--safeguard_space", "output"], "output", None),
        (["--on_pathology", "escalate"], "output", None),  # escalate raises the safeguard's mu: it needs one
        (["--safeguard_space", "update"], "update", None),
        (["--safeguard_mu", "0.5", "--safeguard_space", "none"], "none", 0.5),
    ],
)
def test_the_online_safeguard_is_off_unless_a_flag_asks_for_it(flags, space, mu):
    """Online, an unset ``safeguard_space`` is ``none``; the offline config's default stays the output space."""
    from trl_diffusion_sdpo import DiffusionSDPOConfig
    from trl_diffusion_sdpo.cli.online import parse_args

    _, config, _ = parse_args(["--config", str(CONFIG), "--output_dir", "unused", *flags])
    assert (config.safeguard_space, config.safeguarded, config.safeguard_mu) == (space, space != "none", mu)
    assert DiffusionSDPOConfig(output_dir="unused", use_cpu=True).safeguard_space == "output"


def test_probe_prompts_are_the_online_probes_and_need_the_probe(tmp_path, monkeypatch, capsys):
    """``--probe_prompts`` gives the held-out probe its prompts (the first ``--probe_pairs`` of them), so none is held
    back from ``--prompts``; without ``--probe_steps`` it is a usage error."""
    from trl_diffusion_sdpo.online.trainer import OnlineDiffusionSDPOTrainer

    monkeypatch.chdir(ROOT)
    probe_file = tmp_path / "probe.txt"
    probe_file.write_text("red square on black\nblue circle on white\ngreen triangle on white\n")
    with pytest.raises(SystemExit) as exit_:
        main(["online", "--config", str(CONFIG), "--output_dir", "unused", "--probe_prompts", str(probe_file)])
    assert exit_.value.code == 2 and "set --probe_steps too" in capsys.readouterr().err

    seen: dict[str, list[str]] = {}
    train = OnlineDiffusionSDPOTrainer.train

    def recording_train(self, *args, **kwargs):
        seen["probe"] = list(self.probe.held["prompt"])
        seen["training"] = list(self.train_dataset["prompt"])
        return train(self, *args, **kwargs)

    monkeypatch.setattr(OnlineDiffusionSDPOTrainer, "train", recording_train)
    out = tmp_path / "online"
    argv = ["online", "--config", str(CONFIG), "--max_steps", "1", "--output_dir", str(out), "--probe_steps", "1",
            "--probe_pairs", "2", "--probe_prompts", str(probe_file)]  # fmt: skip
    assert main(argv) == 0
    assert seen["probe"] == ["red square on black", "blue circle on white"]
    shipped = (ROOT / "examples" / "prompts" / "tiny_shapes.txt").read_text().split("\n")
    assert seen["training"] == [line for line in shipped if line.strip()]  # none held back from --prompts
