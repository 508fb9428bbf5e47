"""The update space under DeepSpeed ZeRO-1/2: the optimizer's state lives in flat float32 partitions.

ZeRO-1/2 keep every weight whole on every process but flatten each optimizer group's weights into one vector and give
each process one contiguous partition of it: the float32 master weights and the optimizer's moments exist only for
that partition, and the torch optimizer inside DeepSpeed steps the partition as its only parameter per group.
DeepSpeed links each weight to the piece of it that falls into this process's partition (``param._hp_mapping``, a
``deepspeed.utils.tensor_fragment.tensor_fragment``: the piece's offset in the flattened weight,
``lp_fragment_address``, and in the partition, ``hp_fragment_address``); :func:`zero_partition_inputs` uses it to cut
the averaged branch gradients into the partition's layout. :class:`~..step.update_space.OptimizerUpdate` then runs
on the partitions as on FSDP2's shards: every sum over this process's elements, added up over processes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["zero_partition_inputs"]


def zero_partition_inputs(
    zero_optimizer,
    parameters: Sequence[torch.nn.Parameter],
    winner: Sequence[torch.Tensor],
    loser: Sequence[torch.Tensor],
) -> tuple[torch.optim.Optimizer, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """``(optimizer, partitions, winner, loser)`` for :class:`~..step.update_space.OptimizerUpdate` on this process's
    ZeRO-1/2 partitions: the torch optimizer DeepSpeed steps, its flat float32 partition per group (its parameters,
    holding its state) and ``g_w`` and ``h_l`` (whole, per weight of ``parameters``, averaged over processes) cut into
    each partition's layout (float32; zeros in the partition's padding and where no trainable weight falls).

    Raises:
        ValueError: a weight the optimizer steps is not among ``parameters`` (its gradient would be missing).
    """
    index = {id(p): i for i, p in enumerate(parameters)}
    partitions = list(zero_optimizer.single_partition_of_fp32_groups)
    winner_parts, loser_parts = [], []
    for partition, group in zip(partitions, zero_optimizer.bit16_groups):
        w = torch.zeros(partition.numel(), dtype=torch.float32, device=partition.device)
        h = torch.zeros_like(w)
        for weight in group:
            mapping = getattr(weight, "_hp_mapping", None)
            if mapping is None:  # no element of this weight falls into this process's partition
                continue
            if id(weight) not in index:
                raise ValueError("DeepSpeed steps a weight the safeguard does not train; cannot read its update")
            i = index[id(weight)]
            source, target = mapping.lp_fragment_address, mapping.hp_fragment_address
            w.narrow(0, target.start, target.numel).copy_(winner[i].reshape(-1).narrow(0, source.start, source.numel))
            h.narrow(0, target.start, target.numel).copy_(loser[i].reshape(-1).narrow(0, source.start, source.numel))
        winner_parts.append(w)
        loser_parts.append(h)
    return zero_optimizer.optimizer, partitions, winner_parts, loser_parts
