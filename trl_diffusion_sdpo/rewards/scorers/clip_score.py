"""CLIP score in its two conventions: the cosine similarity of a CLIP model's L2-normalised image and prompt
embeddings.

- ``convention="torchmetrics"`` (registered as ``clip``): OpenAI CLIP ViT-L/14 (``openai/clip-vit-large-patch14``),
  per pair ``100 * cos``, and the set's value is ``max(mean, 0)`` (torchmetrics clamps the mean, not each pair).
- ``convention="cosine"`` (registered as ``clip-cosine``): SDPO's metric, the raw cosine of LAION's ViT-H/14
  (``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, the transformers conversion of the open_clip weights SDPO loads),
  mean without clamp.

Loads with transformers only (``CLIPModel`` + ``AutoProcessor``, Hub id or local folder).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from ...config.checks import Choice
from ._clip import CLIPEmbedder
from .base import Scorer, arguments_with_defaults, resolve_device

__all__ = ["CLIPScoreScorer", "clip_cosine_scorer"]

_DEFAULT_MODELS = {
    "torchmetrics": "openai/clip-vit-large-patch14",
    "cosine": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
}


class CLIPScoreScorer(Scorer):
    """CLIP score; see the module docstring for the two conventions."""

    def __init__(
        self,
        convention: str = "torchmetrics",
        model: str | None = None,
        processor: str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
    ) -> None:
        self.convention = Choice(tuple(_DEFAULT_MODELS)).check("convention", convention)
        model = model or _DEFAULT_MODELS[convention]
        self.embedder = CLIPEmbedder.from_pretrained(model, processor, resolve_device(device), dtype, batch_size)
        if convention == "torchmetrics":
            self.name, self.scale, self.factor = "clip", "x100 cosine, mean clamped at 0 (torchmetrics)", 100.0
            self.mean_floor = 0.0
        else:
            self.name, self.scale, self.factor = "clip_cosine", "raw cosine (SDPO)", 1.0

    @classmethod
    def model_sources(cls, **kwargs) -> dict[str, str]:
        values = arguments_with_defaults(cls, kwargs)
        sources = {"model": values.get("model") or _DEFAULT_MODELS.get(values["convention"])}
        if values.get("processor"):
            sources["processor"] = values["processor"]
        return {name: ref for name, ref in sources.items() if ref}

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        return self.factor * self.embedder.cosine(images, prompts)


def clip_cosine_scorer(**kwargs) -> CLIPScoreScorer:
    """The ``clip-cosine`` scorer: CLIP score on the raw cosine scale, as the SDPO authors report it."""
    return CLIPScoreScorer(convention="cosine", **kwargs)


clip_cosine_scorer.model_sources = lambda **kwargs: CLIPScoreScorer.model_sources(**{"convention": "cosine", **kwargs})
