"""``OnlineDiffusionSDPOTrainer``: Diffusion-DPO / Diffusion-SDPO on pairs the policy samples while it trains.

The offline trainer's step with a generation stage in front of it::

    prompts -> generation (sample K per prompt, score, pair; online.generation) -> the offline step:
    batch -> noised pair -> predictions -> errors -> objective -> backward (a safeguard's hook) -> metrics

Objectives, safeguards, engines and families are the offline trainer's, unchanged. The reference stays the initial
model, or moves to the policy every ``ref_update_steps`` optimizer steps.

A reward that gives no usable score (:class:`~trl_diffusion_sdpo.rewards.functions.RewardError`, e.g. a reward server
down
after its retries) stops the run on every process before the micro-batch trains, with a checkpoint of the last
optimizer step.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from datasets import Dataset, IterableDataset
from diffusers import DiffusionPipeline
from peft import LoraConfig
from torch.utils.data import Sampler
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..config.messages import advice
from ..data.columns import SOURCE_IMAGE, SOURCE_IMAGES
from ..data.training_data import TrainingData
from ..data.validation import DataReport
from ..families import ModelFamily, PromptEmbeddings, is_quantized
from ..io.hub import CardMethod
from ..objectives import objective_class
from ..rewards.functions import RewardError, RewardFunction, RewardFunctions
from ..step.frozen_reference import FrozenCopyReference, merged_copy, merged_policy_state, refreshed_reference
from ..trainer import DiffusionSDPOTrainer
from .config import OnlineDiffusionSDPOConfig
from .generation import PROMPT_COLUMN, GeneratedPairs, GenerationSettings, GenerationStage, PendingGeneration
from .resume import WindowGenerations

if TYPE_CHECKING:  # the probe's module loads only in a run that probes
    from ..callbacks.probe import ProbeCallback

__all__ = ["OnlineDiffusionSDPOTrainer", "PromptCollator", "RepeatedBlockSampler"]

logger = logging.getLogger(__name__)

#: The generation metrics every micro-batch records (per reward function: ``online/reward/<name>`` too).
GENERATION_METRICS = (
    "online/reward_mean",
    "online/reward_std",
    "online/chosen_reward",
    "online/rejected_reward",
    "online/reward_margin",
    "online/prompts_without_pair",
    "online/pairs",
    "online/diversity",
    "online/generation_time_share",
)


class PromptCollator:
    """Prompt rows to lists by column (``prompt`` and any other column a reward function reads)."""

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
        return {name: [row[name] for row in rows] for name in rows[0]}


class RepeatedBlockSampler(Sampler[int]):
    """``sampler``'s indices in blocks of ``block`` (one optimizer step's prompts over every process), each block
    yielded ``repeats`` times in a row: the optimizer steps that reuse a generation see the prompts it sampled."""

    def __init__(self, sampler: Sampler[int], block: int, repeats: int) -> None:
        self.sampler, self.block, self.repeats = sampler, block, repeats

    def __iter__(self) -> Iterator[int]:
        indices = list(self.sampler)
        for start in range(0, len(indices), self.block):
            chunk = indices[start : start + self.block]
            for _ in range(self.repeats):
                yield from chunk

    def __len__(self) -> int:
        return len(self.sampler) * self.repeats  # type: ignore[arg-type]


def check_prompt_dataset(dataset: Dataset | IterableDataset, family: ModelFamily | None = None, args=None) -> None:
    """A prompt dataset: a ``prompt`` column of non-empty strings (a ValueError names the first bad row) and, for an
    editing family that needs them, each prompt's source image(s) (``source_image`` or ``source_images``, the config's
    ``source_image`` / ``source_images``)."""
    columns = dataset.column_names
    if columns is None or PROMPT_COLUMN not in columns:
        raise ValueError(
            f"The online trainer's train_dataset holds prompts: a {PROMPT_COLUMN!r} column (plus any column a reward "
            f"function reads); its columns are {columns}."
        )
    if family is not None and args is not None:
        source_columns = [c for c in (SOURCE_IMAGE, SOURCE_IMAGES) if c in columns]
        if family.edits and not family.sources_optional and not source_columns:
            raise ValueError(
                f"{type(family).__name__} edits source images: each prompt row needs its source in a "
                f"{SOURCE_IMAGE!r} column (one image) or {SOURCE_IMAGES!r} (a list); the "
                f"train_dataset's columns are {columns} (docs/online.md)."
            )
        if source_columns and not family.edits:
            raise ValueError(
                f"The train_dataset has a {source_columns[0]!r} column, but {type(family).__name__} generates from "
                "prompts alone: use an editing pipeline (FluxKontextPipeline, QwenImageEditPipeline, "
                "QwenImageEditPlusPipeline, Flux2Pipeline, Flux2KleinPipeline) or drop the column."
            )
        if len(source_columns) == 2:
            raise ValueError(
                f"The train_dataset has both {source_columns[0]!r} and {source_columns[1]!r}: give each row's sources "
                "in one of them."
            )
    if isinstance(dataset, Dataset):
        for index, prompt in enumerate(dataset[PROMPT_COLUMN]):
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(
                    f"Invalid train dataset row {index}, column {PROMPT_COLUMN!r}: {prompt!r} is no prompt."
                )


class _ReferenceRefresh(TrainerCallback):
    """Moves the reference to the policy every ``ref_update_steps`` optimizer steps."""

    def __init__(self, trainer: OnlineDiffusionSDPOTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if args.ref_update_steps and state.global_step % args.ref_update_steps == 0:
            self.trainer.refresh_reference()


def online_card_details(trainer: OnlineDiffusionSDPOTrainer) -> dict[str, Any]:
    """The online hyperparameters the model card lists beside the shared ones: the rewards and the generation."""
    args = trainer.args
    return {
        "reward_funcs": ", ".join(trainer.rewards.describe()),
        "num_generations": args.num_generations,
        "pair_mode": args.pair_mode,
        "reward_margin": args.reward_margin,
        "num_iterations": args.num_iterations,
        "ref_update_steps": args.ref_update_steps,
    }


def prepare_prompt_data(train_dataset, eval_dataset, args, family: ModelFamily, reward_fn=None) -> TrainingData:
    """Prompts, not pairs: the generation stage makes the pairs, so nothing is encoded ahead. The eval prompts are
    the held-out probe's (``probe_steps``), checked here and paired by the trainer, never evaluated as a split."""
    check_prompt_dataset(train_dataset, family, args)
    if eval_dataset is not None:
        check_prompt_dataset(eval_dataset, family, args)
    rows = len(train_dataset) if isinstance(train_dataset, Dataset) else None
    return TrainingData(
        train_dataset=train_dataset,
        eval_dataset=None,
        collator=PromptCollator(),
        eval_collator=None,
        report=DataReport(num_rows=rows, num_kept=rows, streamed=rows is None),
        eval_report=None,
        empty_prompt=None,
        encoders_idle=False,
    )


class OnlineDiffusionSDPOTrainer(DiffusionSDPOTrainer):
    """Online Diffusion-DPO / Diffusion-SDPO: every micro-batch's prompts are sampled ``num_generations`` times by the
    policy, scored by ``reward_funcs``, and the best against the worst (or every pair above ``reward_margin``) trained
    on with the offline trainer's step.

    Args:
        model: a diffusers pipeline or a path / Hub id (as :class:`~trl_diffusion_sdpo.DiffusionSDPOTrainer`).
        ref_model: as the offline trainer.
        args: an :class:`OnlineDiffusionSDPOConfig`.
        train_dataset: prompts: a ``prompt`` column, and any column a reward function reads.
        eval_dataset: held-out prompts in the same form, for the probe (``probe_steps``): its first ``probe_pairs``
            are paired before training and probed; without it, ``probe_pairs`` prompts are held back from
            ``train_dataset``. Used by nothing else.
        reward_funcs: registered scorer names or callables ``(prompts, images, **columns) -> list[float]``; by
            default the config's ``reward_funcs``.
        peft_config: a ``peft.LoraConfig`` to train LoRA adapters.
        callbacks: as for ``transformers.Trainer``.
        optimizers: as for ``transformers.Trainer``.
    """

    _tag_names = ["trl", "diffusion-sdpo", "online-dpo"]
    card_method = CardMethod("Online ", online_card_details)  # the card's rewards and generation settings
    probe_rows_are_prompts = True  # the probe's held-out prompts are paired once the trainer is built

    def __init__(
        self,
        model: DiffusionPipeline | str,
        ref_model: torch.nn.Module | DiffusionPipeline | None = None,
        args: OnlineDiffusionSDPOConfig | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | None = None,
        *,
        reward_funcs: Sequence[str | RewardFunction] | None = None,
        peft_config: LoraConfig | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
    ) -> None:
        if args is None:
            args = OnlineDiffusionSDPOConfig(output_dir="online-diffusion-sdpo")
        if not isinstance(args, OnlineDiffusionSDPOConfig):
            raise TypeError(f"args must be an OnlineDiffusionSDPOConfig, got {type(args).__name__}")
        if eval_dataset is not None and not args.probe_steps:
            raise ValueError(
                "eval_dataset: the online trainer reads eval prompts only for the held-out probe; set probe_steps or "
                "leave eval_dataset out (held-out samples are judged by an evaluation of their own: docs/online.md)."
            )
        if args.ref_update_steps is not None and not objective_class(args.loss_type).requires_reference:
            raise ValueError(f"ref_update_steps: loss_type={args.loss_type!r} uses no reference model.")
        functions = list(reward_funcs) if reward_funcs is not None else list(args.reward_funcs or [])
        self.rewards = RewardFunctions(functions, args.reward_weights, args.reward_timeout, args.reward_retries)
        super().__init__(
            model,
            ref_model,
            args,
            train_dataset,
            eval_dataset,
            peft_config=peft_config,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        if args.ref_update_steps is not None:
            if not self.engine.refreshes_reference:
                raise ValueError(
                    f"ref_update_steps runs on one process, DDP, DeepSpeed ZeRO and FSDP2; under {self.engine!r} keep "
                    "the initial reference (ref_update_steps=None)."
                )
            if is_quantized(self.family.denoiser):
                raise ValueError(
                    "ref_update_steps copies the policy with its adapters merged into the base weights, which a "
                    "quantized base cannot be copied or merged into: keep the initial reference "
                    "(ref_update_steps=None)."
                )
            if not self.engine.samples_whole_denoiser and self.reference.shares_policy_weights:
                # ZeRO-3, FSDP2: the refreshed reference is a copy of the policy sharded as the policy is, made now
                # (the weights are whole until train() shards them); each refresh writes the gathered, merged policy
                # into its shards
                copied = merged_copy(self._policy())
                self.reference = FrozenCopyReference(
                    self.engine.place_reference(copied, self._policy(), args.device, self._dtype),
                    self.family.call_denoiser,
                )
                self.reference.follow(self._policy, self.accelerator.autocast)
                self.stages.reference = self.reference.predict
            self.add_callback(_ReferenceRefresh(self))
        self.generation = GenerationStage(
            self.family,
            self.rewards,
            GenerationSettings.from_config(args, self.family),
            self.encode_prompts,
            args.device,
            self.accelerator.autocast,
        )
        self._prompt_cache: dict[str, PromptEmbeddings] = {}
        self._generated: dict[int, GeneratedPairs] = {}  # the window's generations by micro-batch index
        self._pending: dict[int, PendingGeneration] = {}  # sampled ahead, being scored (async_rewards)
        self._step_batches: list[dict[str, list[Any]]] = []  # the optimizer step's micro-batches of prompts
        self._window: int | None = None
        self._micro = 0
        self.files.parts.append(WindowGenerations(self))  # a resume inside a window trains on the pairs it had
        if self.probe is not None:  # its held-out prompts paired now, by the initial policy (a resume pairs alike)
            self._pair_probe_prompts(self.probe, eval_dataset is not None)

    def add_callback(self, callback: type[TrainerCallback] | TrainerCallback) -> None:
        """As the offline trainer's; a held-out probe built by hand (``ProbeCallback.held_out(..., trainer=self)``)
        has its prompts paired now, as the config's probe has when the trainer is built."""
        super().add_callback(callback)
        for probe in self.callbacks_of("trl_diffusion_sdpo.callbacks.probe:ProbeCallback"):
            if probe is callback and probe.probe.batch is None:
                self._pair_probe_prompts(probe, probe.held is None)

    def hold_back_probe_pairs(self, train_dataset: Any, eval_dataset: Any, args: Any) -> tuple[Any, Dataset | None]:
        """The probe's prompts: the eval prompts' first, or prompts held back from the training ones
        (:func:`.probe_pairs.hold_back_prompts`)."""
        from .probe_pairs import hold_back_prompts  # the probe's modules load only in a run that probes

        return hold_back_prompts(train_dataset, eval_dataset, args)

    def _pair_probe_prompts(self, probe: ProbeCallback, from_eval: bool) -> None:
        """The probe's held-out prompts paired (:mod:`.probe_pairs`) and what the start summary says of them."""
        from ..callbacks.probe import held_back_how  # only a run that probes loads the probe's modules
        from .probe_pairs import PROBE_PAIR_MODE, held_out_pairs  # the pairing too, in a run that probes

        started = time.perf_counter()
        made = held_out_pairs(self, probe.held)
        seconds = time.perf_counter() - started  # the probe's one cost beyond offline's: stated, not hidden
        probe.probe.batch = made.batch
        where = (
            f"the eval prompts' first {made.prompts}"
            if from_eval
            else f"{made.prompts} prompts held back from the training prompts ({held_back_how(probe.held)})"
        )
        probe.source = (
            f"{made.pairs} pairs of {where}, sampled once before training by the initial policy with the run's "
            f"sampler and reward ({self.args.num_generations} samples each, {PROBE_PAIR_MODE}, the probe's own seeds; "
            f"{seconds:.1f} s)"
        )

    # ------------------------------------------------------------------ data: prompts

    prepare_data = staticmethod(prepare_prompt_data)

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if sampler is None or self.args.num_iterations == 1:
            return sampler
        args = self.args
        block = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        return RepeatedBlockSampler(sampler, block, args.num_iterations)

    def encode_prompts(
        self,
        prompts: list[str],
        sources: list[list[Any]] | None = None,
        cache: dict[str, PromptEmbeddings] | None = None,
    ) -> PromptEmbeddings:
        """The prompts' embeddings in the compute dtype, each prompt encoded once per run (kept in ``cache``, by
        default the training's); a family whose prompt encoding reads the source images (Qwen-Image-Edit) encodes
        each prompt with its ``sources`` every time."""
        cache = self._prompt_cache if cache is None else cache
        tokenizer = self.family.prompt_tokenizer()
        if getattr(tokenizer, "reads_sources", False):
            tokens = {k: v.to(self.args.device) for k, v in tokenizer(prompts, sources).items()}
            with torch.no_grad():
                embeds = self.family.encode_prompts(tokens)
            pooled = None if embeds.pooled is None else embeds.pooled.to(self._dtype)
            return PromptEmbeddings(embeds.encoder_hidden_states.to(self._dtype), pooled)
        missing = [p for p in dict.fromkeys(prompts) if p not in cache]
        if missing:
            tokens = {k: v.to(self.args.device) for k, v in tokenizer(missing).items()}
            with torch.no_grad():
                embeds = self.family.encode_prompts(tokens)
            for index, prompt in enumerate(missing):
                pooled = None if embeds.pooled is None else embeds.pooled[index : index + 1]
                cache[prompt] = PromptEmbeddings(
                    embeds.encoder_hidden_states[index : index + 1].to(self._dtype),
                    None if pooled is None else pooled.to(self._dtype),
                )
        rows = [cache[p] for p in prompts]
        pooled = None if rows[0].pooled is None else torch.cat([r.pooled for r in rows])
        return PromptEmbeddings(torch.cat([r.encoder_hidden_states for r in rows]), pooled)

    # ------------------------------------------------------------------ the step: generation, then the offline step

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """generation (or its reuse within ``num_iterations``) -> the offline step on the generated pairs."""
        started = time.perf_counter()
        generated = self._generation(inputs)  # a reused generation costs a lookup
        generation_seconds = time.perf_counter() - started
        loss = super().training_step(model, generated.batch, num_items_in_batch)
        share = generation_seconds / max(time.perf_counter() - started, 1e-9)
        stored = self._metrics["train"]
        for name, value in generated.metrics().items():
            stored[name].append(value.to(self.args.device))
        stored["online/generation_time_share"].append(torch.tensor(share, device=self.args.device))
        return loss

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._step_batches = batches  # async_rewards samples the next micro-batch while this one is scored
        return batches, num_items

    def _generation(self, inputs: dict[str, list[Any]]) -> GeneratedPairs:
        """This micro-batch's generation: sampled now at the first optimizer step of a ``num_iterations`` window,
        else the one sampled then for the same micro-batch index. With ``async_rewards`` the step's next micro-batch
        is sampled while this one is scored (the policy is the same until the optimizer steps)."""
        args = self.args
        window = self.state.global_step // args.num_iterations
        if window != self._window:
            self._window, self._generated, self._pending = window, {}, {}
        micro = self._micro % args.gradient_accumulation_steps
        self._micro += 1
        if micro in self._generated:
            return self._generated[micro]
        pending = self._pending.pop(micro, None) or self._start_generation(inputs, window, micro)
        position = next((i for i, batch in enumerate(self._step_batches) if batch is inputs), None)
        if args.async_rewards and position is not None and position + 1 < len(self._step_batches):
            following = self._step_batches[position + 1]
            self._pending[micro + 1] = self._start_generation(following, window, micro + 1)
        try:
            generated, failure = self.generation.finish(pending), None
        except RewardError as err:
            generated, failure = None, err
        if self.accelerator.num_processes > 1:  # every process stops at the same micro-batch
            flag = torch.tensor(float(failure is not None), device=self.args.device)
            stop = bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)
        else:
            stop = failure is not None
        if stop:
            self._stop_without_reward(failure)
        self._generated[micro] = generated
        return generated

    def _start_generation(self, inputs: dict[str, list[Any]], window: int, micro: int) -> PendingGeneration:
        generation = window * self.args.gradient_accumulation_steps + micro
        first_row = self.accelerator.process_index * self.args.per_device_train_batch_size
        return self.generation.start(inputs, generation, first_row)

    def _stop_without_reward(self, failure: RewardError | None) -> None:
        """Save a checkpoint of the last optimizer step and raise: the micro-batch has no scores to train on."""
        for pending in self._pending.values():
            pending.cancel()
        self._pending = {}
        step = self.state.global_step
        self._save_checkpoint(self.model_wrapped, None)  # the last optimizer step, marked complete
        checkpoint = os.path.join(self.args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
        raise RewardError(
            f"{failure or 'A reward function failed on another process'}\nTraining stopped before optimizer step "
            f"{step + 1}: nothing was trained on the missing scores. Checkpoint {checkpoint} holds step {step};"
            f" resume with {advice('--resume_from_checkpoint true', 'resume_from_checkpoint=True')} once the reward "
            "answers."
        ) from failure

    def _blank_batch(self, mode: str) -> dict[str, Any] | None:
        return self.place_inputs(self.generation.blank_batch())

    def metric_names(self) -> list[str]:
        per_function = [f"online/reward/{name}" for name in self.rewards.names]
        return super().metric_names() + list(GENERATION_METRICS) + per_function

    # ------------------------------------------------------------------ reference and model card

    def refresh_reference(self) -> None:
        """The reference becomes the policy as it is now (adapters merged into a frozen copy with LoRA). Under ZeRO-3
        and FSDP2 the policy is gathered parameter by parameter and written into the reference's shards."""
        if not self.engine.samples_whole_denoiser:
            state = merged_policy_state(self._policy(), self.engine.whole_parameter)
            self.engine.load_whole_state(self.reference.denoiser, state)
        else:
            self.reference = refreshed_reference(self.reference, self._policy(), self.family.call_denoiser)
        self.reference.follow(self._policy, self.accelerator.autocast)
        self.stages.reference = self.reference.predict
        self._reference_changes += 1  # the probe runs the reference again
        logger.info("Step %d: the reference is now the policy's current weights.", self.state.global_step)
