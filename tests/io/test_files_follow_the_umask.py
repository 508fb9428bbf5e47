"""Every file the package writes has the mode the user's umask gives a new file (``0o666 & ~umask``), and every
folder the mode it gives a new folder (``0o777 & ~umask``): the trained LoRA, its checkpoints (the optimizer, scheduler
and random-state files transformers' format holds included), the latent cache, a full-tuning save, an export and a
merged pipeline. safetensors writes its files owner-only, so under umask 022 a weight file would read ``0o600`` beside
``0o644`` JSON, and a tool running as another user could not load it.

The expected modes are computed from the umask the test sets, never from the package's own reading of it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from tests.helpers.lora_files import write_base_and_lora
from trl_diffusion_sdpo.config import file_modes
from trl_diffusion_sdpo.io.export import export_lora, merge_lora
from trl_diffusion_sdpo.io.saving import save_full_denoiser, save_pipeline_components
from trl_diffusion_sdpo.testing import build_tiny_sd_pipeline

UMASKS = [0o022, 0o077, 0o002]
# 022 (the usual umask) in the slow tier: 002 and 077 by default tell a followed umask from any fixed mode (a fixed
# 0o644 or owner-only 0o600 fails 002, a fixed 0o664 fails 077)
SLOW_UMASKS = {0o022}


@pytest.fixture(
    params=[pytest.param(u, marks=pytest.mark.slow) if u in SLOW_UMASKS else u for u in UMASKS],
    ids=[f"umask-{u:03o}" for u in UMASKS],
)
def umask(request) -> int:
    """The process's umask set to the parameter for the test, and restored after it."""
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


def wrong_modes(root: str | Path, umask: int) -> dict[str, str]:
    """Every file and folder under ``root`` (``root`` itself excluded) whose permission bits are not what ``open()``
    and ``os.makedirs`` give under ``umask``: ``{relative path: found mode}``."""
    wrong = {}
    for folder, folders, files in os.walk(root):
        for name, expected in [(n, 0o777 & ~umask) for n in folders] + [(n, 0o666 & ~umask) for n in files]:
            path = os.path.join(folder, name)
            found = stat.S_IMODE(os.lstat(path).st_mode)
            if found != expected:
                wrong[os.path.relpath(path, root)] = f"{found:o} (expected {expected:o})"
    return wrong


def test_a_lora_run_its_checkpoint_and_its_latent_cache_follow_the_umask(make_trainer, tmp_path, umask):
    output, cache = tmp_path / "run", tmp_path / "latents"
    trainer = make_trainer(
        max_steps=2,
        save_strategy="steps",
        save_steps=2,
        cache_latents=True,
        latent_cache_dir=str(cache),
        output_dir=str(output),
    )
    trainer.train()
    trainer.save_model()
    names = {os.path.relpath(os.path.join(f, n), output) for f, _, files in os.walk(output) for n in files}
    # the files whose modes are checked: the weights beside the JSON, and transformers' resume files
    for wanted in ("pytorch_lora_weights.safetensors", "training_config.json", "checkpoint-2/optimizer.pt"):
        assert wanted in names, sorted(names)
    assert any(n.startswith("checkpoint-2/rng_state") for n in names), sorted(names)
    assert any(n.endswith(".safetensors") for n in os.listdir(next(cache.iterdir()))), "no cached safetensors"
    assert wrong_modes(output, umask) == {}
    assert wrong_modes(cache, umask) == {}


def test_a_full_tuning_save_writes_the_denoiser_and_the_pipeline_with_the_umasks_modes(tmp_path, umask):
    pipe = build_tiny_sd_pipeline(seed=0, tokenizer_dir=str(tmp_path / "tokenizer"))
    output = tmp_path / "full"
    save_full_denoiser(pipe.unet, str(output))
    save_pipeline_components(pipe, str(output))
    # the gathered-weights path (ZeRO-3, FSDP) writes through huggingface_hub's writer instead
    save_full_denoiser(pipe.unet, str(tmp_path / "gathered"), state_dict=dict(pipe.unet.state_dict()))
    assert (output / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (output / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert wrong_modes(output, umask) == {}
    assert wrong_modes(tmp_path / "gathered", umask) == {}


@pytest.fixture(scope="module")
def base_and_lora(tmp_path_factory) -> tuple[str, str]:
    return write_base_and_lora("sd", tmp_path_factory.mktemp("sd"))


def test_an_export_and_a_merge_follow_the_umask(base_and_lora, tmp_path, umask):
    base, lora = base_and_lora
    exported = tmp_path / "exports"
    for export_format in ("comfyui", "kohya", "diffusers"):
        export_lora(lora, base, export_format, str(exported / f"{export_format}.safetensors"))
    assert sorted(os.listdir(exported)) == ["comfyui.safetensors", "diffusers.safetensors", "kohya.safetensors"]
    merged = tmp_path / "merged"
    merge_lora(lora, base, str(merged))
    assert (merged / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert wrong_modes(exported, umask) == {}
    assert wrong_modes(merged, umask) == {}


def test_a_merge_into_a_folder_the_user_made_leaves_that_folders_mode(base_and_lora, tmp_path, umask):
    base, lora = base_and_lora
    merged = tmp_path / "merged"
    merged.mkdir(mode=0o750)
    os.chmod(merged, 0o750)  # whatever the umask: the user's choice for the folder
    merge_lora(lora, base, str(merged))
    assert stat.S_IMODE(merged.stat().st_mode) == 0o750
    assert wrong_modes(merged, umask) == {}


def test_the_umask_is_read_as_set_from_proc_and_without_it_and_left_unchanged(monkeypatch, umask):
    assert file_modes.current_umask() == umask
    monkeypatch.setattr(file_modes, "_PROC_STATUS", "/nonexistent/status")  # no /proc (macOS, a sandbox)
    assert file_modes.current_umask() == umask
    assert os.umask(umask) == umask, "reading the umask changed it"


def test_follow_umask_fixes_sub_folders_keeps_a_shared_folders_setgid_and_leaves_links_alone(tmp_path, umask):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o2700)  # setgid: new files take the folder's group
    weights = shared / "w.safetensors"
    weights.write_bytes(b"x")
    os.chmod(weights, 0o600)
    outside = tmp_path / "outside.txt"
    outside.write_text("a user's own file")
    os.chmod(outside, 0o400)
    (shared / "link").symlink_to(outside)
    private = shared / "staging"  # as tempfile.mkdtemp makes it
    private.mkdir()
    os.chmod(private, 0o700)
    file_modes.follow_umask(shared)
    assert stat.S_IMODE(private.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE(shared.stat().st_mode) == stat.S_ISGID | (0o777 & ~umask)
    assert stat.S_IMODE(weights.stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(outside.stat().st_mode) == 0o400


def test_a_filesystem_refusing_chmod_warns_and_the_save_goes_on(tmp_path, monkeypatch, caplog, umask):
    target = tmp_path / "w.safetensors"
    target.write_bytes(b"x")
    os.chmod(target, 0o600)

    def refuse(path, mode):
        raise PermissionError(1, "Operation not permitted", str(path))

    monkeypatch.setattr(file_modes.os, "chmod", refuse)
    with caplog.at_level("WARNING", logger=file_modes.__name__):
        file_modes.follow_umask(target)
    if umask != 0o077:  # 0o600 is already the mode 0o077 gives: nothing to change
        assert f"Could not set the permissions of {target}" in caplog.text


def owner_only_safetensors(path: Path) -> None:
    """A file as safetensors writes it: ``save_file``'s own output, whatever mode that gives."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.ones(2)}, str(path))
    os.chmod(path, 0o600)  # as safetensors 0.8 leaves it, whatever a later version does


def test_a_published_checkpoint_holds_every_writers_files_with_the_umasks_mode(tmp_path, umask):
    """Files an engine, the rewind or the online generations write straight into the staging folder."""
    from trl_diffusion_sdpo.io.checkpoint_writing import publish_checkpoint, staging_folder

    final = tmp_path / "run" / "checkpoint-4"
    staging = Path(staging_folder(str(final)))
    owner_only_safetensors(staging / "rewind" / "weights.safetensors")
    owner_only_safetensors(staging / "generations-0.safetensors")
    publish_checkpoint(str(staging), str(final))
    assert not staging.exists() and (final / "rewind" / "weights.safetensors").is_file()
    assert wrong_modes(final, umask) == {}


def test_copying_a_checkpoints_weights_into_the_output_gives_the_copies_the_umasks_mode(tmp_path, umask):
    """An older checkpoint's owner-only weights, copied into the output folder (the Hub's checkpoint strategy)."""
    from trl_diffusion_sdpo.io.hub import copy_saved_model
    from trl_diffusion_sdpo.io.saving import LORA_WEIGHTS_NAME

    checkpoint, output = tmp_path / "run" / "checkpoint-2", tmp_path / "run"
    owner_only_safetensors(checkpoint / LORA_WEIGHTS_NAME)
    owner_only_safetensors(checkpoint / "unet" / "diffusion_pytorch_model.safetensors")
    copy_saved_model(str(checkpoint), str(output))
    assert stat.S_IMODE((output / LORA_WEIGHTS_NAME).stat().st_mode) == 0o666 & ~umask
    assert wrong_modes(output / "unet", umask) == {}


def test_the_rewinds_disk_snapshot_follows_the_umask(tmp_path, umask):
    from trl_diffusion_sdpo.callbacks.rewind import DiskSnapshot

    layer = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(layer.parameters())
    snapshot = DiskSnapshot(list(layer.parameters()), str(tmp_path / "run" / "rewind"), True, lambda: None)
    snapshot.take(optimizer)
    assert any(name.endswith(".safetensors") for name in os.listdir(tmp_path / "run" / "rewind"))
    assert wrong_modes(tmp_path / "run", umask) == {}


def test_the_demos_saved_base_follows_the_umask(tmp_path, umask):
    """The demo's base (pretrained or cached) is written through a private temporary folder, then renamed."""
    from trl_diffusion_sdpo.demo.pretrain import PretrainRecipe, save_base

    pipe = build_tiny_sd_pipeline(seed=0, tokenizer_dir=str(tmp_path / "tokenizer"))
    save_base(pipe, PretrainRecipe(), tmp_path / "cache" / "base")
    assert (tmp_path / "cache" / "base" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert wrong_modes(tmp_path / "cache", umask) == {}


def test_the_sharded_latent_cache_follows_the_umask(tmp_path, umask):
    """What ``trl-diffusion-sdpo cache`` writes: shards, the empty prompt's embedding, progress and manifest."""
    from datasets import Dataset

    from tests.helpers.latent_cache import _rows
    from trl_diffusion_sdpo import DiffusionSDPOConfig
    from trl_diffusion_sdpo.data.sharded_cache import build_sharded_latent_cache
    from trl_diffusion_sdpo.families import family_for_pipeline

    family = family_for_pipeline(build_tiny_sd_pipeline(seed=0, tokenizer_dir=str(tmp_path / "tokenizer")))
    args = DiffusionSDPOConfig(output_dir=str(tmp_path / "out"), resolution=32, report_to="none", use_cpu=True)
    folder = tmp_path / "cache"
    build_sharded_latent_cache(Dataset.from_list(_rows(3)), args, family, str(folder), chunk_size=2, batch_size=2)
    assert any(name.endswith(".safetensors") for name in os.listdir(folder)), sorted(os.listdir(folder))
    assert wrong_modes(folder, umask) == {}
