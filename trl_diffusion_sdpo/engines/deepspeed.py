"""DeepSpeed ZeRO 1, 2 and 3: the engine owns the reduced gradients and steps inside its backward."""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import logging
import os
import shutil
from collections.abc import Iterator
from typing import Any

import torch

from .base import Engine, fused_scaling_optimizer

__all__ = [
    "DeepSpeedEngine",
    "engine_loss_scale",
    "gather_zero3_state_dict",
    "reference_inference_engine",
    "universal_checkpoint_view",
    "zero_inner_optimizer",
]

logger = logging.getLogger(__name__)

#: the tag of the rewind's snapshot in its DeepSpeed checkpoint folder
_SNAPSHOT_TAG = "rewind-healthy"
#: what ``engine.load_checkpoint`` sets from the checkpoint that a rewind keeps counting instead
_ENGINE_COUNTS = ("global_steps", "global_samples", "skipped_steps")


def _without_auto(config: Any) -> Any:
    """``config`` without the entries still set to ``"auto"``: DeepSpeed then uses its own defaults for them."""
    if isinstance(config, dict):
        return {k: _without_auto(v) for k, v in config.items() if v != "auto"}
    return config


def reference_inference_engine(module: torch.nn.Module, accelerator) -> torch.nn.Module:
    """Shard a frozen reference ``module`` with ZeRO-3, like the policy: a DeepSpeed engine without optimizer.

    The engine reuses the run's DeepSpeed config (precision, ZeRO-3 settings, batch sizes) minus the optimizer,
    scheduler and optimizer offload, and is put in eval mode. Its forward gathers each layer's shards on the fly.
    """
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    config.get("zero_optimization", {}).pop("offload_optimizer", None)
    config = _without_auto(config)
    module.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=module, config=config)
    engine.eval()
    return engine


def gather_zero3_state_dict(engine, trainable_only: bool) -> dict[str, torch.Tensor] | None:
    """The full state dict of a ZeRO-3 ``engine``'s module, gathered layer by layer onto the main process's CPU.

    Every process must call it; the main process gets the dict, the others ``None``. With ``trainable_only`` only
    parameters that require gradients (LoRA adapters) are gathered.
    """
    return engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=trainable_only)


def engine_loss_scale(engine) -> torch.Tensor:
    """What DeepSpeed's ``engine.backward`` multiplies a loss by besides the accumulation average: its fp16 loss
    scale (dynamic or static), 1 under bf16 and fp32. A device scalar, read without a host sync."""
    device = next(engine.module.parameters()).device
    probe = torch.ones((), device=device, requires_grad=True) * 1.0  # a loss-like scalar: DeepSpeed scales only these
    scale_if_loss = getattr(engine.optimizer, "scale_if_loss", None)
    scaled = scale_if_loss(probe) if scale_if_loss is not None else probe
    return scaled.detach().float()


def _partitioned(parameter: torch.Tensor) -> bool:
    """Whether a ZeRO-3 ``parameter`` is partitioned now: gathering one that is whole (a small weight ZeRO-3 keeps
    whole, or one gathered for a forward) would partition it on release."""
    if not hasattr(parameter, "ds_id"):
        return False
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return parameter.ds_status == ZeroParamStatus.NOT_AVAILABLE


def universal_checkpoint_view(checkpoint: str, view: str) -> str:
    """A folder ``view`` that reads like ``checkpoint`` to transformers (a link to each of its files and folders) and
    holds DeepSpeed's universal checkpoint of its ZeRO-1/2 state, written by DeepSpeed's own converter
    (``deepspeed.checkpoint.ds_to_universal``: the optimizer partitions merged per parameter, so that an engine of
    any data-parallel size loads its own partitions), with the ``latest_universal`` file naming it.

    Only the main process calls it. The converter unpickles DeepSpeed's ``*_optim_states.pt`` files (as DeepSpeed's
    own loading does): they are this run's, and their SHA-256 were checked against the manifest before resuming.
    """
    with open(os.path.join(checkpoint, "latest"), encoding="utf-8") as f:
        tag = f.read().strip()
    shutil.rmtree(view, ignore_errors=True)
    os.makedirs(view)
    for name in os.listdir(checkpoint):
        os.symlink(os.path.abspath(os.path.join(checkpoint, name)), os.path.join(view, name))
    _to_universal(os.path.join(checkpoint, tag), os.path.join(view, f"{tag}_universal"))
    return view


def _to_universal(tagged: str, output: str) -> None:
    """DeepSpeed's converter (``deepspeed.checkpoint.ds_to_universal``) of the ZeRO-1/2 checkpoint folder ``tagged``
    into ``output`` (a ``<tag>_universal`` folder), writing ``latest_universal`` beside it."""
    from deepspeed.checkpoint import ds_to_universal

    options = argparse.Namespace(
        input_folder=tagged,
        output_folder=output,
        num_extract_workers=1,  # in this process: no process pool inside a training process
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        # accelerate's engine records no universal_checkpoint_info (Megatron-DeepSpeed's client state); the
        # converter's own default (its version only: no tensor parallelism) is added in memory, never to the files
        inject_missing_state=True,
    )
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # the converter prints its progress
        ds_to_universal.main(options)
    logger.debug("ds_to_universal: %s", printed.getvalue())


def zero_inner_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer a DeepSpeed ``engine`` steps its float32 partitions with (the ZeRO optimizer's
    ``optimizer``: the one transformers made and handed to DeepSpeed, or DeepSpeed's own)."""
    optimizer = engine.optimizer
    return getattr(optimizer, "optimizer", optimizer)


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO at ``stage`` (1, 2 or 3).

    ZeRO-1/2 keep the weights whole: the parameter-space safeguard uses the engine as its second gradient store
    (:class:`~trl_diffusion_sdpo.safeguards.gradients.per_branch.EngineBranchGradients`). ZeRO-3 partitions the
    weights: the safeguard works on each process's gradient partitions
    (:mod:`~trl_diffusion_sdpo.safeguards.gradients.zero3`, global scope); the reference is sharded like the policy
    and saves gather the shards.
    """

    name = "deepspeed"
    skips_nonfinite_steps = True
    steps_in_backward = True
    # it steps inside its own backward and owns the reduced gradients: the combination must reach them before that
    passes_placement = "with_combination"
    shards_training_state = True  # the optimizer state is partitioned at every stage, the weights too at ZeRO-3

    def __init__(self, accelerator, stage: int) -> None:
        super().__init__(accelerator)
        self.stage = stage
        self.samples_whole_denoiser = stage != 3
        self._skipping: torch.optim.Optimizer | None = None  # the optimizer told to skip its next step

    @property
    def variant(self) -> str:
        return "deepspeed-zero3" if self.stage == 3 else self.name

    def __repr__(self) -> str:
        return f"DeepSpeedEngine(zero_stage={self.stage}, processes={self.num_processes})"

    def input_dtype(self) -> torch.dtype | None:
        # DeepSpeed casts the model to its bf16/fp16 wholesale and runs it without autocast: floating inputs are cast
        # to match, as transformers does under DeepSpeed
        return self.accelerator.state.deepspeed_plugin.hf_ds_config.dtype()

    def place_reference(
        self, module: torch.nn.Module, policy: torch.nn.Module, device: torch.device, dtype: torch.dtype
    ) -> torch.nn.Module:
        if self.stage == 3:  # sharded like the policy: a ZeRO-3 engine without optimizer
            return reference_inference_engine(module, self.accelerator)
        # DeepSpeed casts the policy to its bf16/fp16 wholesale (and computes without autocast): so is the reference.
        return module.to(device=device, dtype=dtype)

    @contextlib.contextmanager
    def probing(self, wrapped: torch.nn.Module, policy: torch.nn.Module) -> Iterator[torch.nn.Module]:
        # DeepSpeed's engine, as an evaluation runs it: at ZeRO-3 its forward gathers each layer's partitions
        yield wrapped

    def save_training_state(self, folder: str, optimizer: torch.optim.Optimizer) -> None:
        """DeepSpeed's own checkpoint of the engine (``engine.save_checkpoint``): each process writes its partitions
        of the optimizer state (and at ZeRO-3 of the weights) into ``folder``; the frozen weights are left out."""
        engine = self.accelerator.deepspeed_engine_wrapped.engine
        engine.save_checkpoint(folder, tag=_SNAPSHOT_TAG, client_state={}, save_latest=False,
                               exclude_frozen_parameters=True)  # fmt: skip

    def load_training_state(self, folder: str, optimizer: torch.optim.Optimizer) -> None:
        """``engine.load_checkpoint`` of what :meth:`save_training_state` wrote: each process reads its own
        partitions back, the weights from the float32 master partitions. The learning-rate schedule is not loaded,
        and the engine's step and sample counts are kept: they go on counting, as the trainer's do."""
        engine = self.accelerator.deepspeed_engine_wrapped.engine
        counts = {name: getattr(engine, name) for name in _ENGINE_COUNTS}
        load_dir, tag = folder, _SNAPSHOT_TAG
        # A run resumed on another number of processes (resume_on_other_count) has its engine read every checkpoint
        # in DeepSpeed's universal format, the snapshot too (written by this count or, resumed with the checkpoint,
        # by the old one): converted for the load, aside, and removed after it.
        universal = engine.load_universal_checkpoint()
        if universal:
            load_dir, tag = f"{folder}.universal", f"{_SNAPSHOT_TAG}_universal"
            if self.accelerator.is_main_process:
                shutil.rmtree(load_dir, ignore_errors=True)
                _to_universal(os.path.join(folder, _SNAPSHOT_TAG), os.path.join(load_dir, tag))
            self.accelerator.wait_for_everyone()
        engine.load_checkpoint(load_dir, tag=tag, load_module_strict=False, load_optimizer_states=True,
                               load_lr_scheduler_states=False)  # fmt: skip
        for name, value in counts.items():
            setattr(engine, name, value)
        if universal:
            self.accelerator.wait_for_everyone()  # every process has read it
            if self.accelerator.is_main_process:
                shutil.rmtree(load_dir, ignore_errors=True)

    def whole_parameter(self, parameter: torch.Tensor) -> torch.Tensor:
        if not _partitioned(parameter):
            return parameter.detach()
        import deepspeed

        with deepspeed.zero.GatheredParameters([parameter]):
            return parameter.detach().clone()

    def load_whole_state(self, module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        if self.stage != 3:
            return super().load_whole_state(module, state)
        import deepspeed

        module = getattr(module, "module", module)  # the reference's inference engine wraps it
        with torch.no_grad():
            for name, parameter in module.named_parameters():
                if name not in state:
                    continue
                if not _partitioned(parameter):  # kept whole (below ZeRO-3's persistence threshold)
                    parameter.copy_(state[name])
                    continue
                # gathered, written (every process holds the same values), partitioned again from process 0
                with deepspeed.zero.GatheredParameters([parameter], modifier_rank=0):
                    parameter.copy_(state[name])
        return None

    def resume_on_other_count(self, checkpoint: str, saved_processes: int, work_dir: str) -> str:
        """ZeRO-1/2: the checkpoint converted to DeepSpeed's universal format (:func:`universal_checkpoint_view`,
        main process) and the engine told to load it (``checkpoint.load_universal``). ZeRO-3: refused (its
        partitioned weights and optimizer state are not converted here)."""
        if self.stage == 3:
            return super().resume_on_other_count(checkpoint, saved_processes, work_dir)
        if self.accelerator.is_main_process:
            universal_checkpoint_view(checkpoint, work_dir)
        self.accelerator.wait_for_everyone()
        config = self.accelerator.state.deepspeed_plugin.deepspeed_config
        config.setdefault("checkpoint", {})["load_universal"] = True
        return work_dir

    def skip_next_step(self) -> None:
        """The engine's next ``step()`` (inside accelerate's backward of the window's last micro-batch) leaves the
        update unapplied: its torch optimizer is handed ``found_inf`` as ``torch.amp.GradScaler`` hands it, and its
        fused kernel skips the whole update (weights, moments, weight decay, step count). The ZeRO optimizer goes on
        as for any step: the gradients are cleared, the fp16 loss scale is kept and the schedulers advance, as an
        empty step does on every other engine. DeepSpeed's own optimizers (a config with an ``optimizer`` section,
        ZeRO-Offload's CPU Adam) take no such flag: refused."""
        inner = zero_inner_optimizer(self.accelerator.deepspeed_engine_wrapped.engine)
        fused = fused_scaling_optimizer(inner)
        if fused is None:
            raise RuntimeError(
                f"An optimizer step without a valid preference pair cannot be left unapplied under DeepSpeed with "
                f"{type(inner).__name__}: use optim='adamw_torch_fused' without a DeepSpeed 'optimizer' section or "
                "optimizer offload, or drop the invalid rows from the dataset before training."
            )
        # A process's first group may hold no partition (ZeRO-3 spreads sub-groups unevenly over processes).
        held = (param.device for group in fused.param_groups for param in group["params"])
        device = next(held, self.accelerator.device)
        # torch's protocol between GradScaler and the fused optimizers: GradScaler.step (torch/amp/grad_scaler.py)
        # sets optimizer.found_inf before optimizer.step() and deletes it after; Adam.step (torch/optim/adam.py)
        # hands getattr(self, "found_inf", None) to the fused kernel, which skips the update where it is not 0.
        fused.found_inf = torch.ones((), dtype=torch.float32, device=device)
        self._skipping = fused

    def end_skipped_step(self) -> None:
        skipping, self._skipping = self._skipping, None
        if skipping is not None:
            del skipping.found_inf  # as GradScaler.step does after the step

    def gathers_for_save(self) -> bool:
        # Before train() has built the engine the weights are still whole.
        return self.stage == 3 and getattr(self.accelerator, "deepspeed_engine_wrapped", None) is not None

    def gather_state_dict(self, model: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor] | None:
        if not self.gathers_for_save():
            return None
        return gather_zero3_state_dict(self.accelerator.deepspeed_engine_wrapped.engine, trainable_only=trainable_only)
