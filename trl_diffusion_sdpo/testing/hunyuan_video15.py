"""A tiny HunyuanVideo 1.5 text-to-video pipeline, and the Qwen tokenizer its prompt template needs."""

from __future__ import annotations

import inspect
import os
import re
from typing import Any

from diffusers import (
    AutoencoderKLHunyuanVideo15,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideo15Pipeline,
    HunyuanVideo15Transformer3DModel,
)
from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, Qwen2Tokenizer

from .components import BuildArguments, decoder_text_config, t5_encoder, two_rope_heads
from .tokenizers import _published, write_qwen_tokenizer

__all__ = ["build_tiny_hunyuan_video15_pipeline", "write_hunyuan_video15_tokenizer"]

# HunyuanVideo15Pipeline.prompt_template_encode_start_idx: the template tokens it drops from Qwen2.5-VL's output.
TEMPLATE_START = 108
# GPT-2-style pre-tokenisation (words with their leading space, digits, punctuation runs, whitespace runs): how Qwen's
# byte-level BPE splits the system message before merging.
_PIECES = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")


def _system_message() -> str:
    """The pipeline's system message (the default of ``_get_mllm_prompt_embeds``, which ``__init__`` copies)."""
    parameters = inspect.signature(HunyuanVideo15Pipeline._get_mllm_prompt_embeds).parameters
    return parameters["system_message"].default


def _prefix_length(tokenizer: Qwen2Tokenizer, system_message: str) -> int:
    """Tokens of the chat template before the user's prompt, as ``_get_mllm_prompt_embeds`` renders it."""
    marker = "\x00"
    conversation = [{"role": "system", "content": system_message}, {"role": "user", "content": marker}]
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    return len(tokenizer(text.split(marker)[0], add_special_tokens=False).input_ids)


def write_hunyuan_video15_tokenizer(directory: str, max_length: int = 64) -> Qwen2Tokenizer:
    """The byte-level Qwen tokenizer of :func:`~.tokenizers.write_qwen_tokenizer` with the pieces of
    HunyuanVideo15Pipeline's system message as whole tokens, the longest pieces cut in two until the template before
    the prompt is :data:`TEMPLATE_START` (108) tokens, as with Qwen2.5-VL's real vocabulary: the pipeline's crop then
    drops exactly the template and keeps the prompt. Written to ``directory`` (atomically) and loaded back."""
    tokenizer = write_qwen_tokenizer(directory, max_length)
    message = _system_message()
    pieces = _PIECES.findall(message)
    wanted = TEMPLATE_START - _prefix_length(tokenizer, "")
    whole = tokenizer.get_vocab()  # pieces that are tokens already (Qwen-Image's template words) stay whole
    while len(pieces) < wanted:  # cut the longest piece in two (a word as BPE splits it into sub-words)
        longest = max((i for i, p in enumerate(pieces) if p not in whole), key=lambda i: len(pieces[i]))
        piece = pieces[longest]
        pieces[longest : longest + 1] = [piece[: len(piece) // 2], piece[len(piece) // 2 :]]
    tokenizer.add_tokens(list(dict.fromkeys(pieces)))
    prefix = _prefix_length(tokenizer, message)
    if prefix != TEMPLATE_START:
        raise RuntimeError(f"the tiny tokenizer's template prefix is {prefix} tokens, not {TEMPLATE_START}")
    with _published(directory) as staging:
        tokenizer.save_pretrained(staging)
    return Qwen2Tokenizer.from_pretrained(directory)


def build_tiny_hunyuan_video15_pipeline(
    attention_head_dim: int = 16, rope_axes_dim: tuple[int, int, int] = (4, 6, 6), **arguments: Any
) -> HunyuanVideo15Pipeline:
    """A tiny HunyuanVideo 1.5-style text-to-video pipeline from configs of the real classes: a
    ``HunyuanVideo15Transformer3DModel`` (the released model's 1x1x1 patches, its config's default; two double-stream
    layers, one token-refiner layer, the ByT5 and image projections, ``in_channels = 2C + 1`` for the zero condition
    latents and mask the text-to-video pipeline concatenates), a four-layer ``Qwen2_5_VLTextModel`` (the pipeline reads
    its third hidden state from the end) with the tokenizer of :func:`write_hunyuan_video15_tokenizer`, a ByT5 glyph
    encoder (``T5EncoderModel`` with ByT5's byte vocabulary and ``ByT5Tokenizer``, which needs no files), an
    ``AutoencoderKLHunyuanVideo15`` (16x spatial, 4x temporal compression as the real one, 4 latent channels, the real
    ``scaling_factor``), a flow-match Euler scheduler with a static shift of 5.0 and classifier-free guidance 6.0.

    Clips have ``4k + 1`` frames: 5 frames of 32x32 pixels are latents ``[4, 2, 2, 2]``. ``attention_head_dim`` (two
    heads; ``rope_axes_dim`` must sum to it) sets the transformer's width. ``arguments``: the
    :class:`~.components.BuildArguments`."""
    from diffusers.guiders import ClassifierFreeGuidance

    build = BuildArguments.start(arguments)
    folder = build.tokenizer_dir
    tokenizer = write_hunyuan_video15_tokenizer(os.path.join(folder, "tokenizer"), build.max_length)
    tokenizer_2 = ByT5Tokenizer()
    with _published(os.path.join(folder, "tokenizer_2")) as staging:  # as a saved pipeline holds it
        tokenizer_2.save_pretrained(staging)
    tokenizer_2 = ByT5Tokenizer.from_pretrained(os.path.join(folder, "tokenizer_2"))
    text_dim, glyph_dim, latent_channels = 16, 24, 4
    text_config = decoder_text_config(len(tokenizer), text_dim, tokenizer.pad_token_id, num_hidden_layers=4)
    text_config["rope_scaling"] = {"type": "mrope", "mrope_section": [1, 1, 2]}  # halves of the 8-wide heads
    text_encoder = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(**text_config)).eval()
    text_encoder_2 = t5_encoder(len(tokenizer_2), glyph_dim).eval()
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=2 * latent_channels + 1,
        out_channels=latent_channels,
        num_layers=2,
        num_refiner_layers=1,
        text_embed_dim=text_dim,
        text_embed_2_dim=glyph_dim,
        image_embed_dim=8,
        **two_rope_heads(attention_head_dim, rope_axes_dim, axes_name="rope_axes_dim"),
        target_size=32,
        task_type="t2v",
    )
    vae = AutoencoderKLHunyuanVideo15(latent_channels=latent_channels, block_out_channels=(8,) * 5, layers_per_block=1)
    return HunyuanVideo15Pipeline(
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        guider=ClassifierFreeGuidance(guidance_scale=6.0),
    )
