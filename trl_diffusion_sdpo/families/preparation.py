"""What is trained, in which dtype, with which effective arguments: the denoiser prepared for LoRA or full tuning.

As in diffusers' training scripts: frozen weights in the compute dtype, trainable weights in float32 (the fp16 grad
scaler cannot unscale half-precision gradients, and bf16 weights lose small updates). The VAE and text encoders are
frozen, in eval mode, on the device in the compute dtype (the VAE in float32 where the family asks), or left on the
CPU when training reads a latent cache. A VAE kept in float32 beside half-precision modules casts what it is given
to float32 (:func:`~.own_dtype.cast_inputs_to_own_dtype`), so the pipeline still samples in place after training.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable, Iterable, Iterator
from types import MethodType
from typing import Any

import torch
from accelerate.utils import recursively_apply
from accelerate.utils.operations import ConvertOutputsToFp32
from diffusers import ModelMixin
from diffusers.training_utils import cast_training_params
from peft import LoraConfig
from torch.utils.hooks import RemovableHandle

# The package's names: is_quantized, and cast_unquantized resolved on first use, so that the quantization module is
# imported for a quantized model only.
from .. import families
from . import ModelFamily

__all__ = ["cast_module", "compute_dtype", "place_frozen_modules", "prepare_denoiser", "training_arguments"]


def compute_dtype(args) -> torch.dtype:
    """The mixed-precision dtype of ``args`` (bf16, fp16, else float32)."""
    if args.bf16:
        return torch.bfloat16
    if args.fp16:
        return torch.float16
    return torch.float32


def cast_module(module: torch.nn.Module, dtype: torch.dtype, device: torch.device | str | None = None) -> None:
    """``module.to(device, dtype)``. diffusers' ``ModelMixin.to`` warns, for any dtype, that the modules a model keeps
    in float32 may be cast (``There are modules in ... that should be kept in float32: []``), also for a model that
    keeps none; such a model is cast by ``torch.nn.Module.to`` instead, which does the same cast without the warning.
    A model that keeps some (Wan) goes through its own ``to`` and the warning stands. A quantized model keeps its
    quantized weights as they are (:func:`~.quantization.cast_unquantized`)."""
    if families.is_quantized(module):
        families.cast_unquantized(module, dtype, device)
        return

    to = module.to if getattr(module, "_keep_in_fp32_modules", None) else MethodType(torch.nn.Module.to, module)
    if device is None:
        to(dtype=dtype)
    else:
        to(device=device, dtype=dtype)


def freeze_frozen_modules(family: ModelFamily) -> None:
    """The VAE and text encoder(s): never in the optimizer, never in train mode."""
    for module in family.frozen_modules().values():
        module.requires_grad_(False)
        module.eval()


def keeps_in_float32(model: torch.nn.Module, name: str) -> bool:
    """Whether parameter ``name`` of ``model`` belongs to a module the model keeps in float32 whatever the compute
    dtype (``_keep_in_fp32_modules``: Wan's time embedder, norms and modulation table), as diffusers'
    ``from_pretrained(torch_dtype=...)`` leaves them. By parameter name: some are tables, not modules."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    return bool(keep & set(name.split(".")))


def prepare_denoiser(
    denoiser: torch.nn.Module, peft_config: LoraConfig | None, dtype: torch.dtype, gradient_checkpointing: bool
) -> None:
    """Add LoRA adapters (base weights frozen in ``dtype``) or unfreeze every weight; trainable weights in float32."""
    if peft_config is not None:
        denoiser.requires_grad_(False)
        cast_module(denoiser, dtype)
        for name, parameter in denoiser.named_parameters():
            if keeps_in_float32(denoiser, name):
                parameter.data = parameter.data.float()
        denoiser.add_adapter(peft_config)
    else:
        denoiser.requires_grad_(True)
    cast_training_params(denoiser, dtype=torch.float32)
    if gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """A parameter or buffer as recorded: its owner, its name there, the object, its data and ``requires_grad``."""

    owner: torch.nn.Module
    name: str
    tensor: torch.Tensor
    data: torch.Tensor
    requires_grad: bool


def _same_data(tensor: torch.Tensor, data: torch.Tensor) -> bool:
    return (tensor.device, tensor.dtype, tensor.data_ptr()) == (data.device, data.dtype, data.data_ptr())


class CallerModules:
    """What building a trainer changes on the caller's modules (the pipeline's components, a separate ``ref_model``),
    recorded before the first change and put back by :meth:`restore` when the construction fails, so that the same
    objects can be given again: the LoRA adapters added (removed with diffusers' ``unload_lora``, or
    ``delete_adapters`` where the model carried adapters of its own), gradient checkpointing switched on, each
    parameter's and buffer's tensor (the dtype casts and device moves: the original tensors themselves, so the values
    are exact), ``requires_grad``, train/eval modes, and what a step registered with :meth:`on_restore` (hooks).

    The original tensors are held until construction ends: a pipeline cast to another dtype on the same device (a
    float32 pipeline trained in bf16) holds both copies meanwhile. diffusers' group offloading
    (``offload_frozen_modules``) has no public removal and stays on the frozen modules."""

    def __init__(self) -> None:
        self._tensors: list[_Tensor] = []
        self._modes: list[tuple[torch.nn.Module, bool]] = []
        # per model given: the adapters it carried, the active ones, and whether it checkpointed gradients
        self._models: list[tuple[torch.nn.Module, set[str], list[str], bool | None]] = []
        self._undo: list[Callable[[], Any]] = []

    def keep(self, modules: Iterable[torch.nn.Module]) -> None:
        """Record ``modules`` as they are now; call before anything changes them."""
        seen = {id(entry.tensor) for entry in self._tensors} | {id(module) for module, _ in self._modes}
        for model in modules:
            adapters = set(getattr(model, "peft_config", None) or {})
            active = model.active_adapters() if adapters else []
            active = [active] if isinstance(active, str) else list(active)
            # a diffusers model's switch only (the trainer turns no other; transformers' property warns when read)
            checkpointing = model.is_gradient_checkpointing if isinstance(model, ModelMixin) else None
            self._models.append((model, adapters, active, checkpointing))
            for module in model.modules():
                if id(module) in seen:
                    continue
                seen.add(id(module))
                self._modes.append((module, module.training))
                named = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
                for name, tensor in named:
                    if id(tensor) not in seen:
                        seen.add(id(tensor))
                        self._tensors.append(_Tensor(module, name, tensor, tensor.data, tensor.requires_grad))

    def on_restore(self, undo: Callable[[], Any]) -> None:
        """``undo()`` is called by :meth:`restore`, before the modules are put back (the latest registered first)."""
        self._undo.append(undo)

    def restore(self) -> None:
        """Every recorded module as it was."""
        for undo in reversed(self._undo):
            undo()
        for model, adapters, active, checkpointing in self._models:
            added = set(getattr(model, "peft_config", None) or {}) - adapters
            if added:
                if adapters:  # its own adapters stay, as they were active
                    model.delete_adapters(sorted(added))
                    model.set_adapter(active)
                else:  # the LoRA layers replaced by the layers they wrap
                    model.unload_lora()
            if checkpointing is False and getattr(model, "is_gradient_checkpointing", False):
                model.disable_gradient_checkpointing()
        with torch.no_grad():
            for entry in self._tensors:
                if getattr(entry.owner, entry.name) is not entry.tensor:  # replaced (a buffer cast or moved)
                    setattr(entry.owner, entry.name, entry.tensor)
                if not _same_data(entry.tensor, entry.data):
                    entry.tensor.data = entry.data
                if entry.tensor.requires_grad != entry.requires_grad:
                    entry.tensor.requires_grad_(entry.requires_grad)
        for module, training in self._modes:
            module.training = training


def training_arguments(args):
    """A copy of ``args`` (a ``DiffusionSDPOConfig``, its per-family defaults resolved) as ``transformers.Trainer``
    must see it; the caller's stays as given.

    * ``scale_lr``: the learning rate times processes, per-device batch and accumulation steps.
    * Gradient checkpointing is the denoiser's own switch (:func:`prepare_denoiser`): transformers would call a
      method UNets do not have, so its flag (and the newer alias ``activation_checkpointing``) is turned off.
    * Streamed batches vary in size (the collator drops bad rows), which accelerate's default for iterable data
      cannot concatenate across processes: each process reads its own shard instead.
    * transformers' per-step NaN check of the logged loss (``logging_nan_inf_filter``) is off: it makes the host wait
      for the device every step, and the trainer already keeps non-finite micro-batch losses out of the logged loss
      on the device.
    """
    args = copy.copy(args)
    args.logging_nan_inf_filter = False
    if args.scale_lr:
        args.learning_rate = (
            args.learning_rate * args.world_size * args.per_device_train_batch_size * args.gradient_accumulation_steps
        )
    args.gradient_checkpointing = False
    if hasattr(args, "activation_checkpointing"):
        args.activation_checkpointing = False
    if args.accelerator_config.dispatch_batches is None:
        args.accelerator_config = dataclasses.replace(args.accelerator_config, dispatch_batches=False)
    return args


def wants_gradient_checkpointing(args) -> bool:
    """``gradient_checkpointing`` or its alias ``activation_checkpointing`` (recent transformers)."""
    return bool(args.gradient_checkpointing or getattr(args, "activation_checkpointing", False))


def place_frozen_modules(
    family: ModelFamily, device: torch.device | str, dtype: torch.dtype, on_cpu: bool, offload: bool = False
) -> list[RemovableHandle]:
    """Move the VAE and text encoder(s) to ``device`` in ``dtype`` (the VAE in float32 where the family needs it),
    or leave them on the CPU (``on_cpu``: nothing is encoded during training). ``offload``: cast them on the CPU and
    let diffusers' group offloading (``apply_group_offloading``, leaf level) move each layer, and its inputs, to
    ``device`` only while it runs.

    A module placed in another dtype than ``dtype`` (the float32 VAE of a half-precision run) takes inputs in any
    dtype (:func:`~.own_dtype.cast_inputs_to_own_dtype`): the pipelines of SD, SDXL, SD3 and FLUX.1 (Kontext too)
    hand their VAE latents and images in the text encoders' dtype, which a float32 VAE refuses (``Input type
    (c10::BFloat16) and bias type (float) should be the same``). Returns the hooks it registered
    (:func:`~.own_dtype.cast_inputs_to_own_dtype`'s)."""
    handles: list[RemovableHandle] = []
    for name, module in family.frozen_modules().items():
        if on_cpu:
            module.to(device="cpu")
            continue
        module_dtype = torch.float32 if name == "vae" and family.vae_needs_fp32() else dtype
        if offload:
            from diffusers.hooks import apply_group_offloading

            cast_module(module, module_dtype, "cpu")
            apply_group_offloading(module, onload_device=torch.device(device), offload_type="leaf_level")
        else:
            cast_module(module, module_dtype, device)
        if module_dtype != dtype:
            from .own_dtype import cast_inputs_to_own_dtype  # a module kept in another dtype only (an upcast VAE)

            handles += cast_inputs_to_own_dtype(module)
    return handles


def _accelerate_wrapper(model: torch.nn.Module) -> ConvertOutputsToFp32 | None:
    """accelerate's mixed-precision wrapper on ``model.forward`` (its autocast and float32 outputs), or None."""
    forward = model.__dict__.get("forward")
    inner = getattr(getattr(forward, "__func__", forward), "__wrapped__", None)
    return inner if isinstance(inner, ConvertOutputsToFp32) else None


def _adapters_take_autocast_inputs(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """Where accelerate's autocast wraps ``model``'s forward: its LoRA layers' input casting off for the block."""
    try:
        from peft.helpers import disable_input_dtype_casting
    except ImportError:  # peft before 0.15: it casts, as it always did
        return contextlib.nullcontext()
    return disable_input_dtype_casting(model, active=_accelerate_wrapper(model) is not None)


class MixedPrecisionForward:
    """accelerate's mixed-precision wrapper on the denoiser's ``forward``, with its float32 outputs inside ``train()``
    and ``evaluate()`` only.

    ``accelerator.prepare`` wraps the model's ``forward`` in its autocast and converts the outputs to float32, and
    leaves it so. Inside a pipeline a float32 prediction meets a bf16/fp16 VAE that does not upcast
    (``force_upcast=False``, as the fp16-fix SDXL VAE): ``Input type (float) and bias type (BFloat16)``. Outside
    ``train()`` and ``evaluate()`` a forward hook (``register_forward_hook``, removed before the trainer runs the model
    again) casts the outputs back to the compute ``dtype``, in which the autocast computed them: the denoiser keeps the
    autocast (full tuning's float32 weights take the pipeline's half-precision inputs) and ``pipe(prompt)`` samples in
    place.

    While it runs under that autocast, peft's LoRA layers take their input as it comes instead of casting it to the
    adapters' float32 (``peft.helpers.disable_input_dtype_casting``): the autocast casts it back to bf16/fp16 for the
    matmul anyway, so the values are the same, and the copy each adapter's matmul would keep for the backward (one
    activation per targeted layer) is not made.
    """

    def __init__(self, get_model: Callable[[], torch.nn.Module], dtype: torch.dtype) -> None:
        self.get_model = get_model  # the denoiser, unwrapped: it may be wrapped (DDP) after construction
        self.dtype = dtype
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        self._depth = 0  # evaluate() runs inside train(): the hook comes back when the outermost call ends

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Within the block (``train()``, ``evaluate()``) the forward is accelerate's, float32 outputs included."""
        if self._depth == 0:
            self.restore()
        self._depth += 1
        try:
            with _adapters_take_autocast_inputs(self.get_model()):
                yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.release()

    def release(self) -> None:
        """Outputs in the compute dtype from here on (nothing where accelerate converts none: fp32, DeepSpeed)."""
        model = self.get_model()
        if self._hook is None and _accelerate_wrapper(model) is not None:
            self._hook = model.register_forward_hook(self._in_compute_dtype)

    def restore(self) -> None:
        """accelerate's float32 outputs again."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _in_compute_dtype(self, module: torch.nn.Module, args: Any, output: Any) -> Any:
        return recursively_apply(
            lambda tensor: tensor.to(self.dtype),
            output,
            test_type=lambda value: isinstance(value, torch.Tensor) and value.dtype == torch.float32,
        )
