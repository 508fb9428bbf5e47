"""The frozen reference model of Diffusion-DPO: a frozen copy of the initial UNet, or, with LoRA, the policy UNet
itself with its adapters disabled (no second copy of the weights).

A reference predicts under ``torch.no_grad`` and in eval mode; it never receives gradients or optimizer updates.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator

import torch
from diffusers import DiffusionPipeline

__all__ = ["DisabledAdaptersReference", "FrozenCopyReference", "Reference", "build_reference", "disabled_adapters"]


@contextlib.contextmanager
def disabled_adapters(unet: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run ``unet`` without its LoRA adapters inside the block; they are re-enabled even if the block raises."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


class Reference:
    """Interface: ``predict(sample, timestep, **conditioning) -> prediction`` without autograd."""

    shares_policy_weights: bool = False

    def predict(self, sample: torch.Tensor, timestep: torch.Tensor, **conditioning) -> torch.Tensor:
        raise NotImplementedError


class FrozenCopyReference(Reference):
    """A separate UNet, frozen and in eval mode."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.unet = unet  # the UNet, or a DeepSpeed engine wrapping it (ZeRO-3)
        self.unet.requires_grad_(False)
        self.unet.eval()
        self.dtype: torch.dtype = unet.dtype  # the dtype its inputs are cast to

    @torch.no_grad()
    def predict(self, sample: torch.Tensor, timestep: torch.Tensor, **conditioning) -> torch.Tensor:
        return self.unet(sample.to(self.dtype), timestep, **conditioning, return_dict=False)[0]


class DisabledAdaptersReference(Reference):
    """The policy UNet with its LoRA adapters switched off for the duration of the call."""

    shares_policy_weights = True

    def __init__(self, get_unet: Callable[[], torch.nn.Module]) -> None:
        # A getter, not the module: the trainer may wrap or move the policy after construction.
        self.get_unet = get_unet

    @torch.no_grad()
    def predict(self, sample: torch.Tensor, timestep: torch.Tensor, **conditioning) -> torch.Tensor:
        with disabled_adapters(self.get_unet()) as unet:
            return unet(sample, timestep, **conditioning, return_dict=False)[0]


def _as_unet(model: torch.nn.Module | DiffusionPipeline) -> torch.nn.Module:
    return model.unet if isinstance(model, DiffusionPipeline) else model


def build_reference(
    policy_unet: torch.nn.Module,
    ref_model: torch.nn.Module | DiffusionPipeline | None,
    uses_lora: bool,
    get_policy: Callable[[], torch.nn.Module] | None = None,
) -> Reference:
    """Choose the reference: ``ref_model`` if given, else disabled adapters (LoRA) or a frozen copy (full tuning).

    Call before adding LoRA adapters when a frozen copy is wanted, so the copy holds only the base weights.
    """
    if ref_model is None:
        if uses_lora:
            return DisabledAdaptersReference(get_policy or (lambda: policy_unet))
        return FrozenCopyReference(copy.deepcopy(policy_unet))
    ref_unet = _as_unet(ref_model)
    if ref_unet is policy_unet:
        raise ValueError(
            "ref_model is the same object as the policy model. Pass ref_model=None to get a frozen copy (full "
            "tuning) or the adapter-disabled policy (LoRA), or pass a separate model."
        )
    return FrozenCopyReference(ref_unet)
