"""The improved LAION aesthetic predictor (christophschuhmann/improved-aesthetic-predictor): a 5-layer MLP without
activations, ``768 -> 1024 -> 128 -> 64 -> 16 -> 1`` (dropouts between, inactive at evaluation), applied to the
L2-normalised CLIP ViT-L/14 image embedding. The output is a predicted 1-10 rating. This is the head SDPO,
ImageReward and flow_grpo use (weights ``sac+logos+ava1-l14-linearMSE.pth``), not LAION's older single linear layer.

Loads with transformers (``CLIPModel`` ``openai/clip-vit-large-patch14``, Hub id or local folder) plus the MLP's
state dict from a local ``.pth``/``.safetensors`` file or a Hub file (``hf_hub_download``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from PIL import Image
from torch import nn

from trl_diffusion_sdpo.rewards.scorers._clip import CLIPEmbedder
from trl_diffusion_sdpo.rewards.scorers.base import Scorer, arguments_with_defaults, resolve_device

from ._weights import load_weights_file

__all__ = ["AestheticMLP", "AestheticScorer"]

DEFAULT_HEAD_REPO = "trl-lib/ddpo-aesthetic-predictor"
DEFAULT_HEAD_FILENAME = "sac+logos+ava1-l14-linearMSE.pth"


class AestheticMLP(nn.Module):
    """The predictor's head; parameter names (``layers.0`` ... ``layers.7``) match the released state dict."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


def _resolve_head(weights: str | None, repo: str, filename: str) -> str:
    if weights is not None and os.path.isfile(weights):
        return weights
    if weights is not None:
        raise FileNotFoundError(f"Aesthetic head weights {weights!r} is not a file.")
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo, filename)


class AestheticScorer(Scorer):
    """Improved aesthetic predictor score (1-10 scale); the prompt is not used.

    Args:
        clip_model: CLIP whose image embeddings feed the MLP (Hub id or local folder); its ``projection_dim`` must
            equal the MLP's input size (768 for ViT-L/14).
        weights: local MLP state dict (``.pth`` read with ``weights_only=True``, or ``.safetensors``); when None it is
            downloaded as ``hf_hub_download(head_repo, head_filename)``.
    """

    name = "aesthetic"
    scale = "predicted rating, 1-10"

    def __init__(
        self,
        clip_model: str = "openai/clip-vit-large-patch14",
        weights: str | None = None,
        processor: str | None = None,
        head_repo: str = DEFAULT_HEAD_REPO,
        head_filename: str = DEFAULT_HEAD_FILENAME,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
    ) -> None:
        device = resolve_device(device)
        self.embedder = CLIPEmbedder.from_pretrained(clip_model, processor, device, dtype, batch_size)
        state = load_weights_file(_resolve_head(weights, head_repo, head_filename))
        input_size = state["layers.0.weight"].shape[1] if "layers.0.weight" in state else 768
        projection = self.embedder.model.config.projection_dim
        if input_size != projection:
            raise ValueError(
                f"The aesthetic head expects {input_size}-d embeddings but {clip_model!r} projects to {projection}; "
                "the released head needs CLIP ViT-L/14 (openai/clip-vit-large-patch14)."
            )
        self.mlp = AestheticMLP(input_size)
        self.mlp.load_state_dict(state)
        self.mlp.eval().requires_grad_(False).to(device)

    @torch.no_grad()
    @classmethod
    def model_sources(cls, **kwargs) -> dict[str, str]:
        values = arguments_with_defaults(cls, kwargs)
        sources = {"clip_model": values["clip_model"], "processor": values.get("processor")}
        sources.update({"weights": values["weights"]} if values.get("weights") else {"head_repo": values["head_repo"]})
        return {name: ref for name, ref in sources.items() if ref}

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        return self.mlp(self.embedder.image_embeddings(images)).squeeze(-1)
