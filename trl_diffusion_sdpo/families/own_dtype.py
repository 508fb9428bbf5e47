"""A frozen module computing in its own dtype, whatever it is given and under whatever autocast: the float32 VAE of
a half-precision run (:func:`~.preparation.place_frozen_modules` registers these hooks on a module it places in
another dtype than the run's; a run whose modules all compute in its dtype never loads this module).
"""

from __future__ import annotations

import torch
from torch.utils.hooks import RemovableHandle

__all__ = ["cast_inputs_to_own_dtype"]

# The autocast switched off by _enter_own_dtype, per module call in progress, until _leave_own_dtype restores it.
_AUTOCAST_OFF: dict[int, list[torch.autocast]] = {}


def _enter_own_dtype(
    module: torch.nn.Module, args: tuple[object, ...], kwargs: dict[str, object]
) -> tuple[tuple[object, ...], dict[str, object]]:
    """Forward pre-hook: an enclosing autocast off, and floating-point tensor arguments in the dtype of ``module``'s
    first floating parameter."""
    parameter = next((p for p in module.parameters() if p.is_floating_point()), None)
    if parameter is None:
        return args, kwargs
    context = torch.autocast(parameter.device.type, enabled=False)
    context.__enter__()
    _AUTOCAST_OFF.setdefault(id(module), []).append(context)

    def cast(value: object) -> object:
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != parameter.dtype:
            return value.to(parameter.dtype)
        return value

    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


def _leave_own_dtype(module: torch.nn.Module, args: object, kwargs: object, output: object) -> None:
    """Forward hook, called even when the forward raises: restores the autocast :func:`_enter_own_dtype` turned off."""
    contexts = _AUTOCAST_OFF.get(id(module))
    if contexts:
        contexts.pop().__exit__(None, None, None)
        if not contexts:
            del _AUTOCAST_OFF[id(module)]


def cast_inputs_to_own_dtype(module: torch.nn.Module) -> list[RemovableHandle]:
    """Make each direct child of ``module`` (a VAE's encoder, decoder and quant convs) compute in its own dtype,
    whatever it is given and under whatever autocast: floating-point inputs are cast to it, as SDXL's pipeline casts
    the latents when it upcasts its VAE (``latents.to(post_quant_conv dtype)``), and an enclosing autocast is off, as
    in :meth:`~.families.ModelFamily.encode_moments` (a validation grid samples under one; the SDXL VAE overflows in
    fp16). On the children, not on ``forward``: pipelines call ``vae.encode`` and ``vae.decode``. Once per child,
    however often the module is placed. Returns the hooks it registered (none on a module placed before)."""
    handles: list[RemovableHandle] = []
    for child in module.children():
        if _enter_own_dtype not in child._forward_pre_hooks.values():
            handles.append(child.register_forward_pre_hook(_enter_own_dtype, with_kwargs=True))
            handles.append(child.register_forward_hook(_leave_own_dtype, with_kwargs=True, always_call=True))
    return handles
