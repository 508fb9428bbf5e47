"""The train command parses the shipped YAML configs and trains end to end on local folders (no Hub access); the
example scripts, in TRL's shape, train and save LoRA adapters that diffusers loads."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from datasets import Dataset
from diffusers import DiffusionPipeline
from PIL import Image
from safetensors.torch import load_file
from trl import ModelConfig, ScriptArguments, get_peft_config

from trl_diffusion_sdpo import DiffusionSDPOConfig
from trl_diffusion_sdpo.cli.main import main as cli_main
from trl_diffusion_sdpo.cli.train import main as train_main
from trl_diffusion_sdpo.cli.train import parse_args
from trl_diffusion_sdpo.io.checkpoints import file_sha256
from trl_diffusion_sdpo.testing import build_tiny_sd_pipeline, build_tiny_sdxl_pipeline

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

import train_sd15  # noqa: E402
import train_sdxl  # noqa: E402


def _png(color: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), color, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _save_pairs(data_dir: Path) -> str:
    rng = np.random.default_rng(0)
    rows = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": []}
    for i in range(6):
        rows["caption"].append(f"shape {i}")
        rows["jpg_0"].append(_png(tuple(int(c) for c in rng.integers(0, 255, 3)), (40, 36)))
        rows["jpg_1"].append(_png(tuple(int(c) for c in rng.integers(0, 255, 3)), (36, 48)))
        rows["label_0"].append(float(i % 2))
    Dataset.from_dict(rows).save_to_disk(str(data_dir))
    return str(data_dir)


@pytest.fixture
def local_pipeline_and_data(tmp_path: Path) -> tuple[str, str]:
    pipe_dir = tmp_path / "pipe"
    build_tiny_sd_pipeline(seed=0, tokenizer_dir=str(tmp_path / "tok")).save_pretrained(pipe_dir)
    return str(pipe_dir), _save_pairs(tmp_path / "pairs")


# The real-model recipes; tiny_cpu.yaml (the shipped tiny base) has its own test, tests/docs/test_tiny_cpu_config.py,
# and the online command's (online_*.yaml) tests/training/test_online_cli.py.
CONFIGS = sorted(
    p for p in (EXAMPLES / "configs").glob("*.yaml") if p.stem != "tiny_cpu" and not p.stem.startswith("online")
)


@pytest.mark.parametrize("config_path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_parses_for_the_train_command(config_path: Path) -> None:
    script_args, config, model_args, diffusion_args = parse_args(
        ["--config", str(config_path), "--output_dir", "/tmp/unused", "--beta", "2500", "--use_cpu", "--bf16", "false"]
    )
    assert isinstance(script_args, ScriptArguments) and isinstance(model_args, ModelConfig)
    assert isinstance(config, DiffusionSDPOConfig) and config.beta == 2500  # flags override the YAML file
    # family-specific: (mu, streamed, LoRA r, LoRA alpha) as each config's comments explain
    mu, streamed, rank, alpha = {
        "sd15": (0.9, True, 16, 16),
        "sdxl": (0.6, True, 16, 16),
        "sd3_lora": (0.5, True, 32, 64),
        "sd3_full": (0.5, True, None, None),
        "flux_lora": (0.5, True, 16, 16),
        "flux_kontext_lora": (0.5, True, 16, 16),
        "qwen_image_lora": (0.5, True, 16, 16),
        "qwen_image_edit": (0.5, True, 16, 16),
        "qwen_image21_lora": (0.5, True, 16, 16),
        "z_image_lora": (0.5, True, 16, 16),
        "flux2_lora": (0.5, True, 16, 16),
        "flux2_klein_lora": (0.5, True, 16, 16),
        "flux2_klein_edit": (0.5, True, 16, 16),
        "wan": (0.5, False, 16, 16),
        "hunyuan_video15": (0.5, False, 16, 16),
    }[
        next(
            k
            for k in (
                "sd15",
                "sdxl",
                "sd3_lora",
                "sd3_full",
                "flux_lora",
                "flux_kontext_lora",
                "qwen_image_lora",
                "qwen_image_edit",
                "qwen_image21_lora",
                "z_image_lora",
                "flux2_lora",
                "flux2_klein_lora",
                "flux2_klein_edit",
                "wan",
                "hunyuan_video15",
            )  # fmt: skip
            if config_path.stem.startswith(k)
        )
    ]
    assert config.safeguarded and config.safeguard_mu == mu
    assert script_args.dataset_streaming is streamed
    editing = "kontext" in config_path.stem or "edit" in config_path.stem
    if editing:  # editing models train on EditReward-Data's votes, mapped to TRL's columns, with its source column
        renames = diffusion_args.rename_columns.split(",")
        assert script_args.dataset_name == "TIGER-Lab/EditReward-Data" and "source_img:source_image" in renames
        assert diffusion_args.dataset_columns == "pickapic" and "vote_type:label_0" in renames
    elif config.num_frames is None:  # image models train on Pick-a-Pic; wan_lora names a placeholder video dataset
        assert script_args.dataset_name == "yuvalkirstain/pickapic_v2" and diffusion_args.dataset_columns == "pickapic"
    # Each config sets its rate, so a change of the learning_rate or scale_lr default never changes the rate it trains
    # at; only the authors' full-tuning recipes scale it by the batch.
    assert "learning_rate" in yaml.safe_load(config_path.read_text())
    assert config.scale_lr is (config_path.stem in ("sd15_full", "sdxl_full"))
    assert model_args.use_peft is config_path.stem.endswith("lora")
    peft_config = get_peft_config(model_args)
    if model_args.use_peft:
        assert (peft_config.r, peft_config.lora_alpha, peft_config.lora_dropout) == (rank, alpha, 0.0)
    else:
        assert peft_config is None
    assert diffusion_args.max_train_rows is None


@pytest.mark.parametrize("config_path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_use_no_deprecated_training_argument(config_path: Path) -> None:
    """transformers warns (FutureWarning, hidden by the suite's filter) for a deprecated TrainingArguments name such as
    gradient_checkpointing; the shipped configs use the current names (activation_checkpointing)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, config, _, _ = parse_args(["--config", str(config_path), "--output_dir", "/tmp/unused", "--use_cpu"])
    deprecated = [str(w.message) for w in caught if "deprecated" in str(w.message)]
    assert not deprecated, deprecated
    assert config.activation_checkpointing is True


def test_train_help_comes_from_the_field_docs(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", "--help_all"])  # every option (--help: the first run's)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: trl-diffusion-sdpo train" in out
    for flag in ("--safeguard_mu", "--use_peft", "--lora_r", "--dtype", "--dataset_streaming", "--vae_name_or_path"):
        assert flag in out
    assert "Safeguard margin mu" in out  # DiffusionSDPOConfig's help metadata


@pytest.mark.parametrize(
    "flags,refused",
    [
        (["--attn_implementation", "sdpa"], "attn_implementation"),
        (["--lora_target_parameters", "w"], "lora_target_parameters"),
    ],
)
def test_model_config_options_for_language_models_are_refused(
    local_pipeline_and_data, tmp_path: Path, flags, refused
) -> None:
    pipe_dir, data_dir = local_pipeline_and_data
    argv = ["--model_name_or_path", pipe_dir, "--dataset_name", data_dir, "--output_dir", str(tmp_path), *flags]
    with pytest.raises(ValueError, match=rf"ModelConfig option\(s\) \['{refused}'\] apply to transformers language"):
        train_main(argv)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--bnb_4bit_quant_type", "fp4"], "--bnb_4bit_quant_type applies to bitsandbytes' 4-bit base only"),
        (["--use_bnb_nested_quant"], "--use_bnb_nested_quant and --bnb_4bit_quant_storage apply to"),
        (["--bnb_4bit_quant_storage", "uint8"], "--use_bnb_nested_quant and --bnb_4bit_quant_storage apply to"),
    ],
)
def test_bitsandbytes_4bit_options_without_a_4bit_base_are_refused(
    local_pipeline_and_data, tmp_path: Path, flags, message, capsys
) -> None:
    """Alone they used to be ignored; they apply to a base loaded with --load_in_4bit (docs/quantization.md). Refused
    in one line before anything loads."""
    pipe_dir, data_dir = local_pipeline_and_data
    argv = ["--model_name_or_path", pipe_dir, "--dataset_name", data_dir, "--output_dir", str(tmp_path), *flags]
    assert cli_main(["train", *argv]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.match(f"^trl-diffusion-sdpo train: error: {re.escape(message)}", last), last


@pytest.mark.parametrize("command", ["train", "cache"])
def test_a_refused_config_value_ends_the_command_as_a_bad_flag_does(command, tmp_path: Path, capsys) -> None:
    """A config field's check (from a flag or the YAML file) exits with argparse's status 2 and its one-line error on
    stderr, not a traceback."""
    config = tmp_path / "bad.yaml"
    config.write_text("safeguard_mu: 1.5\n")
    # a pipeline, a dataset (and cache's folder) named: the command line asks for them before the objective's rules,
    # which load torch
    named = ["--model_name_or_path", "trl-diffusion-sdpo:tiny", "--dataset_name", str(tmp_path)]
    named += ["--latent_cache", str(tmp_path / "cache")] if command == "cache" else []
    for argv in (["--beta", "-1"], ["--config", str(config)]):
        with pytest.raises(SystemExit) as exit_info:
            cli_main([command, *argv, *named, "--output_dir", str(tmp_path)])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith(f"trl-diffusion-sdpo {command}: error: ")
        assert ("beta must be positive, got -1.0" if "--beta" in argv else "safeguard_mu") in error


FAST = [
    "--resolution",
    "32",
    "--per_device_train_batch_size",
    "2",
    "--max_steps",
    "2",
    "--learning_rate",
    "1e-4",
    "--scale_lr",
    "false",
    "--warmup_steps",
    "0",
    "--use_cpu",
    "--save_strategy",
    "no",
    "--logging_steps",
    "1",
    "--report_to",
    "none",
    "--disable_tqdm",
    "true",
    "--dataloader_num_workers",
    "0",
    "--bf16",
    "false",
]


# by default: full-sd (the whole pipeline saved) and lora-sdxl (the LoRA file, SDXL's run), every level of both
# factors; lora-sd and SDXL's full tuning in the slow tier
@pytest.mark.parametrize(
    ("family", "use_peft"),
    [
        pytest.param("sd", True, marks=pytest.mark.slow),
        ("sdxl", True),
        ("sd", False),
        pytest.param("sdxl", False, marks=pytest.mark.slow),
    ],
    ids=["lora-sd", "lora-sdxl", "full-sd", "full-sdxl"],
)
def test_train_command_trains_and_saves_from_local_folders(tmp_path: Path, family, use_peft) -> None:
    """``trl-diffusion-sdpo train`` (main(argv)) from a saved tiny pipeline and a saved dataset, per family."""
    pipe_dir = tmp_path / "pipe"
    build = build_tiny_sd_pipeline if family == "sd" else build_tiny_sdxl_pipeline
    build(seed=0, tokenizer_dir=str(tmp_path / "tok")).save_pretrained(pipe_dir)
    data_dir = _save_pairs(tmp_path / "pairs")
    out = tmp_path / "out"
    peft = ["--use_peft", "--lora_r", "4", "--lora_alpha", "8", "--lora_dropout", "0"] if use_peft else []
    argv = [
        "train",
        "--model_name_or_path",
        str(pipe_dir),
        "--dataset_name",
        data_dir,
        "--output_dir",
        str(out),
        *peft,
        *FAST,
    ]
    assert cli_main(argv) == 0
    pipe = DiffusionPipeline.from_pretrained(pipe_dir)
    if use_peft:
        weights = load_file(out / "pytorch_lora_weights.safetensors")
        assert weights and all(k.startswith("unet.") for k in weights)
        pipe.load_lora_weights(str(out))  # lora_alpha 8 from the adapter metadata
        assert pipe.unet.peft_config["default_0"].lora_alpha == 8
    else:
        tuned = DiffusionPipeline.from_pretrained(out)  # a whole pipeline
        assert type(tuned) is type(pipe)
        before, after = pipe.unet.state_dict(), tuned.unet.state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before)
    config = json.loads((out / "training_config.json").read_text())
    assert config["learning_rate"] == 1e-4 and config["max_steps"] == 2
    card = (out / "README.md").read_text()  # the model card, as TRL's scripts write beside the weights
    assert data_dir in card and "Diffusion-SDPO" in card and "tuning" in card


def test_train_help_describes_the_command_and_marks_what_it_does_not_offer(capsys) -> None:
    with pytest.raises(SystemExit):
        cli_main(["train", "--help_all"])  # every option (--help: the first run's)
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "Train Diffusion-DPO / Diffusion-SDPO" in out and "--config FILE.yaml" in out
    assert "--no_random_flip Set random_flip to False" in out  # not the field's own help, the opposite
    for refused in ("--lora_task_type LORA", "--attn_implementation ATTN"):
        assert refused not in out  # hidden from the options; the epilog says why
    assert "--lora_task_type is ignored" in out
    assert "--load_in_4bit [" in out and "--base_quantization" in out  # they quantize the frozen base
    assert "the shipped configs use 0.0" in out and "to_q, to_k, to_v, to_out.0" in out


@pytest.mark.parametrize(
    ("value", "expected"),
    [("true", True), ("True", True), ("false", None), ("FALSE", None), ("out/checkpoint-4", "out/checkpoint-4")],
)
def test_resume_flag_is_read_as_users_write_it(value, expected) -> None:
    _, config, _, _ = parse_args(["--output_dir", "/tmp/unused", "--use_cpu", "--resume_from_checkpoint", value])
    assert config.resume_from_checkpoint == expected


@pytest.mark.slow  # by default: test_resume_flag_is_read_as_users_write_it and test_checkpoints.py's resume=True
def test_train_command_resumes_from_the_newest_checkpoint_with_resume_true(local_pipeline_and_data, tmp_path) -> None:
    pipe_dir, data_dir = local_pipeline_and_data
    out = tmp_path / "out"
    argv = [
        "--model_name_or_path",
        pipe_dir,
        "--dataset_name",
        data_dir,
        "--output_dir",
        str(out),
        "--use_peft",
        "--lora_r",
        "4",
        *FAST,
        "--save_strategy",
        "steps",
        "--save_steps",
        "2",
    ]
    with pytest.raises(ValueError, match="No complete checkpoint"):  # true reaches the trainer as True, not a path
        train_main([*argv, "--resume_from_checkpoint", "true"])
    train_main(argv)  # max_steps 2: checkpoint-2
    # Mark checkpoint-2's logged history: a resumed run carries it on, a fresh start would log step 1 anew.
    state_file = out / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    first_loss = next(entry for entry in state["log_history"] if "loss" in entry)
    first_loss["loss"] = 12345.0
    state_file.write_text(json.dumps(state))
    # the completion mark's checksums cover trainer_state.json: record the edited file there, as a save would have
    manifest_path = out / "checkpoint-2" / "checkpoint_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["trainer_state.json"] = state_file.stat().st_size
    manifest["sha256"]["trainer_state.json"] = file_sha256(str(state_file))
    manifest_path.write_text(json.dumps(manifest))
    resumed = train_main([*argv, "--max_steps", "3", "--resume_from_checkpoint", "true"])
    losses = {entry["step"]: entry["loss"] for entry in resumed.state.log_history if "loss" in entry}
    assert resumed.state.global_step == 3 and sorted(losses) == [1, 2, 3] and losses[1] == 12345.0


@pytest.mark.slow
def test_train_command_runs_as_a_console_script(local_pipeline_and_data, tmp_path: Path) -> None:
    pipe_dir, data_dir = local_pipeline_and_data
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "trl_diffusion_sdpo",
        "train",
        "--model_name_or_path",
        pipe_dir,
        "--dataset_name",
        data_dir,
        "--output_dir",
        str(out),
        "--use_peft",
        "--lora_r",
        "4",
        *FAST,
    ]
    env = dict(os.environ, PYTHONPATH=str(EXAMPLES.parent), OMP_NUM_THREADS="1")
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def _pickapic_parquet(folder: Path) -> str:
    """Six Pick-a-Pic rows as a parquet file in ``folder``, which ``datasets.load_dataset(folder)`` reads as the
    ``train`` split (a Hub dataset's layout)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    colours = [tuple(int(c) for c in rng.integers(0, 255, 3)) for _ in range(12)]
    Dataset.from_dict(
        {
            "caption": [f"shape {i}" for i in range(6)],
            "jpg_0": [_png(colours[2 * i], (40, 36)) for i in range(6)],
            "jpg_1": [_png(colours[2 * i + 1], (36, 48)) for i in range(6)],
            "label_0": [float(i % 2) for i in range(6)],
        }
    ).to_parquet(str(folder / "train.parquet"))
    return str(folder)


@pytest.mark.parametrize("script", [train_sd15, train_sdxl], ids=["sd15", "sdxl"])
def test_the_example_scripts_train_save_and_their_lora_loads_in_diffusers(script, tmp_path: Path) -> None:
    """Each example script, TRL's shape (TrlParser, the config, the trainer, train, save_model), trains one step of
    LoRA on a tiny base (SD: the demo's shipped base) from a Hub-layout dataset folder; the adapters it saved load
    into a fresh pipeline with diffusers' ``load_lora_weights`` as the weights the trainer trained."""
    from peft import get_peft_model_state_dict

    from trl_diffusion_sdpo.demo.pretrain import SHIPPED_BASE_DIR

    if script is train_sd15:
        base = str(SHIPPED_BASE_DIR)
    else:
        base = str(tmp_path / "tiny-sdxl")
        build_tiny_sdxl_pipeline(seed=0, tokenizer_dir=str(tmp_path / "tok")).save_pretrained(base)
    out, data = tmp_path / "out", _pickapic_parquet(tmp_path / "pairs")
    argv = [
        "--model_name_or_path", base, "--dataset_name", data, "--output_dir", str(out),
        "--use_peft", "--lora_r", "4", "--lora_alpha", "4", "--resolution", "32", "--per_device_train_batch_size", "2",
        "--max_steps", "1", "--learning_rate", "1e-2", "--warmup_steps", "0", "--use_cpu", "--bf16", "false",
        "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
    ]  # fmt: skip
    # the command its docstring shows parses with its own parser (the model and data are the Hub's: not loaded here)
    (shown,) = re.findall(r"```bash\n(.*?)```", script.__doc__, flags=re.DOTALL)
    words = shown.replace("\\\n", " ").split()[2:]  # after "python examples/train_<name>.py"
    parsed = script.make_parser().parse_args_and_config([*words, "--use_cpu"])  # --bf16 needs a GPU otherwise
    assert parsed[2].use_peft and parsed[1].max_steps == 2000 and parsed[0].dataset_streaming
    script_args, training_args, model_args = script.make_parser().parse_args_and_config(argv)
    assert isinstance(training_args, DiffusionSDPOConfig) and model_args.use_peft
    trainer = script.main(script_args, training_args, model_args)
    assert trainer.state.global_step == 1
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "README.md").is_file()
    trained = {k: v.detach() for k, v in get_peft_model_state_dict(trainer.policy).items()}
    assert trained and any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)  # the step moved them
    fresh = DiffusionPipeline.from_pretrained(base)
    fresh.load_lora_weights(str(out))
    (adapter,) = fresh.unet.peft_config  # the adapter load_lora_weights added, under the name it chose
    loaded = get_peft_model_state_dict(fresh.unet, adapter_name=adapter)
    assert sorted(loaded) == sorted(trained)
    for key, value in trained.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)


def test_quickstart_trains_saves_and_reloads(tmp_path: Path) -> None:
    import quickstart_tiny

    metrics = quickstart_tiny.main(["--output-dir", str(tmp_path / "qs"), "--steps", "4"])
    assert (tmp_path / "qs" / "pytorch_lora_weights.safetensors").is_file()
    for key in ("eval_loss", "eval_implicit_acc", "eval_delta/winner", "eval_delta/loser"):
        assert np.isfinite(metrics[key])


def test_train_command_writes_the_model_card_at_every_save(local_pipeline_and_data, tmp_path, monkeypatch) -> None:
    from trl_diffusion_sdpo import DiffusionSDPOTrainer

    pipe_dir, data_dir = local_pipeline_and_data
    written = []
    original = DiffusionSDPOTrainer.create_model_card

    def record(self, *args, **kwargs):
        original(self, *args, **kwargs)
        written.append((self.state.global_step, (Path(self.args.output_dir) / "README.md").is_file()))

    monkeypatch.setattr(DiffusionSDPOTrainer, "create_model_card", record)
    train_main(
        [
            "--model_name_or_path",
            pipe_dir,
            "--dataset_name",
            data_dir,
            "--output_dir",
            str(tmp_path / "out"),
            "--use_peft",
            "--lora_r",
            "4",
            *FAST,
            "--save_strategy",
            "steps",
            "--save_steps",
            "1",
        ]
    )
    assert written == [(1, True), (2, True), (2, True)]  # after checkpoint-1, checkpoint-2, and the final save
    assert data_dir in (tmp_path / "out" / "README.md").read_text()
