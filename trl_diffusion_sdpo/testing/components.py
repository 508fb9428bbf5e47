"""Narrow components shared by the tiny pipelines: CLIP and T5 text encoders, a VAE, schedulers, a decoder-only LM
text config."""

from __future__ import annotations

import atexit
import dataclasses
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    UMT5Config,
    UMT5EncoderModel,
)


def rope_axes(axes: Sequence[int], head_dim: int, names: str) -> tuple[int, ...]:
    """``axes`` as a tuple if they sum to ``head_dim``, else a ValueError naming the builder's arguments ``names``:
    RoPE rotates each head's channels, split axis by axis, and a mismatch would otherwise fail only in the first
    forward pass, as a shape error inside diffusers."""
    axes = tuple(int(a) for a in axes)
    if sum(axes) != head_dim:
        raise ValueError(f"{names}: the RoPE axes {axes} sum to {sum(axes)}, not to the head width {head_dim}")
    return axes


def two_rope_heads(attention_head_dim: int, axes_dims_rope: Sequence[int], axes_name: str = "axes_dims_rope") -> dict:
    """The width keywords of the tiny transformers (FLUX.1, FLUX.2, Qwen-Image, Qwen-Image 2.1, HunyuanVideo 1.5):
    two heads of ``attention_head_dim`` channels, rotated along ``axes_dims_rope`` (checked to sum to it), passed as
    the transformer's keyword ``axes_name``."""
    names = f"attention_head_dim={attention_head_dim}, {axes_name}={tuple(axes_dims_rope)}"
    return {
        "attention_head_dim": attention_head_dim,
        "num_attention_heads": 2,
        axes_name: rope_axes(axes_dims_rope, attention_head_dim, names),
    }


def clip_text_encoder(vocab_size: int, hidden: int, layers: int, max_length: int, projection: int | None = None):
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=max_length,
        projection_dim=projection or hidden,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def tiny_vae(
    block_out_channels: tuple[int, ...],
    latent_channels: int = 4,
    force_upcast: bool = False,
    scaling_factor: float = 0.18215,
    shift_factor: float | None = None,
    use_quant_conv: bool = True,
) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
        block_out_channels=block_out_channels,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=32,
        force_upcast=force_upcast,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=use_quant_conv,
        use_post_quant_conv=use_quant_conv,
    )


def flux_vae(latent_channels: int = 4) -> AutoencoderKL:
    """FLUX.1's VAE layout (no quant convs, latent scale 0.3611 and shift 0.1159), which Z-Image uses too."""
    return tiny_vae(
        (8, 8, 8, 8),
        latent_channels=latent_channels,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
    )


def t5_encoder(vocab_size: int, hidden: int, umt5: bool = False) -> T5EncoderModel | UMT5EncoderModel:
    """A two-layer T5 encoder (``umt5``: UMT5, Wan's text encoder, same fields)."""
    config = (UMT5Config if umt5 else T5Config)(
        vocab_size=vocab_size,
        d_model=hidden,
        d_kv=8,
        d_ff=hidden * 2,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,  # deterministic encodings, as a loaded encoder in eval mode gives
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return UMT5EncoderModel(config) if umt5 else T5EncoderModel(config)


def flow_scheduler(**dynamic) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **dynamic)


def resolution_shift_scheduler(
    shift: float, max_shift: float, max_image_seq_len: int, **extra
) -> FlowMatchEulerDiscreteScheduler:
    """A flow-matching scheduler with dynamic (resolution-dependent) shifting: ``mu`` linear in the number of image
    tokens from ``(256, 0.5)`` to ``(max_image_seq_len, max_shift)``, as FLUX.1's and Qwen-Image's configs set it."""
    return flow_scheduler(
        shift=shift,
        use_dynamic_shifting=True,
        base_image_seq_len=256,
        base_shift=0.5,
        max_image_seq_len=max_image_seq_len,
        max_shift=max_shift,
        **extra,
    )


def flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1's and FLUX.2's scheduler settings: shift 3.0, dynamic shifting up to 1.15 at 4096 image tokens (FLUX.2
    samples with a resolution- and step-dependent ``mu``, so its training table is unshifted too)."""
    return resolution_shift_scheduler(shift=3.0, max_shift=1.15, max_image_seq_len=4096)


def qwen_image_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Qwen-Image's scheduler settings (1.0 and 2.1): exponential time shift, dynamic up to 0.9 at 8192 image
    tokens, a terminal shift of 0.02."""
    return resolution_shift_scheduler(
        shift=1.0, max_shift=0.9, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential"
    )


def latent_statistics(latent_channels: int, seed: int) -> dict[str, list[float]]:
    """Per-channel ``latents_mean`` (N(0, 0.3^2)) and ``latents_std`` (U[1, 2)) drawn from their own generator seeded
    with ``seed``, for the Qwen-Image VAEs: non-trivial, so that the normalisation the pipelines apply is visible."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "latents_mean": (torch.randn(latent_channels, generator=generator) * 0.3).tolist(),
        "latents_std": (1.0 + torch.rand(latent_channels, generator=generator)).tolist(),
    }


def qwen_vl_vision_config(hidden: int, **extra: Any) -> dict:
    """The vision tower of the tiny Qwen-VL text encoders (Qwen2.5-VL, Qwen3-VL; unused by text-to-image): one layer
    16 wide with two heads, merged into the text width ``hidden``; ``extra`` adds fields."""
    return dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hidden, **extra)


def qwen_image_vae(vae_class: type, latent_channels: int, seed: int, **layout: Any) -> Any:
    """A Qwen-Image VAE of ``vae_class`` (1.0's or 2.1's: causal 3D convolutions, 8 base channels, one residual block a
    level) with ``latent_channels`` latents, its per-level ``layout`` (``dim_mult``, ``temperal_downsample``, ...)
    and the :func:`latent_statistics` of ``seed``."""
    return vae_class(
        base_dim=8,
        z_dim=latent_channels,
        num_res_blocks=1,
        **layout,
        **latent_statistics(latent_channels, seed),
    )


def decoder_text_config(vocab_size: int, hidden: int, pad_token_id: int, **overrides) -> dict:
    """The text config of a narrow decoder-only language model (the Qwen2.5-VL, Qwen3 and Mistral-3 text encoders):
    two layers, two attention heads and two key/value heads, a ``2 * hidden`` MLP, no BOS token and padding as EOS.
    ``overrides`` replace or add fields (``model_type``, the layer count a pipeline reads hidden states from, the
    tokenizer's special tokens)."""
    config = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=None,
        eos_token_id=pad_token_id,
        pad_token_id=pad_token_id,
    )
    return {**config, **overrides}


# Stable Diffusion 1.x/2.x's training noise schedule: scaled-linear betas 0.00085 to 0.012 over 1000 steps, no clipping
# (the tiny SD/SDXL pipelines train on it; the CPU demo's base samples it with DDIM).
SD_NOISE_SCHEDULE = dict(
    num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False
)


def ddpm_scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    """A DDPM scheduler on :data:`SD_NOISE_SCHEDULE`."""
    return DDPMScheduler(**SD_NOISE_SCHEDULE, prediction_type=prediction_type)


def tokenizer_folder(tokenizer_dir: str | None) -> str:
    """Where a builder writes its tokenizers: ``tokenizer_dir``, or a fresh folder inside this process's temporary
    folder (:func:`process_folder`), removed when the process exits."""
    return tokenizer_dir or tempfile.mkdtemp(prefix="tiny-tok-", dir=process_folder())


_PROCESS_FOLDERS: dict[int, str] = {}  # process id -> its temporary folder


def process_folder() -> str:
    """This process's temporary folder for the tokenizers of builds given no folder: made at the first such build and
    removed with everything in it when the process exits, so that a test suite building thousands of tiny pipelines
    leaves nothing behind. A forked child makes a folder of its own and never removes its parent's."""
    pid = os.getpid()
    if pid not in _PROCESS_FOLDERS:
        _PROCESS_FOLDERS[pid] = tempfile.mkdtemp(prefix="tiny-tok-")
        atexit.register(_remove_process_folder, pid)
    return _PROCESS_FOLDERS[pid]


def _remove_process_folder(pid: int) -> None:
    if os.getpid() == pid:  # the exit functions a forked child inherits run in the child too
        shutil.rmtree(_PROCESS_FOLDERS[pid], ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class BuildArguments:
    """The keyword arguments the transformer builders share (their ``**arguments``): ``seed`` (torch's global seed,
    set before any module is built, so equal seeds give equal weights), ``tokenizer_dir`` (where the tokenizers are
    written; a fresh temporary folder when ``None``) and the tokenizers' ``max_length`` (each builder's own default).
    """

    seed: int = 0
    tokenizer_dir: str | None = None
    max_length: int = 64

    @classmethod
    def start(cls, arguments: dict[str, Any], max_length: int = 64) -> BuildArguments:
        """``arguments`` (``max_length`` the builder's default; an unknown name is a TypeError, as for any keyword)
        with ``tokenizer_dir`` resolved by :func:`tokenizer_folder`, after seeding torch with the seed."""
        build = cls(**{"max_length": max_length, **arguments})
        torch.manual_seed(build.seed)
        return dataclasses.replace(build, tokenizer_dir=tokenizer_folder(build.tokenizer_dir))
