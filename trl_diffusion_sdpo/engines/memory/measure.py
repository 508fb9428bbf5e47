"""CPU memory of a LoRA training step, measured without a GPU: torch's profiler records every CPU allocation and free
(``profile_memory=True``), and the model's own storages are counted tensor by tensor (a quantized weight by its inner
tensors, into which torchao's and quanto's subclasses flatten). ``benchmarks/speed/quantized_base_memory.py`` and
``tests/quantization/test_quantized_base_memory.py`` compare a quantized base's peak with a bf16 base's and with
``estimate-memory``'s (:mod:`.memory`)."""

from __future__ import annotations

import gc
import json
import os
import tempfile
import warnings
from collections.abc import Callable
from typing import Any

import torch
from peft import LoraConfig

from ...families.preparation import prepare_denoiser
from ...families.quantization import BaseQuantization, quantize_linear_layers

__all__ = ["live_tensor_bytes", "lora_step_memory", "module_bytes", "step_peak_bytes", "tensor_bytes"]


def tensor_bytes(tensor: torch.Tensor, seen: set[int] | None = None) -> int:
    """Bytes of ``tensor``'s storages (each once across calls sharing ``seen``); a tensor subclass by its inner
    tensors (``__tensor_flatten__``)."""
    seen = set() if seen is None else seen
    data = tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor
    if type(data) is not torch.Tensor and hasattr(data, "__tensor_flatten__"):
        return sum(tensor_bytes(getattr(data, name), seen) for name in data.__tensor_flatten__()[0])
    storage = data.untyped_storage()
    pointer = storage.data_ptr()
    if pointer in seen or pointer == 0:  # 0: no memory (an empty tensor, or a compiler's fake one)
        return 0
    seen.add(pointer)
    return storage.nbytes()


def live_tensor_bytes(device: str | None = None) -> int:
    """Bytes of every storage a live tensor holds (each once): the tensors the garbage collector tracks, after a
    collection, on ``device``'s type (``None``: every device). A census of what a training step leaves alive (its
    weights, the optimizer's state, whatever a safeguard keeps), which differences between two runs attribute.
    Tensors without memory of their own are left out: meta tensors, and the fake or functional tensors a compiler
    keeps in its caches (whose data pointer cannot be read). Objects frozen by :func:`gc.freeze` are invisible to
    ``gc.get_objects``: the census warns that it misses them rather than unfreeze the caller's process."""
    if gc.get_freeze_count():
        warnings.warn(
            f"live_tensor_bytes: {gc.get_freeze_count()} objects frozen by gc.freeze() are not counted; call "
            "gc.unfreeze() first for a census of every live tensor",
            stacklevel=2,
        )
    gc.collect()
    seen: set[int] = set()
    total = 0
    for obj in gc.get_objects():
        if not isinstance(obj, torch.Tensor) or obj.is_meta:
            continue
        if device is not None and obj.device.type != device:
            continue
        with warnings.catch_warnings():  # torch warns that a fake tensor's data pointer is read: it holds none
            warnings.simplefilter("ignore", UserWarning)
            try:
                total += tensor_bytes(obj, seen)
            except RuntimeError:  # "Cannot access data pointer of Tensor (e.g. FakeTensor, FunctionalTensor)"
                continue
    return total


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers, each storage once."""
    seen: set[int] = set()
    return sum(tensor_bytes(t, seen) for t in (*module.parameters(), *module.buffers()))


def step_peak_bytes(step: Callable[[], Any]) -> int:
    """The most bytes allocated on the CPU at once while ``step()`` runs, above what was allocated when it started
    (each profiler memory event carries the allocator's running total and its own size)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        profiler.export_chrome_trace(path)
        with open(path) as f:
            events = sorted((e["ts"], e["args"]) for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]")
    finally:
        os.remove(path)
    if not events:
        return 0
    start = events[0][1]["Total Allocated"] - events[0][1]["Bytes"]
    return max(0, max(args["Total Allocated"] for _, args in events) - start)


def lora_step_memory(
    build: Callable[[], torch.nn.Module], base_quantization: str, pairs: int = 1, latent: int = 8, rank: int = 8
) -> dict[str, int]:
    """Bytes of one LoRA training step (bf16 autocast, AdamW, the attention projections as targets) of the UNet
    ``build()`` returns, its frozen base in bf16 or quantized (a ``--base_quantization`` name) as training prepares
    it: ``resident`` the model, ``step`` the step's own peak above it, ``peak`` their sum."""
    unet = build().to(torch.bfloat16)
    quantization = BaseQuantization(base_quantization)
    if quantization.enabled:
        quantize_linear_layers(unet, quantization)
    prepare_denoiser(
        unet, LoraConfig(r=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"]), torch.bfloat16, False
    )
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad])
    generator = torch.Generator().manual_seed(0)
    rows = 2 * pairs
    sample = torch.randn(rows, unet.config.in_channels, latent, latent, generator=generator)
    prompt = torch.randn(rows, 77, unet.config.cross_attention_dim, generator=generator)
    timesteps = torch.randint(0, 1000, (rows,), generator=generator)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            prediction = unet(sample, timesteps, prompt).sample
        prediction.float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    resident = module_bytes(unet)
    peak = step_peak_bytes(step)
    return {"resident": resident, "step": peak, "peak": resident + peak}
