"""PickScore v1 (Kirstain et al., 2023): the cosine similarity of L2-normalised image and text embeddings of a CLIP
ViT-H/14 fine-tuned on Pick-a-Pic preferences, ``cos(E_img, E_txt)``.

SDPO and SmPO report the raw cosine (about 0.2); other papers print ``100 * cos`` (about 21), and the official snippet
multiplies by the model's learned ``logit_scale.exp()``. Loads with transformers only: ``CLIPModel`` from
``yuvalkirstain/PickScore_v1`` and the processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (Hub ids or local
folders).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from ...config.checks import Choice
from ._clip import CLIPEmbedder
from .base import Scorer, arguments_with_defaults, resolve_device

__all__ = ["PickScoreScorer"]

_MULTIPLIERS = ("raw", "x100", "logit_scale")


class PickScoreScorer(Scorer):
    """PickScore: ``multiplier * cos(image, prompt)``.

    Args:
        model: `CLIPModel` weights (Hub id or local folder).
        processor: processor (tokenizer and image processor) folder or Hub id.
        multiplier: ``"raw"`` (SDPO's convention, default), ``"x100"``, or ``"logit_scale"`` (the model's learned
            ``logit_scale.exp()``, as the official snippet before its softmax).
        device, dtype, batch_size: where and how the CLIP model runs.
    """

    name = "pickscore"

    def __init__(
        self,
        model: str = "yuvalkirstain/PickScore_v1",
        processor: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        multiplier: str = "raw",
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
    ) -> None:
        self.multiplier = Choice(_MULTIPLIERS).check("multiplier", multiplier)
        self.embedder = CLIPEmbedder.from_pretrained(model, processor, resolve_device(device), dtype, batch_size)
        self.factor = {"raw": 1.0, "x100": 100.0}.get(multiplier) or float(self.embedder.model.logit_scale.exp())
        self.scale = {"raw": "raw cosine", "x100": "x100 cosine"}.get(multiplier, f"x{self.factor:.2f} cosine")

    @classmethod
    def model_sources(cls, **kwargs) -> dict[str, str]:
        values = arguments_with_defaults(cls, kwargs)
        return {name: values[name] for name in ("model", "processor") if values.get(name)}

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        return self.factor * self.embedder.cosine(images, prompts)
