"""Validation while training: a `transformers.TrainerCallback` that samples a fixed grid of (prompt, seed) images
from the policy at step 0 (the base model) and every ``every_n_steps`` optimizer steps, saves it as
``output_dir/validation/step-XXXXXX.png``, logs it to the image-capable trackers in ``report_to`` (TensorBoard,
Weights & Biases, trackio, MLflow; others are skipped with a debug message) and, with scorers, logs their means as
``eval/reward/<name>``.

Sampling uses its own CPU generators and runs inside ``torch.random.fork_rng``, so the training RNG streams
(dropout, timesteps, noise) are the same with and without the callback; the UNet's train/eval mode is restored and
the pipeline's own scheduler (used by training for noising) is left untouched: sampling goes through a shallow copy
of the pipeline with an Euler scheduler built from the same config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback

from ..data.transforms import load_image
from ..evaluation.compare import image_grid
from ..evaluation.generation import GenerationSettings, sample_images
from ..families import family_for_pipeline
from ..rewards.scorers.base import Scorer, build_scorer

__all__ = ["PROMPT_LABEL_CHARS", "ValidationCallback", "prompt_label", "validation_grid"]

logger = logging.getLogger(__name__)

#: Characters of a prompt shown above its column of the validation grid: a longer prompt is cut at a word boundary
#: and ends in "...", so that its caption (wrapped within the column) stays a few lines tall.
PROMPT_LABEL_CHARS = 80
_ELLIPSIS = "..."  # ASCII: PIL's fallback bitmap font has no "\u2026"


def prompt_label(prompt: str, limit: int = PROMPT_LABEL_CHARS) -> str:
    """``prompt`` as the caption of its grid column: its whitespace collapsed to single spaces, and when longer than
    ``limit`` characters cut to at most ``limit`` with ``"..."`` at the end (after the last whole word that fits,
    or inside a word longer than the rest of the limit)."""
    text = " ".join(prompt.split())
    if len(text) <= limit:
        return text
    room = limit - len(_ELLIPSIS)
    cut = text[: room + 1].rsplit(" ", 1)[0] if " " in text[: room + 1] else text[:room]
    return cut[:room].rstrip() + _ELLIPSIS


def validation_grid(images: Sequence[Image.Image], prompts: Sequence[str], seeds: Sequence[int]) -> Image.Image:
    """The validation grid of ``images`` (sampled seed by seed, the prompts in order within each): one row per seed,
    labelled ``seed <n>`` when there are several, one column per prompt, captioned with :func:`prompt_label`."""
    rows = [list(images[i * len(prompts) : (i + 1) * len(prompts)]) for i in range(len(seeds))]
    row_labels = [f"seed {s}" for s in seeds] if len(seeds) > 1 else ()
    return image_grid(rows, row_labels=row_labels, column_labels=[prompt_label(p) for p in prompts])


class ValidationCallback(TrainerCallback):
    """Sample grids (rows: seeds, columns: prompts, each column captioned with its prompt, cut to
    :data:`PROMPT_LABEL_CHARS` characters) and optional rewards during training. Off unless added.

    Args:
        prompts: the validation prompts.
        seeds: one row of the grid per seed; each image's generator is seeded with its row's seed.
        num_inference_steps: sampling steps (Euler sampler).
        guidance_scale: classifier-free guidance scale (diffusers' convention); None: the model family's own (8.5
            for SD 1.x/2.x and SDXL, the SDPO authors'; else the pipeline's default, 3.5 for FLUX.1-dev, as training
            conditions on).
        negative_prompt: the negative prompt.
        height: image height; None: ``trainer``'s training resolution, else the model's native resolution.
        width: image width; as ``height``.
        every_n_steps: validate when ``global_step % every_n_steps == 0``; 0 validates only at step 0.
        scorers: registered scorer names or `Scorer` instances; names are built on first use with
            ``scorer_kwargs[name]``.
        pipeline: the pipeline whose denoiser (``unet`` or ``transformer``) is trained (the trainer's ``pipeline``);
            or pass ``trainer``.
        trainer: the :class:`~trl_diffusion_sdpo.DiffusionSDPOTrainer` it is added to: it samples the trainer's
            pipeline with its sampling weights (the EMA's with ``ema_decay``) at its training resolution, with its
            family's guidance, reuses its TensorBoard writer, and is refused here where the trainer's main process
            cannot sample alone.
        at_start: validate the base model at step 0 (skipped when training resumes past step 0).
        autocast_dtype: run sampling under ``torch.autocast`` in this dtype; ``"auto"`` (default) picks bf16/fp16
            when the pipeline mixes that dtype with float32 weights (mixed-precision training: frozen modules in the
            compute dtype, trainable weights in float32), else none; None never autocasts.
        batch_size: images per pipeline call.
        sources: editing families: one source image (a PIL image or a file path) per prompt, so the grid shows edits
            of these images; an editing scorer among ``scorers`` is given them.

    Build it once the trainer is, as TRL's ``LogCompletionsCallback(trainer, ...)`` is built, and add it with
    ``trainer.add_callback(ValidationCallback(prompts, trainer=trainer))``; one built with ``pipeline=`` alone samples
    that pipeline's current weights and may be given in ``callbacks=``. The ``train`` command builds it from its
    ``--validation_*`` options.
    """

    def __init__(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int] = (0,),
        num_inference_steps: int = 25,
        guidance_scale: float | None = None,
        every_n_steps: int = 500,
        scorers: Sequence[str | Scorer] | None = None,
        pipeline: Any = None,
        trainer: Any = None,
        scorer_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
        negative_prompt: str = "",
        height: int | None = None,
        width: int | None = None,
        at_start: bool = True,
        autocast_dtype: torch.dtype | str | None = "auto",
        batch_size: int = 4,
        sources: Sequence[Image.Image | str] | None = None,
    ) -> None:
        if not prompts:
            raise ValueError("ValidationCallback needs at least one prompt.")
        if sources is not None and len(sources) != len(prompts):
            raise ValueError(f"Got {len(prompts)} prompts and {len(sources)} source images; they are paired.")
        if every_n_steps < 0:
            raise ValueError("every_n_steps must be >= 0.")
        if pipeline is None and trainer is None:
            raise ValueError(
                "ValidationCallback samples the trainer's pipeline: build it once the trainer is, "
                "ValidationCallback(prompts, trainer=trainer), and add it with trainer.add_callback(validation); or "
                "give pipeline="
            )
        self.prompts = list(prompts)
        self.seeds = [int(s) for s in seeds] or [0]
        self.settings = GenerationSettings(
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            negative_prompt=negative_prompt,
        )
        self.every_n_steps = every_n_steps
        self.scorer_specs = list(scorers or [])
        self.scorer_kwargs = dict(scorer_kwargs or {})
        self._scorers: list[Scorer] | None = None
        self.pipeline = pipeline
        self.trainer = trainer
        self.at_start = at_start
        self.autocast_dtype = autocast_dtype
        self.batch_size = batch_size
        self.sources = None if sources is None else list(sources)
        self.history: list[dict[str, Any]] = []  # one entry per validation: step, path, seconds, rewards
        self._own_tb_writer = None
        self._sampler: tuple[tuple[int, ...], Any] | None = None
        if trainer is not None:  # refused where its main process cannot sample alone
            trainer.engine.check_validation_sampling()
            trainer.family.check_validation_sampling()
            self._settle(trainer.family, trainer.args.resolution)

    def _settle(self, family: Any, resolution: int) -> None:
        """The unset guidance is ``family``'s, the unset size ``resolution``, and source files are read now (a bad
        file fails here, naming it, not at the first grid)."""
        if self.settings.guidance_scale is None:
            self.settings = dataclasses.replace(self.settings, guidance_scale=family.sampling_guidance_scale())
        if self.settings.height is None and self.settings.width is None:
            self.settings = dataclasses.replace(self.settings, height=resolution, width=resolution)
        self.sources = validation_sources(self.sources, family)

    # -- TrainerCallback hooks -------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        if self.at_start and state.global_step == 0:
            self._validate(args, state)

    def on_step_end(self, args, state, control, **kwargs):
        if self.every_n_steps and state.global_step > 0 and state.global_step % self.every_n_steps == 0:
            self._validate(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        if self._own_tb_writer is not None:
            self._own_tb_writer.close()
            self._own_tb_writer = None

    # -- the work --------------------------------------------------------------------------------------------------

    def _get_pipeline(self):
        pipeline = self.pipeline if self.pipeline is not None else getattr(self.trainer, "pipeline", None)
        if pipeline is None:
            raise ValueError("ValidationCallback needs pipeline= (the trainer's pipeline) or trainer= to sample from.")
        return pipeline

    def _sampling_pipeline(self, pipeline):
        """A pipeline sharing every module with ``pipeline`` but with its own Euler scheduler; built once and rebuilt
        only if the pipeline's modules are replaced (e.g. the UNet wrapped)."""
        components = pipeline.components
        identity = tuple(id(module) for module in components.values())
        if self._sampler is None or self._sampler[0] != identity:
            from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler
            from diffusers.utils import logging as diffusers_logging

            # Flow-matching models (SD3, FLUX) sample with their own flow Euler scheduler, a copy of it.
            flow = isinstance(pipeline.scheduler, FlowMatchEulerDiscreteScheduler)
            scheduler_cls = FlowMatchEulerDiscreteScheduler if flow else EulerDiscreteScheduler
            scheduler = scheduler_cls.from_config(pipeline.scheduler.config)
            verbosity = diffusers_logging.get_verbosity()
            diffusers_logging.set_verbosity_error()  # the "safety checker disabled" notice, once per build
            try:
                sampler = type(pipeline)(**{**components, "scheduler": scheduler})
            finally:
                diffusers_logging.set_verbosity(verbosity)
            sampler.set_progress_bar_config(disable=True)
            self._sampler = (identity, sampler)
        return self._sampler[1]

    def generate(self) -> tuple[Image.Image, list[Image.Image]]:
        """Sample the grid now (prompts vary along a row, seeds down the columns; :func:`validation_grid`); returns
        the grid and the images.

        Modules the trainer keeps elsewhere (the VAE and text encoders stay on the CPU with ``cache_latents``) are
        moved to the denoiser's device for sampling and put back; the denoiser's mode and every RNG state are
        restored.
        """
        pipeline = self._get_pipeline()
        if self.settings.guidance_scale is None:  # built without a trainer: the pipeline's family says
            guidance = family_for_pipeline(pipeline).sampling_guidance_scale()
            self.settings = dataclasses.replace(self.settings, guidance_scale=guidance)
        name = "unet" if getattr(pipeline, "unet", None) is not None else "transformer"  # SD3 / FLUX: a transformer
        denoiser = getattr(pipeline, name)
        was_training = denoiser.training
        device = denoiser.device
        modules = {n: m for n, m in pipeline.components.items() if isinstance(m, torch.nn.Module) and n != name}
        homes = {n: _module_device(m) for n, m in modules.items()}
        prompts = [p for _ in self.seeds for p in self.prompts]
        seeds = [s for s in self.seeds for _ in self.prompts]
        autocast_dtype = self._autocast_dtype(pipeline)
        fork_devices = [device] if device.type == "cuda" else []
        try:
            denoiser.eval()
            for name, module in modules.items():
                if homes[name] is not None and homes[name] != device:
                    module.to(device)
            with torch.random.fork_rng(devices=fork_devices), torch.no_grad():
                with torch.autocast(
                    device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
                ):
                    images = sample_images(
                        self._sampling_pipeline(pipeline), prompts, seeds, self.settings, batch_size=self.batch_size,
                        sources=self._grid_sources(),
                    )  # fmt: skip
        finally:
            denoiser.train(was_training)
            for name, module in modules.items():
                if homes[name] is not None and homes[name] != device:
                    module.to(homes[name])
        return validation_grid(images, self.prompts, self.seeds), images

    def _grid_sources(self) -> list[list[Image.Image]] | None:
        """Each grid cell's source images (prompts along a row, seeds down the columns), or ``None``."""
        if self.sources is None:
            return None
        return [[source] for _ in self.seeds for source in self.sources]

    def _autocast_dtype(self, pipeline) -> torch.dtype | None:
        """``autocast_dtype`` as given; with ``"auto"``, the half-precision dtype the pipeline's modules mix with
        float32 (mixed-precision training keeps frozen modules in bf16/fp16 and trainable weights in fp32), if any."""
        if self.autocast_dtype != "auto":
            return self.autocast_dtype
        dtypes = {
            p.dtype
            for m in pipeline.components.values()
            if isinstance(m, torch.nn.Module)
            for p in m.parameters()
            if p.is_floating_point()
        }
        half = [d for d in (torch.bfloat16, torch.float16) if d in dtypes]
        return half[0] if half and len(dtypes) > 1 else None

    def _score(self, images: list[Image.Image]) -> dict[str, float]:
        if not self.scorer_specs:
            return {}
        if self._scorers is None:
            self._scorers = [
                build_scorer(s, **dict(self.scorer_kwargs.get(s, {}))) if isinstance(s, str) else s
                for s in self.scorer_specs
            ]
        prompts = [p for _ in self.seeds for p in self.prompts]
        sources = self._grid_sources()
        return {f"eval/reward/{s.name}": s.aggregate(s(images, prompts, sources)) for s in self._scorers}

    def _validate(self, args, state) -> None:
        if not state.is_world_process_zero:
            return
        start = time.perf_counter()
        # The trainer's sampling weights (the EMA's with ema_decay), else the trained ones
        sampling = getattr(self.trainer, "sampling_weights", None)
        with sampling() if sampling is not None else contextlib.nullcontext():
            grid, images = self.generate()
        folder = os.path.join(args.output_dir, "validation")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"step-{state.global_step:06d}.png")
        grid.save(path)
        rewards = self._score(images)
        seconds = time.perf_counter() - start
        self._log_image(args, state.global_step, grid)
        if rewards:
            self._log_scalars(args, state.global_step, rewards)
            state.log_history.append({**rewards, "step": state.global_step})
        self.history.append({"step": state.global_step, "path": path, "seconds": seconds, **rewards})
        logger.info("Validation at step %d: %s (%.1fs)", state.global_step, path, seconds)

    # -- trackers --------------------------------------------------------------------------------------------------

    def _tb_writer(self, args):
        trackers = self.trainer.callbacks_of(TensorBoardCallback) if self.trainer is not None else []
        writers = [tracker.tb_writer for tracker in trackers if tracker.tb_writer is not None]
        if writers:  # the trainer's TensorBoard run, where report_to has one
            return writers[0]
        if self._own_tb_writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.debug("report_to has tensorboard but tensorboard is not installed; validation images skipped.")
                return None
            log_dir = os.environ.get("TENSORBOARD_LOGGING_DIR") or getattr(args, "logging_dir", None)
            self._own_tb_writer = SummaryWriter(log_dir=log_dir or os.path.join(args.output_dir, "runs", "validation"))
        return self._own_tb_writer

    def _log_image(self, args, step: int, grid: Image.Image) -> None:
        for tracker in _report_to(args):
            try:
                if tracker == "tensorboard":
                    writer = self._tb_writer(args)
                    if writer is not None:
                        writer.add_image("validation/samples", np.asarray(grid), step, dataformats="HWC")
                        writer.flush()
                elif tracker == "wandb":
                    import wandb

                    if wandb.run is not None:
                        wandb.log({"validation/samples": wandb.Image(grid), "train/global_step": step})
                elif tracker == "trackio":
                    import trackio

                    trackio.log({"validation/samples": trackio.Image(grid)}, step=step)
                elif tracker == "mlflow":
                    import mlflow

                    if mlflow.active_run() is not None:
                        mlflow.log_image(grid, key="validation/samples", step=step)
                else:
                    logger.debug("Tracker %s: validation images are not logged to it.", tracker)
            except (ImportError, AttributeError) as error:  # tracker not installed or without image support
                logger.debug("Tracker %s: validation image not logged (%s).", tracker, error)

    def _log_scalars(self, args, step: int, values: dict[str, float]) -> None:
        for tracker in _report_to(args):
            try:
                if tracker == "tensorboard":
                    writer = self._tb_writer(args)
                    if writer is not None:
                        for key, value in values.items():
                            writer.add_scalar(key, value, step)
                elif tracker == "wandb":
                    import wandb

                    if wandb.run is not None:
                        wandb.log({**values, "train/global_step": step})
                elif tracker == "trackio":
                    import trackio

                    trackio.log(values, step=step)
                elif tracker == "mlflow":
                    import mlflow

                    if mlflow.active_run() is not None:
                        mlflow.log_metrics({k.replace("/", "_"): v for k, v in values.items()}, step=step)
            except (ImportError, AttributeError) as error:
                logger.debug("Tracker %s: validation rewards not logged (%s).", tracker, error)


def _module_device(module: torch.nn.Module) -> torch.device | None:
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else None


def _report_to(args) -> list[str]:
    report_to = getattr(args, "report_to", None) or []
    report_to = [report_to] if isinstance(report_to, str) else list(report_to)
    return (
        [r for r in report_to if r not in ("none", "all")]
        if "all" not in report_to
        else ["tensorboard", "wandb", "trackio", "mlflow"]
    )


def validation_sources(paths: Sequence[Image.Image | str] | None, family) -> list[Image.Image] | None:
    """The validation source images (files decoded now: a bad file fails here, naming it, not at the first grid),
    for an editing family only."""
    if paths is None:
        return None
    if not family.edits:
        raise ValueError(
            f"validation source images are for editing families; {family.name} generates from prompts alone: "
            "leave them unset"
        )
    images = []
    for index, path in enumerate(paths):
        if isinstance(path, Image.Image):
            images.append(path)
            continue
        try:
            images.append(load_image(path))
        except Exception as err:  # PIL raises many types for a corrupt or missing file
            raise ValueError(f"validation source image {index} ({path!r}) cannot be read: {err}") from None
    return images
