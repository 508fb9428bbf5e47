"""Per-process peak memory of a training run, estimated before anything loads (``trl-diffusion-sdpo estimate-memory``).

The model is counted on the meta device: each component is built from its config with accelerate's
``init_empty_weights`` (no weights read, seconds even for 20B parameters). A local pipeline folder (the shipped tiny
model included) is read from its ``model_index.json`` and component configs; the Hub pipelines the shipped configs
name are built from their published denoiser configs (:data:`KNOWN_MODELS`) with the frozen parts' published
parameter counts, so the estimate needs no network.

The estimate is the sum of these terms, in bytes per process (P: the denoiser's parameters, T: the trained ones, N:
the processes, ``d``: the training dtype's bytes, 2 for bf16/fp16 and 4 for float32):

* weights: trained weights in float32 (4T), plus under LoRA the frozen base in ``d`` (its linear weights at the
  quantized width: 1 byte int8/float8, 0.5 byte int4/NF4, plus a float scale per output row; the quantized layers
  keep nothing dequantized for the backward, and the one layer's weight dequantized there at a time is not counted);
* gradients: float32, 4T;
* optimizer state: AdamW's two float32 moments 8T; the 8-bit AdamWs 2T; Adafactor its factored rows and columns;
  SGD without momentum 0;
* reference: a frozen copy of the denoiser in ``d`` under full tuning (dP); none under LoRA (the base with the
  adapters off);
* mixed-precision cast: autocast keeps a ``d`` copy of the trained weights for the step (dT, full tuning in bf16/fp16);
* safeguard: the parameter- and update-space safeguards' one pass keeps the winners' and losers' gradients apart in two
  gradient-sized rows in the dtype the per-layer products have (``d`` under bf16/fp16 autocast: a linear or
  convolution weight's gradient is a ``d`` matmul's output; float32 without it; the norms' float32 rows are too
  small to count), held in ``k`` pieces (``engines/memory/pieces.py``: ``PIECE_ELEMENTS`` weights each, at most
  ``MAX_PIECES``) whose memory the backward takes as it reaches them. A Diffusion-DPO step holds no gradient while
  its activations peak (its ``.grad`` return as the backward frees activations), so the pass adds two pieces' rows
  there (``2 dT / k``). After the backward, where the activations are gone, it holds both rows instead of
  Diffusion-DPO's gradients, and while it combines them one piece of the combination beside them (each piece of the
  rows is given back as the combination reads it; nothing of them is held at the optimizer step): ``2 dT + 4T / k -
  4T`` beyond the other terms, less the activations; the larger of the two is added (in bf16, ``4T / k`` either
  way). Rows held whole through the forward add ``8T`` (measured on an H200: SD1.5 +6.4 GiB, SDXL +19.0 GiB,
  ``benchmarks/results/gpu/cuda-h200-gpu-suite-real.json``).
  Under DeepSpeed ZeRO-1/2 the rows are in ``d`` (sharded as its gradients) and the engine's gradient buffers stay
  beside them: both rows and a piece of the combination after the backward; on FSDP2's and ZeRO-3's shards both rows
  in float32 (the reduce-scatter sums in it) and a piece of the combination; the two-pass mode one more float32
  gradient (4T). The update space adds its search's (:mod:`.update_search`): a workspace kept through the step
  (a pass's temporaries and the largest run's moments: 0.56 GiB for SD1.5's or SDXL's UNet) and, after the backward, a
  float32 copy of both rows where they are not float32 already (8T under bf16 autocast), while the rows are whole;
* frozen parts: the VAE and text encoders in ``d`` (the VAE in float32 where the family keeps it so); nothing on the
  device with a latent cache (they stay on the CPU) or ``offload_frozen_modules`` (one layer at a time, not counted);
* activations: what the policy's forward keeps for its backward over the 2B rows of B pairs (below).

Engines divide what they shard, as the ZeRO paper counts: ZeRO-1 the optimizer state and float32 master weights,
ZeRO-2 also the gradients (and the safeguard's halves), ZeRO-3 and FSDP2 everything of the denoiser (weights, the
reference, the frozen base under LoRA). DeepSpeed keeps the trained weights in ``d`` beside the float32 master copy.

Activations. UNets are run once on the meta device at the run's shape (rows, latent size, prompt length), and every
tensor autograd saves for the backward is summed (``torch.autograd.graph.saved_tensors_hooks``); attention is taken
as a fused kernel (flash or memory-efficient attention on a GPU, the flash kernel on a CPU), which saves its output
and a log-sum-exp rather than the attention matrix. With activation checkpointing, the saved tensors are those of the
same meta forward with checkpointing on, plus the largest checkpointed block's own (recomputed in the backward).
Transformers are counted with Korthikanti et al.'s per-layer figure (arXiv 2205.05198, section 4: 34 bytes per token
per hidden unit per layer with 2-byte activations and fused attention, i.e. 17 values): 17 x tokens x hidden x layers
x activation bytes, and with checkpointing 1 value per token per hidden unit per layer (the block inputs) plus one
layer's 17. Tokens are the latent tokens plus, for joint-attention models, the prompt tokens.

``benchmarks/speed/estimate_memory.py`` compares these estimates with measured peaks (docs/memory.md).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ...families import ModelFamily, family_for_pipeline, registered_families
from ...families.loading import resolve_model_name
from . import pieces as one_pass_pieces
from .models import KNOWN_MODELS, KnownModel
from .update_search import update_search_bytes

__all__ = [
    "GIB",
    "ENGINES",
    "GPUS_GB",
    "USABLE_SHARE",
    "CardVerdict",
    "card_verdict",
    "smallest_card",
    "KNOWN_MODELS",
    "KnownModel",
    "MemoryEstimate",
    "ModelSizes",
    "RunShape",
    "estimate_memory",
    "family_lora_targets",
    "model_sizes",
    "model_sizes_of_pipeline",
    "unet_activation_bytes",
]

GIB = 2**30
ENGINES = ("ddp", "zero1", "zero2", "zero3", "fsdp2")
# The cards a verdict names (GB as sold: 10^9 bytes): 24 GB (RTX 4090, L4), 48 GB (L40S, A6000), 80 GB (A100, H100),
# 141 GB (H200)
GPUS_GB = (24, 48, 80, 141)
# A card fits a run whose peak is at most this share of its memory (the rest: the CUDA context, allocator slack).
USABLE_SHARE = 0.9
# bytes per quantized linear weight (int4 and NF4 pack two per byte); the rest of the base stays in the run's dtype
QUANTIZED_BYTES = {
    "none": None,
    "bnb-nf4": 0.5,
    "bnb-int8": 1.0,
    "torchao-int8": 1.0,
    "torchao-float8": 1.0,
    "quanto-int8": 1.0,
    "quanto-int4": 0.5,
}
# Korthikanti et al. (arXiv 2205.05198): values a transformer layer saves per token and hidden unit, fused attention
TRANSFORMER_SAVED_VALUES = 17
# float32 optimizer-state bytes per trained parameter (Adafactor is counted from the shapes)
OPTIMIZER_BYTES = {"adamw": 8, "adam": 8, "8bit": 2, "sgd": 0, "lion": 4, "rmsprop": 4}


@dataclass
class ModelSizes:
    """A pipeline's parts as the estimate needs them: the denoiser (on the meta device), the frozen parts' parameter
    counts, and how its activations are counted."""

    family: str
    denoiser: torch.nn.Module | None  # None where ``counts`` holds a known model's stored counts
    frozen: dict[str, int]
    joint_attention: bool
    vae_fp32: bool
    patch: int
    frames_per_token: int
    source: str  # where the counts come from
    # what the estimate reads of the denoiser, where not counted on it (:class:`MetaCounts`): a known model's counts
    # as :class:`MetaCounts` gave them, stored in the package (:mod:`.stored`)
    counts: Any = None


@dataclass(frozen=True)
class RunShape:
    """What a run trains and how: the shape of a micro-batch, the tuning, the precision and the engine."""

    pairs: int = 1  # per process and micro-batch
    resolution: int = 512
    frames: int = 1
    prompt_tokens: int = 77
    dtype_bytes: int = 2
    lora_rank: int | None = None  # None: full tuning
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    base_quantization: str = "none"
    optim: str = "adamw_torch_fused"
    engine: str = "ddp"
    num_processes: int = 1
    activation_checkpointing: bool = False
    latent_cache: bool = False
    offload_frozen: bool = False  # offload_frozen_modules: one layer of the frozen parts at a time on the device
    safeguard: str = "output"  # none, output, one_pass (parameter/update, one pass), two_pass
    # safeguard_space "update": its search's workspace and copies (.update_search) beside the one_pass or two_pass
    # rows; weight_decay: whether the optimizer decays the weights (the search then copies them too)
    update_space: bool = False
    weight_decay: bool = False
    # not in the peak, read by the advice (.advice): the rank --use_peft trains, and the micro-batches accumulated
    # (fewer pairs per micro-batch keep the pairs per step with more of them)
    lora_r: int = 16
    accumulation: int = 1


@dataclass
class MemoryEstimate:
    """Per-process bytes by term; :attr:`total_gib` is their sum in GiB."""

    components: dict[str, int]
    parameters: dict[str, int] = field(default_factory=dict)
    method: dict[str, str] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(self.components.values())

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB

    def as_dict(self) -> dict[str, Any]:
        return {
            "total_gib": round(self.total_gib, 3),
            "components_gib": {name: round(value / GIB, 3) for name, value in self.components.items()},
            "components_bytes": dict(self.components),
            "parameters": dict(self.parameters),
            "method": dict(self.method),
        }


@dataclass(frozen=True)
class CardVerdict:
    """Whether a per-process peak fits a card of ``gpu_gb`` GB, the peak planned as the estimate times the error
    measured on a GPU (:mod:`.measured`): ``margin_gib`` is the card's usable memory (:data:`USABLE_SHARE` of it)
    minus the planned peak, negative when it does not fit; ``plan`` says where the error comes from."""

    gpu_gb: float
    fits: bool
    margin_gib: float
    estimate_gib: float
    planned_gib: float
    plan: str = ""

    def sentence(self) -> str:
        planned = f"planning with {self.planned_gib:.2f} GiB: the estimate {self.estimate_gib:.2f} GiB"
        planned += f" {self.plan}." if self.plan else "."
        card = f"a {self.gpu_gb:g} GB GPU"
        if self.fits:
            return f"Fits {card}: {self.margin_gib:.2f} GiB to spare beyond the 10 % reserve, {planned}"
        return f"Does not fit {card}: {-self.margin_gib:.2f} GiB over its usable memory, {planned}"


def card_verdict(total_bytes: int, gpu_gb: float, ratio: float = 1.0, plan: str = "") -> CardVerdict:
    """Whether ``total_bytes`` times ``ratio`` (the measured error, :func:`~.measured.planning_error`, described by
    ``plan``) fits a card of ``gpu_gb`` GB, keeping ``1 - USABLE_SHARE`` of it free."""
    planned = total_bytes * ratio
    margin = (USABLE_SHARE * gpu_gb * 1e9 - planned) / GIB
    return CardVerdict(
        gpu_gb=gpu_gb,
        fits=margin >= 0,
        margin_gib=round(margin, 3),
        estimate_gib=round(total_bytes / GIB, 3),
        planned_gib=round(planned / GIB, 3),
        plan=plan,
    )


def smallest_card(total_bytes: int, ratio: float = 1.0) -> int | None:
    """The smallest of :data:`GPUS_GB` that ``total_bytes`` times ``ratio`` fits (:func:`card_verdict`); ``None``
    when none does."""
    return next((gb for gb in GPUS_GB if card_verdict(total_bytes, gb, ratio).fits), None)


# --------------------------------------------------------------------------------------------------- the model


def _meta_denoiser(class_name: str, config: dict[str, Any]) -> torch.nn.Module:
    import diffusers
    from accelerate import init_empty_weights

    cls = getattr(diffusers, class_name)
    with init_empty_weights(include_buffers=True):
        return cls.from_config(config)  # keys not given take the class's defaults


def _local_components(folder: str) -> tuple[str, torch.nn.Module, dict[str, int]]:
    """The denoiser (on the meta device) and frozen parameter counts of a local pipeline folder, from its
    ``model_index.json`` and component configs."""
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    with open(os.path.join(folder, "model_index.json")) as f:
        index = json.load(f)
    denoiser_name, denoiser, frozen = "", None, {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None or spec[1] is None:
            continue
        library, class_name = spec
        sub = os.path.join(folder, name)
        with init_empty_weights(include_buffers=True):
            if library == "diffusers" and hasattr(getattr(diffusers, class_name, None), "from_config"):
                cls = getattr(diffusers, class_name)
                if not issubclass(cls, torch.nn.Module):
                    continue
                module = cls.from_config(cls.load_config(sub))
            elif library == "transformers" and issubclass(getattr(transformers, class_name, object), torch.nn.Module):
                config = transformers.AutoConfig.from_pretrained(sub)
                module = getattr(transformers, class_name)._from_config(config)
            else:
                continue
        if name in ("unet", "transformer") and denoiser is None:
            denoiser_name, denoiser = name, module
        else:
            frozen[name] = sum(p.numel() for p in module.parameters())
    if denoiser is None:
        raise ValueError(f"{folder}: model_index.json names no unet or transformer")
    return denoiser_name, denoiser, frozen


def model_sizes(model_name_or_path: str) -> ModelSizes:
    """The pipeline ``model_name_or_path`` counted on the meta device: a local folder (or a shipped model's short
    name) from its configs, a Hub id of :data:`KNOWN_MODELS` from its published config. Other Hub ids are refused,
    naming what to pass instead."""
    folder = str(resolve_model_name(model_name_or_path))
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        _, denoiser, frozen = _local_components(folder)
        config = dict(denoiser.config)
        family = _family_of_local(folder)
        unet = type(denoiser).__name__.startswith("UNet")
        patch = 8 if unet else 16
        return ModelSizes(
            family=family,
            denoiser=denoiser,
            frozen=frozen,
            joint_attention=not unet and "text_dim" not in config,
            vae_fp32=_vae_forces_upcast(folder),
            patch=patch,
            frames_per_token=4,
            source=f"configs in {folder}, counted on the meta device",
        )
    if model_name_or_path not in KNOWN_MODELS:
        raise ValueError(
            f"--model_name_or_path {model_name_or_path}: not a local pipeline folder and not one of the Hub pipelines "
            f"estimate-memory knows ({', '.join(sorted(KNOWN_MODELS))}). Download the pipeline's configs "
            "(`hf download ID --include '*.json' '*.txt'`, no weights needed) and pass that folder."
        )
    return known_model_sizes(model_name_or_path)


def known_model_sizes(model_name_or_path: str, counts: Any = None) -> ModelSizes:
    """A Hub id of :data:`KNOWN_MODELS`: its denoiser built on the meta device from its published config, or not
    built where ``counts`` holds its stored counts (:mod:`.stored`, made from that build)."""
    known = KNOWN_MODELS[model_name_or_path]
    return ModelSizes(
        family=known.family,
        denoiser=None if counts is not None else _meta_denoiser(known.denoiser_class, known.denoiser_config),
        frozen=dict(known.frozen),
        joint_attention=known.joint_attention,
        vae_fp32=known.vae_fp32,
        patch=8 if known.denoiser_class.startswith("UNet") else known.patch,
        frames_per_token=known.frames_per_token,
        source=f"{model_name_or_path}'s published denoiser config, counted on the meta device; published counts "
        "of the frozen parts",
        counts=counts,
    )


def model_sizes_of_pipeline(pipeline: Any) -> ModelSizes:
    """A loaded pipeline's :class:`ModelSizes`: its denoiser rebuilt from its config on the meta device, its frozen
    parts' parameters counted."""
    from accelerate import init_empty_weights

    family = family_for_pipeline(pipeline)
    denoiser = family.denoiser
    with init_empty_weights(include_buffers=True):
        meta = type(denoiser).from_config(denoiser.config)
    unet = type(denoiser).__name__.startswith("UNet")
    vae = family.frozen_modules().get("vae")
    return ModelSizes(
        family=family.name,
        denoiser=meta,
        frozen={name: sum(p.numel() for p in m.parameters()) for name, m in family.frozen_modules().items()},
        joint_attention=not unet and "text_dim" not in denoiser.config,
        vae_fp32=bool(getattr(getattr(vae, "config", None), "force_upcast", False)),
        patch=8 if unet else 16,
        frames_per_token=4,
        source=f"the {type(pipeline).__name__} given, its denoiser rebuilt from its config on the meta device",
    )


def _family_of_local(folder: str) -> str:
    """The registered family handling the folder's pipeline class (the class's name when none does)."""
    with open(os.path.join(folder, "model_index.json")) as f:
        pipeline_class = json.load(f).get("_class_name", "")
    return next((f.name for f in registered_families() if pipeline_class in f.pipeline_classes), pipeline_class)


def family_lora_targets(family: str) -> tuple[str, ...]:
    """The registered family's default LoRA targets (the base family's when ``family`` is not registered)."""
    found = next((f for f in registered_families() if f.name == family), ModelFamily)
    return tuple(found.lora_target_modules)


def _vae_forces_upcast(folder: str) -> bool:
    try:
        with open(os.path.join(folder, "vae", "config.json")) as f:
            return bool(json.load(f).get("force_upcast", False))
    except OSError:
        return False


# --------------------------------------------------------------------------------------------------- activations


class _FusedAttention(torch.autograd.Function):
    """Scaled dot-product attention as a fused kernel counts for the backward: the output and a float32 log-sum-exp
    per query and head are saved (with q, k, v), never the attention matrix. Shapes only: for the meta device."""

    @staticmethod
    def forward(ctx, query, key, value):  # noqa: ANN001, ANN205
        out = query.new_empty((*query.shape[:-1], value.shape[-1]))
        logsumexp = query.new_empty(query.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(query, key, value, out, logsumexp)
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        query, key, value, _, _ = ctx.saved_tensors
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):  # noqa: ANN001
    return _FusedAttention.apply(query, key, value)


class _FusedAttentionCalls(torch.overrides.TorchFunctionMode):
    """``torch.nn.functional.scaled_dot_product_attention`` called as :func:`_fused_sdpa` (what a fused kernel
    saves); every other call as it is. torch's public way to stand in for one of its functions, where the function
    itself is left as it is."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if func is torch.nn.functional.scaled_dot_product_attention:
            return _fused_sdpa(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _count_saved(parameters: set[int], totals: list[int]) -> Iterator[None]:
    """Add the bytes of each tensor autograd saves (parameters and their views left out, each storage once) to
    ``totals[0]``."""
    seen: set[int] = set()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        base = tensor._base if tensor._base is not None else tensor
        if id(base) not in parameters and id(base) not in seen:
            seen.add(id(base))
            totals[0] += base.numel() * base.element_size()
        return tensor

    with _FusedAttentionCalls(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield


def _unet_inputs(unet: torch.nn.Module, rows: int, latent: int, tokens: int, dtype: torch.dtype) -> dict[str, Any]:
    config = unet.config
    meta = {"device": "meta", "dtype": dtype}
    inputs: dict[str, Any] = {
        "sample": torch.empty(rows, config.in_channels, latent, latent, **meta),
        "timestep": torch.zeros(rows, device="meta", dtype=torch.long),
        "encoder_hidden_states": torch.empty(rows, tokens, config.cross_attention_dim, **meta),
    }
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.empty(rows, pooled, **meta),
            "time_ids": torch.empty(rows, 6, **meta),
        }
    return inputs


def unet_activation_bytes(
    unet: torch.nn.Module, rows: int, latent: int, tokens: int, dtype: torch.dtype, checkpointing: bool
) -> int:
    """Bytes a UNet's forward saves for its backward over ``rows`` latents of ``latent`` x ``latent``, counted on the
    meta device (``unet`` is on it); with ``checkpointing``, the saved block inputs plus the largest checkpointed
    block's own saved tensors (recomputed in the backward)."""
    torch.nn.Module.to(unet, dtype)  # diffusers' own ``to`` warns about float32 modules a meta copy has no use for
    parameters = {id(p) for p in unet.parameters()}
    inputs = _unet_inputs(unet, rows, latent, tokens, dtype)
    for p in unet.parameters():
        p.requires_grad_(True)
    # the saved bytes of each checkpointed unit (the children of the blocks that check gradient_checkpointing)
    units = [
        child
        for module in unet.modules()
        if hasattr(module, "gradient_checkpointing") and module is not unet
        for child in module.children()
        if isinstance(child, torch.nn.ModuleList)
        for child in child
    ]
    totals = [0]
    per_unit: list[int] = []
    starts: dict[int, int] = {}
    handles = [u.register_forward_pre_hook(lambda m, a: starts.__setitem__(id(m), totals[0])) for u in units]
    handles += [u.register_forward_hook(lambda m, a, o: per_unit.append(totals[0] - starts[id(m)])) for u in units]
    try:
        with _count_saved(parameters, totals):
            unet(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    if not checkpointing:
        return totals[0]
    unet.enable_gradient_checkpointing()
    checkpointed = [0]
    try:
        with _count_saved(parameters, checkpointed):
            unet(**inputs)
    finally:
        unet.disable_gradient_checkpointing()
    return checkpointed[0] + max(per_unit, default=0)


def _transformer_dims(config: dict[str, Any]) -> tuple[int, int]:
    """The hidden width and the layer count (every block a token passes) of a transformer denoiser's config."""
    if "dim" in config:  # Z-Image
        return int(config["dim"]), int(config["n_layers"]) + 2 * int(config.get("n_refiner_layers", 0))
    hidden = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    layers = int(config["num_layers"]) + int(config.get("num_single_layers", 0))
    return hidden, layers + int(config.get("num_refiner_layers", 0))


def activation_bytes(
    sizes: ModelSizes, shape: RunShape, memo: dict[tuple, tuple[int, str]] | None = None
) -> tuple[int, str]:
    """Bytes the policy's forward over the 2B rows of a micro-batch keeps for its backward, and how they were
    counted; ``memo`` keeps a pair's counts by the shape they depend on, for one caller's many estimates.

    Every saved tensor has the rows as a dimension, so the bytes are linear in the pairs: one pair (two rows) is
    counted and scaled, and a UNet's meta forward runs once per resolution and checkpointing setting."""
    key = (shape.resolution, shape.frames, shape.prompt_tokens, shape.dtype_bytes, shape.activation_checkpointing)
    if memo is not None and key in memo:
        per_pair, how = memo[key]
    else:
        per_pair, how = _activation_bytes(sizes, replace(shape, pairs=1))
        if memo is not None:
            memo[key] = per_pair, how
    return shape.pairs * per_pair, how


def _activation_bytes(sizes: ModelSizes, shape: RunShape) -> tuple[int, str]:
    rows = 2 * shape.pairs
    counts = denoiser_counts(sizes)
    if counts.unet:
        latent = shape.resolution // sizes.patch
        count = counts.unet_activations(
            rows, latent, shape.prompt_tokens, shape.dtype_bytes, shape.activation_checkpointing
        )
        return count, "UNet forward on the meta device, saved tensors summed"
    hidden, layers = counts.transformer_dims()
    latent_frames = 1 if shape.frames <= 1 else (shape.frames - 1) // sizes.frames_per_token + 1
    tokens = latent_frames * (shape.resolution // sizes.patch) ** 2
    if sizes.joint_attention:
        tokens += shape.prompt_tokens
    per_layer = rows * tokens * hidden * shape.dtype_bytes
    if shape.activation_checkpointing:
        count = per_layer * (layers + TRANSFORMER_SAVED_VALUES)
    else:
        count = per_layer * TRANSFORMER_SAVED_VALUES * layers
    return count, (
        f"transformer: {TRANSFORMER_SAVED_VALUES} values per token, hidden unit and layer (Korthikanti et al. 2022); "
        f"{tokens} tokens, hidden {hidden}, {layers} layers"
    )


# --------------------------------------------------------------------------------------------------- the estimate


class MetaCounts:
    """What the estimate reads of a denoiser, counted on its module (on the meta device). A known model's stored
    counts (:mod:`.stored`) are these methods' answers, generated by them."""

    def __init__(self, denoiser: torch.nn.Module) -> None:
        self.denoiser = denoiser

    @property
    def unet(self) -> bool:
        """Whether the activations are a UNet's (its meta forward) rather than a transformer's (the formula)."""
        return type(self.denoiser).__name__.startswith("UNet")

    def parameters(self) -> int:
        return sum(p.numel() for p in self.denoiser.parameters())

    def lora_parameters(self, rank: int, targets: tuple[str, ...]) -> int:
        return _lora_parameters(self.denoiser, rank, targets)

    def linear_weights(self) -> tuple[int, int]:
        return _linear_weights(self.denoiser)

    def largest_tensor(self) -> int:
        """The elements of the denoiser's largest tensor (the update space's search reads it as one run)."""
        return max((p.numel() for p in self.denoiser.parameters()), default=0)

    def largest_lora_tensor(self, rank: int, targets: tuple[str, ...]) -> int:
        """The elements of the largest LoRA matrix on ``targets`` at ``rank``: r x the widest in or out width."""
        return rank * _lora_widest(self.denoiser, targets)

    def factored_state_bytes(self) -> int:
        """Adafactor's state under full tuning: float32 rows and columns of each matrix, a vector's own size."""
        return sum(
            4 * (p.shape[0] + math.prod(p.shape[1:])) if p.dim() >= 2 else 4 * p.numel()
            for p in self.denoiser.parameters()
        )

    def transformer_dims(self) -> tuple[int, int]:
        return _transformer_dims(dict(self.denoiser.config))

    def unet_activations(self, rows: int, latent: int, tokens: int, dtype_bytes: int, checkpointing: bool) -> int:
        dtype = {2: torch.bfloat16, 4: torch.float32}[dtype_bytes]
        return unet_activation_bytes(self.denoiser, rows, latent, tokens, dtype, checkpointing)


def denoiser_counts(sizes: ModelSizes) -> Any:
    """The counts the estimate reads of ``sizes``'s denoiser: its stored counts, else :class:`MetaCounts` of it."""
    return sizes.counts if sizes.counts is not None else MetaCounts(sizes.denoiser)


def _lora_parameters(denoiser: torch.nn.Module, rank: int, targets: tuple[str, ...]) -> int:
    """Parameters of rank-``rank`` LoRA on the linear layers whose names end with one of ``targets`` (peft's
    matching), r x (in + out) each."""
    count = 0
    for name, module in denoiser.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            count += rank * (module.in_features + module.out_features)
    return count


def _lora_widest(denoiser: torch.nn.Module, targets: tuple[str, ...]) -> int:
    """The widest in or out width of the linear layers LoRA on ``targets`` adapts (peft's matching, as
    :func:`_lora_parameters`)."""
    return max(
        (
            max(module.in_features, module.out_features)
            for name, module in denoiser.named_modules()
            if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)
        ),
        default=0,
    )


def _linear_weights(denoiser: torch.nn.Module) -> tuple[int, int]:
    """(linear weight values, their output rows): what a weight-only quantization converts."""
    values = rows = 0
    for module in denoiser.modules():
        if isinstance(module, torch.nn.Linear):
            values += module.weight.numel()
            rows += module.out_features
    return values, rows


def _optimizer_bytes(optim: str, counts: MetaCounts, trained: int, lora: bool) -> int:
    """Optimizer state bytes for ``trained`` parameters under transformers' ``optim`` name."""
    name = optim.lower()
    if "adafactor" in name:
        if lora:  # the adapters' matrices are thin: factored state is about their rows plus columns
            return 4 * trained // 8
        return counts.factored_state_bytes()
    if "8bit" in name:
        return OPTIMIZER_BYTES["8bit"] * trained
    for key in ("adamw", "adam", "lion", "rmsprop"):
        if key in name:
            return OPTIMIZER_BYTES[key] * trained
    if name.startswith("sgd"):
        return 0
    return OPTIMIZER_BYTES["adamw"] * trained


def _one_pass_after(trained: int, row: int, gradients: int, replaces_gradients: bool) -> int:
    """What the one pass holds beyond the other terms after the backward: both rows and one piece of the combination
    (``gradients`` bytes in all, formed piece by piece as the rows are given back), less the gradients term where
    the combination becomes the gradients (``.grad``) rather than joining an engine's own buffers."""
    pieces = one_pass_pieces.piece_count(trained)
    return 2 * row + -(-gradients // pieces) - (gradients if replaces_gradients else 0)


def estimate_memory(
    sizes: ModelSizes, shape: RunShape, activations_memo: dict[tuple, tuple[int, str]] | None = None
) -> MemoryEstimate:
    """The per-process peak of a training step of ``sizes``'s model run as ``shape`` says, term by term (the module
    docstring's formulas); ``activations_memo``: :func:`activation_bytes`'s, shared by one caller's estimates."""
    if shape.engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {shape.engine!r}")
    if shape.base_quantization != "none" and shape.lora_rank is None:
        raise ValueError("a quantized base trains only LoRA: set --use_peft (or --base_quantization none)")
    n = max(1, shape.num_processes)
    d = shape.dtype_bytes
    counts = denoiser_counts(sizes)
    params = counts.parameters()
    lora = shape.lora_rank is not None
    trained = counts.lora_parameters(shape.lora_rank, shape.lora_targets) if lora else params
    deepspeed = shape.engine.startswith("zero")
    stage = int(shape.engine[-1]) if deepspeed else (3 if shape.engine == "fsdp2" else 0)
    # how many processes share each term
    shard_states = n if stage >= 1 else 1  # optimizer state (and DeepSpeed's float32 master copy)
    shard_grads = n if stage >= 2 else 1
    shard_weights = n if stage >= 3 else 1

    if deepspeed:  # d-byte weights and gradients beside float32 master weights
        weights = d * trained // shard_weights + 4 * trained // shard_states
        gradients = d * trained // shard_grads
    else:
        weights = 4 * trained // shard_weights
        gradients = 4 * trained // shard_grads
    if lora:
        bytes_per = QUANTIZED_BYTES.get(shape.base_quantization)
        if bytes_per is None:
            base = d * params
        else:
            values, rows = counts.linear_weights()
            base = int(bytes_per * values) + 4 * rows + d * (params - values)
        weights += base // shard_weights
    reference = 0 if lora else d * params // shard_weights
    cast = d * trained // shard_weights if (not lora and d == 2 and not deepspeed) else 0
    optimizer = _optimizer_bytes(shape.optim, counts, trained, lora) // shard_states
    activations, how = activation_bytes(sizes, shape, activations_memo)
    pieces = one_pass_pieces.piece_count(trained)
    if not deepspeed and stage == 0:  # rows in the products' dtype (d under autocast); the combination is .grad
        row_bytes, row = d, d * trained
        combination = -(-gradients // pieces)
        after = _one_pass_after(trained, row, gradients, replaces_gradients=True)
    elif deepspeed and stage < 3:  # rows in d; the engine's gradient buffers beside them
        row_bytes, row = d, d * trained // shard_grads
        combination = -(-row // pieces)
        after = _one_pass_after(trained, row, row, replaces_gradients=False)
    else:  # FSDP2, ZeRO-3: the shards' float32 rows (the reduce-scatter sums in float32)
        row_bytes, row = 4, 4 * trained // shard_grads
        combination = -(-row // pieces)
        after = _one_pass_after(trained, row, row, replaces_gradients=False)
    at_peak = 2 * -(-row // pieces)  # the one pass: two pieces' rows beside the activations
    if shape.safeguard == "two_pass":  # one more float32 gradient, held through the step; no combination's piece
        at_peak = after = 4 * trained // shard_grads
        combination = 0
    if shape.update_space and shape.safeguard in ("one_pass", "two_pass"):
        largest = counts.largest_lora_tensor(shape.lora_rank, shape.lora_targets) if lora else counts.largest_tensor()
        search = update_search_bytes(
            trained,
            largest,
            engine=shape.engine,
            num_processes=n,
            rows_bytes=row_bytes,
            per_branch=shape.safeguard == "two_pass",
            adam="sgd" not in shape.optim.lower(),
            weight_decay=shape.weight_decay,
        )
        # its workspace is kept through the step; its copies exist after the backward (the activations gone), while
        # the rows are whole, and are given back before the combination's piece is formed
        at_peak += search.kept
        after += search.kept + max(0, search.during - combination)
    safeguard = max(at_peak, after - activations) if shape.safeguard in ("one_pass", "two_pass") else 0
    frozen = 0
    if not (shape.latent_cache or shape.offload_frozen):
        frozen = sum((4 if name == "vae" and sizes.vae_fp32 else d) * count for name, count in sizes.frozen.items())
    return MemoryEstimate(
        components={
            "weights": weights,
            "gradients": gradients,
            "optimizer": optimizer,
            "reference": reference,
            "mixed_precision_cast": cast,
            "safeguard": safeguard,
            "frozen_parts": frozen,
            "activations": activations,
        },
        parameters={"denoiser": params, "trained": trained, **{f"frozen.{k}": v for k, v in sizes.frozen.items()}},
        method={"model": sizes.source, "activations": how},
    )
