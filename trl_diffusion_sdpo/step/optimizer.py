"""The optimizer step's gradient norm and clipping, on the optimizer's own parameters.

``transformers.Trainer`` (through ``accelerate``) clips over ``model.parameters()``: on a UNet carrying LoRA adapters
that walks thousands of frozen weights to reach a few hundred small gradients. The optimizer already lists the trained
weights, in its parameter groups (transformers makes two: with and without weight decay), so the norm and the clipping
run over those only, with torch's own ``get_total_norm`` and ``clip_grads_with_norm_``.

A fused optimizer step (torch's fused Adam, AdamW and SGD) also takes a device-side ``found_inf`` flag, as
``torch.amp.GradScaler`` hands it, and skips the whole update in its kernel when it is set: the non-finite guard
(:mod:`~trl_diffusion_sdpo.callbacks.nonfinite`) skips a step that way without the host waiting for the device
(:func:`fused_scaling_optimizer`).
"""

from __future__ import annotations

import torch
from accelerate.optimizer import AcceleratedOptimizer

__all__ = [
    "clip_gradients",
    "fused_scaling_optimizer",
    "gradient_norm",
    "optimizer_parameters",
    "trainable_parameters",
]


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


def clip_gradients(parameters: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale the gradients by ``min(1, max_norm / (||g||_2 + 1e-6))`` as ``torch.nn.utils.clip_grad_norm_`` does
    (``clip_grads_with_norm_``); returns the pre-clip norm ``||g||_2``."""
    norm = gradient_norm(parameters)
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm


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
