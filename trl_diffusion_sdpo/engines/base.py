"""The interface every training engine implements: what differs between one process or DDP, DeepSpeed ZeRO, FSDP.

The trainer picks an engine once (:func:`~trl_diffusion_sdpo.engines.engine_for`) after accelerate has set up its
``Accelerator``, and from then on asks it instead of checking which engine runs. An engine answers:

* where a frozen reference copy lives, and in which precision (:meth:`Engine.place_reference`);
* how the weights are gathered for a save (:meth:`Engine.gather_state_dict`) and loaded back (:meth:`Engine.loading`),
  what the optimizer's state needs before transformers writes it into a checkpoint
  (:meth:`Engine.prepare_checkpoint`) and how a checkpoint of another process count resumes
  (:meth:`Engine.resume_on_other_count`);
* who owns the gradients and overflow skipping (:attr:`Engine.manages_gradients`,
  :attr:`Engine.skips_nonfinite_steps`), and whether the main process can sample alone
  (:meth:`Engine.check_validation_sampling`).

Gradients are clipped by ``transformers.Trainer`` (through accelerate) on every engine. A fused optimizer step
(torch's fused Adam, AdamW and SGD) takes a device-side ``found_inf`` flag, as ``torch.amp.GradScaler`` hands it, and
skips the whole update in its kernel when it is set: the non-finite guard
(:mod:`~trl_diffusion_sdpo.callbacks.interruptions`) skips a step that way without the host waiting for the device,
and DeepSpeed's engine leaves a step without data unapplied the same way (:func:`fused_scaling_optimizer`).

What the exact safeguard needs of an engine (its per-branch gradient store and reductions) is that engine's
:class:`~trl_diffusion_sdpo.safeguards.gradients.collectives.BranchCollectives`.

The checks every run makes before an engine is chosen, one process's too, are here: the pipeline a trainer tunes
(:func:`training_pipeline`), its frozen components whole (:func:`check_not_partitioned`) and one device per process
(:func:`check_one_device_per_process`). What several processes share (loading a pipeline with ZeRO-3's construction
switched off, the collectives) is :mod:`.collectives`, loaded by a run that uses it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DistributedType
from diffusers import DiffusionPipeline

from ..config._lazy import import_target

__all__ = [
    "PASS_PLACEMENTS",
    "Engine",
    "check_not_partitioned",
    "check_one_device_per_process",
    "fused_scaling_optimizer",
    "gradient_norm",
    "is_partitioned",
    "local_gradient_norm",
    "optimizer_parameters",
    "place_batch",
    "trainable_parameters",
    "training_pipeline",
]

#: the frozen reference copy's placement like the policy (its module loaded by a run that holds such a copy)
REFERENCE_COPY = "trl_diffusion_sdpo.families.reference_copy:reference_like_policy"

# Where gradients are sharded or clipped by the engine itself, accelerate's own clipping must be used.
_ENGINE_MANAGED = {DistributedType.DEEPSPEED, DistributedType.FSDP, DistributedType.XLA, DistributedType.MEGATRON_LM}


#: Where an engine runs the exact rule's per-branch passes within transformers' ``Trainer.training_step``
#: (:attr:`Engine.passes_placement`, read by :class:`~trl_diffusion_sdpo.safeguards.passes.PassesInStep`)
PASS_PLACEMENTS = {
    "in_backward": "inside the engine's backward that Trainer's step runs, carried by the loss compute_loss returns",
    "in_compute_loss": (
        "in compute_loss, before Trainer's backward: the engine's backward hooks cannot run inside another backward"
    ),
    "with_combination": (
        "in compute_loss with the safeguard's combination after them, the engine's last backward of the micro-batch "
        "deferred to Trainer's: the engine steps inside its own backward"
    ),
}


class ResumeConfigError(ValueError):
    """The new run's model or config contradicts the checkpoint it resumes from (raised by an engine that cannot
    reshard, and by :mod:`trl_diffusion_sdpo.io.resume_check`, which re-exports it)."""


class Engine:
    """One training engine behind accelerate. Subclasses override what differs; the defaults are one process's."""

    name: str = "base"
    #: DeepSpeed steps (and skips an overflowing step) inside its backward: the non-finite guard only counts.
    skips_nonfinite_steps: bool = False
    #: DeepSpeed steps inside the backward of an accumulation window's last micro-batch, before the trainer's
    #: ``on_pre_optimizer_step``: a step to leave unapplied must be known (:meth:`skip_next_step`) before it.
    steps_in_backward: bool = False
    #: Where the exact rule's per-branch passes run within transformers' step, a key of :data:`PASS_PLACEMENTS`: one
    #: process and DDP inside the backward Trainer's step runs.
    passes_placement: str = "in_backward"
    #: FSDP wraps the model inside ``Trainer.train()``, replacing the parameters: none can be listed before it.
    replaces_parameters_in_train: bool = False
    #: Validation sampling needs the whole denoiser on the main process.
    samples_whole_denoiser: bool = True
    #: Online training's reference refresh (``ref_update_steps``) can gather the policy (:meth:`whole_parameter`)
    #: and write a reference placed by :meth:`place_reference` (:meth:`load_whole_state`).
    refreshes_reference: bool = True
    #: Each process holds only its own part of the trainable weights or of their optimizer state (ZeRO's partitions,
    #: FSDP2's shards): a rewind's snapshot is each process's part, written and read back by the engine
    #: (:meth:`save_training_state`, :meth:`load_training_state`).
    shards_training_state: bool = False

    def __init__(self, accelerator) -> None:
        self.accelerator = accelerator

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def variant(self) -> str:
        """The engine's :attr:`name`, refined where one of its configurations keeps the gradients elsewhere (ZeRO-3's
        partitions: ``"deepspeed-zero3"``): the key under which the exact safeguard's collectives are registered
        (:data:`~trl_diffusion_sdpo.safeguards.gradients.collectives.COLLECTIVES`)."""
        return self.name

    @property
    def manages_gradients(self) -> bool:
        """Whether the engine owns the gradients (sharded or clipped by it): clipping is then accelerate's and no
        fused optimizer step can be told to skip."""
        return self.accelerator.distributed_type in _ENGINE_MANAGED

    def __repr__(self) -> str:
        return f"{type(self).__name__}(processes={self.num_processes})"

    # ------------------------------------------------------------------ the held-out probe and the rewind

    @contextlib.contextmanager
    def probing(self, wrapped: torch.nn.Module, policy: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """The module the held-out probe runs its forward passes through inside the block (``wrapped``: the model as
        the engine trains it; ``policy``: unwrapped): the unwrapped policy, whose weights are whole on every process.
        Every process enters the block at the same steps and runs the same number of forward passes (a sharding
        engine gathers weights in them)."""
        yield policy

    def save_training_state(self, folder: str, optimizer: torch.optim.Optimizer) -> None:
        """Where :attr:`shards_training_state`: write this process's part of the trainable weights and their
        optimizer state into ``folder`` (every process calls it, with the same ``folder``)."""
        raise NotImplementedError(f"{type(self).__name__} keeps whole weights: the rewind snapshots them itself")

    def load_training_state(self, folder: str, optimizer: torch.optim.Optimizer) -> None:
        """Put back this process's part of what :meth:`save_training_state` wrote into ``folder`` (every process
        calls it); the engine's step counts go on counting."""
        raise NotImplementedError(f"{type(self).__name__} keeps whole weights: the rewind restores them itself")

    # ------------------------------------------------------------------ placement, saving, loading

    def input_dtype(self) -> torch.dtype | None:
        """The dtype a batch's floating tensors are cast to before the model takes them, or ``None`` (kept)."""
        return None

    def check_validation_sampling(self) -> None:
        """Raise when the main process cannot sample validation images alone (its denoiser is a shard)."""
        if not self.samples_whole_denoiser:
            raise ValueError(
                "ValidationCallback cannot sample under DeepSpeed ZeRO-3 or FSDP2 (every process holds only a "
                "shard of the denoiser, and the main process samples alone); validate from a saved checkpoint with "
                "`trl-diffusion-sdpo evaluate`, or use ZeRO-2 or DDP."
            )

    def place_reference(
        self, module: torch.nn.Module, policy: torch.nn.Module, device: torch.device, dtype: torch.dtype
    ) -> torch.nn.Module:
        """A frozen reference copy, ready for inference: whole on every process, each weight in the dtype of the
        ``policy``'s (float32 for full tuning's trainable weights, ``dtype`` for LoRA's frozen base), so that under the
        policy's autocast it computes what the policy computes at step 0 (see
        :func:`~trl_diffusion_sdpo.families.reference_copy.reference_like_policy`)."""
        return import_target(REFERENCE_COPY)(module, policy, device, dtype)

    def gather_state_dict(self, model: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor] | None:
        """The full weights to save, gathered from shards on the main process (every process calls it); ``None``
        where the weights are whole and ``Trainer.save_model`` can save them as usual."""
        return None

    def whole_parameter(self, parameter: torch.Tensor) -> torch.Tensor:
        """``parameter``'s whole value on this process (online training's reference refresh). Under a sharding engine
        it is a collective: every process calls it, for the same parameters in the same order."""
        return parameter.detach()

    def load_whole_state(self, module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Copy whole tensors (by parameter name; every process holds all of them) into a frozen ``module`` as
        :meth:`place_reference` placed it: into its shards under a sharding engine (every process calls it)."""
        with torch.no_grad():
            for name, parameter in module.named_parameters():
                if name in state:
                    parameter.copy_(state[name])

    def skip_next_step(self) -> None:
        """Leave the next optimizer step unapplied (weights, moments and weight decay untouched, the gradients
        cleared), where the engine steps inside its backward (:attr:`steps_in_backward`); :meth:`end_skipped_step`
        once it has stepped. Elsewhere the trainer drops the gradients before the optimizer step instead."""
        raise NotImplementedError(f"{type(self).__name__} steps after the backward: drop the gradients instead")

    def end_skipped_step(self) -> None:
        """After the step :meth:`skip_next_step` left unapplied: the next one applies again."""

    def gathers_for_save(self) -> bool:
        """Whether :meth:`gather_state_dict` must run (on every process) before a save."""
        return False

    @contextlib.contextmanager
    def loading(self) -> Iterator[None]:
        """Within the block, full diffusers-format weights load into the trained model."""
        yield

    def prepare_checkpoint(self, optimizer: torch.optim.Optimizer) -> None:
        """Called on every process before transformers' ``_save_checkpoint`` writes the optimizer's state (as its
        own code does for the engine: ``optimizer.pt``, DeepSpeed's checkpoint or accelerate's FSDP one): whatever
        that writer needs of the state first. Nothing by default."""

    def unused_checkpoint_files(self, folder: str) -> list[str]:
        """The files and folders transformers' ``_save_checkpoint`` wrote into the checkpoint ``folder`` that no
        resume reads (removed before the checkpoint is published): none by default."""
        return []

    def resume_on_other_count(self, checkpoint: str, saved_processes: int, work_dir: str) -> str:
        """The folder to resume from when ``checkpoint`` was written by ``saved_processes`` processes and this run has
        another number (every process calls it; ``work_dir`` is free for what the engine must write, removed after
        training). By default refused: the engine's state is sharded for the old count."""
        raise ResumeConfigError(
            f"Cannot resume under {self.name} on {self.num_processes} process(es) from {checkpoint}, written by "
            f"{saved_processes}: its sharded optimizer state is not resharded to another number of processes here. "
            f"Resume on {saved_processes} process(es); another count works under DDP (multi_gpu.yaml) and DeepSpeed "
            "ZeRO-1/2 (docs/reliability.md)."
        )


def place_batch(
    inputs: Any, device: torch.device | str, float_dtype: torch.dtype | None, keep_float32: tuple[str, ...] = ()
) -> Any:
    """``inputs`` (a dict, list or tuple of them, nested) with every tensor on ``device``, floating ones cast to
    ``float_dtype`` where given; a top-level key in ``keep_float32`` is cast to float32 instead."""
    if isinstance(inputs, Mapping):
        return type(inputs)(
            {
                k: v.to(device=device, dtype=torch.float32)
                if k in keep_float32 and isinstance(v, torch.Tensor)
                else place_batch(v, device, float_dtype)
                for k, v in inputs.items()
            }
        )
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(place_batch(v, device, float_dtype) for v in inputs)
    if isinstance(inputs, torch.Tensor):
        cast = float_dtype is not None and (inputs.is_floating_point() or inputs.is_complex())
        return inputs.to(device=device, dtype=float_dtype) if cast else inputs.to(device=device)
    return inputs


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters that can hold gradients (``requires_grad``), in ``module.parameters()`` order."""
    return [p for p in module.parameters() if p.requires_grad]


def optimizer_parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every parameter the optimizer updates, over all its parameter groups."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def gradient_norm(parameters: list[torch.Tensor]) -> torch.Tensor:
    """``||g||_2`` over the gradients of ``parameters`` taken as one vector (``torch.nn.utils.get_total_norm``):
    a device tensor, the host does not wait for it; 0 when none has a gradient."""
    return torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])


def local_gradient_norm(parameters: list[torch.Tensor]) -> torch.Tensor:
    """:func:`gradient_norm` over this process's part of each gradient (a DTensor's local shard): no collective, and
    non-finite exactly where this process holds a non-finite gradient element (or the norm overflows)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    return torch.nn.utils.get_total_norm([g.to_local() if hasattr(g, "to_local") else g for g in grads])


def fused_scaling_optimizer(
    optimizer, scaler: object | None = None, manages_gradients: bool = False
) -> torch.optim.Optimizer | None:
    """The torch optimizer inside ``optimizer`` if its fused step applies ``found_inf``, and nothing else already
    uses it (a gradient ``scaler``, an engine that ``manages_gradients``); else ``None``.

    ``_step_supports_amp_scaling`` is read, never written: it is what ``torch.amp.GradScaler`` itself checks before
    handing an optimizer ``grad_scale`` and ``found_inf``."""
    if optimizer is None or scaler is not None or manages_gradients:
        return None
    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    if isinstance(optimizer, torch.optim.Optimizer) and getattr(optimizer, "_step_supports_amp_scaling", False):
        return optimizer
    return None


def training_pipeline(model: DiffusionPipeline | str | os.PathLike) -> tuple[DiffusionPipeline, str | None]:
    """The pipeline a trainer tunes, from a pipeline or a local path / Hub id (:func:`~.collectives.load_pipeline`),
    and the name of its base model (``None`` when unknown)."""
    if isinstance(model, (str, os.PathLike)):
        from .collectives import load_pipeline  # a path: loaded whole under ZeRO-3's zero3_init_flag, by its module

        pipeline = load_pipeline(model)
    else:
        pipeline = model
    if not isinstance(pipeline, DiffusionPipeline):
        raise TypeError(f"model must be a diffusers pipeline or a path/Hub id, got {type(model).__name__}")
    name = getattr(pipeline.config, "_name_or_path", None) or (model if isinstance(model, str) else None)
    return pipeline, None if name is None else os.fspath(name)  # a pathlib.Path given to from_pretrained


def is_partitioned(parameter: torch.Tensor) -> bool:
    """Whether DeepSpeed ZeRO-3 manages ``parameter`` (its data then lives in shards across processes)."""
    return hasattr(parameter, "ds_id")


def check_not_partitioned(modules: dict[str, torch.nn.Module]) -> None:
    """Raise if any of the frozen ``modules`` was built under ``deepspeed.zero.Init`` (sharded)."""
    for name, module in modules.items():
        if any(is_partitioned(p) for p in module.parameters()):
            raise ValueError(
                f"The pipeline's {name} was loaded sharded by DeepSpeed ZeRO-3 (zero3_init_flag). Frozen components "
                "must be whole on every process: load the pipeline with trl_diffusion_sdpo.load_pipeline(path) or "
                "inside trl_diffusion_sdpo.zero3_init_disabled()."
            )


def check_one_device_per_process(args) -> None:
    """Refuse one process driving several GPUs (``python train.py`` on a multi-GPU machine).

    transformers then sets ``args.n_gpu`` to the device count and wraps the denoiser in ``torch.nn.DataParallel``,
    which splits every input tensor along its first axis: the conditioning tensors without a batch axis (FLUX's
    ``img_ids`` and ``txt_ids``) are cut wrongly, the step's draws and its collectives assume one device per process.
    """
    n_gpu = args.n_gpu
    if n_gpu > 1:
        raise ValueError(
            f"One process sees {n_gpu} GPUs (started with `python`, not a launcher): transformers would wrap the "
            "denoiser in torch.nn.DataParallel, which this trainer does not support. Start one process per GPU: "
            f"`accelerate launch --num_processes {n_gpu} your_script.py ...` (or `torchrun --nproc_per_node "
            f"{n_gpu} ...`), or train on one GPU with CUDA_VISIBLE_DEVICES=0."
        )
