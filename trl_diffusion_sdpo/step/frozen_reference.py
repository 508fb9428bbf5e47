"""A reference with weights of its own: a frozen copy of the denoiser, and the copies that refresh it.

Full tuning's reference is a frozen copy of the initial denoiser, and a ``ref_model`` given to the trainer is held as
one; online training's ``ref_update_steps`` refreshes the reference into a copy of the policy as it is now, with a
LoRA policy's adapters merged into the copy's base weights (:func:`refreshed_reference`, :func:`merged_copy`, and
:func:`merged_policy_state` for the engines that shard the weights). A LoRA run's reference is the policy with its
adapters switched off (:class:`~.predictions.DisabledAdaptersReference`) and loads none of this:
:func:`~.predictions.build_reference`, where the reference is chosen, imports this module when it chooses a copy.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .predictions import DenoiserCall, Reference

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

__all__ = [
    "FrozenCopyReference",
    "frozen_reference",
    "merged_copy",
    "merged_policy_state",
    "refreshed_reference",
]


class FrozenCopyReference(Reference):
    """A separate denoiser, frozen and in eval mode."""

    def __init__(self, denoiser: torch.nn.Module, call: DenoiserCall | None = None) -> None:
        self.denoiser = denoiser  # the denoiser, or a DeepSpeed engine wrapping it (ZeRO-3)
        if call is not None:
            self.call = call
        self.denoiser.requires_grad_(False)
        self.denoiser.eval()
        self.dtype: torch.dtype | None = denoiser.dtype  # the dtype its inputs are cast to (None: as given)
        # The mixed precision the policy's forward runs in (accelerate wraps the policy's forward in its autocast):
        # the reference runs in the same, or its float32 ops would run in another precision than the policy's.
        self.precision: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
        # The policy whose train/eval mode the reference takes (None: always eval). A Dropout(p=0) is the identity in
        # value, but in train mode it returns a fresh contiguous tensor where eval returns its input as is, and the
        # next matmul then rounds differently (the tiny SDXL's first bf16 loss was 0.02 off log 2): in the policy's
        # mode the reference computes exactly what the policy computes at step 0, as the LoRA reference (the policy
        # itself) does.
        self.mode_of: Callable[[], torch.nn.Module] | None = None

    def follow(
        self, policy: Callable[[], torch.nn.Module], precision: Callable[[], contextlib.AbstractContextManager]
    ):
        """Compute as ``policy()`` does: its inputs as they are, under its mixed precision ``precision()``, in its
        train/eval mode, so that at step 0 the reference computes what the policy computes."""
        self.dtype, self.precision, self.mode_of = None, precision, policy

    def place(self, engine: Any, policy: torch.nn.Module, device: torch.device | str, dtype: torch.dtype) -> None:
        """Where ``engine`` keeps a frozen copy beside ``policy``, in the compute ``dtype``
        (:meth:`~trl_diffusion_sdpo.engines.Engine.place_reference`)."""
        self.denoiser = engine.place_reference(self.denoiser, policy, device, dtype)

    @torch.no_grad()
    def predict(self, sample: torch.Tensor, timestep: torch.Tensor, **conditioning) -> torch.Tensor:
        if self.dtype is not None:
            sample = sample.to(self.dtype)
        training = self.mode_of().training if self.mode_of is not None else False
        if self.denoiser.training != training:
            self.denoiser.train(training)
        with self.precision():
            return self.call(self.denoiser, sample, timestep, conditioning)


def refreshed_reference(reference: Reference, policy: torch.nn.Module, call: DenoiserCall | None = None) -> Reference:
    """A reference that computes what ``policy`` computes now (online training's ``ref_update_steps``).

    A frozen copy of a policy without adapters takes the policy's weights in place. Otherwise (LoRA: the reference
    was the adapter-disabled policy, or an earlier refresh) the reference becomes a frozen copy of the policy with its
    adapters merged into the base weights: one more copy of the denoiser in memory."""
    if isinstance(reference, FrozenCopyReference) and not bool(getattr(policy, "peft_config", None)):
        with torch.no_grad():
            for target, source in zip(reference.denoiser.parameters(), policy.parameters()):
                target.copy_(source)
        return reference
    return FrozenCopyReference(merged_copy(policy), call)


def merged_copy(policy: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``policy`` with its LoRA adapters merged into the base weights (peft's ``merge``), which computes what
    the policy computes; without adapters, a plain copy."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = copy.deepcopy(policy)
    for module in merged.modules():
        if isinstance(module, BaseTunerLayer) and not module.merged:
            module.merge()
    return merged


def _lora_product(up: torch.Tensor, down: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """``B A`` of a LoRA layer as a change of its base weight: the matrix product for a linear layer (transposed where
    the base stores its weight as ``fan_in x fan_out``), ``B`` (a 1x1 convolution) composed with ``A`` for a
    convolution."""
    if down.dim() == 2:
        product = up.float() @ down.float()
        return product.T if fan_in_fan_out else product
    conv = torch.nn.functional.conv2d if down.dim() == 4 else torch.nn.functional.conv3d
    return conv(down.float().transpose(0, 1), up.float()).transpose(0, 1)


def merged_policy_state(
    policy: torch.nn.Module, whole: Callable[[torch.Tensor], torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Every parameter of ``policy`` whole, by name, with each LoRA layer's active adapters merged into its base
    weight as peft's ``merge`` merges them: ``W' = W + s B A`` with ``s = lora_alpha / r`` (peft's ``scaling``;
    ``B A`` per :func:`_lora_product`). ``whole`` gives a parameter's whole value (an engine's gather: under ZeRO-3 or
    FSDP2 a collective, called for every parameter in the same order on every process).

    The adapters' own entries are kept: a reference that is a merged copy (:func:`merged_copy`) has the same names and
    computes with its merged base weights only."""
    from peft.tuners.lora import LoraLayer

    state = {name: whole(parameter).clone() for name, parameter in policy.named_parameters()}
    for name, module in policy.named_modules():
        if not isinstance(module, LoraLayer) or module.merged:
            continue
        base = f"{name}.base_layer.weight"
        for adapter in module.active_adapters:
            if module.use_dora.get(adapter, False):
                raise ValueError(f"{name}: a DoRA adapter cannot be merged into a refreshed reference here")
            down, up = state[f"{name}.lora_A.{adapter}.weight"], state[f"{name}.lora_B.{adapter}.weight"]
            delta = module.scaling[adapter] * _lora_product(up, down, getattr(module, "fan_in_fan_out", False))
            state[base] = (state[base].float() + delta.reshape(state[base].shape)).to(state[base].dtype)
    return state


def frozen_reference(
    policy_denoiser: torch.nn.Module, ref_model: torch.nn.Module | DiffusionPipeline | None, call: DenoiserCall | None
) -> FrozenCopyReference:
    """The reference :func:`~.predictions.build_reference` chooses where it is not the policy with its adapters off:
    ``ref_model``'s denoiser if given, else a frozen copy of ``policy_denoiser`` (full tuning)."""
    if ref_model is None:
        return FrozenCopyReference(copy.deepcopy(policy_denoiser), call)
    ref_denoiser = _as_denoiser(ref_model)
    if ref_denoiser is policy_denoiser:
        raise ValueError(
            "ref_model is the same object as the policy model. Pass ref_model=None to get a frozen copy (full "
            "tuning) or the adapter-disabled policy (LoRA), or pass a separate model."
        )
    return FrozenCopyReference(ref_denoiser, call)


def _as_denoiser(model: torch.nn.Module | DiffusionPipeline) -> torch.nn.Module:
    """The denoiser of a pipeline (its UNet or transformer), or the module itself."""
    from diffusers import DiffusionPipeline

    if isinstance(model, DiffusionPipeline):
        unet = getattr(model, "unet", None)
        return unet if unet is not None else model.transformer
    return model
