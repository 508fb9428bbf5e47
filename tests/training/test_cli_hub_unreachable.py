"""Every command that takes a model names the real cause when the Hub cannot be reached: one line, before anything
loads, saying the Hub was not asked (``HF_HUB_OFFLINE``) or could not be reached (a refused connection), never a
missing ``model_index.json`` after the Hub client's retries. A Hub id already in the Hugging Face cache is left to the
loaders, which read the cache offline."""

from __future__ import annotations

import os
import re

import pytest
from huggingface_hub import constants

from trl_diffusion_sdpo.cli.main import main
from trl_diffusion_sdpo.data.model_names import check_model_exists, model_problem

HUB_ID = "no-such-owner/no-such-pipeline"
OFFLINE = "the Hub is not asked (HF_HUB_OFFLINE=1)"
UNREACHABLE = "the Hub cannot be reached"


@pytest.fixture(params=["offline", "unreachable"])
def no_hub(request, monkeypatch, tmp_path):
    """The Hub switched off (``HF_HUB_OFFLINE=1``) or unreachable (an endpoint nothing listens on), with an empty
    Hugging Face cache; the cause the commands must name."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    if request.param == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        return OFFLINE
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: the connection is refused
    return UNREACHABLE


def _error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines and "Traceback" not in "\n".join(lines)
    return lines[-1]


def test_export_names_the_hub_for_a_hub_base(no_hub, tmp_path, capsys):
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"")  # never read: the base is checked first
    code = main(["export", "--lora", str(lora), "--base", HUB_ID, "--format", "kohya", "--output", "x.safetensors"])
    line = _error_line(capsys)
    assert code == 2 and line.startswith("trl-diffusion-sdpo export: error: --base no-such-owner/no-such-pipeline")
    assert no_hub in line and "model_index.json" in line  # what a --base must be, not what diffusers missed


@pytest.mark.parametrize("command", ["evaluate", "pairs"])
def test_sampling_commands_name_the_hub_for_a_hub_base(command, no_hub, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("red square on white\n")
    arguments = [command, "--base", HUB_ID, "--prompts", str(prompts), "--scorer", "colour", "--steps", "1"]
    code = main([*arguments, "--output_dir", str(tmp_path / "out"), "--no_progress"])
    line = _error_line(capsys)
    assert code == 2 and f"--base {HUB_ID}: no such folder" in line and no_hub in line
    if command == "evaluate":  # nothing left that a rerun into the folder would have to overwrite
        assert not (tmp_path / "out" / "run.json").exists()


def test_evaluate_names_the_hub_for_a_hub_variant(no_hub, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("red square on white\n")
    code = main(
        ["evaluate", "--base", "trl-diffusion-sdpo:tiny", "--model", f"tuned={HUB_ID}", "--prompts", str(prompts)]
        + ["--scorer", "colour", "--steps", "1", "--output_dir", str(tmp_path / "out"), "--no_progress"]
    )
    line = _error_line(capsys)
    assert code == 2 and f"--model {HUB_ID}: no such folder" in line and no_hub in line
    assert not os.path.exists(tmp_path / "out" / "images" / "base")  # nothing sampled before the refusal


def test_online_names_the_hub_for_a_hub_model(no_hub, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("red square on white\n")
    code = main(
        ["online", "--model_name_or_path", HUB_ID, "--prompts", str(prompts), "--reward_funcs", "colour"]
        + ["--output_dir", str(tmp_path / "out"), "--use_peft", "--use_cpu", "true", "--report_to", "none"]
    )
    line = _error_line(capsys)
    assert code == 2 and f"--model_name_or_path {HUB_ID}: no such folder" in line and no_hub in line


def test_a_hub_id_in_the_hugging_face_cache_is_left_to_the_loaders(no_hub, tmp_path):
    """What ``hf download`` leaves in the cache (a snapshot and the ref naming it) passes the check offline and with
    the Hub unreachable; the same id without it does not."""
    assert model_problem(HUB_ID) is not None
    repo = tmp_path / "hf-cache" / f"models--{HUB_ID.replace('/', '--')}"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "model_index.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    assert model_problem(HUB_ID) is None
    check_model_exists(HUB_ID, "--base")  # no error
    # A LoRA repository is found by its own file, which a pipeline's check does not look for.
    assert model_problem(HUB_ID, files=["pytorch_lora_weights.safetensors"]) is not None


def test_a_local_path_or_the_shipped_base_is_never_asked_of_the_hub(no_hub, tmp_path):
    assert model_problem("trl-diffusion-sdpo:tiny") is None
    assert model_problem(str(tmp_path)) is None
    problem = model_problem("./missing/pipeline")
    assert problem is not None and "not looked for on the Hub" in problem


def test_a_hub_prompt_set_names_the_hub(no_hub, tmp_path, capsys, monkeypatch):
    """The default prompt set (partiprompts, a Hub dataset) neither local nor cached: one line naming the preset,
    its Hub id and the cause, before the datasets loader's retries."""
    from datasets import config

    monkeypatch.setattr(config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    code = main(["evaluate", "--base", "trl-diffusion-sdpo:tiny", "--scorer", "colour", "--output_dir", str(tmp_path)])
    line = _error_line(capsys)
    assert code == 2 and "--prompts partiprompts (the Hub dataset nateraw/parti-prompts): no such file" in line
    assert no_hub in line and "--prompt_path PATH" in line


def test_a_hub_vae_names_the_hub_before_the_pipeline_loads(no_hub):
    from trl import ModelConfig

    from trl_diffusion_sdpo.cli.train import DiffusionScriptArguments, build_pipeline

    model = ModelConfig(model_name_or_path="trl-diffusion-sdpo:tiny")
    with pytest.raises(FileNotFoundError, match=f"--vae_name_or_path {HUB_ID}: no such folder .*{re.escape(no_hub)}"):
        build_pipeline(model, DiffusionScriptArguments(vae_name_or_path=HUB_ID))
