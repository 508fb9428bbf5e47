"""``DiffusionSDPOTrainer``: Diffusion-DPO / Diffusion-SDPO on Stable Diffusion UNets with ``transformers.Trainer``.

The trainer orchestrates; the math lives in :mod:`.losses` and :mod:`.safeguard`, the data handling in
:mod:`.data`, SD-vs-SDXL specifics in :mod:`.model_family`, the reference model in :mod:`.reference` and the file
formats in :mod:`.saving`. One training step reads: encode, noise, predict, reference, safeguard, loss, log.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import os
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, enable_full_determinism, set_seed

from .config import DiffusionSDPOConfig
from .data.latent_cache import (
    CachedPreferenceCollator,
    LatentCache,
    build_latent_cache,
    cached_moments,
    cached_prompt_embeds,
    cached_time_ids,
)
from .data.preference import DataReport, PairTransform, PreferenceCollator, prepare_preference_dataset
from .distributed import (
    all_reduce_sum,
    check_not_partitioned,
    gather_zero3_state_dict,
    load_pipeline,
    rank_rows,
    reference_inference_engine,
    zero_stage,
)
from .families import ModelFamily, PromptEmbeddings, family_for_pipeline, scale_latents
from .io.hub import build_model_card, upload_folder_to_hub
from .io.saving import (
    has_saved_weights,
    load_full_unet,
    load_lora_adapters,
    save_full_unet,
    save_lora_adapters,
    unet_has_lora,
)
from .objectives import DenoisingErrors, PreferencePredictions, denoising_error, get_objective, implicit_accuracy
from .reference import Reference, build_reference
from .step.noising import prediction_target, sample_pair_noise, training_scheduler
from .step.optimizer import (
    clip_divisor,
    engine_manages_gradients,
    fused_scaling_optimizer,
    grad_norm,
    trainable_parameters,
    zero_grads,
)
from .step.safeguard import lambda_from_sums, safeguard_sums, scale_gradient

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
        if trainer.is_deepspeed_enabled:
            # DeepSpeed has already stepped, inside backward, and skipped the update: a non-finite loss makes the
            # gradient norm non-finite, which its ZeRO optimizers treat as an overflow. Count it, or stop.
            if bool(flag.item() > 0):
                trainer._nonfinite_skipped += 1
                self._stop_or_warn(args, state)
            return
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
        self._stop_or_warn(args, state)

    def _stop_or_warn(self, args, state) -> None:
        trainer = self.trainer
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


def _where_rows(condition: torch.Tensor, if_true: torch.Tensor, if_false: torch.Tensor) -> torch.Tensor:
    """``if_true`` in the rows (dim 0) where ``condition`` is set, ``if_false`` elsewhere."""
    condition = condition.to(if_false.device).view(-1, *([1] * (if_false.dim() - 1)))
    return torch.where(condition, if_true.to(if_false), if_false)


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
        # Seeded before LoRA adapters are initialised, so their random init is the same on every run.
        enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)

        # Loaded whole even under ZeRO-3's zero3_init_flag: the frozen components must not be sharded.
        pipeline = load_pipeline(model) if isinstance(model, (str, os.PathLike)) else model
        if not isinstance(pipeline, DiffusionPipeline):
            raise TypeError(f"model must be a diffusers pipeline or a path/Hub id, got {type(model).__name__}")
        self.pipeline = pipeline
        self.family: ModelFamily = family_for_pipeline(pipeline)
        check_not_partitioned({**self.family.frozen_modules(), "unet": pipeline.unet})
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
        transform = PairTransform(args.resolution, args.random_crop)
        self._tokenize = self.family.prompt_tokenizer()
        data_collator = PreferenceCollator(
            columns, self._tokenize, transform, train=True, with_flipped=args.random_flip
        )
        self._eval_collator = PreferenceCollator(eval_columns, self._tokenize, transform, train=False)
        self._empty_prompt: PromptEmbeddings | None = None  # for prompt dropout; encoded at first use
        if args.cache_latents:
            # Encode once (main process first, the others load), then train from the cache.
            train_cache = self._latent_cache(train_dataset, columns, args, "train")
            train_dataset = train_cache.dataset
            data_collator = CachedPreferenceCollator(with_flipped=args.random_flip)
            self._empty_prompt = train_cache.empty_prompt
            if eval_dataset is not None:
                eval_cache = self._latent_cache(eval_dataset, eval_columns, args, "eval")
                eval_dataset = eval_cache.dataset
                self._eval_collator = CachedPreferenceCollator()

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
        self._draw_step, self._draw_index = -1, 0  # which micro-batch of which step the training draws are for
        self._last_inputs: dict[str, dict] = {}  # per mode, for a micro-batch whose rows were all invalid
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

        With ``cache_latents`` the VAE and text encoders are not used during training and stay on the CPU. Under
        DeepSpeed ZeRO-3 a reference copy is sharded like the policy instead (an engine without optimizer); under DDP
        and ZeRO-1/2 every process holds it whole, in the compute dtype.
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
            if zero_stage(self.accelerator) == 3:
                self.reference.unet = reference_inference_engine(self.reference.unet, self.accelerator)
            else:
                self.reference.unet.to(device=device, dtype=compute_dtype)
            self.reference.dtype = compute_dtype

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
        self, inputs: dict[str, torch.Tensor], flip: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, PromptEmbeddings, torch.Tensor]:
        """VAE posterior mean and std ``[2B, C, h, w]`` (winners then losers), prompt embeddings ``[B, ...]`` and
        time ids ``[2B, 6]``; the pairs where ``flip`` is set are mirrored (both images)."""
        dtype = _compute_dtype(self.args)
        if flip is not None:
            inputs = dict(inputs, time_ids=_where_rows(flip, inputs["time_ids_flipped"], inputs["time_ids"]))
        if "latent_mean" in inputs:  # a batch of the latent cache: nothing left to encode
            if flip is not None:
                for key in ("latent_mean", "latent_std"):
                    inputs[key] = _where_rows(flip, inputs[f"{key}_flipped"], inputs[key])
            mean, std = cached_moments(inputs)
            return mean, std, cached_prompt_embeds(inputs, dtype), cached_time_ids(inputs)
        pixel_values = inputs["pixel_values"]  # [B, 2, 3, H, W]
        if flip is not None:
            pixel_values = _where_rows(flip, pixel_values.flip(-1), pixel_values)
        batch = pixel_values.shape[0]
        pixels = pixel_values.transpose(0, 1).reshape(2 * batch, *pixel_values.shape[2:])
        mean, std = self.family.encode_moments(pixels)
        tokens = {k: v for k, v in inputs.items() if k.startswith("input_ids")}
        prompt_embeds = self.family.encode_prompts(tokens)
        time_ids = inputs["time_ids"].transpose(0, 1).reshape(2 * batch, -1)
        return mean, std, prompt_embeds, time_ids

    def _drop_prompts(self, embeds: PromptEmbeddings, drop: torch.Tensor) -> PromptEmbeddings:
        """Replace the prompt embeddings of the rows where ``drop`` is set by the empty prompt's."""
        if self._empty_prompt is None:
            tokens = {k: v.to(self.args.device) for k, v in self._tokenize([""]).items()}
            self._empty_prompt = self.family.encode_prompts(tokens)
        empty = self._empty_prompt
        hidden = embeds.encoder_hidden_states
        hidden = _where_rows(drop, empty.encoder_hidden_states.to(hidden).expand_as(hidden), hidden)
        pooled = embeds.pooled
        if pooled is not None:
            pooled = _where_rows(drop, empty.pooled.to(pooled).expand_as(pooled), pooled)
        return PromptEmbeddings(hidden, pooled)

    def _generator(self, mode: str, device: torch.device) -> torch.Generator:
        """The generator of this micro-batch's random draws (flips, prompt dropout, timesteps, noise, posterior
        samples).

        Training: seeded by ``(seed, global step, micro-batch within the step)``, so a resumed run draws exactly
        what the uninterrupted one did. Evaluation: the CPU generator seeded with ``eval_seed`` at each
        ``evaluate()``. Every process holds the same generator state and draws for all processes (see
        :meth:`_draw`).
        """
        if mode == "eval" and self._eval_generator is not None:
            return self._eval_generator
        step = self.state.global_step
        if step != self._draw_step:
            self._draw_step, self._draw_index = step, 0
        key = f"{self.args.seed}/{step}/{self._draw_index}".encode()
        self._draw_index += 1
        seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
        return torch.Generator(device=device).manual_seed(seed)

    def _draw(
        self, generator: torch.Generator, mode: str, batch: int, draw: Callable[[int, torch.device], tuple]
    ) -> tuple[torch.Tensor, ...]:
        """``draw(n, device)`` for the global micro-batch (every process, ``per_device_*_batch_size`` rows each),
        of which this process keeps its own rows: a pair gets the same draws whatever the number of processes."""
        rows = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        return tuple(
            t.to(self.args.device)
            for t in rank_rows(
                lambda n: draw(n, generator.device),
                batch,
                rows,
                self.accelerator.process_index,
                self.accelerator.num_processes,
            )
        )

    def _sample(
        self, generator: torch.Generator, mode: str, mean: torch.Tensor, std: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Timesteps, noise and latents ``[2B, ...]``: one timestep and noise per pair (shared by winner and loser),
        a posterior sample ``mean + std * eps`` per image."""
        batch = mean.shape[0] // 2
        latent_shape = tuple(mean.shape[1:])

        def draw(n: int, device: torch.device) -> tuple[torch.Tensor, ...]:
            timesteps, noise = sample_pair_noise(
                (n, *latent_shape),
                self.noise_scheduler.config.num_train_timesteps,
                self.args.min_timestep,
                self.args.max_timestep,
                device,
                torch.float32,
                generator,
            )
            eps = torch.randn((n, 2, *latent_shape), generator=generator, device=device)
            return timesteps, noise, eps

        timesteps, noise, eps = self._draw(generator, mode, batch, draw)
        eps = eps.to(mean).transpose(0, 1).reshape(2 * batch, *latent_shape)  # winners, then losers
        latents = scale_latents(mean + std * eps, self.family.vae.config)
        return timesteps.repeat(2), noise.to(mean).repeat(2, 1, 1, 1), latents

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
        replay = False
        if inputs["time_ids"].shape[0] == 0:
            # Every row of this streamed micro-batch was invalid.
            if self.accelerator.num_processes == 1:  # contribute nothing, keep the graph connected
                loss = sum(p.sum() * 0.0 for p in model.parameters() if p.requires_grad)
                return (loss, {}) if return_outputs else loss
            # The other processes run forward and backward (collectives): join them on the last good micro-batch,
            # weighted zero and kept out of the metrics.
            if mode not in self._last_inputs:
                raise RuntimeError(
                    f"Every row of the first {mode} micro-batch on process {self.accelerator.process_index} was "
                    "invalid, and with several processes a micro-batch cannot be left out. Clean the data or raise "
                    "the per-device batch size."
                )
            inputs, replay = self._last_inputs[mode], True
        elif self.accelerator.num_processes > 1:
            self._last_inputs[mode] = inputs

        # augment: flip both images of a pair, drop the prompt (training only)
        generator = self._generator(mode, self.args.device)
        batch = inputs["time_ids"].shape[0]
        flip, drop = self._draw(
            generator, mode, batch, lambda n, device: tuple(torch.rand((2, n), generator=generator, device=device))
        )
        train = mode == "train"
        flip = flip < 0.5 if train and self.args.random_flip else None
        # encode
        mean, std, prompt_embeds, time_ids = self._encode_batch(inputs, flip)
        if train and self.args.proportion_empty_prompts > 0:
            prompt_embeds = self._drop_prompts(prompt_embeds, drop < self.args.proportion_empty_prompts)
        prompt_embeds = prompt_embeds.repeat(2)
        # noise: one timestep and one noise per pair, shared by winner and loser
        timesteps, noise, latents = self._sample(generator, mode, mean, std)
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
        if replay:
            loss = loss * 0.0
            return (loss, {"logits": output.logits}) if return_outputs else loss
        if mode == "train":
            finite = torch.isfinite(loss.detach())
            flag = (~finite).float()
            self._nonfinite_flag = flag if self._nonfinite_flag is None else self._nonfinite_flag + flag

        # log
        self._record_metrics(metrics, errors, output.logits, lam)
        return (loss, {"logits": output.logits}) if return_outputs else loss

    def _safeguard_lambda(self, predictions: PreferencePredictions) -> torch.Tensor:
        """The authors' output-space rule on the policy's residuals, one detached fp32 scalar per micro-batch.

        With ``safeguard_scope="global"`` the two sums are added up over all processes first, so ``lambda`` is that
        of the global micro-batch.
        """
        winner_residual = predictions.policy_winner - predictions.target_winner
        loser_residual = predictions.policy_loser - predictions.target_loser
        num, den = safeguard_sums(winner_residual, loser_residual)
        if self.args.safeguard_scope == "global" and self.accelerator.num_processes > 1:
            num, den = all_reduce_sum(torch.stack([num, den]))
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
        reduced = self._reduce_metrics(self._metrics[mode])
        if mode == "train":
            self._count_device_skips()
            reduced["nonfinite_skipped"] = float(self._nonfinite_skipped)
        else:
            reduced = {f"{prefix}_{k}": v for k, v in reduced.items()}
        # In place: evaluate() returns this very dict, and on_evaluate callbacks (best-model tracking) read it.
        logs.update(reduced)
        super().log(logs, start_time)

    def _metric_names(self) -> list[str]:
        """The metrics every micro-batch records; the same list on every process (they are reduced together)."""
        names = ["data/skipped_rows", "implicit_acc", "mse/policy_winner", "mse/policy_loser"]
        if self.objective.requires_reference:
            names += ["mse/ref_winner", "mse/ref_loser", "delta/winner", "delta/loser"]
        if self.args.safeguard:
            names.append("safeguard/lambda")
        return names

    def _reduce_metrics(self, stored: defaultdict[str, list[torch.Tensor]]) -> dict[str, float]:
        """Means over the micro-batches of all processes since the last log (sums for skipped rows; min and max of
        lambda), with one all-reduce and one gather however many metrics there are; the stored values are cleared.
        """
        names = self._metric_names()
        device = self.args.device
        sums, counts = torch.zeros(len(names) + 1, device=device), torch.zeros(len(names) + 1, device=device)
        lam_min = lam_max = None
        for i, name in enumerate(names):
            values = stored.get(name)
            if not values:
                continue
            stacked = torch.stack([v.detach().float().to(device) for v in values])
            sums[i], counts[i] = stacked.sum(), stacked.numel()
            if name == "safeguard/lambda":
                sums[-1], counts[-1] = (stacked < self.args.safeguard_max_lambda).float().sum(), stacked.numel()
                lam_min, lam_max = stacked.min(), stacked.max()
        stored.clear()
        extremes = torch.stack([
            -lam_min if lam_min is not None else torch.tensor(-torch.inf, device=device),
            lam_max if lam_max is not None else torch.tensor(-torch.inf, device=device),
        ])
        if self.accelerator.num_processes > 1:
            totals = self.accelerator.reduce(torch.stack([sums, counts]), reduction="sum")
            sums, counts = totals[0], totals[1]
            extremes = self.accelerator.gather(extremes.reshape(1, 2)).amax(dim=0)
        sums, counts, extremes = sums.tolist(), counts.tolist(), extremes.tolist()  # the one host sync
        reduced: dict[str, float] = {}
        for i, name in enumerate(names):
            if counts[i] == 0:
                continue
            if name == "data/skipped_rows":
                reduced[name] = sums[i]
            elif name == "safeguard/lambda":
                reduced["safeguard/lambda_mean"] = sums[i] / counts[i]
                reduced["safeguard/lambda_min"] = -extremes[0]
                reduced["safeguard/lambda_max"] = extremes[1]
                reduced["safeguard/engaged"] = sums[-1] / counts[-1]
            else:
                reduced[name] = sums[i] / counts[i]
        return reduced

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

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        # A fresh seeded generator per evaluation: the same noise, timesteps and VAE samples every time.
        # Every process draws for all of them and keeps its own rows (see _sample).
        self._eval_generator = torch.Generator().manual_seed(self.args.eval_seed)
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

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write the LoRA adapters or the UNet, in diffusers' format, to ``output_dir``.

        Under DeepSpeed ZeRO-3 the weights are first gathered from their shards (every process must call this), so
        the files are the same as on one process whatever ``stage3_gather_16bit_weights_on_model_save`` says.
        """
        if getattr(self, "deepspeed", None) is None or zero_stage(self.accelerator) != 3:
            return super().save_model(output_dir, _internal_call)
        state_dict = gather_zero3_state_dict(self.deepspeed, trainable_only=self.is_lora)
        self._save(output_dir, state_dict=state_dict)
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

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
