"""ImageReward v1.0 (Xu et al., 2023), re-implemented on transformers' BLIP classes.

The reward of (image, prompt): a BLIP ViT-L/16 encodes the image (224 px, bicubic resize and centre crop, CLIP
mean/std); a BERT-base text encoder with cross-attention to the image tokens reads the prompt (padded and truncated
to 35 tokens); its first token's final state goes through a 5-layer MLP without activations
(``768 -> 1024 -> 128 -> 64 -> 16 -> 1``), and the output is standardised with the training statistics,
``(r - 0.16717362830052426) / 1.0333394966054072`` (roughly -2..+2).

Why not the ``image-reward`` package: its BLIP code imports helpers that transformers 5 no longer exports from
``transformers.modeling_utils`` (``ImportError`` on ``import ImageReward``), it pins ``timm==0.6.13`` and
``fairscale`` (torchvision, which does not install beside this project's CPU torch), and it always downloads
``bert-base-uncased``. The checkpoint ``ImageReward.pt`` holds the original BLIP names (``blip.visual_encoder.*``,
``blip.text_encoder.*``, ``mlp.layers.*``), which map one to one onto `BlipVisionModel` / `BlipTextModel` by the same
renaming transformers' own BLIP conversion uses. Numerical agreement with the package on the real checkpoint has NOT
been verified here (no network access to the weights, and the package cannot be imported with transformers 5).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn
from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

from trl_diffusion_sdpo.rewards.scorers.base import Scorer, arguments_with_defaults, resolve_device

from ._weights import load_weights_file
from .aesthetic import AestheticMLP

__all__ = ["ImageRewardModel", "ImageRewardScorer", "blip_to_transformers"]

IMAGE_REWARD_MEAN = 0.16717362830052426
IMAGE_REWARD_STD = 1.0333394966054072
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# BLIP's ViT-L/16 at 224 px, as ImageReward builds it (``BLIP_Pretrain(image_size=224, vit='large')``: BLIP's
# create_vit gives width 1024, depth 24, 16 heads, MLP ratio 4, timm's LayerNorm eps 1e-6), as the fields that differ
# from BlipVisionConfig's defaults (BLIP's ViT-B/16 at 384 px: the 16 px patch and exact GELU are the same).
VIT_LARGE = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=224,
    layer_norm_eps=1e-6,
)
# BLIP's med_config.json (BERT-base with cross-attention, vocabulary 30522 + [DEC] + [ENC]) differs from
# BlipTextConfig's defaults (vocabulary 30524, width 768, MLP 3072, 12 layers, 512 positions, eps 1e-12, GELU, pad 0)
# only in its 12 heads (8 there); so a field a med_config leaves out falls back to the published file's value.
MED_BERT_BASE = dict(num_attention_heads=12)
# The fields of a med_config that shape the text encoder; the others are not read (dropout is off at inference,
# ``encoder_width`` follows the ViT).
MED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "layer_norm_eps",
    "hidden_act",
    "pad_token_id",
)

_VISION_RENAMES = (
    ("cls_token", "embeddings.class_embedding"),
    ("pos_embed", "embeddings.position_embedding"),
    ("patch_embed.proj", "embeddings.patch_embedding"),
    ("blocks.", "encoder.layers."),
    ("attn.proj", "self_attn.projection"),
    ("attn.qkv", "self_attn.qkv"),
    ("norm1", "layer_norm1"),
    ("norm2", "layer_norm2"),
)


def _vision_key(key: str) -> str:
    if key.startswith("norm."):
        return "post_layernorm." + key.removeprefix("norm.")
    for old, new in _VISION_RENAMES:
        key = key.replace(old, new)
    return key


def blip_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an ImageReward state dict to `ImageRewardModel`'s names; other BLIP parts (projections, heads) drop."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("blip.visual_encoder."):
            out["vision_model." + _vision_key(key.removeprefix("blip.visual_encoder."))] = value
        elif key.startswith("blip.text_encoder."):
            out["text_encoder." + key.removeprefix("blip.text_encoder.")] = value
        elif key.startswith("mlp.layers."):
            out[key] = value
    return out


def _med_config(med_config: str | dict[str, Any] | None, hub_repo: str) -> dict[str, Any]:
    if isinstance(med_config, dict):
        return med_config
    if med_config is None:
        from huggingface_hub import hf_hub_download

        med_config = hf_hub_download(hub_repo, "med_config.json")
    with open(med_config) as f:
        return json.load(f)


def text_config_from_med(med: dict[str, Any], encoder_hidden_size: int) -> BlipTextConfig:
    """`BlipTextConfig` from BLIP's BERT ``med_config.json``: its :data:`MED_FIELDS`, each one it leaves out as BLIP's
    own file has it; ``encoder_width`` is replaced by the ViT width, as BLIP does."""
    values = {**MED_BERT_BASE, **{k: med[k] for k in MED_FIELDS if k in med}}
    return BlipTextConfig(
        **values, encoder_hidden_size=encoder_hidden_size, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )


def image_reward_configs(
    med: dict[str, Any], vision_config: dict[str, Any] | None = None
) -> tuple[BlipVisionConfig, BlipTextConfig]:
    """The vision and text configs of `ImageRewardModel`: ImageReward's ViT-L/16 (:data:`VIT_LARGE`) with the
    overrides ``vision_config``, and the text encoder of ``med`` (:func:`text_config_from_med`) cross-attending it."""
    vision = BlipVisionConfig(**{**VIT_LARGE, **(vision_config or {})})
    return vision, text_config_from_med(med, vision.hidden_size)


class ImageRewardModel(nn.Module):
    """BLIP image encoder, cross-attending BERT text encoder and the MLP head: ``forward`` returns the raw (not
    standardised) reward per pair."""

    def __init__(self, vision_config: BlipVisionConfig, text_config: BlipTextConfig) -> None:
        super().__init__()
        self.vision_model = BlipVisionModel(vision_config)
        self.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = AestheticMLP(text_config.hidden_size)  # the same 5-layer layout, ``mlp.layers.{0,2,4,6,7}``

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = self.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
        )
        return self.mlp(text.last_hidden_state[:, 0, :].float()).squeeze(-1)


def _image_processor(size: int):
    try:  # transformers 5: the PIL backend, no torchvision needed
        from transformers import CLIPImageProcessorPil as processor_class
    except ImportError:
        from transformers import CLIPImageProcessor as processor_class
    return processor_class(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        resample=3,  # PIL bicubic
        do_center_crop=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )


class ImageRewardScorer(Scorer):
    """ImageReward v1.0 reward, standardised.

    Args:
        checkpoint: local ``ImageReward.pt`` (read with ``weights_only=True``) or safetensors file; when None,
            ``hf_hub_download(hub_repo, "ImageReward.pt")``.
        med_config: BLIP's BERT config (path or dict); when None, ``med_config.json`` from ``hub_repo``.
        tokenizer: BERT tokenizer folder or Hub id (``bert-base-uncased`` as BLIP); ``[DEC]`` and ``[ENC]`` are added
            as BLIP does.
        vision_config: overrides of the ViT-L/16 vision config (tests use a tiny one).
    """

    name = "imagereward"
    scale = "standardised reward (ImageReward v1.0)"

    def __init__(
        self,
        checkpoint: str | None = None,
        med_config: str | dict[str, Any] | None = None,
        tokenizer: str = "google-bert/bert-base-uncased",
        vision_config: dict[str, Any] | None = None,
        hub_repo: str = "THUDM/ImageReward",
        max_length: int = 35,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
    ) -> None:
        if checkpoint is None:
            from huggingface_hub import hf_hub_download

            checkpoint = hf_hub_download(hub_repo, "ImageReward.pt")
        elif not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"ImageReward checkpoint {checkpoint!r} is not a file.")
        vision, text = image_reward_configs(_med_config(med_config, hub_repo), vision_config)
        self.model = ImageRewardModel(vision, text)
        missing, unexpected = self.model.load_state_dict(
            blip_to_transformers(load_weights_file(checkpoint)), strict=False
        )
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ValueError(
                f"{checkpoint} does not match ImageReward's architecture: missing {missing[:8]}, "
                f"unexpected {unexpected[:8]}."
            )
        self.device = resolve_device(device)
        self.model.eval().requires_grad_(False).to(self.device, dtype)
        self.tokenizer = BertTokenizer.from_pretrained(tokenizer)
        self.tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        self.tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        self.image_processor = _image_processor(vision.image_size)
        self.max_length = max_length
        self.batch_size = batch_size

    @torch.no_grad()
    def raw_reward(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """The MLP output before standardisation."""
        dtype = next(self.model.parameters()).dtype
        chunks = []
        for start in range(0, len(images), self.batch_size):
            batch = [image.convert("RGB") for image in images[start : start + self.batch_size]]
            pixels = self.image_processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device, dtype)
            tokens = self.tokenizer(
                list(prompts[start : start + self.batch_size]),
                padding="max_length",
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            chunks.append(self.model(pixels, tokens["input_ids"], tokens["attention_mask"]).float())
        return torch.cat(chunks)

    @classmethod
    def model_sources(cls, **kwargs) -> dict[str, str]:
        values = arguments_with_defaults(cls, kwargs)
        sources = {"tokenizer": values["tokenizer"], "checkpoint": values.get("checkpoint")}
        if values.get("checkpoint") is None or values.get("med_config") is None:  # downloaded from hub_repo
            sources["hub_repo"] = values["hub_repo"]
        return {name: ref for name, ref in sources.items() if isinstance(ref, str)}

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        return (self.raw_reward(images, prompts) - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD
