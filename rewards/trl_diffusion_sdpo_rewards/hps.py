"""HPSv2.0 / HPSv2.1 (Wu et al., 2023): the cosine similarity of L2-normalised image and prompt embeddings of an
open_clip ViT-H-14 fine-tuned on human preferences (no logit scale; raw cosine, about 0.2-0.3).

The weights are open_clip state dicts (``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt`` in ``xswu/HPSv2``).
open-clip-torch needs torchvision, which does not install beside this project's CPU torch build, so this module maps
the open_clip ViT weights onto transformers' `CLIPModel` (the same architecture: pre-LayerNorm residual blocks, exact
GELU, class-token vision pooling, end-of-text text pooling, bias-free projections) and uses the processor of
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (resize 224 bicubic, centre crop, CLIP mean/std, the same BPE tokenizer).
Only that repository's ``config.json`` and processor files are read; its weights are never loaded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from PIL import Image
from transformers import AutoProcessor, CLIPConfig, CLIPModel

from trl_diffusion_sdpo.config.checks import Choice
from trl_diffusion_sdpo.rewards.scorers._clip import CLIPEmbedder
from trl_diffusion_sdpo.rewards.scorers.base import Scorer, arguments_with_defaults, resolve_device

from ._weights import load_weights_file

__all__ = ["HPSv2Scorer", "hps_v21_scorer", "open_clip_to_transformers"]

HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}

# Keys open_clip state dicts carry that have no weight in transformers' CLIP (the causal mask is rebuilt there).
_IGNORED = {"attn_mask"}

_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def _convert_block(rest: str, value: torch.Tensor, prefix: str, out: dict[str, torch.Tensor]) -> None:
    layer, name = rest.split(".", 1)
    target = f"{prefix}.encoder.layers.{layer}"
    if name in ("attn.in_proj_weight", "attn.in_proj_bias"):
        kind = name.rsplit("_", 1)[1]
        for part, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
            out[f"{target}.self_attn.{part}.{kind}"] = chunk
        return
    module, param = name.rsplit(".", 1)
    if module not in _BLOCK:
        raise KeyError(f"Unexpected open_clip block parameter {name!r}.")
    out[f"{target}.{_BLOCK[module]}.{param}"] = value


def open_clip_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename (and split or transpose) an open_clip ViT CLIP state dict into transformers' `CLIPModel` names.

    ``in_proj_weight`` splits into q, k, v; ``visual.proj`` and ``text_projection`` (``x @ P``) become the transposed
    weights of bias-free linear layers. Raises on a key it does not know, so a different architecture (a
    non-ViT tower, attention pooling) fails loudly rather than loading partially.
    """
    direct = {
        "logit_scale": "logit_scale",
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "ln_final.weight": "text_model.final_layer_norm.weight",
        "ln_final.bias": "text_model.final_layer_norm.bias",
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
        "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
        "visual.ln_post.weight": "vision_model.post_layernorm.weight",
        "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    }
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in _IGNORED:
            continue
        if key in direct:
            out[direct[key]] = value
        elif key == "text_projection":
            out["text_projection.weight"] = value.t().contiguous()
        elif key == "visual.proj":
            out["visual_projection.weight"] = value.t().contiguous()
        elif key.startswith("transformer.resblocks."):
            _convert_block(key.removeprefix("transformer.resblocks."), value, "text_model", out)
        elif key.startswith("visual.transformer.resblocks."):
            _convert_block(key.removeprefix("visual.transformer.resblocks."), value, "vision_model", out)
        else:
            raise KeyError(f"Unexpected open_clip parameter {key!r}: not a ViT CLIP checkpoint this scorer can map.")
    return out


def _load_converted(model: CLIPModel, state: dict[str, torch.Tensor], source: str) -> None:
    converted = open_clip_to_transformers(state)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match the CLIP architecture: missing {missing[:8]}, unexpected {unexpected[:8]}."
        )


class HPSv2Scorer(Scorer):
    """HPSv2 score: raw cosine of the HPS-tuned ViT-H-14's image and prompt embeddings.

    Args:
        version: ``"v2.0"`` (SDPO) or ``"v2.1"``.
        checkpoint: local open_clip checkpoint (``.pt``/``.pth`` read with ``weights_only=True``, or safetensors);
            when None, ``hf_hub_download(hub_repo, HPS_v2_compressed.pt | HPS_v2.1_compressed.pt)``.
        architecture: folder or Hub id with the transformers ``config.json`` and processor of the ViT-H-14.
    """

    scale = "raw cosine"

    def __init__(
        self,
        version: str = "v2.0",
        checkpoint: str | None = None,
        architecture: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        hub_repo: str = "xswu/HPSv2",
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
    ) -> None:
        self.version = Choice(tuple(HPS_FILES)).check("version", version)
        self.name = "hpsv2" if version == "v2.0" else "hpsv2.1"
        if checkpoint is None:
            from huggingface_hub import hf_hub_download

            checkpoint = hf_hub_download(hub_repo, HPS_FILES[version])
        elif not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"HPS checkpoint {checkpoint!r} is not a file.")
        model = CLIPModel(CLIPConfig.from_pretrained(architecture))
        _load_converted(model, load_weights_file(checkpoint), checkpoint)
        processor = AutoProcessor.from_pretrained(architecture)
        self.embedder = CLIPEmbedder(model.to(dtype), processor, resolve_device(device), batch_size)

    @classmethod
    def model_sources(cls, **kwargs) -> dict[str, str]:
        values = arguments_with_defaults(cls, kwargs)
        weights = "checkpoint" if values.get("checkpoint") else "hub_repo"  # hub_repo: downloaded when none is given
        return {"architecture": values["architecture"], weights: values[weights]}

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        return self.embedder.cosine(images, prompts)


def hps_v21_scorer(**kwargs) -> HPSv2Scorer:
    """The ``hpsv2.1`` scorer: HPS v2.1's checkpoint."""
    return HPSv2Scorer(version="v2.1", **kwargs)


hps_v21_scorer.model_sources = HPSv2Scorer.model_sources
