"""Keeping the optimizer step lean: no walk over frozen weights, no extra pass over the gradients, no host sync.

Around every optimizer step ``transformers.Trainer`` (through ``accelerate``) walks ``model.parameters()`` twice,
for gradient clipping and for ``model.zero_grad()``: on a UNet carrying LoRA adapters that is thousands of modules,
milliseconds per step, to reach a few hundred small gradients. Clipping then multiplies every gradient by the clip
coefficient, a full extra read and write of the gradients. And skipping the update after a non-finite loss needs
the host to read a flag, which makes it wait for the device every step.

The helpers here work on the trainable parameters only, listed once. With an optimizer whose fused step accepts
``grad_scale`` and ``found_inf`` (torch's fused Adam, AdamW and SGD: what ``torch.amp.GradScaler`` uses to unscale
and to skip), clipping costs one read of the gradients (their norm), the division by the clip factor happens
inside the optimizer's own pass, and a step flagged on the device is skipped by the fused kernel itself (no moment
update, no weight decay, step count unchanged) without the host ever waiting.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from accelerate.optimizer import AcceleratedOptimizer

__all__ = [
    "clip_divisor",
    "fused_scaling_optimizer",
    "grad_norm",
    "trainable_parameters",
    "zero_grads",
    "zeroing_only",
]


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters that can hold gradients (``requires_grad``), in ``module.parameters()`` order."""
    return [p for p in module.parameters() if p.requires_grad]


def zero_grads(parameters: list[torch.nn.Parameter], set_to_none: bool = True) -> None:
    """``Module.zero_grad`` restricted to ``parameters``."""
    for p in parameters:
        if p.grad is None:
            continue
        if set_to_none:
            p.grad = None
        else:
            if p.grad.grad_fn is not None:
                p.grad.detach_()
            else:
                p.grad.requires_grad_(False)
            p.grad.zero_()


def grad_norm(parameters: list[torch.nn.Parameter]) -> torch.Tensor:
    """The global L2 norm of the parameters' gradients (a device tensor; the host does not wait for it)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def clip_divisor(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """What to divide the gradients by to clip them as ``torch.nn.utils.clip_grad_norm_`` does.

    ``clip_grad_norm_`` multiplies by ``min(max_norm / (norm + 1e-6), 1)``; this is the reciprocal, in float32.
    """
    return ((norm.float() + 1e-6) / max_norm).clamp(min=1.0)


def fused_scaling_optimizer(
    optimizer, scaler: object | None = None, manages_gradients: bool = False
) -> torch.optim.Optimizer | None:
    """The torch optimizer inside ``optimizer`` if its fused step applies ``grad_scale`` and ``found_inf``, and
    nothing else already uses them (a gradient ``scaler``, an engine that ``manages_gradients``); else ``None``."""
    if optimizer is None or scaler is not None or manages_gradients:
        return None
    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    if isinstance(optimizer, torch.optim.Optimizer) and getattr(optimizer, "_step_supports_amp_scaling", False):
        return optimizer
    return None


@contextlib.contextmanager
def zeroing_only(module: torch.nn.Module, parameters: list[torch.nn.Parameter] | None) -> Iterator[None]:
    """Within the block, ``module.zero_grad`` walks only ``parameters`` (:func:`zero_grads`), not every module
    (``None``: ``module.zero_grad`` as it is).

    ``transformers.Trainer``'s loop calls ``model.zero_grad()`` itself after every optimizer step, with no hook to
    override, so the module's own method is shadowed for the block's duration and restored after it, however it ends.
    """
    if parameters is None:
        yield
        return
    module.zero_grad = lambda set_to_none=True: zero_grads(parameters, set_to_none)
    try:
        yield
    finally:
        del module.zero_grad  # back to Module.zero_grad
