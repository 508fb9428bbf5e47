"""Saved weights are what diffusers loads, the same bytes for the same weights in any process; the Hub upload carries
the weights and a model card."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from diffusers import DiffusionPipeline, UNet2DConditionModel

import trl_diffusion_sdpo.io.hub as hub
from tests.helpers.common import changed_keys, snapshot
from tests.helpers.hub import FakeHfApi, files_under
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


def test_lora_save_model_is_loaded_by_a_fresh_pipeline_with_load_lora_weights(make_pipeline, make_trainer, tmp_path):
    pipe = make_pipeline(seed=0)
    trainer = make_trainer(pipeline=pipe, max_steps=1, output_dir=str(tmp_path / "lora"))  # lora_B moves off 0
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


@pytest.mark.slow  # by default: test_full_save_model_writes_a_whole_pipeline_... (its unet folder loaded back)
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


@pytest.mark.parametrize(  # full tuning's folder by default: test_full_save_model_writes_a_whole_pipeline_...
    "lora", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["lora", "full"]
)
def test_output_dir_holds_safetensors_and_json_but_no_pickles(make_trainer, tmp_path, lora):
    trainer = make_trainer(lora=lora, max_steps=1, output_dir=str(tmp_path / "out"))
    trainer.train()
    trainer.save_model()
    files = files_under(tmp_path / "out")
    assert not [f for f in files if f.endswith(PICKLE_SUFFIXES)], files
    assert any(f.endswith(".safetensors") for f in files)
    with open(tmp_path / "out" / "training_config.json") as f:
        config = json.load(f)
    # the file keeps what was given (beta unset), the run used the family's value (config.defaults)
    assert config["beta"] is None and trainer.beta == trainer.args.beta == 5000.0 and config["resolution"] == 32


def load_file_keys(path) -> set[str]:
    from safetensors.torch import load_file

    return set(load_file(str(path)))


def test_the_lora_file_does_not_depend_on_the_order_a_set_iterates_in(make_trainer, tmp_path):
    """diffusers writes the adapter config's sets (``target_modules``) in their iteration order, which string hashing
    makes differ between processes, and safetensors the file's metadata in a hash map's order, which differs from one
    save to the next: the same weights saved twice, and twice with the set iterating backwards, give the same bytes,
    and diffusers reads the file back."""

    class Backwards(set):
        def __iter__(self):
            return iter(sorted(super().__iter__(), reverse=True))

    trainer = make_trainer(max_steps=1, output_dir=str(tmp_path / "out"))
    for n in range(3):
        trainer.save_model(str(tmp_path / f"forwards-{n}"))
    config = trainer.model.peft_config["default"]
    config.target_modules = Backwards(config.target_modules)
    assert list(config.to_dict()["target_modules"]) == sorted(config.target_modules, reverse=True)
    for n in range(3):
        trainer.save_model(str(tmp_path / f"backwards-{n}"))
    files = [tmp_path / f"{way}-{n}" / LORA_WEIGHTS_NAME for way in ("forwards", "backwards") for n in range(3)]
    assert len({file.read_bytes() for file in files}) == 1
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from safetensors import safe_open

    with safe_open(str(files[-1]), framework="pt") as f:  # the rewritten header reads back, metadata and tensors
        metadata = json.loads(f.metadata()[LORA_ADAPTER_METADATA_KEY])
        assert metadata["unet.target_modules"] == sorted(config.target_modules)
        assert set(f.keys()) == set(load_file_keys(files[0]))


def test_checkpoint_weights_are_the_same_files_a_user_loads(make_pipeline, make_trainer, tmp_path):
    pipe = make_pipeline(seed=0)
    trainer = make_trainer(
        pipeline=pipe, max_steps=1, save_strategy="steps", save_steps=1, output_dir=str(tmp_path / "run")
    )
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-1"
    fresh = make_pipeline(seed=0)
    fresh.load_lora_weights(str(checkpoint))
    inputs = unet_inputs()
    torch.testing.assert_close(unet_output(fresh.unet, inputs), unet_output(pipe.unet, inputs), rtol=1e-5, atol=1e-6)


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
    assert "2311.12908" in readme and "2511.03317" in readme and "vonwerra2020trl" in readme


def test_model_card_of_full_dpo_names_the_method_and_has_no_lora_tag(make_trainer, tmp_path, monkeypatch):
    FakeHfApi.instances.clear()
    monkeypatch.setattr(hub, "HfApi", FakeHfApi)
    trainer = make_trainer(lora=False, safeguard_space="none", max_steps=1, output_dir=str(tmp_path / "dpo"))
    trainer.train()
    trainer.push_to_hub()
    (api,) = FakeHfApi.instances
    assert api.calls[0][1]["repo_id"] == "dpo"  # defaults to the output folder's name
    readme = api.uploaded["README.md"].decode()
    assert "lora" not in card_metadata(readme)["tags"]
    assert "Diffusion-DPO" in readme and "Diffusion-SDPO fine-tune" not in readme
    assert any(name.startswith("unet/") and name.endswith(".safetensors") for name in api.uploaded)


def test_training_config_json_keeps_the_learning_rate_as_given_so_scale_lr_applies_once(make_trainer, tmp_path):
    trainer = make_trainer(
        max_steps=1,
        learning_rate=1e-3,
        scale_lr=True,
        gradient_accumulation_steps=2,
        hub_token="secret",
        output_dir=str(tmp_path / "o"),
    )
    assert trainer.args.learning_rate == pytest.approx(1e-3 * 2 * 2)  # batch 2 x accumulation 2 x 1 process
    trainer.save_model()
    with open(tmp_path / "o" / "training_config.json") as f:
        config = json.load(f)
    assert config["learning_rate"] == 1e-3 and config["scale_lr"] is True
    assert config["hub_token"] != "secret"  # masked, as transformers does


def test_full_save_model_writes_a_whole_pipeline_that_diffusion_pipeline_loads_and_runs(
    make_pipeline, make_trainer, tmp_path
):
    pipe = make_pipeline(seed=0)
    trainer = make_trainer(pipeline=pipe, lora=False, max_steps=1, output_dir=str(tmp_path / "full"))
    trainer.train()
    trainer.save_model()
    loaded = DiffusionPipeline.from_pretrained(str(tmp_path / "full"))
    assert type(loaded) is type(pipe)
    assert not changed_keys(snapshot(pipe.unet), snapshot(loaded.unet))
    image = loaded("a red square", num_inference_steps=2, height=32, width=32, output_type="np").images[0]
    assert image.shape == (32, 32, 3) and torch.isfinite(torch.as_tensor(image)).all()
    assert not [f for f in files_under(tmp_path / "full") if f.endswith(PICKLE_SUFFIXES)]


def test_full_checkpoints_hold_only_the_unet(make_trainer, tmp_path):
    trainer = make_trainer(
        lora=False, max_steps=1, save_strategy="steps", save_steps=1, output_dir=str(tmp_path / "r")
    )
    trainer.train()
    checkpoint = files_under(tmp_path / "r" / "checkpoint-1")
    assert any(f.startswith("unet/") for f in checkpoint)
    assert not any(f.startswith(("vae/", "text_encoder/")) or f == "model_index.json" for f in checkpoint)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_every_save_pushes_carry_the_weights_and_the_final_push_no_pickles(make_trainer, tmp_path, monkeypatch, lora):
    """The checkpoint pushes are transformers' own (with its pickled ``training_args.bin``), the output folder readied
    with the checkpoint's weights and a card first; the final ``push_to_hub`` is the package's, with no pickle."""
    import transformers.trainer

    FakeHfApi.instances.clear()
    monkeypatch.setattr(hub, "HfApi", FakeHfApi)
    monkeypatch.setattr(transformers.trainer, "hf_api", FakeHfApi)
    trainer = make_trainer(
        lora=lora,
        max_steps=2,
        save_strategy="steps",
        save_steps=1,
        push_to_hub=True,
        hub_strategy="every_save",
        hub_model_id="someone/tiny",
        output_dir=str(tmp_path / "run"),
    )
    trainer.train()
    trainer.push_to_hub()
    uploads = [(api, kwargs) for api in FakeHfApi.instances for name, kwargs in api.calls if name == "upload_folder"]
    assert len(uploads) == 3  # checkpoint-1, checkpoint-2, the final push
    assert not [f for f in uploads[-1][0].uploaded if f.endswith(PICKLE_SUFFIXES)]
    for api, _ in uploads:
        assert "README.md" in api.uploaded and "training_config.json" in api.uploaded
        if lora:
            assert LORA_WEIGHTS_NAME in api.uploaded
        else:
            assert "model_index.json" in api.uploaded
            assert any(f.startswith("unet/") and f.endswith(".safetensors") for f in api.uploaded)
            assert any(f.startswith("vae/") and f.endswith(".safetensors") for f in api.uploaded)
    assert {kwargs["repo_id"] for _, kwargs in uploads} == {"someone/tiny"}
    assert [kwargs["commit_message"] for _, kwargs in uploads][:2] == [
        "Training in progress, step 1",
        "Training in progress, step 2",
    ]


def test_hub_strategy_checkpoint_pushes_the_checkpoint_beside_the_weights(make_trainer, tmp_path, monkeypatch):
    import transformers.trainer

    FakeHfApi.instances.clear()
    monkeypatch.setattr(hub, "HfApi", FakeHfApi)
    monkeypatch.setattr(transformers.trainer, "hf_api", FakeHfApi)
    trainer = make_trainer(
        max_steps=1,
        save_strategy="steps",
        save_steps=1,
        push_to_hub=True,
        hub_strategy="checkpoint",
        hub_model_id="someone/tiny",
        output_dir=str(tmp_path / "run"),
    )
    trainer.train()
    uploaded = {name for api in FakeHfApi.instances for name in api.uploaded}
    assert f"last-checkpoint/{LORA_WEIGHTS_NAME}" in uploaded and LORA_WEIGHTS_NAME in uploaded
    assert "last-checkpoint/trainer_state.json" in uploaded


def test_model_card_follows_trl_and_diffusers_conventions(make_trainer, tmp_path, monkeypatch):
    trainer = make_trainer(max_steps=1, output_dir=str(tmp_path / "card"), hub_model_id="someone/sdpo-lora")
    trainer.base_model_name = str(tmp_path)  # a local folder: no base_model in the metadata, as TRL
    trainer.create_model_card(model_name="My SDPO", dataset_name="yuvalkirstain/pickapic_v2", tags=["extra"])
    readme = (tmp_path / "card" / "README.md").read_text()
    meta = card_metadata(readme)
    assert "base_model" not in meta
    assert meta["datasets"] == ["yuvalkirstain/pickapic_v2"] and meta["license"] == "other"
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-image"
    assert meta["model_name"] == "My SDPO" and "extra" in meta["tags"] and "lora" in meta["tags"]
    assert "# My SDPO" in readme
    assert 'pipe.load_lora_weights("someone/sdpo-lora")' in readme and "<this repo>" not in readme
    for framework in ("TRL", "Diffusers", "Transformers", "PEFT", "PyTorch", "Datasets"):
        assert f"- {framework}: " in readme
    assert "vonwerra2020trl" in readme

    trainer.base_model_name = "org/base-model"  # a Hub id is kept; the arguments given before are remembered
    trainer.create_model_card(license="creativeml-openrail-m")
    meta = card_metadata((tmp_path / "card" / "README.md").read_text())
    assert meta["base_model"] == "org/base-model" and meta["license"] == "creativeml-openrail-m"
    assert meta["datasets"] == ["yuvalkirstain/pickapic_v2"]


def test_model_card_shows_the_validation_grid_and_a_hub_widget():
    card = hub.build_model_card(
        base_model="org/base",
        is_lora=True,
        method="Diffusion-SDPO",
        hyperparameters={},
        tags=[],
        model_family="stable-diffusion",
        model_name="m",
        sample_grid="validation/step-000020.png",
        sample_prompt="a red square",
    )
    meta = card_metadata(str(card))
    assert meta["widget"] == [{"text": "a red square", "output": {"url": "validation/step-000020.png"}}]
    assert "![validation samples](validation/step-000020.png)" in str(card) and "at step 20" in str(card)
    assert 'pipe.load_lora_weights("<this repo>")' in str(card)  # no hub_model_id given


# transformers.Trainer's file hooks the trainer overrides, each in its own class (io/run_files.py holds their helpers).
FILE_HOOKS = [
    "save_model",
    "_save_checkpoint",
    "_load_from_checkpoint",
    "_load_best_model",
    "create_model_card",
    "init_hf_repo",
    "push_to_hub",
    "train",
]


def test_each_file_hook_is_written_in_the_trainer_and_the_run_files_hand_nothing_back():
    """Each of transformers' save, load and Hub hooks is defined once, by the trainer's own class, where a reader finds
    it; the helpers object defines none of them under transformers' names."""
    from transformers import Trainer

    from trl_diffusion_sdpo import DiffusionSDPOTrainer
    from trl_diffusion_sdpo.io import run_files

    for hook in FILE_HOOKS:
        assert [c for c in DiffusionSDPOTrainer.__mro__ if hook in vars(c)] == [DiffusionSDPOTrainer, Trainer], hook
        assert hook not in vars(run_files.RunFiles), hook
    assert not hasattr(run_files, "files_hook")


def test_a_pipeline_loaded_from_a_path_object_saves_checkpoints_naming_its_base(make_pipeline, make_trainer, tmp_path):
    """``from_pretrained(pathlib.Path)`` keeps the Path as the pipeline's ``_name_or_path``: the run's identity
    (written into every checkpoint as JSON) names the base as a string."""
    from pathlib import Path

    folder = tmp_path / "base"
    make_pipeline().save_pretrained(str(folder))
    pipe = DiffusionPipeline.from_pretrained(Path(folder))
    trainer = make_trainer(pipeline=pipe, max_steps=1, save_strategy="steps", save_steps=1)
    trainer.train()
    with open(tmp_path / "out" / "checkpoint-1" / "run_identity.json", encoding="utf-8") as f:
        assert json.load(f)["base_model"] == str(folder)
