"""The update space under DeepSpeed ZeRO: the optimizer's state lives in flat float32 partitions.

ZeRO-1/2 keep every weight whole on every process but flatten each optimizer group's weights into one vector and give
each process one contiguous partition of it: the float32 master weights and the optimizer's moments exist only for
that partition, and the torch optimizer inside DeepSpeed steps the partition as its only parameter per group.
DeepSpeed links each weight to the piece of it that falls into this process's partition (``param._hp_mapping``, a
``deepspeed.utils.tensor_fragment.tensor_fragment``: the piece's offset in the flattened weight,
``lp_fragment_address``, and in the partition, ``hp_fragment_address``). ZeRO-3 partitions each weight itself and
lays this process's partitions end to end, per sub-group, in the flat float32 tensors its optimizer steps (each at
its ``grad_position``). :func:`zero_partition_inputs` cuts the averaged branch gradients into that layout;
:class:`~trl_diffusion_sdpo.safeguards.update_space.OptimizerUpdate` then runs on the partitions as on FSDP2's shards:
every sum over this process's elements, added up over processes.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence

import torch

__all__ = ["zero_partition_inputs"]


def zero_partition_inputs(
    zero_optimizer,
    parameters: Sequence[torch.nn.Parameter],
    winner: Sequence[torch.Tensor],
    loser: Sequence[torch.Tensor],
) -> tuple[torch.optim.Optimizer, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """``(optimizer, partitions, winner, loser)`` for
    :class:`~trl_diffusion_sdpo.safeguards.update_space.OptimizerUpdate` on this process's ZeRO partitions: the torch
    optimizer DeepSpeed steps, its flat float32 partitions (its parameters, holding its state) and ``g_w`` and ``h_l``
    cut into their layout (float32; zeros in padding and where no trainable weight
    falls). ``winner`` and ``loser``: per weight of ``parameters``, averaged over processes; whole weights under
    ZeRO-1/2, this process's partition of each (flat) under ZeRO-3.

    Raises:
        ValueError: a weight the optimizer steps is not among ``parameters`` (its gradient would be missing).
    """
    index = {id(p): i for i, p in enumerate(parameters)}
    stage3 = hasattr(zero_optimizer, "fp32_partitioned_groups_flat")
    partitions = list(
        zero_optimizer.fp32_partitioned_groups_flat if stage3 else zero_optimizer.single_partition_of_fp32_groups
    )
    winner_parts = [torch.zeros(t.numel(), dtype=torch.float32, device=t.device) for t in partitions]
    loser_parts = [torch.zeros_like(t) for t in winner_parts]
    for weight, group, target, source, numel in (_zero3_pieces if stage3 else _zero_pieces)(zero_optimizer):
        if id(weight) not in index:
            raise ValueError("DeepSpeed steps a weight the safeguard does not train; cannot read its update")
        i = index[id(weight)]
        winner_parts[group].narrow(0, target, numel).copy_(winner[i].reshape(-1).narrow(0, source, numel))
        loser_parts[group].narrow(0, target, numel).copy_(loser[i].reshape(-1).narrow(0, source, numel))
    optimizer = zero_optimizer.optimizer
    if stage3:
        # ZeRO-3 hands its optimizer one sub-group's partition at a time, only while it steps: a shallow copy holds
        # every partition in its group, as the step would (read-only: the state is the optimizer's own).
        optimizer = copy.copy(optimizer)
        optimizer.param_groups = [dict(group, params=[]) for group in optimizer.param_groups]
        for sub_group, partition in enumerate(partitions):
            optimizer.param_groups[zero_optimizer.sub_group_to_group_id[sub_group]]["params"].append(partition)
    return optimizer, partitions, winner_parts, loser_parts


def _zero_pieces(zero_optimizer) -> Iterator[tuple[torch.nn.Parameter, int, int, int, int]]:
    """ZeRO-1/2: ``(weight, group, offset in the partition, offset in the flattened weight, elements)`` for each
    weight's piece in this process's partition (``_hp_mapping``; ``None`` where no element of it falls there)."""
    for group, weights in enumerate(zero_optimizer.bit16_groups):
        for weight in weights:
            mapping = getattr(weight, "_hp_mapping", None)
            if mapping is not None:
                target, source = mapping.hp_fragment_address, mapping.lp_fragment_address
                yield weight, group, target.start, source.start, source.numel


def _zero3_pieces(zero_optimizer) -> Iterator[tuple[torch.nn.Parameter, int, int, int, int]]:
    """ZeRO-3: each weight's partition at its ``grad_position`` in its sub-group's flat partition (the offset
    DeepSpeed's own gradient copies use)."""
    for weights in zero_optimizer.fp16_groups:
        for weight in weights:
            group, offset, numel = zero_optimizer.grad_position[zero_optimizer.get_param_id(weight)]
            yield weight, group, offset, 0, numel
