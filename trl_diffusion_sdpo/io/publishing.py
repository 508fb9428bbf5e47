"""Publishing a trained model the way TRL's trainers do: a model card, a Hub repo, pushes at every save and at the
end, as a mixin of :class:`~trl_diffusion_sdpo.DiffusionSDPOTrainer`.

transformers' own versions copy files named as its weights (none of ours) and upload a pickled
``training_args.bin``; these push the diffusers-format weights, ``training_config.json`` and the card, built by
:func:`.hub.build_model_card`, and never a pickle.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from transformers.trainer_utils import HubStrategy
from transformers.utils import PushInProgress

from .hub import build_model_card, create_hub_repo, push_checkpoint, upload_folder_to_hub
from .saving import copy_saved_model, has_pipeline_components, save_pipeline_components

if TYPE_CHECKING:
    from transformers import Trainer

    _Base = Trainer
else:
    _Base = object

__all__ = ["HubPublishing"]


class HubPublishing(_Base):
    """Model card and Hub pushes for the trainer; reads its ``args``, ``args_as_given``, ``family``, ``pipeline``,
    ``is_lora``, ``base_model_name`` and ``_model_card_args``."""

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
        license: str | None = None,
    ) -> None:
        """Write ``README.md`` in ``output_dir`` (TRL's signature, plus transformers' ``license``): base model (when
        a Hub id), dataset, method, usage, the last validation grid, key hyperparameters, framework versions and
        citations. Arguments given once are remembered for the cards of later pushes."""
        given = {"model_name": model_name, "dataset_name": dataset_name, "tags": tags, "license": license}
        self._model_card_args.update({k: v for k, v in given.items() if v is not None})
        if not self.is_world_process_zero():
            return
        args, card_args = self.args, self._model_card_args
        hyperparameters: dict[str, Any] = {
            "loss_type": args.loss_type,
            "beta": args.beta,
            "safeguard": args.safeguard,
            "safeguard_mu": args.safeguard_mu if args.safeguard else None,
            "safeguard_space": args.safeguard_space if args.safeguard else None,
            "learning_rate": self.args_as_given.learning_rate,
            "scale_lr": args.scale_lr,
            "effective_learning_rate": args.learning_rate,
            "effective_batch_size": args.world_size
            * args.per_device_train_batch_size
            * args.gradient_accumulation_steps,
            "max_steps": self.state.max_steps or args.max_steps,
            "resolution": args.resolution,
            "tuning": "LoRA" if self.is_lora else f"full {self.family.denoiser_name.replace('unet', 'UNet')}",
        }
        if self.is_lora:
            lora = self.accelerator.unwrap_model(self.model).peft_config["default"]
            hyperparameters["lora_rank"] = lora.r
            hyperparameters["lora_alpha"] = lora.lora_alpha
        tags = card_args.get("tags") or []
        hub_model_id = self.hub_model_id or args.hub_model_id
        card = build_model_card(
            base_model=self.base_model_name,
            is_lora=self.is_lora,
            method="Diffusion-SDPO" if args.safeguard else "Diffusion-DPO",
            hyperparameters=hyperparameters,
            tags=list(self._tag_names) + ([tags] if isinstance(tags, str) else list(tags)),
            model_family=self.family.name,
            model_name=card_args.get("model_name")
            or (hub_model_id or os.path.basename(os.path.abspath(args.output_dir))).split("/")[-1],
            hub_model_id=hub_model_id,
            dataset_name=card_args.get("dataset_name"),
            license=card_args.get("license"),
            sample_grid=self._last_validation_grid(),
            sample_prompt=(args.validation_prompts or [None])[0],
            denoiser=(self.family.denoiser_name, type(self.family.denoiser).__name__),
            pipeline_loads_lora=hasattr(type(self.pipeline), "load_lora_weights"),
        )
        os.makedirs(args.output_dir, exist_ok=True)
        card.save(os.path.join(args.output_dir, "README.md"))

    def _last_validation_grid(self) -> str | None:
        """The newest ``validation/step-*.png`` in ``output_dir``, relative to it (for the model card)."""
        folder = os.path.join(self.args.output_dir, "validation")
        grids = sorted(f for f in os.listdir(folder) if f.startswith("step-")) if os.path.isdir(folder) else []
        return f"validation/{grids[-1]}" if grids else None

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """Create the Hub repo (``hub_model_id``, else the output folder's name) through :mod:`.io.hub`."""
        if not self.is_world_process_zero():
            return
        self.hub_model_id = create_hub_repo(
            self.args.hub_model_id or os.path.basename(os.path.abspath(self.args.output_dir)),
            token=token or self.args.hub_token,
            private=private if private is not None else self.args.hub_private_repo,
        )
        self.push_in_progress = None

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """A save with ``push_to_hub``: copy the checkpoint's weights to ``output_dir`` (with the rest of the pipeline
        for full tuning, and a model card) and upload it in the background. transformers' version copies files named
        as its own weights (none of ours) and a pickled training_args.bin."""
        args = self.args
        if not self.is_world_process_zero() or args.hub_strategy == HubStrategy.END:
            return
        if not args.hub_always_push and self.push_in_progress is not None and not self.push_in_progress.is_done():
            return
        self.callback_handler.on_push_begin(args, self.state, self.control)
        copy_saved_model(checkpoint_folder, args.output_dir)
        if not self.is_lora and not has_pipeline_components(args.output_dir):
            save_pipeline_components(self.pipeline, args.output_dir, self.family.denoiser_name)
        self.create_model_card()
        checkpoint_path = {
            HubStrategy.CHECKPOINT: "last-checkpoint",
            HubStrategy.ALL_CHECKPOINTS: os.path.basename(checkpoint_folder),
        }.get(args.hub_strategy)
        jobs = push_checkpoint(
            args.output_dir,
            checkpoint_folder,
            self.hub_model_id,
            commit_message=f"Training in progress, step {self.state.global_step}",
            push_checkpoint_folder=checkpoint_path,
            token=args.hub_token,
            revision=args.hub_revision,
        )
        if self.push_in_progress is None or self.push_in_progress.is_done():
            self.push_in_progress = PushInProgress(jobs)
        else:
            self.push_in_progress.jobs.extend(jobs)

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs,
    ):
        """Save the weights and a model card (``kwargs``: :meth:`create_model_card`'s) to ``output_dir`` and upload
        that folder to ``hub_model_id``, once the checkpoint pushes still running are done."""
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        self.create_model_card(**kwargs)
        self._finish_current_push()
        repo_id = (
            self.hub_model_id or self.args.hub_model_id or os.path.basename(os.path.abspath(self.args.output_dir))
        )
        return upload_folder_to_hub(
            self.args.output_dir,
            repo_id,
            token=token or self.args.hub_token,
            private=private if private is not None else self.args.hub_private_repo,
            revision=revision or self.args.hub_revision,
            commit_message=commit_message or "End of training",
        )
