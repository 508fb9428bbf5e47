"""What changes when training runs on several processes: DDP, DeepSpeed ZeRO 1/2/3, FSDP2.

* The frozen VAE and text encoder(s) are never partitioned: :func:`load_pipeline` loads a pipeline with ZeRO-3's
  model construction switched off (transformers would otherwise build the CLIP text encoders inside
  ``deepspeed.zero.Init`` and shard them), and :func:`check_not_partitioned` refuses a pipeline that was loaded
  sharded.
* The reference UNet (a frozen copy, for full tuning) is replicated in the compute dtype under DDP and ZeRO-1/2;
  under ZeRO-3 it is sharded like the policy, by :func:`reference_inference_engine`: a DeepSpeed engine with no
  optimizer, in eval mode.
* :func:`gather_zero3_state_dict` collects ZeRO-3 shards on the main process, so a save writes the same files as
  a single process does.
* Under FSDP2 (``fully_shard`` through accelerate) a reference copy is sharded like the policy by
  :func:`shard_reference_fsdp2`, :func:`gather_fsdp2_state_dict` collects the full weights for a save, and
  :func:`loading_into_shards` lets diffusers-format weights (full tensors) be loaded into the sharded UNet on resume
  (:func:`shard_like` first cuts each full tensor into the process's shard).
* :func:`all_reduce_sum` serves the output-space safeguard's global scope; :func:`all_reduce_mean_` averages
  gradients (or the winner's gradient buffer) in buckets, for the parameter-space safeguard, which runs its two
  backward passes outside DDP's hooks and reduces the combined gradient once, as DDP would.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from diffusers import DiffusionPipeline

from .loading import resolve_model_name

__all__ = [
    "all_reduce_mean_",
    "all_reduce_sum",
    "check_not_partitioned",
    "check_one_device_per_process",
    "drop_fsdp_model_copy",
    "engine_loss_scale",
    "gather_fsdp2_state_dict",
    "gather_zero3_state_dict",
    "is_fsdp2",
    "is_partitioned",
    "load_pipeline",
    "loading_into_shards",
    "reference_inference_engine",
    "shard_like",
    "shard_reference_fsdp2",
    "zero3_init_disabled",
    "zero_stage",
]


def zero_stage(accelerator) -> int | None:
    """The DeepSpeed ZeRO stage ``accelerator`` trains with, or ``None`` without DeepSpeed."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return None if plugin is None else int(plugin.zero_stage)


@contextlib.contextmanager
def zero3_init_disabled() -> Iterator[None]:
    """Within the block, transformers builds models whole even when a DeepSpeed ZeRO-3 config is active.

    Creating ZeRO-3 ``TrainingArguments`` (or an accelerate ZeRO-3 state) registers the DeepSpeed config with
    transformers, whose ``from_pretrained`` then builds every model inside ``deepspeed.zero.Init``: partitioned across
    processes. (accelerate's ``zero3_init_context_manager(enable=False)`` does not undo that registration.) The
    registration is lifted for the block and restored after it. Outside ZeRO-3 this does nothing.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    config = ref() if ref is not None else None
    if config is None or not hf_deepspeed.is_deepspeed_zero3_enabled():
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(config)


def load_pipeline(pretrained: str | os.PathLike, **kwargs) -> DiffusionPipeline:
    """``DiffusionPipeline.from_pretrained(pretrained, **kwargs)``, never partitioned by ZeRO-3; a shipped model's
    short name (``trl-diffusion-sdpo:tiny``, :mod:`.loading`) loads its folder.

    Use it (or :func:`zero3_init_disabled`) to load the pipeline when launching with a ZeRO-3 config: the frozen
    VAE and text encoders must be whole on every process, and the UNet that trains is partitioned by DeepSpeed itself
    when training starts.
    """
    with zero3_init_disabled():
        return DiffusionPipeline.from_pretrained(resolve_model_name(pretrained), **kwargs)


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


def is_fsdp2(accelerator) -> bool:
    """Whether ``accelerator`` trains with FSDP2 (``fully_shard``)."""
    return getattr(accelerator, "is_fsdp2", False)


def shard_reference_fsdp2(module: torch.nn.Module, accelerator) -> torch.nn.Module:
    """Shard a frozen reference ``module`` with FSDP2 exactly as accelerate shards the policy: the same blocks (the
    config's wrap policy), mesh and mixed precision, and no optimizer. Each forward all-gathers one block at a time
    and frees it after use, so a process holds 1/N of the reference plus one block."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    module.requires_grad_(False)
    module = fsdp2_prepare_model(accelerator, module)
    # accelerate keeps the root's own weights (stem and head) gathered after the forward, for the backward that
    # follows; a reference has no backward, so every block, the root included, frees its gathered weights at once.
    module.set_reshard_after_forward(True, recurse=True)
    module.eval()
    return module


def gather_fsdp2_state_dict(module: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor] | None:
    """The full state dict of an FSDP2-sharded ``module``, gathered tensor by tensor onto the main process's CPU.

    Every process must call it (each tensor is one all-gather); process 0 gets the dict, the others ``None``. With
    ``trainable_only`` only parameters that require gradients (LoRA adapters) are gathered. Names are the module's
    own (``fully_shard`` does not rename parameters).
    """
    from torch.distributed.tensor import DTensor

    keep = {name for name, p in module.named_parameters() if p.requires_grad} if trainable_only else None
    is_main = torch.distributed.get_rank() == 0
    state: dict[str, torch.Tensor] = {}
    for name, tensor in module.state_dict().items():
        if keep is not None and name not in keep:
            continue
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        if is_main:
            state[name] = full.detach().to("cpu", copy=True)
    return state if is_main else None


def drop_fsdp_model_copy(checkpoint_dir: str) -> list[str]:
    """Remove the model copy accelerate's ``save_fsdp_model`` writes into a checkpoint (``pytorch_model_fsdp*``: a
    torch pickle, or a folder of distributed-checkpoint shards); returns the names removed.

    The trainer's checkpoints already hold the weights in diffusers' format, which is what resuming reads; the
    optimizer state accelerate writes beside them is kept.
    """
    removed = []
    for name in sorted(os.listdir(checkpoint_dir)):
        if name.startswith("pytorch_model_fsdp"):
            path = os.path.join(checkpoint_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            removed.append(name)
    return removed


@contextlib.contextmanager
def loading_into_shards() -> Iterator[None]:
    """Within the block, ``load_state_dict`` of full tensors into an FSDP2-sharded module works: each process copies
    its own shard out of the full tensor (the full tensors are treated as replicated DTensors)."""
    from torch.distributed.tensor.experimental import implicit_replication

    with implicit_replication():
        yield


def shard_like(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state``'s full tensors placed as ``module``'s FSDP2 parameters and buffers of the same names are (DTensors):
    each process keeps its own slice of the full tensor, without communication; the rest as they are.

    ``load_state_dict`` then copies shard into shard. A full tensor copied into a shard (even as an implicitly
    replicated DTensor) fails where a process's shard is empty: a ``[1, d]`` weight sharded on dim 0 over two
    processes (Z-Image's pad tokens).
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    targets = dict(module.named_parameters())
    targets.update(module.named_buffers())
    out = {}
    for name, tensor in state.items():
        target = targets.get(name)
        if isinstance(target, DTensor) and not isinstance(tensor, DTensor):
            tensor = distribute_tensor(
                tensor.to(target.device), target.device_mesh, target.placements, src_data_rank=None
            )
        out[name] = tensor
    return out


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes (in place, and returned); a no-op without ``torch.distributed``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def all_reduce_mean_(tensors: Sequence[torch.Tensor], bucket_elements: int = 1 << 25) -> None:
    """Average ``tensors`` over all processes, in place, in flat buckets of at most ``bucket_elements`` elements
    (one collective per bucket, not per tensor); a no-op without an initialised process group.

    Every process must pass tensors of the same shapes in the same order.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world = torch.distributed.get_world_size()
    if world == 1:
        return
    bucket: list[torch.Tensor] = []
    size = 0

    def flush() -> None:
        if not bucket:
            return
        flat = torch.cat([t.reshape(-1) for t in bucket])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        flat.div_(world)
        offset = 0
        for t in bucket:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        bucket.clear()

    for tensor in tensors:
        if bucket and (size + tensor.numel() > bucket_elements or tensor.dtype != bucket[0].dtype):
            flush()
            size = 0
        bucket.append(tensor)
        size += tensor.numel()
    flush()


def engine_loss_scale(engine) -> torch.Tensor:
    """What DeepSpeed's ``engine.backward`` multiplies a loss by besides the accumulation average: its fp16 loss
    scale (dynamic or static), 1 under bf16 and fp32. A device scalar, read without a host sync."""
    device = next(engine.module.parameters()).device
    probe = torch.ones((), device=device, requires_grad=True) * 1.0  # a loss-like scalar: DeepSpeed scales only these
    scale_if_loss = getattr(engine.optimizer, "scale_if_loss", None)
    scaled = scale_if_loss(probe) if scale_if_loss is not None else probe
    return scaled.detach().float()
