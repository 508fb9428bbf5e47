"""Small diffusion pipelines built from configs, for tests, the CPU demo and CPU benchmarks.

They are real diffusers pipelines (UNet or transformer, VAE, CLIP, T5, UMT5, Qwen2.5-VL or Qwen3 text encoders,
tokenizers, scheduler), only narrow. The CLIP tokenizer is character-level: its vocabulary is CLIP's 256 byte
symbols (plus word-final forms), written to a folder so nothing is downloaded. The T5 tokenizer is a
character-level Unigram (sentencepiece-style) model built from a vocabulary list, also offline. The Qwen tokenizer
is byte-level BPE without merges (one token per byte) plus Qwen's chat special tokens and a Qwen3-style chat
template.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLWan,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    QwenImagePipeline,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    WanPipeline,
    WanTransformer3DModel,
    ZImagePipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Qwen2Tokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
    UMT5Config,
    UMT5EncoderModel,
)

__all__ = [
    "build_tiny_flux_pipeline",
    "build_tiny_qwen_image_pipeline",
    "build_tiny_sd3_pipeline",
    "build_tiny_sd_pipeline",
    "build_tiny_sdxl_pipeline",
    "build_tiny_wan_pipeline",
    "build_tiny_z_image_pipeline",
    "write_char_tokenizer",
    "write_qwen_tokenizer",
    "write_t5_tokenizer",
]


def _bytes_to_unicode() -> list[str]:
    # CLIP's reversible byte -> printable-symbol table.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    symbols = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            symbols.append(256 + extra)
            extra += 1
    return [chr(s) for s in symbols]


@contextlib.contextmanager
def _published(directory: str) -> Iterator[str]:
    """Write into a staging folder inside ``directory``, then move each file into place with ``os.replace``: a process
    reading the tokenizer while another (re)writes it (two training processes building the same tiny pipeline)
    always sees whole files."""
    os.makedirs(directory, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".staging-", dir=directory)
    try:
        yield staging
        for name in os.listdir(staging):
            os.replace(os.path.join(staging, name), os.path.join(directory, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_char_tokenizer(directory: str, max_length: int = 32, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """Write a character-level CLIP tokenizer to ``directory`` (file by file, atomically) and load it back."""
    symbols = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab.setdefault(s, len(vocab))
    for s in symbols:
        vocab.setdefault(s + "</w>", len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with _published(directory) as staging:
        with open(os.path.join(staging, "vocab.json"), "w") as f:
            json.dump(vocab, f)
        with open(os.path.join(staging, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n")
        tokenizer = CLIPTokenizer(
            os.path.join(staging, "vocab.json"),
            os.path.join(staging, "merges.txt"),
            model_max_length=max_length,
            pad_token=pad_token,
        )
        tokenizer.save_pretrained(staging)
    return tokenizer


def _text_encoder(vocab_size: int, hidden: int, layers: int, max_length: int, projection: int | None = None):
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


def _vae(
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


def build_tiny_sd_pipeline(
    seed: int = 0,
    unet_channels: tuple[int, ...] = (32, 64),
    cross_attention_dim: int = 32,
    prediction_type: str = "epsilon",
    tokenizer_dir: str | None = None,
    max_length: int = 32,
) -> StableDiffusionPipeline:
    """A tiny SD-1.x-style pipeline (8x downsampling VAE, so ``resolution`` must be a multiple of 8)."""
    torch.manual_seed(seed)
    tokenizer = write_char_tokenizer(tokenizer_dir or tempfile.mkdtemp(prefix="tiny-tok-"), max_length)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=unet_channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) + ("DownBlock2D",) * (len(unet_channels) - 1),
        up_block_types=("UpBlock2D",) * (len(unet_channels) - 1) + ("CrossAttnUpBlock2D",),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = _vae((8, 8, 8, 8))
    text_encoder = _text_encoder(len(tokenizer), cross_attention_dim, 2, max_length)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        clip_sample=False,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sdxl_pipeline(
    seed: int = 0, prediction_type: str = "epsilon", tokenizer_dir: str | None = None, max_length: int = 32
) -> StableDiffusionXLPipeline:
    """A tiny SDXL-style pipeline: two text encoders, pooled text embeds and time-id micro-conditioning."""
    torch.manual_seed(seed)
    base_dir = tokenizer_dir or tempfile.mkdtemp(prefix="tiny-tok-")
    tokenizer = write_char_tokenizer(os.path.join(base_dir, "tokenizer"), max_length)
    # SDXL's second tokenizer pads with "!" instead of the end token: the two id tensors differ, as in the real model.
    tokenizer_2 = write_char_tokenizer(os.path.join(base_dir, "tokenizer_2"), max_length, pad_token="!")
    hidden_1, hidden_2, projection = 16, 16, 16
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=hidden_1 + hidden_2,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=projection + 6 * 8,
        norm_num_groups=8,
    )
    vae = _vae((8, 8, 8, 8), force_upcast=True)
    text_encoder = _text_encoder(len(tokenizer), hidden_1, 2, max_length)
    text_encoder_2 = _text_encoder(len(tokenizer_2), hidden_2, 2, max_length, projection=projection)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        clip_sample=False,
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
    )


def write_t5_tokenizer(directory: str, max_length: int = 16) -> T5TokenizerFast:
    """Write a character-level T5 (Unigram, sentencepiece-style) tokenizer to ``directory`` and load it back.

    Its pieces are ``<pad>`` (0), ``</s>`` (1), ``<unk>`` (2), the word-start marker and the printable ASCII
    characters with and without it; every prompt therefore tokenises without unknown pieces. ``max_length`` is
    its ``model_max_length``.
    """
    os.makedirs(directory, exist_ok=True)
    characters = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + c, -3.0) for c in characters] + [(c, -4.0) for c in characters]
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=max_length)
    with _published(directory) as staging:  # whole files for a process reading them meanwhile
        tokenizer.save_pretrained(staging)
    return T5TokenizerFast.from_pretrained(directory)


def _t5_encoder(vocab_size: int, hidden: int) -> T5EncoderModel:
    config = T5Config(
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
    return T5EncoderModel(config)


def _flow_scheduler(**dynamic) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **dynamic)


def build_tiny_sd3_pipeline(
    seed: int = 0,
    tokenizer_dir: str | None = None,
    max_length: int = 16,
    with_t5: bool = True,
    attention_head_dim: int = 8,
) -> StableDiffusion3Pipeline:
    """A tiny SD3-style pipeline: MMDiT transformer, two CLIP encoders with projection, a T5 encoder, a 16-channel
    VAE with SD3's latent scale and shift, and a flow-matching scheduler with SD3's static shift 3.0.

    ``attention_head_dim`` (two heads) sets the transformer's width: 96 makes its feed-forward weights larger than
    DeepSpeed ZeRO-3's default persistence threshold, so they really are partitioned."""
    torch.manual_seed(seed)
    base_dir = tokenizer_dir or tempfile.mkdtemp(prefix="tiny-tok-")
    tokenizer = write_char_tokenizer(os.path.join(base_dir, "tokenizer"), max_length)
    tokenizer_2 = write_char_tokenizer(os.path.join(base_dir, "tokenizer_2"), max_length, pad_token="!")
    tokenizer_3 = write_t5_tokenizer(os.path.join(base_dir, "tokenizer_3"), max_length) if with_t5 else None
    clip_hidden, joint = 16, 32  # the two CLIP widths add up to the T5 width (SD3: 768 + 1280 padded to 4096)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=attention_head_dim,
        num_attention_heads=2,
        joint_attention_dim=joint,
        caption_projection_dim=2 * attention_head_dim,
        pooled_projection_dim=2 * clip_hidden,
        pos_embed_max_size=16,
    )
    vae = _vae((8, 8, 8, 8), latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609)
    text_encoder = _text_encoder(len(tokenizer), clip_hidden, 2, max_length, projection=clip_hidden)
    text_encoder_2 = _text_encoder(len(tokenizer_2), clip_hidden, 2, max_length, projection=clip_hidden)
    text_encoder_3 = _t5_encoder(len(tokenizer_3), joint) if with_t5 else None
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=_flow_scheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def build_tiny_flux_pipeline(
    seed: int = 0,
    tokenizer_dir: str | None = None,
    max_length: int = 16,
    guidance_embeds: bool = True,
    attention_head_dim: int = 8,
    axes_dims_rope: tuple[int, int, int] = (2, 2, 4),
) -> FluxPipeline:
    """A tiny FLUX.1-style pipeline: double- and single-stream transformer (with the guidance embedding of
    FLUX.1-dev, or without it as schnell), CLIP-L (pooled only) and T5 encoders, a VAE without quant convs and
    FLUX's latent scale and shift, and a flow-matching scheduler with dynamic (resolution-dependent) shifting.

    ``attention_head_dim`` (two heads; ``axes_dims_rope`` must sum to it) sets the transformer's width."""
    torch.manual_seed(seed)
    base_dir = tokenizer_dir or tempfile.mkdtemp(prefix="tiny-tok-")
    tokenizer = write_char_tokenizer(os.path.join(base_dir, "tokenizer"), max_length)
    tokenizer_2 = write_t5_tokenizer(os.path.join(base_dir, "tokenizer_2"), max_length)
    latent_channels, hidden = 4, 32
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,  # latents are packed into 2x2 patches
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=attention_head_dim,
        num_attention_heads=2,
        joint_attention_dim=hidden,
        pooled_projection_dim=16,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=axes_dims_rope,
    )
    vae = _vae(
        (8, 8, 8, 8),
        latent_channels=latent_channels,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
    )
    text_encoder = _text_encoder(len(tokenizer), 16, 2, max_length)
    text_encoder_2 = _t5_encoder(len(tokenizer_2), hidden)
    scheduler = _flow_scheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def build_tiny_wan_pipeline(seed: int = 0, tokenizer_dir: str | None = None, max_length: int = 16) -> WanPipeline:
    """A tiny Wan 2.1-style text-to-video pipeline: a ``WanTransformer3DModel`` (1x2x2 patches, two layers), a UMT5
    encoder, a causal 3D ``AutoencoderKLWan`` (8x spatial, 4x temporal compression, 16 latent channels with Wan's
    per-channel ``latents_mean``/``latents_std``) and a flow-matching scheduler with Wan's static shift.

    Clips have ``4k + 1`` frames (the VAE keeps the first frame and compresses the rest 4x): 5 frames at 16x16
    pixels are latents ``[16, 2, 2, 2]``."""
    torch.manual_seed(seed)
    tokenizer = write_t5_tokenizer(tokenizer_dir or tempfile.mkdtemp(prefix="tiny-tok-"), max_length)
    text_dim = 32
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=text_dim,
            d_kv=8,
            d_ff=2 * text_dim,
            num_layers=2,
            num_heads=2,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            dropout_rate=0.0,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    vae = AutoencoderKLWan(
        base_dim=4,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=16,
        out_channels=16,
        text_dim=text_dim,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=_flow_scheduler(shift=3.0),
        transformer=transformer,
    )


# Qwen's chat markers and a Qwen3-style chat template (the generation prompt, and the empty thinking block when
# ``enable_thinking=False``), enough for ``apply_chat_template`` as the Z-Image pipeline calls it.
_QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


# The words of QwenImagePipeline's prompt template, one token each as in Qwen's real BPE vocabulary: the template's
# prefix is then 34 tokens, the pipeline's ``prompt_template_encode_start_idx``, and dropping it keeps the prompt.
_QWEN_TEMPLATE_WORDS = (
    "system", "user", "assistant", "Describe", " the", " image", " by", " detailing", " color", " shape", " size",
    " texture", " quantity", " text", " spatial", " relationships", " of", " objects", " and", " background",
)  # fmt: skip


def write_qwen_tokenizer(directory: str, max_length: int = 64) -> Qwen2Tokenizer:
    """Write a byte-level Qwen2 tokenizer (one token per byte, no merges, plus whole-word tokens for the words of
    Qwen-Image's prompt template) with Qwen's chat special tokens (``<|endoftext|>`` pads) and a chat template to
    ``directory``, and load it back."""
    os.makedirs(directory, exist_ok=True)
    vocab = {symbol: index for index, symbol in enumerate(dict.fromkeys(_bytes_to_unicode()))}
    for token in _QWEN_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=max_length)
    tokenizer.add_tokens(list(_QWEN_TEMPLATE_WORDS))
    tokenizer.add_special_tokens({"additional_special_tokens": list(_QWEN_SPECIAL_TOKENS[1:])})
    tokenizer.chat_template = _QWEN_CHAT_TEMPLATE
    with _published(directory) as staging:  # whole files for a process reading them meanwhile
        tokenizer.save_pretrained(staging)
    return Qwen2Tokenizer.from_pretrained(directory)


def _qwen_text_config(vocab_size: int, hidden: int, pad_token_id: int) -> dict:
    return dict(
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


def build_tiny_qwen_image_pipeline(
    seed: int = 0, tokenizer_dir: str | None = None, max_length: int = 64, guidance_embeds: bool = False
) -> QwenImagePipeline:
    """A tiny Qwen-Image-style pipeline: the double-stream MMDiT transformer with 3-axis RoPE, a Qwen2.5-VL text
    encoder (tiny vision tower included, unused by text-to-image), the Qwen-Image VAE (causal 3D convolutions, a
    temporal axis of one frame, per-channel ``latents_mean``/``latents_std``; 4x spatial downsampling here), and a
    flow-matching scheduler with Qwen-Image's dynamic-shift settings."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    tokenizer = write_qwen_tokenizer(os.path.join(tokenizer_dir or tempfile.mkdtemp(prefix="tiny-tok-"), "tokenizer"),
                                     max_length)  # fmt: skip
    hidden, latent_channels = 16, 4
    text_config = _qwen_text_config(len(tokenizer), hidden, tokenizer.pad_token_id)
    text_config["rope_scaling"] = {"type": "mrope", "mrope_section": [1, 1, 2]}  # halves of the 8-wide heads
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hidden),
        vocab_size=len(tokenizer),
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * latent_channels,  # latents are packed into 2x2 patches
        out_channels=latent_channels,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=hidden,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )
    generator = torch.Generator().manual_seed(seed)
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=latent_channels,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=(torch.randn(latent_channels, generator=generator) * 0.3).tolist(),
        latents_std=(1.0 + torch.rand(latent_channels, generator=generator)).tolist(),
    )
    scheduler = _flow_scheduler(
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )
    return QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )


def build_tiny_z_image_pipeline(
    seed: int = 0, tokenizer_dir: str | None = None, max_length: int = 64
) -> ZImagePipeline:
    """A tiny Z-Image-style pipeline: the single-stream S3-DiT transformer (noise and caption refiners, 3-axis
    RoPE), a Qwen3 text encoder with a chat-template tokenizer, a FLUX-style VAE with Z-Image's latent scale and
    shift, and a flow-matching scheduler with a static shift of 3.0 (Z-Image-Turbo's scheduler config)."""
    from diffusers import ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    tokenizer = write_qwen_tokenizer(os.path.join(tokenizer_dir or tempfile.mkdtemp(prefix="tiny-tok-"), "tokenizer"),
                                     max_length)  # fmt: skip
    hidden, latent_channels = 16, 4
    text_encoder = Qwen3Model(
        Qwen3Config(head_dim=8, **_qwen_text_config(len(tokenizer), hidden, tokenizer.pad_token_id))
    ).eval()
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=latent_channels,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=hidden,
        axes_dims=[4, 6, 6],
        axes_lens=[256, 32, 32],
    )
    vae = _vae(
        (8, 8, 8, 8),
        latent_channels=latent_channels,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
    )
    return ZImagePipeline(
        scheduler=_flow_scheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
