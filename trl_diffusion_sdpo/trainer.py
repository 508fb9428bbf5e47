"""``DiffusionSDPOTrainer``: Diffusion-DPO / Diffusion-SDPO on Stable Diffusion UNets with ``transformers.Trainer``.

The trainer orchestrates: it builds the parts, then calls the stages of :mod:`.step` in order. The math lives in
:mod:`.objectives` and :mod:`.step.safeguard`, the data in :mod:`.data`, model specifics in :mod:`.families`, the
reference model in :mod:`.reference` and the file formats in :mod:`.io`. One micro-batch reads: batch -> latents ->
noised pair -> predictions -> errors -> safeguard -> objective -> backward (per branch for the parameter-space
safeguard) -> guard -> log.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
from collections import defaultdict
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from diffusers import DiffusionPipeline
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import enable_full_determinism, set_seed

from .config import DiffusionSDPOConfig
from .data.latent_cache import CachedPreferenceCollator, LatentCache, build_latent_cache
from .data.preference import (
    DataReport,
    PairTransform,
    PreferenceCollator,
    RewardFn,
    add_reward_scores,
    prepare_preference_dataset,
)
from .data.sharded_cache import ShardedLatentCache
from .data.stream_guard import StreamGuard
from .distributed import (
    all_reduce_mean_,
    all_reduce_sum,
    check_not_partitioned,
    drop_fsdp_model_copy,
    engine_loss_scale,
    gather_fsdp2_state_dict,
    gather_zero3_state_dict,
    is_fsdp2,
    load_pipeline,
    loading_into_shards,
    reference_inference_engine,
    shard_reference_fsdp2,
    zero_stage,
)
from .families import ModelFamily, PromptEmbeddings, family_for_pipeline
from .io.checkpoints import AtomicCheckpoints, is_checkpoint_folder
from .io.publishing import HubPublishing
from .io.saving import (
    has_pipeline_components,
    has_saved_weights,
    load_full_unet,
    load_lora_adapters,
    save_full_unet,
    save_lora_adapters,
    save_pipeline_components,
    unet_has_lora,
    write_training_config,
)
from .io.trackers import make_config_trackable
from .objectives import (
    PreferencePredictions,
    build_objective,
)
from .reference import Reference, build_reference
from .step.batch import EncodedBatch, crop_pairs, drop_prompts, encode_batch, fixed_time_ids
from .step.branches import BranchGradientSplitter, EngineBranchGradients, branch_cotangents
from .step.draws import MicroBatchDraws
from .step.flow import FlowNoising, flow_noising_for
from .step.guard import NonFiniteLossGuard, flag_nonfinite
from .step.metrics import metric_names, record_metrics, reduce_metrics
from .step.noising import NoisedPair, check_timestep_range, noise_pairs, sample_pair_noise, training_scheduler
from .step.optimizer import (
    clip_divisor,
    engine_manages_gradients,
    fused_scaling_optimizer,
    trainable_parameters,
    zero_grads,
)
from .step.optimizer import grad_norm as trainable_grad_norm
from .step.predictions import denoising_errors, predict_pairs
from .step.safeguard import lambda_from_sums, parameter_space_lambda, safeguard_sums, scale_gradient

__all__ = ["DiffusionSDPOTrainer"]

logger = logging.getLogger(__name__)


def _compute_dtype(args: DiffusionSDPOConfig) -> torch.dtype:
    if args.bf16:
        return torch.bfloat16
    if args.fp16:
        return torch.float16
    return torch.float32


class DiffusionSDPOTrainer(AtomicCheckpoints, HubPublishing, Trainer):
    """Preference tuning of a Stable Diffusion (1.x, 2.x, XL) UNet, or an SD3 / SD3.5 or FLUX.1 transformer (flow
    matching), with Diffusion-DPO or Diffusion-SDPO.

    Args:
        model: a diffusers pipeline, or a local path / Hub id loaded with ``DiffusionPipeline.from_pretrained``.
            Its UNet (or transformer) is tuned in place (after ``train()``, ``pipe(prompt)`` samples from the tuned
            model); the VAE and text encoder(s) stay frozen.
        ref_model: ``None`` (the adapter-disabled policy with LoRA, else a frozen copy of the initial UNet), or a
            separate UNet or pipeline.
        args: a :class:`DiffusionSDPOConfig`.
        train_dataset: a preference dataset in Pick-a-Pic or TRL form (see :mod:`.data`), or a cache written by
            ``trl-diffusion-sdpo cache`` (:func:`~trl_diffusion_sdpo.data.sharded_cache.load_sharded_latent_cache`),
            read streamed.
        eval_dataset: an optional preference dataset in the same forms.
        peft_config: a ``peft.LoraConfig`` to train LoRA adapters on the UNet instead of all its weights.
        callbacks: as for ``transformers.Trainer``.
        optimizers: as for ``transformers.Trainer``.
        reward_fn: ``loss_type="smpo"`` only: ``reward_fn(images: list[PIL.Image.Image], prompts: list[str]) ->
            Sequence[float] | torch.Tensor``, one score per image (e.g. PickScore). When a dataset lacks the score
            columns (``score_0_column``, ``score_1_column``), both images of every row are scored with it before
            training (``dataset.map``; lazily for a streamed dataset) and the higher-scored image is the winner. An
            error with any other ``loss_type``.
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
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | None = None,
        *,
        peft_config: LoraConfig | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        reward_fn: RewardFn | None = None,
    ) -> None:
        if args is None:
            args = DiffusionSDPOConfig(output_dir="diffusion-sdpo")
        if not isinstance(args, DiffusionSDPOConfig):
            raise TypeError(f"args must be a DiffusionSDPOConfig, got {type(args).__name__}")
        if train_dataset is None:
            raise ValueError("DiffusionSDPOTrainer needs a train_dataset of preference pairs")
        self.args_as_given = args  # what training_config.json stores
        self._model_card_args: dict[str, Any] = {}
        args = copy.copy(args)  # the learning-rate scaling below must not leak into the caller's config
        # Seeded before LoRA adapters are initialised, so their random init is the same on every run.
        enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)

        # Loaded whole even under ZeRO-3's zero3_init_flag: the frozen components must not be sharded.
        pipeline = load_pipeline(model) if isinstance(model, (str, os.PathLike)) else model
        if not isinstance(pipeline, DiffusionPipeline):
            raise TypeError(f"model must be a diffusers pipeline or a path/Hub id, got {type(model).__name__}")
        self.pipeline = pipeline
        self.family: ModelFamily = family_for_pipeline(pipeline, args.max_sequence_length, args.flux_guidance_scale)
        check_not_partitioned({**self.family.frozen_modules(), self.family.denoiser_name: self.family.denoiser})
        # Flow-matching families (SD3, FLUX) noise with step.flow; the UNet families with a DDPM scheduler.
        self.flow_noising: FlowNoising | None = None
        if self.family.flow_matching:
            self.flow_noising = flow_noising_for(self.family, args)
            self.noise_scheduler = pipeline.scheduler
            if args.loss_type in ("dpo", "smpo") and args.beta == 5000.0:
                logger.warning(
                    "beta=5000 is Diffusion-DPO's value for SD UNets; the flow-matching anchors use beta=100 on "
                    "mean velocity errors (flow_grpo's SD3.5 Flow-DPO). See docs/sd3.md before keeping it."
                )
        else:
            self.noise_scheduler = training_scheduler(pipeline.scheduler)
            check_timestep_range(
                args.min_timestep, args.max_timestep, self.noise_scheduler.config.num_train_timesteps
            )
        self.base_model_name = getattr(pipeline.config, "_name_or_path", None) or (
            model if isinstance(model, str) else None
        )
        unet = self.family.denoiser  # the UNet or transformer

        # Frozen components: never in the optimizer, never in train mode.
        for module in self.family.frozen_modules().values():
            module.requires_grad_(False)
            module.eval()

        self.objective = build_objective(
            args.loss_type,
            beta=args.beta,
            dmpo_alpha=args.dmpo_alpha,
            dspo_form=args.dspo_form,
            mapo_beta=args.mapo_beta,
            mapo_snr_value=args.mapo_snr_value,
            num_train_timesteps=self.noise_scheduler.config.num_train_timesteps,
        )
        # The reference copy is taken before adapters are added so it holds the base weights only. Reference-free
        # objectives (MaPO, SFT) build none: no copy in memory, no forward pass.
        if peft_config is not None and ref_model is None and unet_has_lora(unet):
            raise ValueError("The UNet already carries LoRA adapters; pass an explicit ref_model or a clean UNet")
        self.reference: Reference | None = None
        if self.objective.requires_reference:
            self.reference = build_reference(
                unet,
                ref_model,
                uses_lora=peft_config is not None,
                get_policy=lambda: self._policy_unet(),
                call=self.family.call_denoiser,
            )
        elif ref_model is not None:
            logger.warning("loss_type=%r needs no reference model; the ref_model passed is not used", args.loss_type)
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
        self._dtype = _compute_dtype(args)

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

        # A cache written by `trl-diffusion-sdpo cache` is read streamed, as it is (see .data.sharded_cache).
        prebuilt = train_dataset if isinstance(train_dataset, ShardedLatentCache) else None
        if prebuilt is not None:
            prebuilt.check_matches(self.family, args.resolution, args.random_flip)
            train_dataset, columns, self.train_data_report = prebuilt.dataset, prebuilt.columns, prebuilt.report()
        else:
            # SmPO: score the images with reward_fn where the score columns are absent (an error otherwise).
            train_dataset = add_reward_scores(train_dataset, args, reward_fn, "train")
            train_dataset, columns, self.train_data_report = prepare_preference_dataset(train_dataset, args, "train")
        self.eval_data_report: DataReport | None = None
        if eval_dataset is not None:
            eval_dataset = add_reward_scores(eval_dataset, args, reward_fn, "eval")
            eval_dataset, eval_columns, self.eval_data_report = prepare_preference_dataset(eval_dataset, args, "eval")
        else:
            eval_columns = columns
        # SmPO's per-pair weights are made by the collators, for smpo only (other objectives refuse them).
        weighting: dict[str, float] = {}
        if args.loss_type == "smpo":
            weighting = dict(
                smpo_gamma=args.smpo_gamma, smpo_score_min=args.smpo_score_min, smpo_score_max=args.smpo_score_max
            )
        transform = PairTransform(args.resolution, args.random_crop, independent=args.independent_augmentation)
        self._tokenize = self.family.prompt_tokenizer()
        data_collator = PreferenceCollator(
            columns, self._tokenize, transform, train=True, with_flipped=args.random_flip, **weighting
        )
        self._eval_collator = PreferenceCollator(eval_columns, self._tokenize, transform, train=False, **weighting)
        self._empty_prompt: PromptEmbeddings | None = None  # for prompt dropout; encoded at first use
        if prebuilt is not None:
            data_collator = prebuilt.collator(**weighting)
            self._empty_prompt = prebuilt.empty_prompt
        # Without images to encode, the VAE and text encoders stay on the CPU.
        self._encoders_idle = args.cache_latents or (prebuilt is not None and eval_dataset is None)
        if args.cache_latents:
            # Encode once (main process first, the others load), then train from the cache.
            if prebuilt is None:
                train_cache = self._latent_cache(train_dataset, columns, args, "train")
                train_dataset = train_cache.dataset
                data_collator = CachedPreferenceCollator(with_flipped=args.random_flip, **weighting)
                self._empty_prompt = train_cache.empty_prompt
            if eval_dataset is not None:
                eval_cache = self._latent_cache(eval_dataset, eval_columns, args, "eval")
                eval_dataset = eval_cache.dataset
                self._eval_collator = CachedPreferenceCollator(**weighting)

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
        make_config_trackable(unet)  # report_to trackers read model.config as a transformers config
        self.add_callback(NonFiniteLossGuard(self))
        self._stream_guard = StreamGuard(self)  # issue 26: an optimizer step without a valid pair is never applied
        self.add_callback(self._stream_guard)
        if args.validation_prompts:
            if zero_stage(self.accelerator) == 3 or is_fsdp2(self.accelerator):
                raise ValueError(
                    "validation_prompts cannot sample under DeepSpeed ZeRO-3 or FSDP2 (every process holds only a "
                    "shard of the UNet, and the main process samples alone); validate from a saved checkpoint with "
                    "`trl-diffusion-sdpo evaluate`, or use ZeRO-2 or DDP."
                )
            from .evaluation import ValidationCallback

            self.add_callback(
                ValidationCallback(
                    prompts=args.validation_prompts,
                    seeds=args.validation_seeds,
                    num_inference_steps=args.validation_num_inference_steps,
                    guidance_scale=args.validation_guidance_scale,
                    every_n_steps=args.validation_steps,
                    scorers=args.validation_scorers or None,
                    height=args.resolution,
                    width=args.resolution,
                    trainer=self,
                )
            )

        self._place_frozen_modules()
        self._metrics: dict[str, defaultdict[str, list[torch.Tensor]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }
        self._nonfinite_flag: torch.Tensor | None = None
        self._nonfinite_skipped = 0
        self._nonfinite_skipped_pending: torch.Tensor | None = None  # skips counted on the device, read when logging
        self._trainable: list[torch.nn.Parameter] = []
        self._eval_metric_prefix: str | None = None
        self._draws = MicroBatchDraws(
            args.seed,
            args.per_device_train_batch_size,
            args.per_device_eval_batch_size,
            self.accelerator.process_index,
            self.accelerator.num_processes,
            args.device,
        )
        self._last_inputs: dict[str, dict] = {}  # per mode, for a micro-batch whose rows were all invalid
        # The parameter-space safeguard's per-branch backward passes (one extra gradient-sized buffer, allocated at
        # the first such step).
        self._splitter: BranchGradientSplitter | EngineBranchGradients | None = None
        if args.safeguard and args.safeguard_space == "parameter":
            self._check_parameter_space_engine()
        logger.info("Train data: %s", self.train_data_report.summary())

    # ------------------------------------------------------------------ setup

    def _check_parameter_space_engine(self) -> None:
        """The parameter-space safeguard runs its own per-branch backward passes; engines whose gradients it cannot
        separate are refused here, before any step: DeepSpeed ZeRO-3 and FSDP1. Under DeepSpeed ZeRO-1/2 the engine
        keeps the reduced sum (:class:`~.step.branches.EngineBranchGradients`); FSDP2 hands each branch's reduced
        gradient shards back between the passes: allowed, with the global scope it implies."""
        if self.is_deepspeed_enabled and zero_stage(self.accelerator) == 3:
            raise ValueError(
                "safeguard_space='parameter' is not supported under DeepSpeed ZeRO-3: the weights are partitioned, so "
                "the per-branch gradients are never whole on one process. Use ZeRO-1 or ZeRO-2 "
                "(examples/accelerate_configs/deepspeed_zero2.yaml), FSDP2 (fsdp2.yaml, safeguard_scope='global') or "
                "DDP (multi_gpu.yaml) with safeguard_space='parameter', or keep ZeRO-3 with safeguard_space='output' "
                "(the authors' rule)."
            )
        if self.is_fsdp_enabled and not is_fsdp2(self.accelerator):
            raise ValueError(
                "safeguard_space='parameter' is not supported under FSDP1; use FSDP2 "
                "(examples/accelerate_configs/fsdp2.yaml), DDP or DeepSpeed ZeRO-1/2, or keep FSDP1 with "
                "safeguard_space='output'."
            )
        if is_fsdp2(self.accelerator) and self.args.safeguard_scope != "global":
            raise ValueError(
                "safeguard_space='parameter' under FSDP2 needs safeguard_scope='global': FSDP2 averages each branch's "
                "gradient over processes inside its backward, so lambda is that of the global micro-batch. Set "
                "safeguard_scope='global', or use DDP for one lambda per process."
            )

    def _branch_gradients(self, policy: torch.nn.Module) -> BranchGradientSplitter | EngineBranchGradients:
        """The per-branch backward machinery: on the ``.grad`` fields (their FSDP2 shards), or through DeepSpeed's
        engine (ZeRO-1/2), which owns the accumulated, reduced gradient."""
        trainable = trainable_parameters(policy)
        if not self.is_deepspeed_enabled:  # under FSDP2, on each process's gradient shards
            return BranchGradientSplitter(trainable, local=is_fsdp2(self.accelerator))
        engine = self.accelerator.deepspeed_engine_wrapped.engine

        def engine_backward(scalar: torch.Tensor, boundary: bool | None) -> None:
            if boundary is None:  # the micro-batch's last pass: accelerate sets the boundary and steps the engine
                self.accelerator.backward(scalar, scale_wrt_gas=False)
            else:
                engine.set_gradient_accumulation_boundary(boundary)
                engine.backward(scalar, scale_wrt_gas=False)

        return EngineBranchGradients(trainable, engine_backward, lambda: engine_loss_scale(engine))

    def _policy_unet(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model) if hasattr(self, "accelerator") else self.family.denoiser

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
                progress=not args.disable_tqdm,
            )

    def _place_frozen_modules(self) -> None:
        """Move the VAE, text encoder(s) and a reference copy to the device in the compute dtype.

        With ``cache_latents`` (or a sharded cache) the VAE and text encoders are not used and stay on the CPU. Under
        DeepSpeed ZeRO-3 and FSDP2 a reference copy is sharded like the policy instead (a ZeRO-3 engine without
        optimizer, or ``fully_shard`` with the policy's blocks and mixed precision); under DDP and ZeRO-1/2 every
        process holds it whole, in the compute dtype.
        """
        device = self.args.device
        compute_dtype = _compute_dtype(self.args)
        for name, module in self.family.frozen_modules().items():
            if self._encoders_idle:
                module.to(device="cpu")
                continue
            dtype = torch.float32 if name == "vae" and self.family.vae_needs_fp32() else compute_dtype
            module.to(device=device, dtype=dtype)
        if self.reference is not None and not self.reference.shares_policy_weights:
            if zero_stage(self.accelerator) == 3:
                self.reference.unet = reference_inference_engine(self.reference.unet, self.accelerator)
            elif is_fsdp2(self.accelerator):
                self.reference.unet.to(device=device, dtype=compute_dtype)
                self.reference.unet = shard_reference_fsdp2(self.reference.unet, self.accelerator)
            else:
                self.reference.unet.to(device=device, dtype=compute_dtype)
            self.reference.dtype = compute_dtype

    # ------------------------------------------------------------------ the step

    def train(self, *args, **kwargs):
        # Only trainable weights ever hold gradients: clipping and zeroing walk those, listed once, instead of every
        # module of the UNet (thousands with LoRA adapters: milliseconds per step). See :mod:`.step.optimizer`.
        # Not under FSDP, whose wrapping (inside super().train()) replaces the parameters with sharded ones.
        if self.is_fsdp_enabled:
            return super().train(*args, **kwargs)
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
        if self.args.safeguard and self.args.safeguard_space == "parameter":
            loss = self._parameter_space_training_step(model, inputs)
        else:
            loss = super().training_step(model, inputs, num_items_in_batch)
        # A non-finite micro-batch never reaches the weights (see NonFiniteLossGuard); keep it out of the logged
        # loss as well, on the device: transformers' logging_nan_inf_filter would make the host wait every step.
        return torch.where(torch.isfinite(loss), loss, torch.zeros_like(loss))

    def _clip_grad_norm(self, model: torch.nn.Module) -> torch.Tensor:
        """Clip the trainable weights' gradients; with a fused optimizer, inside the optimizer's own pass."""
        if engine_manages_gradients(self.accelerator) or not self._trainable:
            return super()._clip_grad_norm(model)
        fused = fused_scaling_optimizer(self.optimizer, self.accelerator)
        if fused is None:
            return self.accelerator.clip_grad_norm_(self._trainable, self.args.max_grad_norm)
        norm = trainable_grad_norm(self._trainable)
        fused.grad_scale = clip_divisor(norm, self.args.max_grad_norm)
        return norm

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: torch.Tensor | None = None):
        """The pre-clip gradient norm; a non-finite one (an inf gradient with a finite loss) is flagged on the device
        and the step skipped or raised on like a non-finite loss (see :class:`.step.guard.NonFiniteLossGuard`)."""
        if grad_norm is None and self._trainable and not engine_manages_gradients(self.accelerator):
            grad_norm = trainable_grad_norm(self._trainable)  # max_grad_norm <= 0: no clipping, still guarded
        grad_norm = super()._get_grad_norm(model, grad_norm)
        if isinstance(grad_norm, torch.Tensor) and not self.is_deepspeed_enabled:  # DeepSpeed skips overflow itself
            self._nonfinite_flag = flag_nonfinite(self._nonfinite_flag, grad_norm)
        return grad_norm

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """One micro-batch, read top-down: batch -> latents -> noised pair -> predictions -> errors -> safeguard
        (output space) -> objective. The backward pass is transformers'; the parameter-space safeguard replaces it
        (see :meth:`_parameter_space_training_step`)."""
        mode = "train" if model.training else "eval"
        inputs, replay = self._usable_inputs(inputs, mode)
        if inputs is None:  # every row was invalid, one process: contribute nothing, keep the graph connected
            loss = sum(p.sum() * 0.0 for p in model.parameters() if p.requires_grad)
            return (loss, {}) if return_outputs else loss
        predictions = self._predict(model, inputs, mode, separate_branches=False)
        errors = denoising_errors(predictions)
        lam = None
        if self.args.safeguard and self.args.safeguard_space == "output":
            lam = self._output_space_lambda(predictions)
            errors.policy_loser = scale_gradient(errors.policy_loser, lam)
        output = self.objective(predictions, errors, pair_weights=inputs.get("pair_weights"))
        loss = output.loss
        if replay:
            loss = loss * 0.0
            return (loss, {"logits": output.logits}) if return_outputs else loss
        self._flag_nonfinite(loss, mode)
        record_metrics(self._metrics[mode], errors, output, {"safeguard/lambda": lam})
        return (loss, {"logits": output.logits}) if return_outputs else loss

    def _parameter_space_training_step(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The exact safeguard: one forward and one backward pass per branch, ``lambda`` from parameter gradients.

        batch -> latents -> noised pair -> predictions (per branch) -> errors and objective on detached predictions
        (giving each branch's cotangent) -> winner backward -> loser backward -> ``lambda`` -> combine -> (several
        processes) one all-reduce of the combined gradient at the end of the accumulation window, as DDP would.
        """
        model.train()
        inputs = self._prepare_inputs(inputs)
        inputs, replay = self._usable_inputs(inputs, "train")
        if inputs is None:  # every row was invalid, one process: nothing to add to the gradients
            return torch.zeros((), device=self.args.device)
        policy = self.accelerator.unwrap_model(model)  # the branches bypass DDP's hooks; reduced once below
        fsdp2 = is_fsdp2(self.accelerator)
        if self._splitter is None:
            self._check_parameter_space_engine()
            self._splitter = self._branch_gradients(policy)
        accumulated = None
        if fsdp2:
            # Each branch must reach its gradient shards now, not at the end of the accumulation window; the
            # window's earlier sum is set aside (a 1/N-sized shard) so the branches start from empty gradients.
            policy.set_requires_gradient_sync(True)
            accumulated = [p.grad for p in self._splitter.parameters]
            for p in self._splitter.parameters:
                p.grad = None
        with self.compute_loss_context_manager():
            predictions = self._predict(policy, inputs, "train", separate_branches=True)
        pair_weights = inputs.get("pair_weights")
        captured: dict[str, Any] = {}

        def loss_of(policy_winner: torch.Tensor, policy_loser: torch.Tensor) -> torch.Tensor:
            branch = dataclasses.replace(predictions, policy_winner=policy_winner, policy_loser=policy_loser)
            captured["errors"] = denoising_errors(branch)
            captured["output"] = self.objective(branch, captured["errors"], pair_weights=pair_weights)
            return captured["output"].loss

        loss, cot_winner, cot_loser = branch_cotangents(loss_of, predictions.policy_winner, predictions.policy_loser)
        scale = self._backward_scale(cot_winner.device)
        if replay:  # join the other processes' collectives with a zero contribution
            cot_winner, cot_loser = torch.zeros_like(cot_winner), torch.zeros_like(cot_loser)
        global_scope = self.args.safeguard_scope == "global" and self.accelerator.num_processes > 1
        reduce_winner = all_reduce_mean_ if global_scope and not fsdp2 else None
        winner_sq = self._splitter.backward_winner(
            predictions.policy_winner, cot_winner * scale.to(cot_winner), reduce_winner
        )
        cross = self._splitter.backward_loser(predictions.policy_loser, cot_loser * scale.to(cot_loser))
        if fsdp2:  # sums over this process's shards of the already averaged gradients: add them up
            winner_sq, cross = all_reduce_sum(torch.stack([winner_sq, cross]))
        elif global_scope:
            cross = all_reduce_sum(cross) / self.accelerator.num_processes
        lam = parameter_space_lambda(winner_sq, -cross, self.args.safeguard_mu, self.args.safeguard_max_lambda)
        self._splitter.combine(lam)
        if accumulated is not None:
            for p, earlier in zip(self._splitter.parameters, accumulated):
                if earlier is not None:
                    p.grad = earlier if p.grad is None else p.grad.add_(earlier)
        several = self.accelerator.num_processes > 1
        if several and self.accelerator.sync_gradients and not fsdp2 and not self.is_deepspeed_enabled:
            all_reduce_mean_([p.grad if p.grad is not None else p.new_zeros(p.shape) for p in self._trainable])
        if replay:
            return torch.zeros((), device=loss.device)
        self._flag_nonfinite(loss, "train")
        record_metrics(
            self._metrics["train"],
            captured["errors"],
            captured["output"],
            {"safeguard/lambda": lam, "safeguard/output_lambda": self._output_space_lambda(predictions)},
        )
        return loss / self.current_gradient_accumulation_steps

    def _backward_scale(self, device: torch.device) -> torch.Tensor:
        """What ``accelerator.backward`` would multiply the loss by: the gradient-accumulation average, and the fp16
        grad scaler's current scale (a device tensor: no host sync)."""
        scale = torch.full((), 1.0 / self.current_gradient_accumulation_steps, device=device)
        if self.accelerator.scaler is not None:
            scale = self.accelerator.scaler.scale(scale)
        return scale

    def _usable_inputs(
        self, inputs: dict[str, torch.Tensor], mode: str
    ) -> tuple[dict[str, torch.Tensor] | None, bool]:
        """``(inputs, replay)``. A streamed micro-batch whose rows were all invalid gives ``None`` on one process; with
        several processes (whose collectives must run) it is replaced by this process's last good micro-batch, to be
        weighted zero (``replay``) and kept out of the metrics."""
        if mode == "train":
            self._stream_guard.observe(inputs)  # issue 26: counts valid pairs and skipped rows per optimizer step
        self._metrics[mode]["data/skipped_rows"].append(inputs["num_skipped"].detach().float())
        if inputs["time_ids"].shape[0] > 0:
            if self.accelerator.num_processes > 1:
                self._last_inputs[mode] = inputs
            return inputs, False
        if self.accelerator.num_processes == 1:
            return None, False
        if mode not in self._last_inputs:
            raise RuntimeError(
                f"Every row of the first {mode} micro-batch on process {self.accelerator.process_index} was "
                "invalid, and with several processes a micro-batch cannot be left out. Clean the data or raise "
                "the per-device batch size."
            )
        return self._last_inputs[mode], True

    def _predict(
        self, policy: torch.nn.Module, inputs: dict[str, torch.Tensor], mode: str, separate_branches: bool
    ) -> PreferencePredictions:
        """Stages batch -> latents -> noised pair -> predictions, with this micro-batch's keyed draws."""
        generator = self._draws.generator(mode, self.state.global_step)
        train = mode == "train"
        # batch: flips (per pair, or per image with independent_augmentation), prompt dropout and random crops,
        # training only
        flip, drop, crop = self._draws.augmentation(
            generator,
            mode,
            inputs["time_ids"].shape[0],
            independent=self.args.independent_augmentation,
            cropping=self.args.random_crop and train,
        )
        if "crop_sizes" in inputs:  # resized, not yet cropped, by the collator (random_crop)
            inputs = crop_pairs(inputs, crop, self.args.resolution)
        encoded = encode_batch(inputs, self.family, flip if train and self.args.random_flip else None, self._dtype)
        if train and self.args.proportion_empty_prompts > 0:
            encoded.prompt_embeds = drop_prompts(
                encoded.prompt_embeds, drop < self.args.proportion_empty_prompts, self._empty_prompt_embeds()
            )
        time_ids = None
        if self.family.needs_time_ids:
            time_ids = encoded.time_ids
            if self.args.fixed_time_ids:
                time_ids = fixed_time_ids(self.args.resolution, time_ids.shape[0], time_ids.device)
        # latents and noised pair: one timestep and one noise per pair, shared by winner and loser
        noised = self._noise(generator, mode, encoded)
        # predictions
        reference = self.reference.predict if self.objective.requires_reference else None
        return predict_pairs(
            policy, reference, self.family, noised, encoded.prompt_embeds, time_ids, separate_branches
        )

    def _empty_prompt_embeds(self) -> PromptEmbeddings:
        if self._empty_prompt is None:
            tokens = {k: v.to(self.args.device) for k, v in self._tokenize([""]).items()}
            self._empty_prompt = self.family.encode_prompts(tokens)
        return self._empty_prompt

    def _noise(self, generator: torch.Generator, mode: str, encoded: EncodedBatch) -> NoisedPair:
        """Draw one noise level (a timestep, or a flow-matching ``s``) and one noise per pair and one posterior sample
        per image; noise the pair."""
        shape = tuple(encoded.mean.shape[1:])
        flow = self.flow_noising

        def draw(n: int, device: torch.device) -> tuple[torch.Tensor, ...]:
            if flow is not None:
                levels = flow.sample_sigmas(n, shape, generator, device)
                noise = torch.randn((n, *shape), generator=generator, device=device)
            else:
                levels, noise = sample_pair_noise(
                    (n, *shape),
                    self.noise_scheduler.config.num_train_timesteps,
                    self.args.min_timestep,
                    self.args.max_timestep,
                    device,
                    torch.float32,
                    generator,
                )
            return levels, noise, torch.randn((n, 2, *shape), generator=generator, device=device)

        levels, noise, eps = self._draws.rows(generator, mode, encoded.num_pairs, draw)
        if flow is not None:
            return flow.noise_pairs(encoded.mean, encoded.std, levels, noise, eps, self.family.vae.config)
        return noise_pairs(self.noise_scheduler, encoded.mean, encoded.std, levels, noise, eps, self.family.vae.config)

    def _output_space_lambda(self, predictions: PreferencePredictions) -> torch.Tensor:
        """The authors' output-space rule on the policy's residuals, one detached fp32 scalar per micro-batch.

        With ``safeguard_scope="global"`` the sums (and the element count behind the epsilon) are added up over all
        processes first, so ``lambda`` is that of the global micro-batch.
        """
        winner_residual = predictions.policy_winner - predictions.target_winner
        loser_residual = predictions.policy_loser - predictions.target_loser
        num, den = safeguard_sums(winner_residual, loser_residual)
        count: int | torch.Tensor = winner_residual.numel()
        if self.args.safeguard_scope == "global" and self.accelerator.num_processes > 1:
            # torch.full, not torch.tensor: a host-to-device copy would make the host wait for the device
            num, den, count = all_reduce_sum(torch.stack([num, den, torch.full_like(num, float(count))]))
        return lambda_from_sums(num, den, self.args.safeguard_mu, self.args.safeguard_max_lambda, count)

    def _flag_nonfinite(self, loss: torch.Tensor, mode: str) -> None:
        if mode == "train":
            self._nonfinite_flag = flag_nonfinite(self._nonfinite_flag, loss)

    # ------------------------------------------------------------------ logging

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        prefix = self._eval_metric_prefix  # set while evaluate() runs
        mode = "train" if prefix is None else "eval"
        several = self.accelerator.num_processes > 1
        reduced = reduce_metrics(
            self._metrics[mode],
            metric_names(self.objective, self.args.safeguard, self.args.safeguard_space),
            self.args.safeguard_max_lambda,
            self.args.device,
            (lambda t: self.accelerator.reduce(t, reduction="sum")) if several else None,
            self.accelerator.gather if several else None,
        )
        if mode == "train":
            self._count_device_skips()
            reduced["nonfinite_skipped"] = float(self._nonfinite_skipped)
        else:
            reduced = {f"{prefix}_{k}": v for k, v in reduced.items()}
        # In place: evaluate() returns this very dict, and on_evaluate callbacks (best-model tracking) read it.
        logs.update(reduced)
        super().log(logs, start_time)

    def _count_device_skips(self) -> None:
        pending, self._nonfinite_skipped_pending = self._nonfinite_skipped_pending, None
        skipped = 0 if pending is None else round(float(pending.item()))
        if skipped:
            self._nonfinite_skipped += skipped
            logger.warning(
                "Non-finite loss or gradient norm: %d optimizer step(s) skipped since the last log (%d so far)",
                skipped,
                self._nonfinite_skipped,
            )

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        # A fresh seeded generator per evaluation: the same noise, timesteps and VAE samples every time.
        # Every process draws for all of them and keeps its own rows (see _draw).
        self._draws.start_evaluation(self.args.eval_seed)
        self._eval_metric_prefix = metric_key_prefix
        try:
            return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        finally:
            self._draws.end_evaluation()
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

        Under DeepSpeed ZeRO-3 and FSDP2 the weights are first gathered from their shards (every process must call
        this), so the files are the same as on one process whatever ``stage3_gather_16bit_weights_on_model_save`` or
        ``fsdp_state_dict_type`` say.
        """
        if is_fsdp2(self.accelerator):
            state_dict = gather_fsdp2_state_dict(self.model, trainable_only=self.is_lora)
        elif getattr(self, "deepspeed", None) is None or zero_stage(self.accelerator) != 3:
            return super().save_model(output_dir, _internal_call)
        else:
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
        name = self.family.denoiser_name
        if self.is_lora:
            save_lora_adapters(unet, output_dir, type(self.pipeline), state_dict=state_dict or None, prefix=name)
        else:
            save_full_unet(unet, output_dir, state_dict=state_dict or None, subfolder=name)
            # The whole pipeline in the output folder, only the UNet in checkpoints (all that resuming reads). The
            # other components are frozen: written once.
            if not is_checkpoint_folder(output_dir) and not has_pipeline_components(output_dir):
                save_pipeline_components(self.pipeline, output_dir, name)
        # Plain JSON instead of transformers' pickled training_args.bin; the config as given (learning_rate before
        # scale_lr), so that training again from the file does not scale it twice.
        write_training_config(self.args_as_given, output_dir)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if is_fsdp2(self.accelerator):  # accelerate's pickled copy of the weights duplicates the diffusers files
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                drop_fsdp_model_copy(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        if not has_saved_weights(resume_from_checkpoint):
            raise ValueError(f"No trl-diffusion-sdpo weights found in checkpoint {resume_from_checkpoint}")
        unet = self.accelerator.unwrap_model(model if model is not None else self.model)
        # Under FSDP2 each process copies its own shards out of the full tensors on disk.
        with loading_into_shards() if is_fsdp2(self.accelerator) else contextlib.nullcontext():
            if self.is_lora:
                load_lora_adapters(unet, resume_from_checkpoint, prefix=self.family.denoiser_name)
            else:
                load_full_unet(unet, resume_from_checkpoint, subfolder=self.family.denoiser_name)

    def _load_best_model(self) -> None:
        self._load_from_checkpoint(self.state.best_model_checkpoint)
