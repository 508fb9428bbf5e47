"""What every engine shares when training runs on several processes: setting up, and the collectives.

* The frozen VAE and text encoder(s) are never partitioned: :func:`load_pipeline` loads a pipeline with ZeRO-3's
  model construction switched off (transformers would otherwise build the CLIP text encoders inside
  ``deepspeed.zero.Init`` and shard them), for a trainer given a path or Hub id too
  (:func:`~.base.training_pipeline`); the checks every run makes, one process's too, live in :mod:`.base`
  (:func:`~.base.check_not_partitioned` refuses a pipeline that was loaded sharded,
  :func:`~.base.check_one_device_per_process` a process that sees several GPUs), so a run of one process given a
  pipeline never loads this module.
* :func:`shard_like` cuts full tensors into a process's FSDP2 shards (loading diffusers-format weights on resume).
* :func:`all_reduce_sum` serves the output-space safeguard's global scope; :func:`all_reduce_mean_` averages
  gradients (or the winner's gradient buffer) in place, for the exact safeguard, which runs its passes outside
  DDP's hooks and reduces the combined gradient once, as DDP would.

What is particular to DeepSpeed or FSDP2 (a sharded reference, gathering the weights for a save) lives with its
engine in :mod:`trl_diffusion_sdpo.engines`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import torch
from accelerate.utils import reduce
from diffusers import DiffusionPipeline

from ..families.loading import import_own_components, resolve_model_name

__all__ = [
    "all_reduce_mean_",
    "load_pipeline",
    "shard_like",
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
    short name (``trl-diffusion-sdpo:tiny``, :mod:`~trl_diffusion_sdpo.families.loading`) loads its folder.

    Use it (or :func:`zero3_init_disabled`) to load the pipeline when launching with a ZeRO-3 config: the frozen
    VAE and text encoders must be whole on every process, and the UNet that trains is partitioned by DeepSpeed itself
    when training starts.
    """
    pretrained = resolve_model_name(pretrained)
    import_own_components(pretrained)
    with zero3_init_disabled():
        return DiffusionPipeline.from_pretrained(pretrained, **kwargs)


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
    """``tensor`` summed over all processes, as a new tensor (``tensor`` is left as it is): accelerate's
    ``reduce(tensor, reduction="sum")``, which the trainer's metrics use too; on one process, a copy."""
    return reduce(tensor, reduction="sum")


def _back_to_back(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """One flat view of ``tensors`` where they are contiguous and lie back to back in one storage, else None; read
    from their addresses (no operation per tensor)."""
    if not tensors:
        return None
    first = tensors[0]
    size, storage = first.element_size(), first.untyped_storage().data_ptr()
    for a, b in zip(tensors, tensors[1:]):
        if not b.is_contiguous() or b.dtype != first.dtype or b.untyped_storage().data_ptr() != storage:
            return None
        if b.data_ptr() != a.data_ptr() + a.numel() * size:
            return None
    if not first.is_contiguous():
        return None
    return first.as_strided((sum(t.numel() for t in tensors),), (1,), first.storage_offset())


def all_reduce_mean_(tensors: Sequence[torch.Tensor]) -> None:
    """Average ``tensors`` over all processes, in place; a no-op on one process. Views of one buffer lying back to
    back (the one pass's rows, its weights' ``.grad``) are reduced where they lie, in one collective and no copy;
    other tensors one at a time, each in place (no copy is made).

    Every process must pass tensors of the same shapes in the same order.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world = torch.distributed.get_world_size()
    if world == 1:
        return
    flat = _back_to_back(tensors)
    if flat is not None:
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        flat.div_(world)
        return
    for tensor in tensors:  # torch's own collective, in place: it needs the process group only, not accelerate's state
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        tensor.div_(world)
