"""The protocol every per-branch gradient store follows.

The exact safeguard needs, per micro-batch, the gradients of the loss's winner term ``g_w`` and of its loser term
``h_l`` over the trainable weights, kept apart until ``lambda`` is known, then ``.grad = A + g_w + lambda * h_l``
(``A``: the accumulation window's earlier sum). These stores hold them:

* :class:`~.one_pass.OnePassBranchGradients`: split inside one forward and one backward pass by per-layer taps (by
  branch, or by image for the per-pair scope), on whole weights (one process, DDP, DeepSpeed ZeRO-1/2); on each
  process's shards, reduce-scattered as the taps make them, :class:`~.one_pass_sharded.ShardedOnePassBranchGradients`
  (FSDP2) and :class:`~.one_pass_sharded.ZeRO3OnePassBranchGradients` (DeepSpeed ZeRO-3);
* :class:`~.per_branch.BranchGradientSplitter`: one backward pass per branch, ``.grad`` plus one buffer (one process,
  DDP, FSDP2's local shards);
* :class:`~.per_branch.EngineBranchGradients`: one backward pass per branch with the engine as the second store
  (DeepSpeed ZeRO-1/2);
* :class:`~.zero3.ZeRO3BranchGradients`: one engine backward pass per branch, read off and written back to each
  process's gradient partitions (DeepSpeed ZeRO-3).

They differ in how the branches' passes run; what the safeguard writes afterwards is :class:`BranchGradients`'s
``combine``. The one-pass stores and :class:`~.per_branch.BranchGradientSplitter` also hand both branches out with
``branch_gradients()``, which the update space reads. The reductions over processes each engine needs are its
:class:`~.collectives.BranchCollectives`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

__all__ = ["BranchGradients", "PerBranchStore"]


@runtime_checkable
class BranchGradients(Protocol):
    """What every store offers once a micro-batch's branches have run."""

    parameters: list[torch.nn.Parameter]

    def combine(self, lam: torch.Tensor) -> None:
        """``.grad = A + g_w + lambda * h_l`` (or, where the engine owns the sum, the engine's sum becomes it)."""
        ...


@runtime_checkable
class PerBranchStore(BranchGradients, Protocol):
    """A store filled by one backward pass per branch."""

    def backward_winner(self, outputs: torch.Tensor, cotangents: torch.Tensor, reduce_winner=None) -> torch.Tensor:
        """Backpropagate the winner's branch; ``<g_w, g_w>`` in float32 (after ``reduce_winner`` if given)."""
        ...

    def backward_loser(self, outputs: torch.Tensor, cotangents: torch.Tensor) -> torch.Tensor:
        """Backpropagate the loser's branch; ``<g_w, h_l>`` in float32."""
        ...
