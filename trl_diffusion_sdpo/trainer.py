"""``DiffusionSDPOTrainer``: Diffusion-DPO / Diffusion-SDPO on Stable Diffusion UNets with ``transformers.Trainer``.

The trainer orchestrates; the math lives in :mod:`.losses` and :mod:`.safeguard`, the data handling in
:mod:`.data`, SD-vs-SDXL specifics in :mod:`.model_family`, the reference model in :mod:`.reference` and the file
formats in :mod:`.saving`. One training step reads: encode, noise, predict, reference, safeguard, loss, log.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections import defaultdict
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .config import DiffusionSDPOConfig
from .data import DataReport, PairTransform, PreferenceCollator, prepare_preference_dataset
from .hub import build_model_card, upload_folder_to_hub
from .latent_cache import CachedPreferenceCollator, LatentCache, build_latent_cache, latents_from_cached_batch
from .lean_step import (
    clip_divisor,
    engine_manages_gradients,
    fused_scaling_optimizer,
    grad_norm,
    trainable_parameters,
    zero_grads,
)
from .losses import DenoisingErrors, PreferencePredictions, denoising_error, get_objective, implicit_accuracy
from .model_family import ModelFamily, PromptEmbeddings, family_for_pipeline
from .noising import prediction_target, sample_pair_noise, training_scheduler
from .reference import Reference, build_reference
from .safeguard import lambda_from_sums, safeguard_sums, scale_gradient
from .saving import (
    has_saved_weights,
    load_full_unet,
    load_lora_adapters,
    save_full_unet,
    save_lora_adapters,
    unet_has_lora,
)

__all__ = ["DiffusionSDPOTrainer"]

logger = logging.getLogger(__name__)


class _NonFiniteLossGuard(TrainerCallback):
    """Keeps gradients of a non-finite loss away from the optimizer.

    The trainer flags a non-finite micro-batch loss on the device. With a fused optimizer (torch's fused AdamW, the
    default) and ``on_nonfinite_loss="skip"`` the flag goes to the optimizer as ``found_inf`` and its fused kernel
    skips the whole update on the device, so the host never waits; the skips are counted on the device and read
    when logging. Otherwise the flag is read just before the optimizer step, and if set every gradient is dropped
    (``grad = None``). Either way the step is a no-op for all parameters: no moment update, no weight decay.
    """

    def __init__(self, trainer: DiffusionSDPOTrainer) -> None:
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        flag = trainer._nonfinite_flag
        if flag is None:
            return
        trainer._nonfinite_flag = None
        if trainer.accelerator.num_processes > 1:
            flag = trainer.accelerator.reduce(flag, reduction="sum")
        fused = fused_scaling_optimizer(trainer.optimizer, trainer.accelerator)
        if fused is not None and args.on_nonfinite_loss == "skip":
            skipped = (flag > 0).float()
            fused.found_inf = skipped
            pending = trainer._nonfinite_skipped_pending
            trainer._nonfinite_skipped_pending = skipped if pending is None else pending + skipped
            return
        if not bool(flag.item() > 0):
            return
        trainer.model.zero_grad(set_to_none=True)
        trainer._nonfinite_skipped += 1
        if args.on_nonfinite_loss == "raise":
            trainer._save_checkpoint(trainer.model, trial=None)
            raise RuntimeError(
                f"Non-finite loss at optimizer step {state.global_step + 1}; the update was not applied and a "
                f"checkpoint of the last good state was saved in {args.output_dir}/{PREFIX_CHECKPOINT_DIR}-"
                f"{state.global_step}. Lower the learning rate or beta, check the data, or set "
                "on_nonfinite_loss='skip'."
            )
        logger.warning(
            "Non-finite loss: optimizer step %d skipped (%d so far)", state.global_step + 1, trainer._nonfinite_skipped
        )

    def on_optimizer_step(self, args, state, control, **kwargs):
        # The clip divisor and the skip flag hold for one step only.
        fused = fused_scaling_optimizer(self.trainer.optimizer, self.trainer.accelerator)
        if fused is not None:
            fused.grad_scale = None
            fused.found_inf = None


def _compute_dtype(args: DiffusionSDPOConfig) -> torch.dtype:
    if args.bf16:
        return torch.bfloat16
    if args.fp16:
        return torch.float16
    return torch.float32


class DiffusionSDPOTrainer(Trainer):
    """Preference tuning of a Stable Diffusion (1.x, 2.x, XL) UNet with Diffusion-DPO or Diffusion-SDPO.

    Args:
        model: a diffusers pipeline, or a local path / Hub id loaded with ``DiffusionPipeline.from_pretrained``.
            Its UNet is tuned in place (after ``train()``, ``pipe(prompt)`` samples from the tuned model); the VAE
            and text encoder(s) stay frozen.
        ref_model: ``None`` (the adapter-disabled policy with LoRA, else a frozen copy of the initial UNet), or a
            separate UNet or pipeline.
        args: a :class:`DiffusionSDPOConfig`.
        train_dataset, eval_dataset: preference datasets in Pick-a-Pic or TRL form (see :mod:`.data`).
        peft_config: a ``peft.LoraConfig`` to train LoRA adapters on the UNet instead of all its weights.
        callbacks, optimizers: as for ``transformers.Trainer``.
    """

    _tag_names = ["trl", "diffusion-sdpo"]
    _name = "Diffusion-SDPO"
    _paper = {
        "title": "Diffusion-SDPO: Safeguarded Direct Preference Optimization for Diffusion Models",
        "id": "2511.03317",
    }

    def __init__(
        self,
        model: DiffusionPipeline | str,
        ref_model: torch.nn.Module | DiffusionPipeline | None = None,
        args: DiffusionSDPOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        *,
        peft_config: LoraConfig | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
    ) -> None:
        if args is None:
            args = DiffusionSDPOConfig(output_dir="diffusion-sdpo")
        if not isinstance(args, DiffusionSDPOConfig):
            raise TypeError(f"args must be a DiffusionSDPOConfig, got {type(args).__name__}")
        if train_dataset is None:
            raise ValueError("DiffusionSDPOTrainer needs a train_dataset of preference pairs")
        args = copy.copy(args)  # the learning-rate scaling below must not leak into the caller's config

        pipeline = DiffusionPipeline.from_pretrained(model) if isinstance(model, (str, os.PathLike)) else model
        if not isinstance(pipeline, DiffusionPipeline):
            raise TypeError(f"model must be a diffusers pipeline or a path/Hub id, got {type(model).__name__}")
        self.pipeline = pipeline
        self.family: ModelFamily = family_for_pipeline(pipeline)
        self.noise_scheduler = training_scheduler(pipeline.scheduler)
        self.base_model_name = getattr(pipeline.config, "_name_or_path", None) or (
            model if isinstance(model, str) else None
        )
        unet = pipeline.unet

        # Frozen components: never in the optimizer, never in train mode.
        for module in self.family.frozen_modules().values():
            module.requires_grad_(False)
            module.eval()

        # The reference copy is taken before adapters are added so it holds the base weights only.
        if peft_config is not None and ref_model is None and unet_has_lora(unet):
            raise ValueError("The UNet already carries LoRA adapters; pass an explicit ref_model or a clean UNet")
        self.reference: Reference = build_reference(
            unet, ref_model, uses_lora=peft_config is not None, get_policy=lambda: self._policy_unet()
        )
        # As in diffusers' scripts: frozen weights in the compute dtype, trainable weights in float32 (the fp16 grad
        # scaler cannot unscale half-precision gradients, and bf16 weights lose small updates).
        if peft_config is not None:
            unet.requires_grad_(False)
            unet.to(dtype=_compute_dtype(args))
            unet.add_adapter(peft_config)
        else:
            unet.requires_grad_(True)
        cast_training_params(unet, dtype=torch.float32)
        self.is_lora = peft_config is not None
        self.objective = get_objective(args.loss_type)

        # ``gradient_checkpointing`` is an alias of ``activation_checkpointing`` in recent transformers; with either
        # set, transformers would call a method UNets do not have, so the UNet's own switch is used instead.
        if args.gradient_checkpointing or getattr(args, "activation_checkpointing", False):
            unet.enable_gradient_checkpointing()
            args.gradient_checkpointing = False
            if hasattr(args, "activation_checkpointing"):
                args.activation_checkpointing = False

        if args.scale_lr:
            args.learning_rate = (
                args.learning_rate
                * args.world_size
                * args.per_device_train_batch_size
                * args.gradient_accumulation_steps
            )
        if args.accelerator_config.dispatch_batches is None:
            # Streamed batches vary in size (the collator drops bad rows), which accelerate's default for iterable
            # data cannot concatenate across processes; each process reads its own shard instead.
            args.accelerator_config = dataclasses.replace(args.accelerator_config, dispatch_batches=False)

        train_dataset, columns, self.train_data_report = prepare_preference_dataset(train_dataset, args, "train")
        self.eval_data_report: DataReport | None = None
        if eval_dataset is not None:
            eval_dataset, eval_columns, self.eval_data_report = prepare_preference_dataset(eval_dataset, args, "eval")
        else:
            eval_columns = columns
        transform = PairTransform(args.resolution, args.random_crop, args.random_flip)
        tokenize = self.family.prompt_tokenizer()
        data_collator = PreferenceCollator(columns, tokenize, transform, args.proportion_empty_prompts, train=True)
        self._eval_collator = PreferenceCollator(eval_columns, tokenize, transform, 0.0, train=False)
        if args.cache_latents:
            # Encode once (main process first, the others load), then train from the cache.
            train_cache = self._latent_cache(train_dataset, columns, args, "train")
            train_dataset = train_cache.dataset
            data_collator = CachedPreferenceCollator(
                train_cache.empty_prompt, args.proportion_empty_prompts, args.random_flip, train=True
            )
            if eval_dataset is not None:
                eval_cache = self._latent_cache(eval_dataset, eval_columns, args, "eval")
                eval_dataset = eval_cache.dataset
                self._eval_collator = CachedPreferenceCollator(eval_cache.empty_prompt, train=False)

        super().__init__(
            model=unet,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        self.model_accepts_loss_kwargs = False
        self.add_callback(_NonFiniteLossGuard(self))

        self._place_frozen_modules()
        self._metrics: dict[str, defaultdict[str, list[torch.Tensor]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }
        self._nonfinite_flag: torch.Tensor | None = None
        self._nonfinite_skipped = 0
        self._nonfinite_skipped_pending: torch.Tensor | None = None  # skips counted on the device, read when logging
        self._trainable: list[torch.nn.Parameter] = []
        self._eval_generator: torch.Generator | None = None
        self._eval_metric_prefix: str | None = None
        logger.info("Train data: %s", self.train_data_report.summary())

    # ------------------------------------------------------------------ setup

    def _policy_unet(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.pipeline.unet

    def _latent_cache(self, dataset, columns, args: DiffusionSDPOConfig, split: str) -> LatentCache:
        # Without a shared filesystem (save_on_each_node) every node encodes its own copy.
        with args.main_process_first(local=args.save_on_each_node, desc=f"{split} latent cache"):
            return build_latent_cache(
                dataset,
                columns,
                self.family,
                resolution=args.resolution,
                random_flip=args.random_flip and split == "train",
                random_crop=args.random_crop,
                cache_dir=args.latent_cache_dir,
                device=args.device,
                batch_size=max(args.per_device_train_batch_size, 1),
                split=split,
            )

    def _place_frozen_modules(self) -> None:
        """Move the VAE, text encoder(s) and a reference copy to the device in the compute dtype.

        With ``cache_latents`` the VAE and text encoders are not used during training and stay on the CPU.
        """
        device = self.args.device
        compute_dtype = _compute_dtype(self.args)
        for name, module in self.family.frozen_modules().items():
            if self.args.cache_latents:
                module.to(device="cpu")
                continue
            dtype = torch.float32 if name == "vae" and self.family.vae_needs_fp32() else compute_dtype
            module.to(device=device, dtype=dtype)
        if not self.reference.shares_policy_weights:
            self.reference.unet.to(device=device, dtype=compute_dtype)

    # ------------------------------------------------------------------ the step

    def train(self, *args, **kwargs):
        # Only trainable weights ever hold gradients: clipping and zeroing walk those, listed once, instead of every
        # module of the UNet (thousands with LoRA adapters: milliseconds per step). See :mod:`.lean_step`.
        unet = self._policy_unet()
        self._trainable = trainable_parameters(unet)
        unet.zero_grad = lambda set_to_none=True: zero_grads(self._trainable, set_to_none)
        fused = fused_scaling_optimizer(self.optimizer, self.accelerator)
        if fused is not None:  # an interrupted earlier train() may have left a clip divisor or skip flag behind
            fused.grad_scale = fused.found_inf = None
        try:
            return super().train(*args, **kwargs)
        finally:
            del unet.zero_grad  # back to Module.zero_grad

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        # A non-finite micro-batch never reaches the weights (see _NonFiniteLossGuard); keep it out of the logged
        # loss as well, on the device: transformers' logging_nan_inf_filter would make the host wait every step.
        return torch.where(torch.isfinite(loss), loss, torch.zeros_like(loss))

    def _clip_grad_norm(self, model: torch.nn.Module) -> torch.Tensor:
        """Clip the trainable weights' gradients; with a fused optimizer, inside the optimizer's own pass."""
        if engine_manages_gradients(self.accelerator) or not self._trainable:
            return super()._clip_grad_norm(model)
        fused = fused_scaling_optimizer(self.optimizer, self.accelerator)
        if fused is None:
            return self.accelerator.clip_grad_norm_(self._trainable, self.args.max_grad_norm)
        norm = grad_norm(self._trainable)
        fused.grad_scale = clip_divisor(norm, self.args.max_grad_norm)
        return norm

    def _encode_batch(
        self, inputs: dict[str, torch.Tensor], generator: torch.Generator | None
    ) -> tuple[torch.Tensor, PromptEmbeddings, torch.Tensor]:
        """Latents ``[2B, C, h, w]`` (winners then losers), prompt embeddings for 2B, time ids ``[2B, 6]``."""
        if "latent_mean" in inputs:  # a batch of the latent cache: only the posterior sampling is left to do
            return latents_from_cached_batch(inputs, self.family.vae.config, generator, _compute_dtype(self.args))
        pixel_values = inputs["pixel_values"]  # [B, 2, 3, H, W]
        batch = pixel_values.shape[0]
        pixels = pixel_values.transpose(0, 1).reshape(2 * batch, *pixel_values.shape[2:])
        latents = self.family.encode_images(pixels, generator=generator).to(_compute_dtype(self.args))
        tokens = {k: v for k, v in inputs.items() if k.startswith("input_ids")}
        prompt_embeds = self.family.encode_prompts(tokens).repeat(2)
        time_ids = inputs["time_ids"].transpose(0, 1).reshape(2 * batch, -1)
        return latents.float(), prompt_embeds, time_ids

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        mode = "train" if model.training else "eval"
        metrics = self._metrics[mode]
        metrics["data/skipped_rows"].append(inputs["num_skipped"].detach().float())
        if inputs["time_ids"].shape[0] == 0:
            # Every row of this streamed batch was bad: contribute nothing, keep the graph connected.
            loss = sum(p.sum() * 0.0 for p in model.parameters() if p.requires_grad)
            return (loss, {}) if return_outputs else loss
        generator = self._eval_generator if mode == "eval" else None

        # encode
        latents, prompt_embeds, time_ids = self._encode_batch(inputs, generator)
        batch = latents.shape[0] // 2
        # noise: one timestep and one noise per pair, shared by winner and loser
        timesteps, noise = sample_pair_noise(
            latents[:batch].shape,
            self.noise_scheduler.config.num_train_timesteps,
            self.args.min_timestep,
            self.args.max_timestep,
            latents.device,
            latents.dtype,
            generator,
        )
        timesteps, noise = timesteps.repeat(2), noise.repeat(2, 1, 1, 1)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        target = prediction_target(self.noise_scheduler, latents, noise, timesteps)
        conditioning = self.family.unet_conditioning(prompt_embeds, time_ids)

        # predict: one policy forward over winners and losers together
        policy_pred = model(noisy, timesteps, **conditioning, return_dict=False)[0]
        # reference
        ref_pred = None
        if self.objective.requires_reference:
            ref_pred = self.reference.predict(noisy, timesteps, **conditioning)

        predictions = PreferencePredictions(
            policy_winner=policy_pred[:batch],
            policy_loser=policy_pred[batch:],
            target_winner=target[:batch],
            target_loser=target[batch:],
            reference_winner=None if ref_pred is None else ref_pred[:batch],
            reference_loser=None if ref_pred is None else ref_pred[batch:],
        )
        errors = DenoisingErrors(
            policy_winner=denoising_error(predictions.policy_winner, predictions.target_winner),
            policy_loser=denoising_error(predictions.policy_loser, predictions.target_loser),
        )
        if ref_pred is not None:
            errors.reference_winner = denoising_error(predictions.reference_winner, predictions.target_winner)
            errors.reference_loser = denoising_error(predictions.reference_loser, predictions.target_loser)

        # safeguard: scale the loser error's gradient, keep its value
        lam = None
        if self.args.safeguard:
            lam = self._safeguard_lambda(predictions)
            errors.policy_loser = scale_gradient(errors.policy_loser, lam)

        # loss
        output = self.objective(predictions, errors, beta=self.args.beta, pair_weights=inputs.get("pair_weights"))
        loss = output.loss
        if mode == "train":
            finite = torch.isfinite(loss.detach())
            flag = (~finite).float()
            self._nonfinite_flag = flag if self._nonfinite_flag is None else self._nonfinite_flag + flag

        # log
        self._record_metrics(metrics, errors, output.logits, lam)
        return (loss, {"logits": output.logits}) if return_outputs else loss

    def _safeguard_lambda(self, predictions: PreferencePredictions) -> torch.Tensor:
        """The authors' output-space rule on the policy's residuals, one detached fp32 scalar per micro-batch."""
        winner_residual = predictions.policy_winner - predictions.target_winner
        loser_residual = predictions.policy_loser - predictions.target_loser
        num, den = safeguard_sums(winner_residual, loser_residual)
        return lambda_from_sums(num, den, self.args.safeguard_mu, self.args.safeguard_max_lambda)

    def _record_metrics(
        self,
        metrics: defaultdict[str, list[torch.Tensor]],
        errors: DenoisingErrors,
        logits: torch.Tensor,
        lam: torch.Tensor | None,
    ) -> None:
        # Tensors stay on the device; they are reduced only when logging, so a step never waits on the host.
        metrics["implicit_acc"].append(implicit_accuracy(logits.detach()))
        metrics["mse/policy_winner"].append(errors.policy_winner.detach().mean())
        metrics["mse/policy_loser"].append(errors.policy_loser.detach().mean())
        if errors.reference_winner is not None:
            metrics["mse/ref_winner"].append(errors.reference_winner.mean())
            metrics["mse/ref_loser"].append(errors.reference_loser.mean())
            metrics["delta/winner"].append((errors.policy_winner.detach() - errors.reference_winner).mean())
            metrics["delta/loser"].append((errors.policy_loser.detach() - errors.reference_loser).mean())
        if lam is not None:
            metrics["safeguard/lambda"].append(lam)

    # ------------------------------------------------------------------ logging

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        prefix = self._eval_metric_prefix  # set while evaluate() runs
        mode = "train" if prefix is None else "eval"
        stored = self._metrics[mode]
        reduced: dict[str, float] = {}
        for key, values in stored.items():
            if not values:
                continue
            stacked = torch.stack([v.float() for v in values])
            if key == "safeguard/lambda":
                for name, value in (
                    ("safeguard/lambda_mean", stacked.mean()),
                    ("safeguard/lambda_min", stacked.min()),
                    ("safeguard/lambda_max", stacked.max()),
                    ("safeguard/engaged", (stacked < self.args.safeguard_max_lambda).float().mean()),
                ):
                    reduced[name] = self._reduce(value, "min" if name.endswith("_min") else
                                                 "max" if name.endswith("_max") else "mean")
            elif key == "data/skipped_rows":
                reduced[key] = self._reduce(stacked.sum(), "sum")
            else:
                reduced[key] = self._reduce(stacked.mean(), "mean")
        if mode == "train":
            self._count_device_skips()
            reduced["nonfinite_skipped"] = float(self._nonfinite_skipped)
        else:
            reduced = {f"{prefix}_{k}": v for k, v in reduced.items()}
        # In place: evaluate() returns this very dict, and on_evaluate callbacks (best-model tracking) read it.
        logs.update(reduced)
        stored.clear()
        super().log(logs, start_time)

    def _count_device_skips(self) -> None:
        pending, self._nonfinite_skipped_pending = self._nonfinite_skipped_pending, None
        skipped = 0 if pending is None else round(float(pending.item()))
        if skipped:
            self._nonfinite_skipped += skipped
            logger.warning(
                "Non-finite loss: %d optimizer step(s) skipped since the last log (%d so far)",
                skipped,
                self._nonfinite_skipped,
            )

    def _reduce(self, value: torch.Tensor, how: str) -> float:
        if self.accelerator.num_processes > 1:
            if how in ("min", "max"):
                gathered = self.accelerator.gather(value.reshape(1))
                value = gathered.min() if how == "min" else gathered.max()
            else:
                value = self.accelerator.reduce(value, reduction="sum" if how == "sum" else "mean")
        return float(value.item())

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        # A fresh seeded generator per evaluation: the same noise, timesteps and VAE samples every time.
        self._eval_generator = torch.Generator().manual_seed(self.args.eval_seed + self.args.process_index)
        self._eval_metric_prefix = metric_key_prefix
        try:
            return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        finally:
            self._eval_generator = None
            self._eval_metric_prefix = None

    def get_eval_dataloader(self, eval_dataset=None):
        train_collator, self.data_collator = self.data_collator, self._eval_collator
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = train_collator

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ------------------------------------------------------------------ saving and loading

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        unet = self.accelerator.unwrap_model(self.model)
        if self.is_lora:
            save_lora_adapters(unet, output_dir, type(self.pipeline), state_dict=state_dict or None)
        else:
            save_full_unet(unet, output_dir, state_dict=state_dict or None)
        # Plain JSON instead of transformers' pickled training_args.bin.
        with open(os.path.join(output_dir, "training_config.json"), "w") as f:
            f.write(self.args.to_json_string())

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        if not has_saved_weights(resume_from_checkpoint):
            raise ValueError(f"No trl-diffusion-sdpo weights found in checkpoint {resume_from_checkpoint}")
        unet = self.accelerator.unwrap_model(model if model is not None else self.model)
        if self.is_lora:
            load_lora_adapters(unet, resume_from_checkpoint)
        else:
            load_full_unet(unet, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    # ------------------------------------------------------------------ the Hub

    def create_model_card(self, model_name: str | None = None, tags: list[str] | None = None, **kwargs) -> None:
        """Write ``README.md`` in ``output_dir``: base model, tags, method, key hyperparameters, citations."""
        if not self.is_world_process_zero():
            return
        args = self.args
        hyperparameters: dict[str, Any] = {
            "loss_type": args.loss_type,
            "beta": args.beta,
            "safeguard": args.safeguard,
            "safeguard_mu": args.safeguard_mu if args.safeguard else None,
            "learning_rate": args.learning_rate,
            "effective_batch_size": args.world_size * args.per_device_train_batch_size
            * args.gradient_accumulation_steps,
            "max_steps": self.state.max_steps or args.max_steps,
            "resolution": args.resolution,
            "tuning": "LoRA" if self.is_lora else "full UNet",
        }
        if self.is_lora:
            lora = self.accelerator.unwrap_model(self.model).peft_config["default"]
            hyperparameters["lora_rank"] = lora.r
            hyperparameters["lora_alpha"] = lora.lora_alpha
        card = build_model_card(
            base_model=self.base_model_name,
            is_lora=self.is_lora,
            method="Diffusion-SDPO" if args.safeguard else "Diffusion-DPO",
            hyperparameters=hyperparameters,
            tags=list(self._tag_names) + list(tags or []),
            model_family=self.family.name,
        )
        os.makedirs(args.output_dir, exist_ok=True)
        card.save(os.path.join(args.output_dir, "README.md"))

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        private: bool | None = None,
        **kwargs,
    ):
        """Save the weights and a model card to ``output_dir`` and upload that folder to ``args.hub_model_id``."""
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        self.create_model_card(tags=kwargs.get("tags"))
        repo_id = self.args.hub_model_id or os.path.basename(os.path.abspath(self.args.output_dir))
        return upload_folder_to_hub(
            self.args.output_dir,
            repo_id,
            token=token or self.args.hub_token,
            private=private if private is not None else self.args.hub_private_repo,
            revision=revision or self.args.hub_revision,
            commit_message=commit_message or "End of training",
        )
