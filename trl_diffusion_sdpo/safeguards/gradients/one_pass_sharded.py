"""The one pass on FSDP2's shards: each gathered weight's per-group gradient is reduce-scattered as the taps make it.

FSDP2 gathers a block's weights for its forward and backward and keeps only this process's rows of each (dimension 0,
in ``torch.chunk``'s pieces) between them. The per-layer taps see the gathered weights, so each hands its per-group
gradient ``[groups, *weight.shape]`` whole; this store reduce-scatters it at once, in float32, into this process's rows
and drops it, so what it keeps is shard-sized, as FSDP2's gradients are:

* by branch (two groups, the global scope): averaged over processes (``AVG``): every process holds the rows of the
  global micro-batch's ``g_w`` and ``h_l``; the inner products are summed over processes (the engine's
  :meth:`~.collectives.BranchCollectives.reduce_branch_sums`, two scalars) and the combination is formed on the rows.
  Two gradients' worth of reduce-scatter where FSDP2's own backward moves one.
* by pair (one group per image): a pair's ``lambda_i`` needs that pair's own gradients, not their average over
  processes: each process puts its images into its own rows of ``[2 B world, ...]`` (winners first, then losers, in
  the order of the processes) and the reduce-scatter adds them up (``SUM``), so every process holds every image's
  rows; the per-pair inner products are summed over processes and the combination is divided by the number of
  processes (FSDP2 averages). ``2 B world`` image gradients' worth of reduce-scatter, and ``2 B`` gradients of the
  trainable weights kept per process (LoRA; see
  :func:`~trl_diffusion_sdpo.safeguards.parameter.check_pair_scope_memory`).

FSDP2's own backward sees no gradient for the tapped weights (the taps hand autograd none) and reduces nothing for
them. The combination becomes each weight's ``.grad`` as a DTensor over this process's rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist

from .one_pass import OnePassBranchGradients

__all__ = ["ShardedOnePassBranchGradients", "ZeRO3OnePassBranchGradients"]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class ShardedOnePassBranchGradients(OnePassBranchGradients):
    """:class:`~.one_pass.OnePassBranchGradients` over FSDP2-sharded ``parameters`` (DTensors sharded on dimension 0
    over the default process group): the buffer holds this process's rows of every weight, per group.

    The rows are held in pieces as on whole weights, in float32 (or wider) whatever the products' dtype: the
    reduce-scatter sums in it, as FSDP2 reduces float32 weights' gradients. A reduce-scatter takes its piece's memory
    when the backward first reaches one of its weights; the combination reads each piece once and gives its memory
    back at once (``.grad`` is the combination's own tensor), so nothing of the rows outlives the step. Another
    layout of the shards
    (:class:`ZeRO3OnePassBranchGradients`) overrides :meth:`_shard_shape`, :meth:`_process_pieces` and
    :meth:`_mine`."""

    def __init__(self, module: torch.nn.Module, parameters: Sequence[torch.nn.Parameter]) -> None:
        super().__init__(module, parameters)
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self._local_shapes = [self._shard_shape(p) for p in self.parameters]
        self._set_layout(self._local_shapes)
        self._by_image = False
        self._written: list[bool] = []
        self._pair_divisor = self.world  # by pair every process's images are summed: FSDP2 averages

    def _shard_shape(self, parameter: torch.nn.Parameter) -> tuple[int, ...]:
        """The shape of this process's shard of ``parameter``."""
        return tuple(_local(parameter).shape)

    def _process_pieces(self, per_group: torch.Tensor) -> tuple[list[torch.Tensor], tuple[int, ...]]:
        """``per_group`` (``[groups, *weight.shape]``) cut into each process's piece (``[groups, ...]``, the last
        ones possibly shorter or missing), and the shape of a whole piece (after ``groups``)."""
        chunk = -(-per_group.shape[1] // self.world)  # rows per process, as torch.chunk and FSDP2 cut them
        return list(per_group.split(chunk, dim=1)), (chunk, *per_group.shape[2:])

    def _mine(self, received: torch.Tensor, index: int) -> torch.Tensor:
        """This process's shard of weight ``index`` out of a whole piece received."""
        return received[:, : self._local_shapes[index][0]]

    def _buffer_spec(self, groups: int) -> tuple:
        rows = groups * self.world if self._by_image else groups
        first = self.parameters[0]  # float32 (or wider) whatever the weights: the reduce-scatter sums in it
        return rows, torch.promote_types(first.dtype, torch.float32), _local(first).device

    @contextlib.contextmanager
    def split(self, groups: int) -> Iterator[None]:
        """As :meth:`OnePassBranchGradients.split`; ``groups`` larger than 2 is by image (the pair scope)."""
        self._by_image = groups > 2
        self._prepare(groups)
        self._written = [False] * len(self.parameters)
        with self.taps.tapping(groups, sink=self._scatter):
            yield
        self._complete(list(self._written))  # the same on every process: they ran the same layers

    def _scatter(self, index: int, per_group: torch.Tensor) -> None:
        """Reduce-scatter weight ``index``'s whole per-group gradient into this process's shard of its view."""
        groups = per_group.shape[0]
        view = self._destination(index)
        rows = view.shape[0]
        pieces, piece_shape = self._process_pieces(per_group.to(view.dtype))
        send = per_group.new_zeros((self.world, rows, *piece_shape), dtype=view.dtype)
        if self._by_image:  # image k of this process -> its row among all processes' (winners, then losers)
            pairs = groups // 2
            slots = [self.rank * pairs + k if k < pairs else (self.world + self.rank) * pairs + k - pairs for k in
                     range(groups)]  # fmt: skip
            for destination, piece in enumerate(pieces):
                send[destination, slots, : piece.shape[1]] = piece
            op = dist.ReduceOp.SUM
        else:
            for destination, piece in enumerate(pieces):
                send[destination, :, : piece.shape[1]] = piece
            op = dist.ReduceOp.AVG
        received = send.new_empty((rows, *piece_shape))
        dist.reduce_scatter_tensor(received.view(-1), send.view(-1), op=op)  # flat: gloo wants 1-D
        mine = self._mine(received, index)
        if self._written[index]:
            view.add_(mine)
        else:
            view.copy_(mine)
            self._written[index] = True

    def assign(self, combined: list[torch.Tensor]) -> None:
        """``.grad += combined`` as DTensors over this process's rows (the combination's own tensors: the rows are
        given back already)."""
        from torch.distributed.tensor import DTensor

        for p, c, seen in zip(self.parameters, combined, self._seen):
            if not seen:
                continue
            if p.grad is None:
                p.grad = DTensor.from_local(
                    c.to(p.dtype), p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
                )
            else:
                _local(p.grad).add_(c.to(p.dtype))
        self.release()


class ZeRO3OnePassBranchGradients(ShardedOnePassBranchGradients):
    """The same over DeepSpeed ZeRO-3's partitions: each weight flattened, padded to a multiple of the processes and
    cut into equal pieces, piece ``r`` on process ``r`` (``param.ds_tensor``, of ``ds_tensor.ds_numel`` elements).
    The combination is copied into the engine's gradient partitions (:class:`~.zero3.DeepSpeedZeRO3Collectives`,
    through DeepSpeed's ``safe_set_local_grad``), not handed to ``.grad``: the pieces give their memory back as the
    combination reads them, so between steps the store holds none."""

    def _shard_shape(self, parameter: torch.nn.Parameter) -> tuple[int, ...]:
        return (parameter.ds_tensor.ds_numel,)

    def _process_pieces(self, per_group: torch.Tensor) -> tuple[list[torch.Tensor], tuple[int, ...]]:
        flat = per_group.reshape(per_group.shape[0], -1)
        size = -(-flat.shape[1] // self.world)
        return list(flat.split(size, dim=1)), (size,)

    def _mine(self, received: torch.Tensor, index: int) -> torch.Tensor:
        return received

    def assign(self, combined: list[torch.Tensor]) -> None:
        raise RuntimeError("under ZeRO-3 the combination goes to the engine's partitions (add_combined)")
