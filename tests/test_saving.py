"""Saved weights are what diffusers loads; the Hub upload carries the weights and a model card."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from conftest import changed_keys, snapshot
from diffusers import UNet2DConditionModel

import trl_diffusion_sdpo.io.hub as hub
from trl_diffusion_sdpo.io.saving import LORA_WEIGHTS_NAME

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def unet_inputs(seed: int = 5):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, 4, 4, 4, generator=gen),
        torch.tensor([10, 700]),
        torch.randn(2, 32, 32, generator=gen),
    )


@torch.no_grad()
def unet_output(unet, inputs) -> torch.Tensor:
    sample, timesteps, hidden = inputs
    return unet(sample, timesteps, encoder_hidden_states=hidden, return_dict=False)[0]


def files_under(folder) -> list[str]:
    return sorted(os.path.relpath(os.path.join(root, f), folder) for root, _, fs in os.walk(folder) for f in fs)


def test_lora_save_model_is_loaded_by_a_fresh_pipeline_with_load_lora_weights(make_pipeline, make_trainer, tmp_path):
    pipe = make_pipeline(seed=0)
    trainer = make_trainer(pipeline=pipe, output_dir=str(tmp_path / "lora"))
    trainer.train()
    trainer.save_model()
    out = tmp_path / "lora"
    assert (out / LORA_WEIGHTS_NAME).is_file()
    assert LORA_WEIGHTS_NAME == "pytorch_lora_weights.safetensors"

    inputs = unet_inputs()
    trained = unet_output(pipe.unet, inputs)
    fresh = make_pipeline(seed=0)
    untrained = unet_output(fresh.unet, inputs)
    assert not torch.allclose(trained, untrained, atol=1e-5), "training changed nothing"
    fresh.load_lora_weights(str(out))
    # LoRA alpha (8) differs from the rank (4): a lost scaling factor would show here.
    torch.testing.assert_close(unet_output(fresh.unet, inputs), trained, rtol=1e-5, atol=1e-6)


def test_full_save_model_writes_a_unet_folder_that_from_pretrained_loads(make_pipeline, make_trainer, tmp_path):
    pipe = make_pipeline(seed=0)
    trainer = make_trainer(pipeline=pipe, lora=False, output_dir=str(tmp_path / "full"))
    trainer.train()
    trainer.save_model()
    loaded = UNet2DConditionModel.from_pretrained(str(tmp_path / "full"), subfolder="unet")
    trained = snapshot(pipe.unet)
    assert not changed_keys(trained, snapshot(loaded))
    assert changed_keys(trained, snapshot(make_pipeline(seed=0).unet)), "training changed nothing"
    inputs = unet_inputs()
    torch.testing.assert_close(unet_output(loaded, inputs), unet_output(pipe.unet, inputs), rtol=0, atol=0)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_output_dir_holds_safetensors_and_json_but_no_pickles(make_trainer, tmp_path, lora):
    trainer = make_trainer(lora=lora, max_steps=1, output_dir=str(tmp_path / "out"))
    trainer.train()
    trainer.save_model()
    files = files_under(tmp_path / "out")
    assert not [f for f in files if f.endswith(PICKLE_SUFFIXES)], files
    assert any(f.endswith(".safetensors") for f in files)
    with open(tmp_path / "out" / "training_config.json") as f:
        config = json.load(f)
    assert config["beta"] == trainer.args.beta and config["resolution"] == 32


def test_checkpoint_weights_are_the_same_files_a_user_loads(make_pipeline, make_trainer, tmp_path):
    pipe = make_pipeline(seed=0)
    trainer = make_trainer(pipeline=pipe, max_steps=2, save_strategy="steps", save_steps=2,
                           output_dir=str(tmp_path / "run"))
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    fresh = make_pipeline(seed=0)
    fresh.load_lora_weights(str(checkpoint))
    inputs = unet_inputs()
    torch.testing.assert_close(unet_output(fresh.unet, inputs), unet_output(pipe.unet, inputs), rtol=1e-5, atol=1e-6)


class FakeHfApi:
    """Records Hub calls and what the uploaded folder held at upload time; never touches the network."""

    instances: list[FakeHfApi] = []

    def __init__(self, token=None, **kwargs):
        self.token = token
        self.calls: list[tuple[str, dict]] = []
        self.uploaded: dict[str, bytes] = {}
        FakeHfApi.instances.append(self)

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))
        return f"https://huggingface.co/{kwargs['repo_id']}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        folder = kwargs["folder_path"]
        for name in files_under(folder):
            with open(os.path.join(folder, name), "rb") as f:
                self.uploaded[name] = f.read()
        return "commit-url"


def card_metadata(readme: str) -> dict:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n")[1])


def test_push_to_hub_uploads_weights_and_a_model_card(make_trainer, tmp_path, monkeypatch):
    FakeHfApi.instances.clear()
    monkeypatch.setattr(hub, "HfApi", FakeHfApi)
    trainer = make_trainer(
        max_steps=1, beta=2500.0, output_dir=str(tmp_path / "push"), hub_model_id="someone/tiny-sdpo", hub_token="tok"
    )
    trainer.train()
    result = trainer.push_to_hub()
    assert result == "commit-url"
    (api,) = FakeHfApi.instances
    assert api.token == "tok"
    assert [name for name, _ in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][1]["repo_id"] == api.calls[1][1]["repo_id"] == "someone/tiny-sdpo"
    assert os.path.abspath(api.calls[1][1]["folder_path"]) == str(tmp_path / "push")

    assert LORA_WEIGHTS_NAME in api.uploaded and "README.md" in api.uploaded
    readme = api.uploaded["README.md"].decode()
    tags = card_metadata(readme)["tags"]
    for tag in ("diffusers", "lora", "trl", "diffusion-sdpo"):
        assert tag in tags
    assert "Diffusion-SDPO" in readme
    assert "`beta` | `2500.0`" in readme
    assert "2311.12908" in readme and "2511.03317" in readme


def test_model_card_of_full_dpo_names_the_method_and_has_no_lora_tag(make_trainer, tmp_path, monkeypatch):
    FakeHfApi.instances.clear()
    monkeypatch.setattr(hub, "HfApi", FakeHfApi)
    trainer = make_trainer(lora=False, safeguard=False, max_steps=1, output_dir=str(tmp_path / "dpo"))
    trainer.train()
    trainer.push_to_hub()
    (api,) = FakeHfApi.instances
    assert api.calls[0][1]["repo_id"] == "dpo"  # defaults to the output folder's name
    readme = api.uploaded["README.md"].decode()
    assert "lora" not in card_metadata(readme)["tags"]
    assert "Diffusion-DPO" in readme and "Diffusion-SDPO fine-tune" not in readme
    assert any(name.startswith("unet/") and name.endswith(".safetensors") for name in api.uploaded)
