"""The frozen parts (VAE, text encoders) off the device: with a latent cache they stay on the CPU; otherwise
``offload_frozen_modules`` hands them to diffusers' group offloading, and training computes what it computes without
it."""

from __future__ import annotations

import torch

from trl_diffusion_sdpo import DiffusionSDPOTrainer


def group_offloaded(module: torch.nn.Module) -> bool:
    """Whether diffusers' group-offloading hook sits on every leaf layer of ``module`` (its hook registry)."""
    from diffusers.hooks import HookRegistry

    leaves = [m for m in module.modules() if not list(m.children()) and list(m.parameters(recurse=False))]
    return bool(leaves) and all(
        any("group_offloading" in name for name in HookRegistry.check_if_exists_or_initialize(m).hooks) for m in leaves
    )


def losses(trainer: DiffusionSDPOTrainer) -> list[float]:
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_offloaded_frozen_parts_train_as_resident_ones(make_pipeline, make_config, pickapic_dataset) -> None:
    runs = {}
    for offload in (False, True):
        pipe = make_pipeline()
        trainer = DiffusionSDPOTrainer(
            pipe, args=make_config(offload_frozen_modules=offload, max_steps=2), train_dataset=pickapic_dataset
        )
        assert group_offloaded(pipe.vae) == offload and group_offloaded(pipe.text_encoder) == offload
        runs[offload] = losses(trainer)
    assert len(runs[True]) == 2
    assert runs[True] == runs[False]


def test_cached_latents_leave_the_frozen_parts_on_the_cpu_without_offloading(
    make_pipeline, make_config, pickapic_dataset, tmp_path
) -> None:
    pipe = make_pipeline()
    DiffusionSDPOTrainer(
        pipe,
        args=make_config(cache_latents=True, latent_cache_dir=str(tmp_path / "cache"), offload_frozen_modules=True),
        train_dataset=pickapic_dataset,
    )
    for module in (pipe.vae, pipe.text_encoder):
        assert {p.device.type for p in module.parameters()} == {"cpu"}
        assert not group_offloaded(module)
