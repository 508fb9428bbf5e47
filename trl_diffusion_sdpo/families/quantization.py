"""LoRA on a quantized frozen base: which backends, how a pipeline is loaded with one, and what training refuses.

The denoiser (and the text encoders, unless training reads a latent cache) is quantized, one name per backend
(``--base_quantization``): bitsandbytes and torchao through diffusers' and transformers' quantization configs while
loading, optimum-quanto with its own ``quantize``/``freeze`` once loaded (diffusers deprecates its ``QuantoConfig``);
only the ``nn.Linear`` layers, whose weights are most of a denoiser's::

    bnb-nf4, bnb-int8         bitsandbytes 4-bit NF4 / LLM.int8() (a CUDA GPU)
    torchao-int8, -float8     torchao weight-only int8 / float8 (CPU and GPU)
    quanto-int8, -int4        optimum-quanto weight-only int8 / int4 (CPU and GPU)

Only LoRA trains on such a base: the quantized weights are tensor subclasses or integer tensors that no optimizer
can update and no deep copy (a full-tuning reference) can take. The reference is the same quantized base with the
adapters off (:class:`~trl_diffusion_sdpo.step.predictions.DisabledAdaptersReference`), so both branches share one
copy of the weights and at step 0 the policy computes exactly what the reference computes. The adapters themselves
are ordinary float32 ``lora_A``/``lora_B`` linear layers inside peft's quantized LoRA layers, which the one-pass
safeguard taps as any other (:mod:`~trl_diffusion_sdpo.safeguards.gradients.layer_taps`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..config.rules import BASE_QUANTIZATIONS
from .base import is_quantized, quantized_parameters
from .base import is_quantized_tensor as _is_quantized_tensor

__all__ = [
    "BASE_QUANTIZATIONS",
    "BaseQuantization",
    "cast_unquantized",
    "check_engine_supports_quantized_base",
    "check_quantized_base_training",
    "is_quantized",
    "load_quantized_pipeline",
    "pipeline_quantization_config",
    "quantize_linear_layers",
    "quantized_parameters",
]

logger = logging.getLogger(__name__)

# backend -> (the package diffusers imports for it, how to install it)
_PACKAGES = {
    "bnb": ("bitsandbytes", "pip install bitsandbytes (it quantizes on a CUDA GPU)"),
    "torchao": ("torchao", "pip install 'trl-diffusion-sdpo[quantization]'"),
    "quanto": ("optimum.quanto", "pip install 'trl-diffusion-sdpo[quantization]'"),
}
_DENOISERS = ("unet", "transformer", "transformer_2")


@dataclass(frozen=True)
class BaseQuantization:
    """How the frozen base is quantized: a :data:`BASE_QUANTIZATIONS` name and bitsandbytes' 4-bit options.

    ``compute_dtype`` is what bitsandbytes' 4-bit layers compute in (their weights are dequantized to it).
    """

    name: str = "none"
    bnb_4bit_quant_type: str = "nf4"
    bnb_nested_quant: bool = False
    bnb_4bit_quant_storage: str | None = None
    compute_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.name not in BASE_QUANTIZATIONS:
            raise ValueError(f"--base_quantization must be one of {', '.join(BASE_QUANTIZATIONS)}, got {self.name!r}")
        if self.name != "bnb-nf4" and (self.bnb_nested_quant or self.bnb_4bit_quant_storage is not None):
            raise ValueError(
                "--use_bnb_nested_quant and --bnb_4bit_quant_storage apply to bitsandbytes' 4-bit base only: add "
                "--load_in_4bit (or --base_quantization bnb-nf4), or remove them"
            )
        if self.bnb_4bit_quant_type not in ("nf4", "fp4"):
            raise ValueError(f"--bnb_4bit_quant_type must be nf4 or fp4, got {self.bnb_4bit_quant_type!r}")

    @classmethod
    def from_arguments(
        cls,
        base_quantization: str = "none",
        *,
        load_in_4bit: bool = False,
        load_in_8bit: bool = False,
        bnb_4bit_quant_type: str = "nf4",
        use_bnb_nested_quant: bool = False,
        bnb_4bit_quant_storage: str | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> BaseQuantization:
        """TRL's ``ModelConfig`` switches (``--load_in_4bit``: bitsandbytes 4-bit with ``--bnb_4bit_quant_type``,
        ``--load_in_8bit``: bitsandbytes int8) and ``--base_quantization``, which name one backend together."""
        if load_in_4bit and load_in_8bit:
            raise ValueError("--load_in_4bit and --load_in_8bit exclude each other: keep one")
        switch = "bnb-nf4" if load_in_4bit else "bnb-int8" if load_in_8bit else None
        if switch is not None and base_quantization not in ("none", switch):
            flag = "--load_in_4bit" if load_in_4bit else "--load_in_8bit"
            raise ValueError(f"{flag} and --base_quantization {base_quantization} name two backends: keep one")
        name = switch or base_quantization
        if name != "bnb-nf4" and bnb_4bit_quant_type != "nf4":
            raise ValueError(
                "--bnb_4bit_quant_type applies to bitsandbytes' 4-bit base only: add --load_in_4bit, or remove it"
            )
        return cls(
            name=name,
            bnb_4bit_quant_type=bnb_4bit_quant_type,
            bnb_nested_quant=use_bnb_nested_quant,
            bnb_4bit_quant_storage=bnb_4bit_quant_storage,
            compute_dtype=compute_dtype or torch.float32,
        )

    @property
    def enabled(self) -> bool:
        return self.name != "none"

    @property
    def backend(self) -> str:
        """``"bnb"``, ``"torchao"`` or ``"quanto"`` (``"none"`` when off)."""
        return self.name.split("-")[0]

    def check_installed(self) -> None:
        """The backend's package is importable, else a ValueError naming it and how to install it."""
        if not self.enabled:
            return
        package, install = _PACKAGES[self.backend]
        if importlib.util.find_spec(package.split(".")[0]) is None or importlib.util.find_spec(package) is None:
            hint = " On a CPU, use --base_quantization quanto-int8 or torchao-int8." if self.backend == "bnb" else ""
            raise ValueError(f"--base_quantization {self.name} needs the {package} package: {install}.{hint}")

    def check_usable(self) -> None:
        """The backend can quantize on this machine: bitsandbytes needs a CUDA GPU, every backend its package; else
        a ValueError saying what to use instead. Checked before the model loads."""
        if self.backend == "bnb" and not torch.cuda.is_available():
            switch = " (--load_in_4bit)" if self.name == "bnb-nf4" else " (--load_in_8bit)"
            raise ValueError(
                f"--base_quantization {self.name}{switch} quantizes with bitsandbytes on a CUDA GPU and this machine "
                "has none: on a CPU use --base_quantization quanto-int4, quanto-int8 or torchao-int8."
            )
        self.check_installed()

    def config_kwargs(self, library: str) -> dict[str, Any]:
        """The keyword arguments of ``library``'s (``"diffusers"`` or ``"transformers"``) config class for this
        backend; both libraries' classes take the same for bitsandbytes and torchao, quanto's differ in one name."""
        if self.backend == "bnb":
            if self.name == "bnb-int8":
                return {"load_in_8bit": True}
            kwargs: dict[str, Any] = {
                "load_in_4bit": True,
                "bnb_4bit_quant_type": self.bnb_4bit_quant_type,
                "bnb_4bit_use_double_quant": self.bnb_nested_quant,
                "bnb_4bit_compute_dtype": self.compute_dtype,
            }
            if self.bnb_4bit_quant_storage is not None:
                kwargs["bnb_4bit_quant_storage"] = self.bnb_4bit_quant_storage
            return kwargs
        if self.backend == "torchao":
            from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

            return {"quant_type": Int8WeightOnlyConfig() if self.name == "torchao-int8" else Float8WeightOnlyConfig()}
        raise ValueError(f"{self.name} is applied once loaded (quantize_linear_layers), not by a loading config")

    def config(self, library: str):
        """``library``'s quantization config object for this backend (diffusers' for a denoiser, transformers' for a
        text encoder); quanto has none (:func:`quantize_linear_layers`)."""
        self.check_installed()
        module = __import__(library)
        cls = {"bnb": "BitsAndBytesConfig", "torchao": "TorchAoConfig"}[self.backend]
        return getattr(module, cls)(**self.config_kwargs(library))


def pipeline_quantization_config(
    quantization: BaseQuantization, pretrained: str | os.PathLike, quantize_text_encoders: bool = True
):
    """diffusers' ``PipelineQuantizationConfig`` for ``from_pretrained(pretrained, quantization_config=...)``: the
    denoiser(s) and, with ``quantize_text_encoders``, every text encoder the pipeline at ``pretrained`` (a folder or
    Hub id, a shipped model's name resolved already) names, each with its library's config. ``None`` when
    ``quantization`` is off or applied once loaded (quanto). The VAE stays as it is: convolutions, small."""
    if not quantization.enabled or quantization.backend == "quanto":
        return None
    from diffusers import DiffusionPipeline, PipelineQuantizationConfig

    index = DiffusionPipeline.load_config(pretrained)
    mapping = {name: quantization.config("diffusers") for name in _DENOISERS if index.get(name, [None])[0]}
    if quantize_text_encoders:
        for name, entry in index.items():
            if name.startswith("text_encoder") and isinstance(entry, list) and entry[0]:
                mapping[name] = quantization.config("transformers")
    return PipelineQuantizationConfig(quant_mapping=mapping)


def quantize_linear_layers(module: torch.nn.Module, quantization: BaseQuantization) -> None:
    """Quantize ``module``'s ``nn.Linear`` weights in place with a weight-only backend (quanto or torchao); the
    full-precision weights are released layer by layer. Convolutions stay: autocast cannot cast a quantized one."""
    quantization.check_installed()
    if quantization.backend == "quanto":
        from optimum.quanto import freeze, qint4, qint8, quantize

        linears = [name for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)]
        quantize(module, weights={"quanto-int8": qint8, "quanto-int4": qint4}[quantization.name], include=linears)
        freeze(module)
    elif quantization.backend == "torchao":
        from torchao.quantization import quantize_

        quantize_(module, quantization.config_kwargs("diffusers")["quant_type"])
    else:
        raise ValueError(f"{quantization.name} quantizes while loading only (pipeline_quantization_config)")


def load_quantized_pipeline(
    load: Callable[..., Any],
    pretrained: str | os.PathLike,
    quantization: BaseQuantization,
    quantize_text_encoders: bool = True,
    **kwargs: Any,
) -> Any:
    """``load(**kwargs)`` (a pipeline's ``from_pretrained``) with its frozen base quantized: through the loading
    config of :func:`pipeline_quantization_config`, or once loaded (quanto, :func:`quantize_linear_layers`). A large
    base takes minutes: one log line says what starts, one what it took."""
    if not quantization.enabled:
        return load(**kwargs)
    config = pipeline_quantization_config(quantization, pretrained, quantize_text_encoders)
    logger.info("Loading %s and quantizing its base to %s...", pretrained, quantization.name)
    start = time.perf_counter()
    pipeline = load(**kwargs, **({"quantization_config": config} if config is not None else {}))
    if config is None:
        names = [n for n in _DENOISERS if getattr(pipeline, n, None) is not None]
        if quantize_text_encoders:
            names += [n for n in pipeline.components if n.startswith("text_encoder") and pipeline.components[n]]
        for name in names:
            quantize_linear_layers(getattr(pipeline, name), quantization)
    denoiser = next(getattr(pipeline, n) for n in _DENOISERS if getattr(pipeline, n, None) is not None)
    gib = sum(_tensor_bytes(t) for t in (*denoiser.parameters(), *denoiser.buffers())) / 2**30
    logger.info(
        "Quantized %s's base to %s in %.1f s (the denoiser's weights: %.2f GiB)",
        pretrained, quantization.name, time.perf_counter() - start, gib,
    )  # fmt: skip
    return pipeline


def _tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes ``tensor`` stores; a quantized tensor subclass by its inner tensors."""
    data = tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor
    if type(data) is not torch.Tensor and hasattr(data, "__tensor_flatten__"):
        return sum(_tensor_bytes(getattr(data, name)) for name in data.__tensor_flatten__()[0])
    return data.numel() * data.element_size()


def check_quantized_base_training(denoiser: torch.nn.Module, denoiser_name: str, peft_config) -> None:
    """Refuse full tuning of a quantized denoiser, before its reference would be copied."""
    if peft_config is None and is_quantized(denoiser):
        method = getattr(
            getattr(getattr(denoiser, "hf_quantizer", None), "quantization_config", None), "quant_method", None
        )
        if method is None:  # quantized once loaded: the package of a quantized weight's class names the backend
            modules = {
                c.__module__
                for _, p in denoiser.named_parameters()
                if _is_quantized_tensor(p)
                for c in type(p.data).__mro__
            }
            method = next((b for b in ("quanto", "torchao", "bitsandbytes") if any(b in m for m in modules)), None)
        how = f" ({getattr(method, 'value', method)})" if method is not None else ""
        raise ValueError(
            f"The {denoiser_name} is quantized{how}: its weights cannot be trained. Train LoRA adapters on the "
            "quantized base instead (peft_config=LoraConfig(...), or --use_peft on the command line), or load the "
            "base without a quantization config for full tuning."
        )


def check_engine_supports_quantized_base(engine: str, denoiser: torch.nn.Module) -> None:
    """One process and DDP (``engine``: an :class:`~.engines.Engine`'s ``name``) train LoRA on a quantized base;
    DeepSpeed and FSDP are refused with the reason."""
    if engine == "ddp" or not is_quantized(denoiser):
        return
    reasons = {
        "deepspeed": "DeepSpeed casts and flattens every parameter of the model it wraps, which the quantized "
        "weights (tensor subclasses or integer tensors) do not survive",
        "fsdp2": "FSDP2 shards every parameter into a DTensor, which the quantized weights (tensor subclasses or "
        "integer tensors) do not support",
        "fsdp1": "FSDP flattens every parameter into one buffer, which the quantized weights do not survive",
    }
    reason = reasons.get(engine, f"{engine} is not tested with a quantized base")
    raise ValueError(
        f"A quantized base does not train under {engine}: {reason}. Launch with DDP instead (accelerate's "
        "multi_gpu config, examples/accelerate_configs/multi_gpu.yaml): the quantized base is small enough to sit "
        "whole on every process, and the LoRA's gradients and optimizer state are small (docs/quantization.md)."
    )


def _inputs_in_autocast_dtype(module: torch.nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook: floating-point tensor inputs in the enclosing autocast's dtype (none outside autocast)."""
    tensor = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if tensor is None or not torch.is_autocast_enabled(tensor.device.type):
        return None
    dtype = torch.get_autocast_dtype(tensor.device.type)
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def _elsewhere(module: torch.nn.Module, device: torch.device) -> bool:
    """Whether a parameter or buffer of ``module`` is not on ``device`` (``cuda`` matches any CUDA index)."""
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.device.type != device.type or (device.index is not None and tensor.device.index != device.index):
            return True
    return False


class _FrozenQuantizedLinear(torch.autograd.Function):
    """``y = layer(x)`` through a frozen layer with a quantized weight ``W``, keeping nothing of ``W`` for backward.

    Autograd would save the operands of the layer's matmul, and torchao's layers dequantize ``W`` before it: every
    layer's full-precision ``W`` would stay saved until the backward, as many bytes as an unquantized base (and more
    than the bytes the quantization saved). Here the layer's own forward runs on a detached ``x`` (autograd records
    nothing of it) and this function joins its ``output`` to ``x``; the backward dequantizes ``W`` again, one layer at
    a time: ``dx = dy W`` (``W`` never trains, so there is no ``dW``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, output: torch.Tensor, layer: torch.nn.Module) -> torch.Tensor:  # noqa: ANN001
        ctx.layer, ctx.x_dtype = layer, x.dtype
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        weight = ctx.layer.weight
        weight = weight.dequantize() if hasattr(weight, "dequantize") else weight
        return (grad @ weight.to(grad.dtype)).to(ctx.x_dtype), None, None


# The layers that run through _FrozenQuantizedLinear (their hooks registered once), and the input each is taking
# now: the forward pre-hook detaches it, the forward hook joins the output to it.
_FROZEN_LAYERS: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
_TAKING: weakref.WeakKeyDictionary[torch.nn.Module, torch.Tensor] = weakref.WeakKeyDictionary()


def _detach_frozen_input(layer: torch.nn.Module, args: tuple, kwargs: dict) -> tuple | None:
    """Forward pre-hook: a quantized layer's input that needs a gradient goes in detached, and is remembered."""
    _TAKING.pop(layer, None)  # what a forward that raised left
    if len(args) != 1 or kwargs or layer.weight.requires_grad:
        return None
    (x,) = args
    if not (torch.is_grad_enabled() and x.requires_grad):
        return None
    _TAKING[layer] = x
    return (x.detach(),), kwargs


def _join_frozen_output(layer: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    """Forward hook: the output of a detached input, joined to the remembered one through the frozen backward."""
    x = _TAKING.pop(layer, None)
    return None if x is None else _FrozenQuantizedLinear.apply(x, output, layer)


def _run_frozen_quantized(layer: torch.nn.Module) -> None:
    """``layer`` computes through :class:`_FrozenQuantizedLinear` when its input needs a gradient (its hooks
    registered once)."""
    if layer in _FROZEN_LAYERS:
        return
    layer.register_forward_pre_hook(_detach_frozen_input, with_kwargs=True)
    layer.register_forward_hook(_join_frozen_output)
    _FROZEN_LAYERS.add(layer)


def _is_quantized_linear(module: torch.nn.Module) -> bool:
    """A linear layer whose weight is quantized and dequantizes in the backward (torchao's and quanto's; bitsandbytes'
    layers keep their own autograd function, which saves the quantized state only)."""
    weight = module._parameters.get("weight") if isinstance(module, torch.nn.Linear) else None
    if weight is None or type(weight).__module__.startswith("bitsandbytes"):
        return False
    return _is_quantized_tensor(weight) and hasattr(weight, "dequantize")


def cast_unquantized(module: torch.nn.Module, dtype: torch.dtype, device: torch.device | str | None = None) -> None:
    """``module`` on ``device`` with its unquantized floating-point parameters and buffers in ``dtype``; the quantized
    weights keep their own storage (a dtype cast would dequantize them, or fail: diffusers and transformers refuse
    ``.to(dtype)`` on a bitsandbytes model).

    A layer with a floating-point quantized weight (torchao's) computes in its input's dtype whatever the autocast:
    under a bf16 autocast a float32 input would give a float32 output that the next bf16 norm refuses (``mixed
    dtype (CPU)``). Such a layer takes its inputs in the autocast's dtype, as an unquantized layer computes."""
    if device is not None and _elsewhere(module, torch.device(device)):
        module.to(device=device)  # diffusers and transformers refuse it for bitsandbytes' 8-bit models, placed on load
    for submodule in module.modules():
        weight = submodule._parameters.get("weight")
        follows = _inputs_in_autocast_dtype in submodule._forward_pre_hooks.values()
        if weight is not None and _is_quantized_tensor(weight) and weight.is_floating_point() and not follows:
            submodule.register_forward_pre_hook(_inputs_in_autocast_dtype)
        if _is_quantized_linear(submodule):
            _run_frozen_quantized(submodule)
        for store in (submodule._parameters, submodule._buffers):
            for tensor in store.values():
                if tensor is None or _is_quantized_tensor(tensor) or not tensor.is_floating_point():
                    continue
                if tensor.dtype != dtype:
                    tensor.data = tensor.data.to(dtype)
