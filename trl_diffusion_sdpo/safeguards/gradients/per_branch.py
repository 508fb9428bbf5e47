"""Per-branch backward passes for the parameter-space safeguard, with one extra gradient-sized buffer.

The exact safeguard needs, per micro-batch, ``g_w`` (gradient of the loss's winner term) and ``h_l`` (gradient of
its loser term, as the loss sees it) over the trainable weights, and then hands the optimizer
``g_w + lambda * h_l`` (:func:`~trl_diffusion_sdpo.safeguards.parameter.safeguarded_gradients`). ``lambda`` is known
only after both passes. :class:`BranchGradientSplitter` keeps whole weights' gradients in two flat tensors of the
gradients' dtype (one per device and dtype, one in practice), each weight a view of a slice:

* the ``.grad`` flat: the weights' ``.grad`` are its views, where Diffusion-DPO's backward would hold its gradients;
* the buffer: the one tensor beyond Diffusion-DPO's.

A micro-batch that starts from empty gradients (no accumulation, or the window's first micro-batch) needs no hook
and no per-weight arithmetic: the ``.grad`` views are set, the winner's backward accumulates ``g_w`` into them, the
buffer takes it (``buffer <- .grad; .grad <- 0``), the loser's backward accumulates ``h_l`` into the zeroed views,
and then::

    <g_w, g_w> = <buffer, buffer>     <g_w, h_l> = <buffer, .grad>     .grad <- .grad * lambda + buffer

each one call per flat tensor (:func:`~.one_pass.blocked_dot`), ``lambda`` a device tensor throughout. Each branch's
gradient is autograd's accumulation into zeros, bit for bit what a separate ``torch.autograd.backward`` of that branch
gives. Each pass notes the weights it reaches (one hook per weight, a Python call each, no host read); after the
loser's, a weight neither pass reached keeps an empty ``.grad``, as after a plain backward (a zero ``.grad`` would
still move it through an optimizer's moments and weight decay).

Where the ``.grad`` fields already hold the earlier micro-batches' sum ``A`` (gradient accumulation), or the winner's
buffered gradient is averaged over processes while ``.grad`` keeps the local one (the global scope), three vectors
are in play (``A`` or the local ``g_w``, ``g_w``, ``h_l``) and two places hold them, by streaming the loser's gradient
through per-weight hooks (a Python call and an inner product per weight and pass):

1. winner pass: each gradient accumulates into ``.grad`` (``A + g_w``) and a hook copies it into the buffer;
2. loser pass: as each weight's gradient ``h`` arrives, ``<g_w, h>`` is accumulated from the buffer, then the
   buffer is overwritten by ``h``; ``h`` also accumulates into ``.grad`` (``A + g_w + h_l``);
3. combine: ``.grad += (lambda - 1) * buffer`` (one call on the flats where the ``.grad`` are its views).

The loser's hook must see each parameter's gradient in one piece; autograd delivers it so for a leaf (its
``AccumulateGrad`` runs once per backward with the summed gradient), also under diffusers' non-reentrant gradient
checkpointing. A second delivery (reentrant checkpointing of a shared weight) is detected and raises.

When an engine owns the accumulated gradient (DeepSpeed ZeRO-1/2 reduce it into their own partitions, and ZeRO-2
frees ``.grad`` as it goes), :class:`EngineBranchGradients` uses the engine as the second store instead of ``.grad``:
the winner pass is an ordinary engine backward (the engine adds ``g_w`` to its sum, a hook copies this process's
``g_w`` into the buffer); the loser pass is ``torch.autograd.grad`` (the engine sees nothing) streaming ``<g_w, h>``
and the buffer is overwritten by ``h``; a last engine backward of ``lambda * <w, buffer>``, whose gradient is
``lambda * h_l``, hands the engine the loser's share. The engine's sum becomes ``A + g_w + lambda * h_l``.

Under FSDP2 the parameters are shards (DTensors) whose ``.grad`` arrive already reduce-scattered, after autograd has
finished with the gathered weights, so neither a hook nor a view of ours sees them: :class:`BranchGradientSplitter`
with ``local=True`` copies each process's shards of ``g_w`` into its buffer after the winner's pass and reads
``<g_w, h_l> = <buffer, .grad> - |buffer|^2`` after the loser's, per weight. The two inner products are then sums over
this process's shard of every tensor, which the caller adds up over processes to get the exact global values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .one_pass import blocked_dot

__all__ = ["BranchGradientSplitter", "EngineBranchGradients"]

Tensor = torch.Tensor
Reduction = Callable[[list[torch.Tensor]], None]  # averages a list of tensors over processes, in place


def _local(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """This process's shard of an FSDP2 parameter or gradient (a view: in-place edits reach the DTensor)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _squared_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_i |t_i|^2`` in float32."""
    norms = torch._foreach_norm([t.float() if t.dtype != torch.float32 else t for t in tensors])
    return torch.stack(norms).pow(2).sum() if norms else torch.zeros(())


class _Flat:
    """Tensors shaped as ``like`` laid back to back in one zeroed flat tensor per device and dtype (:attr:`flats`),
    each a view of its slice (:attr:`views`, in the order of ``like``)."""

    def __init__(self, like: Sequence[torch.Tensor]) -> None:
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, tensor in enumerate(like):
            groups.setdefault((tensor.device, tensor.dtype), []).append(i)
        self.flats: list[torch.Tensor] = []
        self.views: list[torch.Tensor] = [None] * len(like)  # type: ignore[list-item]
        for (device, dtype), members in groups.items():
            flat = torch.zeros(sum(like[i].numel() for i in members), device=device, dtype=dtype)
            offset = 0
            for i in members:
                self.views[i] = flat[offset : offset + like[i].numel()].view(like[i].shape)
                offset += like[i].numel()
            self.flats.append(flat)

    def dot(self, other: _Flat) -> torch.Tensor:
        """``<self, other>`` (float64; float32 on MPS), one :func:`~.one_pass.blocked_dot` per flat tensor."""
        sums = [
            blocked_dot(a, b, dtype=torch.float32 if a.device.type == "mps" else torch.float64)
            for a, b in zip(self.flats, other.flats)
        ]
        return sums[0] if len(sums) == 1 else torch.stack(sums).sum()


class _LoserStream:
    """The loser's gradients streamed into ``buffers``, which hold ``g_w``: as weight ``i``'s gradient ``h`` arrives,
    ``<buffer_i, h>`` is accumulated and ``buffer_i`` is overwritten by ``h``; :meth:`finish` zeroes the buffers no
    gradient reached and returns ``<g_w, h_l>`` (float32)."""

    def __init__(self, buffers: list[torch.Tensor]) -> None:
        self.buffers = buffers
        self.seen = [False] * len(buffers)
        self._dots: list[torch.Tensor] = []

    def take(self, i: int, grad: torch.Tensor) -> None:
        if self.seen[i]:
            raise RuntimeError(
                "A trainable weight received its loser-branch gradient in several pieces (reentrant gradient "
                "checkpointing around a shared weight?), which the parameter-space safeguard cannot stream. Use "
                "non-reentrant checkpointing (diffusers' default) or safeguard_space='output'."
            )
        self.seen[i] = True
        self._dots.append(torch.dot(self.buffers[i].reshape(-1).float(), grad.detach().reshape(-1).float()))
        self.buffers[i].copy_(grad)

    def finish(self) -> torch.Tensor:
        for buffer, seen in zip(self.buffers, self.seen):
            if not seen:  # no loser gradient reached this weight: nothing of the loser to scale
                buffer.zero_()
        return torch.stack(self._dots).sum() if self._dots else torch.zeros(())


def _hooked_backward(parameters: Sequence[torch.nn.Parameter], outputs: Tensor, cotangents: Tensor, hook) -> None:
    """``torch.autograd.backward(outputs, cotangents)`` with ``hook(i, grad)`` called as weight ``i``'s gradient
    arrives."""
    handles = [p.register_hook(lambda grad, i=i: hook(i, grad)) for i, p in enumerate(parameters)]
    try:
        torch.autograd.backward(outputs, cotangents)
    finally:
        for handle in handles:
            handle.remove()


class BranchGradientSplitter:
    """Run the winner's and the loser's backward pass separately over ``parameters`` (see the module docstring).

    Use once per micro-batch, in this order: :meth:`backward_winner`, :meth:`backward_loser`, :meth:`combine` (the
    update space: :meth:`branch_gradients`, reduced in place, then :meth:`set_combined`). The flat tensors are
    allocated at the first call and reused; ``local=True``: FSDP2's shards (per-weight buffers, no views).
    """

    def __init__(self, parameters: Sequence[torch.nn.Parameter], local: bool = False) -> None:
        self.parameters = list(parameters)
        self.local = local
        self._buffer: _Flat | None = None  # g_w (h_l while streaming): the one tensor beyond Diffusion-DPO's
        self._grads: _Flat | None = None  # whole weights: the .grad views, allocated at the first fresh micro-batch
        self._reached: list[bool] = []  # the weights this micro-batch's passes reached (whole weights, fresh)
        self._seen: list[bool] = []
        self._streaming = True  # False: this micro-batch started from empty gradients (see the module docstring)

    @property
    def _buffers(self) -> list[torch.Tensor]:
        if self._buffer is None:
            self._buffer = _Flat([_local(p) for p in self.parameters])
        return self._buffer.views

    # ------------------------------------------------------------------ the passes

    def backward_winner(self, outputs: Tensor, cotangents: Tensor, reduce_winner: Reduction | None = None) -> Tensor:
        """Backpropagate ``cotangents`` through the winner's ``outputs``; returns ``<g_w, g_w>``.

        ``reduce_winner``, if given, is applied to the buffered ``g_w`` before the norm (the global scope averages it
        over processes there, so ``lambda`` uses the global ``g_w``); ``.grad`` keeps the local gradient.
        """
        buffers = self._buffers
        self._streaming = reduce_winner is not None or any(p.grad is not None for p in self.parameters)
        if self.local and self._streaming:
            raise RuntimeError("local shards need empty gradients and no winner reduction (FSDP2 reduces itself)")
        if self._streaming:
            torch._foreach_zero_(self._buffer.flats)

            def copy(i: int, grad: torch.Tensor) -> None:
                buffers[i].add_(grad)  # add, not copy: harmless if a gradient arrives in pieces

            _hooked_backward(self.parameters, outputs, cotangents, copy)
        elif self.local:
            torch.autograd.backward(outputs, cotangents)
            torch._foreach_zero_(self._buffer.flats)
            with_grad = [(buffer, _local(p.grad)) for p, buffer in zip(self.parameters, buffers) if p.grad is not None]
            if with_grad:
                torch._foreach_copy_([b for b, _ in with_grad], [g for _, g in with_grad])
        else:
            grads = self._fresh_grads()
            self._flat_backward(outputs, cotangents)
            torch._foreach_copy_(self._buffer.flats, grads.flats)  # buffer <- g_w
            torch._foreach_zero_(grads.flats)  # the loser's pass accumulates into zeros: h_l exactly
        if reduce_winner is not None:
            reduce_winner(buffers)  # views lying back to back: one collective per flat tensor
        return _squared_norm(buffers) if self.local else self._buffer.dot(self._buffer)

    def backward_loser(self, outputs: torch.Tensor, cotangents: torch.Tensor) -> torch.Tensor:
        """Backpropagate ``cotangents`` through the loser's ``outputs``; returns ``<g_w, h_l>``.

        ``g_w`` is the buffered winner gradient (after ``reduce_winner``), ``h_l`` this process's loser gradient.
        """
        buffers = self._buffers
        if self._streaming:
            stream = _LoserStream(buffers)
            _hooked_backward(self.parameters, outputs, cotangents, stream.take)
            self._seen = stream.seen
            return stream.finish()
        if not self.local:
            self._flat_backward(outputs, cotangents, last=True)
            self._seen = [p.grad is not None for p in self.parameters]
            return self._buffer.dot(self._grads)
        torch.autograd.backward(outputs, cotangents)
        self._seen = [p.grad is not None for p in self.parameters]
        pairs = [(b, _local(p.grad)) for p, b, seen in zip(self.parameters, buffers, self._seen) if seen]
        if not pairs:
            return torch.zeros(())
        # <g_w, h_l> = <buffer, .grad> - |buffer|^2, without materialising h_l
        cross = torch.stack([torch.dot(b.reshape(-1).float(), g.reshape(-1).float()) for b, g in pairs]).sum()
        return cross - torch.stack(torch._foreach_norm([b for b, _ in pairs])).float().pow(2).sum()

    def _fresh_grads(self) -> _Flat:
        """The ``.grad`` flat, zeroed, its views set as every weight's ``.grad``; none reached yet."""
        if self._grads is None:
            self._grads = _Flat(self.parameters)
        else:
            torch._foreach_zero_(self._grads.flats)
        for p, view in zip(self.parameters, self._grads.views):
            p.grad = view
        self._reached = [False] * len(self.parameters)
        return self._grads

    def _flat_backward(self, outputs: Tensor, cotangents: Tensor, last: bool = False) -> None:
        """A branch's backward accumulating into the ``.grad`` views, noting the weights it reaches; after the
        micro-batch's ``last`` pass the weights neither pass reached get an empty ``.grad`` back."""
        reached = self._reached
        _hooked_backward(self.parameters, outputs, cotangents, lambda i, grad: reached.__setitem__(i, True))
        if last:
            for p, hit in zip(self.parameters, reached):
                if not hit:
                    p.grad = None

    # ------------------------------------------------------------------ after the passes

    def branch_gradients(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``(g_w, h_l)`` per weight, after both passes of a micro-batch that started from empty gradients (the
        update space): on whole weights the buffer's and the ``.grad`` flat's views (no copy); on local shards the
        buffer and ``h_l = .grad - g_w``, a new tensor (zeros where neither branch reached the weight). Every weight
        gets an entry, so several processes can reduce the lists together."""
        if self._streaming:
            raise RuntimeError(
                "the per-branch gradients are kept apart only when a micro-batch starts from empty gradients and the "
                "winner's gradient stays local (gradient_accumulation_steps=1)"
            )
        buffers = self._buffers
        if not self.local:
            return buffers, self._grads.views
        losers = [
            _local(p.grad) - b if seen else torch.zeros_like(b)
            for p, b, seen in zip(self.parameters, buffers, self._seen)
        ]
        return buffers, losers

    def set_combined(self, lam: torch.Tensor, winner: list[torch.Tensor], loser: list[torch.Tensor]) -> None:
        """``.grad = g_w + lambda * h_l`` for every weight a branch reached (``winner`` and ``loser`` as returned by
        :meth:`branch_gradients`, possibly reduced over processes since)."""
        if not self.local and winner is self._buffers and loser is self._grads.views:
            self.combine(lam)  # the flats themselves, reduced in place
            return
        for p, w, h, seen in zip(self.parameters, winner, loser, self._seen):
            if seen:
                _local(p.grad).copy_(w + lam.to(h) * h)

    def combine(self, lam: torch.Tensor) -> None:
        """``.grad = A + g_w + lambda * h_l``: from empty gradients ``.grad <- .grad * lambda + buffer`` (on whole
        weights one multiply and one add per flat tensor), else ``.grad += (lambda - 1) * buffer``."""
        buffers = self._buffers
        lam = lam.detach()
        if not self._streaming and not self.local:  # .grad = h_l, buffer = g_w
            for grads, kept in zip(self._grads.flats, self._buffer.flats):
                grads.mul_(lam.to(device=grads.device, dtype=grads.dtype)).add_(kept)
            return
        if not self._streaming:  # local shards: .grad = g_w + h_l, buffer = g_w: buffer + lambda * (.grad - buffer)
            pairs = [(b, _local(p.grad)) for p, b, seen in zip(self.parameters, buffers, self._seen) if seen]
            if pairs:
                grads, kept = [g for _, g in pairs], [b for b, _ in pairs]
                weight = lam.to(device=grads[0].device, dtype=grads[0].dtype)
                torch._foreach_sub_(grads, kept)
                torch._foreach_mul_(grads, weight)
                torch._foreach_add_(grads, kept)
            return
        views = self._grads.views if self._grads is not None else None
        if views is not None and all(p.grad is None or p.grad is v for p, v in zip(self.parameters, views)):
            for grads, kept in zip(self._grads.flats, self._buffer.flats):  # the .grad are the flat's views
                grads.addcmul_(kept, (lam - 1.0).to(device=grads.device, dtype=grads.dtype))
            return
        coefficient = None
        for p, buffer, seen in zip(self.parameters, buffers, self._seen):
            if seen and p.grad is not None:
                if coefficient is None:  # a device scalar: no host sync, no temporary copy of the buffer
                    coefficient = (lam - 1.0).to(device=p.grad.device, dtype=p.grad.dtype)
                p.grad.addcmul_(buffer, coefficient)


class EngineBranchGradients:
    """Per-branch passes when an engine owns the accumulated gradients (DeepSpeed ZeRO-1/2), one local buffer.

    ``engine_backward(scalar, boundary)`` runs the engine's backward of ``scalar`` (``boundary=False``: a pass inside
    the micro-batch, no optimizer step; ``boundary=None``: the micro-batch's last pass, whose boundary and step are
    the caller's). ``loss_scale`` is what the engine multiplies a loss by before its backward (an fp16 loss scale;
    1 otherwise), so that the loser's gradients, taken outside the engine, are in the same units as the winner's.
    Use once per micro-batch: :meth:`backward_winner`, :meth:`backward_loser`, :meth:`combine`.
    """

    def __init__(
        self,
        parameters: Sequence[torch.nn.Parameter],
        engine_backward: Callable[[torch.Tensor, bool | None], None],
        loss_scale: Callable[[], torch.Tensor],
    ) -> None:
        self.parameters = list(parameters)
        self._engine_backward = engine_backward
        self._loss_scale = loss_scale
        self._buffers: list[torch.Tensor] | None = None
        self._scale = torch.ones(())

    def _ensure_buffers(self) -> list[torch.Tensor]:
        if self._buffers is None:
            self._buffers = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.parameters]
        return self._buffers

    def backward_winner(self, outputs: Tensor, cotangents: Tensor, reduce_winner: Reduction | None = None) -> Tensor:
        """The engine's backward of ``<outputs, cotangents>``; returns ``<g_w, g_w>`` (float32) of the buffered
        ``g_w``: this process's gradient as the engine received it, after ``reduce_winner`` if given."""
        buffers = self._ensure_buffers()
        torch._foreach_zero_(buffers)
        self._scale = self._loss_scale().detach().to(device=cotangents.device, dtype=torch.float32)

        def copy(i: int, grad: torch.Tensor) -> None:
            buffers[i].add_(grad.detach())  # add, not copy: harmless if a gradient arrives in pieces

        handles = [p.register_hook(lambda grad, i=i: copy(i, grad)) for i, p in enumerate(self.parameters)]
        try:
            self._engine_backward((outputs * cotangents.detach()).sum(), False)
        finally:
            for handle in handles:
                handle.remove()
        if reduce_winner is not None:
            reduce_winner(buffers)
        return _squared_norm(buffers)

    def backward_loser(self, outputs: torch.Tensor, cotangents: torch.Tensor) -> torch.Tensor:
        """``torch.autograd.grad`` of ``<outputs, cotangents>`` (scaled as the engine scales), outside the engine;
        returns ``<g_w, h_l>`` (float32) and leaves ``h_l`` in the buffer."""
        buffers = self._ensure_buffers()
        stream = _LoserStream(buffers)

        def take(i: int, grad: torch.Tensor) -> torch.Tensor:
            stream.take(i, grad)
            return grad.new_zeros(()).expand_as(grad)  # autograd.grad returns this: no second gradient-sized copy

        handles = [p.register_hook(lambda grad, i=i: take(i, grad)) for i, p in enumerate(self.parameters)]
        try:
            torch.autograd.grad(outputs, self.parameters, cotangents * self._scale.to(cotangents), allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()
        return stream.finish()

    def combine(self, lam: torch.Tensor) -> None:
        """The engine's backward of ``lambda / scale * sum_i <w_i, h_i>``: its gradient ``lambda * h_l`` joins the
        engine's sum; this pass closes the micro-batch (boundary and optimizer step as the caller's engine decides)."""
        buffers = self._ensure_buffers()
        weight = (lam.detach().float() / self._scale).to(buffers[0].device)
        surrogate = sum(torch.dot(p.reshape(-1), b.reshape(-1).to(p.dtype)) for p, b in zip(self.parameters, buffers))
        self._engine_backward(surrogate * weight.to(surrogate.dtype), None)
