"""Editing families: what FLUX.1 Kontext, FLUX.2 and Qwen-Image-Edit share about source images.

An editing family's denoiser reads each pair's source images beside the target (``edits``; the data then needs a
source column, docs/editing.md). :class:`SourceConditioning`, a mixin placed before the family it extends, adds the
pairs' source latents to the conditioning of every prediction, hands the sources to the pipeline when online training
samples, and takes ``source_resolution`` from the config, warning where the sources are encoded at another size than
the pipeline encodes them at. How a source is encoded (:meth:`~.base.ModelFamily.encode_sources`) and what its side
must be a multiple of (:meth:`~.base.ModelFamily.source_multiple`) stay with the family's VAE and patches.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import torch

from .base import PromptEmbeddings

__all__ = ["SourceConditioning"]

logger = logging.getLogger(__name__)


class SourceConditioning:
    """Mixin, before the family it extends, of the editing families (FLUX.1 Kontext, FLUX.2, Qwen-Image-Edit): the
    extended family's :meth:`~.base.ModelFamily.denoiser_conditioning` with the pairs' source latents
    ``[N, S, C, h, w]`` added by :meth:`with_sources`."""

    # How to sample with sources of the training size, for the warning of :meth:`configure_sources`.
    same_source_size_hint: ClassVar[str] = ""

    def denoiser_conditioning(
        self, prompt_embeds: PromptEmbeddings, time_ids: torch.Tensor | None
    ) -> dict[str, object]:
        return self.with_sources(super().denoiser_conditioning(prompt_embeds, time_ids), prompt_embeds)

    def with_sources(self, conditioning: dict[str, object], prompt_embeds: PromptEmbeddings) -> dict[str, object]:
        """``conditioning`` with the pairs' ``source_latents`` added (for the family's ``call_denoiser`` to pack beside
        the target); refused when a family that needs a source gets a batch without one, unchanged when its sources
        are optional (FLUX.2: text-to-image data)."""
        if prompt_embeds.source_latents is None:
            if not self.sources_optional:
                raise ValueError(f"{self.name} edits a source image: the batch has no source latents")
            return conditioning
        return {**conditioning, "source_latents": prompt_embeds.source_latents}

    def sampling_keywords(self, resolution: int, sources: list[Any] | None = None) -> dict[str, Any]:
        """The extended family's keywords and the edit's sources as the editing pipelines take them (``image``: one PIL
        image, or the list of several: Qwen-Image-Edit Plus's and FLUX.2's reference images)."""
        keywords = super().sampling_keywords(resolution, sources)
        if sources:
            keywords["image"] = sources[0] if len(sources) == 1 else list(sources)
        return keywords

    def pipeline_source_size(self, width: int, height: int) -> tuple[int, int]:
        """``(width, height)`` at which the family's pipeline, called with its defaults, hands a ``width x height``
        source image to its VAE; by default the image's own size."""
        return width, height

    def configure_sources(self, args: Any) -> None:
        """Take ``source_resolution`` from the config ``args`` (None where the config has no such field), refusing a
        value that cannot apply, and warn when the sources are encoded at another size than the one the pipeline
        encodes a source of the training size at by default: the model would be tuned on source latents (their token
        count, their positions) it does not see at sampling.

        Called from the family's ``noiser``, with the config's other checks."""
        value = getattr(args, "source_resolution", None)
        if value is not None:
            multiple = self.source_multiple()
            if value <= 0 or value % multiple != 0:
                raise ValueError(f"source_resolution must be a positive multiple of {multiple} for {self.name}")
            if getattr(args, "cache_latents", False):
                raise ValueError(
                    "source_resolution cannot be combined with cache_latents=True: the latent cache stores the "
                    "sources at the training resolution. Set one of them."
                )
        self.source_resolution = value
        resolution = args.resolution
        trained = value or resolution
        width, height = self.pipeline_source_size(resolution, resolution)
        if (width, height) == (trained, trained):
            return
        multiple = self.source_multiple()
        logger.warning(
            "%s encodes each source at %dx%d pixels (%d tokens), but %s, called with its defaults, encodes a %dx%d "
            "source at %dx%d (%d tokens): the model is tuned on source latents it will not see at sampling. Set "
            "source_resolution=%d to train on the pipeline's size%s.",
            self.name,
            trained,
            trained,
            (trained // multiple) ** 2,
            type(self.pipeline).__name__,
            resolution,
            resolution,
            width,
            height,
            (width // multiple) * (height // multiple),
            max(width, height),
            f", or {self.same_source_size_hint.format(size=trained)}" if self.same_source_size_hint else "",
        )
