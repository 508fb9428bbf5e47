"""Saving and loading the trained denoiser from the trainer, in diffusers' formats, whatever the engine.

Mixed into :class:`~trl_diffusion_sdpo.DiffusionSDPOTrainer` (as :class:`.checkpoints.AtomicCheckpoints` and
:class:`.publishing.HubPublishing` are): ``transformers.Trainer``'s save and load hooks write and read LoRA adapters
(``pytorch_lora_weights.safetensors``) or the denoiser's subfolder, never pickles. Where the engine shards the weights
it gathers them first (:meth:`~trl_diffusion_sdpo.engines.Engine.gather_state_dict`) and loads into its shards
(:meth:`~trl_diffusion_sdpo.engines.Engine.loading`).
"""

from __future__ import annotations

import os

import torch
from transformers import Trainer

from . import saving
from .checkpoints import is_checkpoint_folder

__all__ = ["DenoiserSaving"]


class DenoiserSaving:
    """``save_model``, ``_save``, ``_load_from_checkpoint`` for a trainer with ``engine``, ``family``, ``pipeline``,
    ``is_lora`` and ``args_as_given``."""

    def save_model(self: Trainer, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write the LoRA adapters or the denoiser, in diffusers' format, to ``output_dir``.

        Where the engine shards the weights (DeepSpeed ZeRO-3, FSDP2) they are first gathered (every process must
        call this), so the files are the same as on one process whatever the engine's own save settings say.
        """
        if not self.engine.gathers_for_save():
            return super().save_model(output_dir, _internal_call)
        self._save(output_dir, state_dict=self.engine.gather_state_dict(self.model, trainable_only=self.is_lora))
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save(self: Trainer, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        denoiser = self.accelerator.unwrap_model(self.model)
        name = self.family.denoiser_name
        if self.is_lora:
            pipeline_class = type(self.pipeline)
            saving.save_lora_adapters(denoiser, output_dir, pipeline_class, state_dict=state_dict or None, prefix=name)
        else:
            saving.save_full_denoiser(denoiser, output_dir, state_dict=state_dict or None, subfolder=name)
            # The whole pipeline in the output folder, only the denoiser in checkpoints (all that resuming reads).
            # The other components are frozen: written once.
            if not is_checkpoint_folder(output_dir) and not saving.has_pipeline_components(output_dir):
                saving.save_pipeline_components(self.pipeline, output_dir, name)
        # Plain JSON instead of transformers' pickled training_args.bin; the config as given (learning_rate before
        # scale_lr), so that training again from the file does not scale it twice.
        saving.write_training_config(self.args_as_given, output_dir)

    def _save_optimizer_and_scheduler(self: Trainer, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        self.engine.clean_checkpoint(output_dir, self.args.should_save)

    def _load_from_checkpoint(
        self: Trainer, resume_from_checkpoint: str, model: torch.nn.Module | None = None
    ) -> None:
        if not saving.has_saved_weights(resume_from_checkpoint):
            raise ValueError(f"No trl-diffusion-sdpo weights found in checkpoint {resume_from_checkpoint}")
        denoiser = self.accelerator.unwrap_model(model if model is not None else self.model)
        with self.engine.loading():
            if self.is_lora:
                saving.load_lora_adapters(denoiser, resume_from_checkpoint, prefix=self.family.denoiser_name)
            else:
                saving.load_full_denoiser(denoiser, resume_from_checkpoint, subfolder=self.family.denoiser_name)

    def _load_best_model(self: Trainer) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)
