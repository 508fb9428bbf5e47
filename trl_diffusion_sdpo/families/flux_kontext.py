"""FLUX.1 Kontext: FLUX.1's transformer editing a source image, whose latents are packed beside the target's in the
token sequence.

Followed: diffusers' ``FluxKontextPipeline`` (``pipelines/flux/pipeline_flux_kontext.py``, diffusers 0.42) and the
Kontext section of diffusers' FLUX LoRA example (``examples/dreambooth/README_flux.md``).

* Text: FLUX.1's (:class:`~.flux.FluxFamily`): T5's sequence, CLIP-L's pooled projection, ``txt_ids`` zeros. The
  instruction is the prompt.
* Source: the VAE posterior's mode (``sample_mode="argmax"``), shifted and scaled as the targets
  (:meth:`~.base.ModelFamily.encode_sources`), encoded once per pair and shared by both branches. The data resizes
  and center-crops it as the edited images, so it has their latent size.
* The call: the target's ``(h/2)(w/2)`` packed 2x2 patches, then the source's, in one sequence
  (``torch.cat([latents, image_latents], dim=1)``); ``img_ids`` are the target's positions followed by the source's,
  whose first coordinate is 1 (``image_ids[..., 0] = 1``); the prediction keeps the target's tokens
  (``noise_pred[:, : latents.size(1)]``) and is unpacked.
* Noise levels: FLUX.1's, with the resolution shift of the target's tokens (the pipeline's ``image_seq_len`` is the
  target's sequence length, before the source is appended).
* Source size: the pipeline, called with its defaults (``_auto_resize=True``), resizes its input image to the
  ``PREFERRED_KONTEXT_RESOLUTIONS`` entry nearest its aspect ratio (1024x1024 for a square): about 1024^2 pixels,
  4096 source tokens, whatever the training resolution. Training encodes the source at the training resolution
  unless ``source_resolution`` says otherwise, and warns at start where the two differ
  (:meth:`~.editing.SourceConditioning.configure_sources`).
"""

from __future__ import annotations

from typing import Any

import torch

from .editing import SourceConditioning
from .flux import FluxFamily
from .registry import pipeline_is, register_family

__all__ = ["FluxKontextFamily"]


@register_family("flux-kontext", pipelines=("FluxKontextPipeline",))
class FluxKontextFamily(SourceConditioning, FluxFamily):
    """FLUX.1 Kontext (``FluxKontextPipeline`` with a ``FluxTransformer2DModel``): instruction editing of one source
    image."""

    edits = True
    max_sources = 1
    # diffusers' Kontext LoRA example trains with --guidance_scale=1 and --learning_rate=1e-4 (README_flux.md).
    default_guidance_scale = 1.0
    default_learning_rate = 1e-4
    learning_rate_source = "diffusers' FLUX.1 Kontext LoRA example (examples/dreambooth/README_flux.md, 1e-4)"
    same_source_size_hint = "call FluxKontextPipeline with the source at {size}x{size} and _auto_resize=False"

    @classmethod
    def matches(cls, pipeline: Any) -> bool:
        """A FLUX transformer in a ``FluxKontextPipeline`` (or a subclass): its components are FLUX.1's, so the
        pipeline's class is what tells the editing pipeline apart."""
        return super(FluxFamily, cls).matches(pipeline) and pipeline_is(pipeline, "FluxKontextPipeline")

    def pipeline_source_size(self, width: int, height: int) -> tuple[int, int]:
        """As ``FluxKontextPipeline.__call__`` with ``_auto_resize=True`` sizes its input image: the preferred Kontext
        resolution nearest the aspect ratio of the image (its size rounded down to the VAE's factor), rounded down to
        the latent patch."""
        from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS
        from PIL import Image

        height, width = self.pipeline.image_processor.get_default_height_width(Image.new("RGB", (width, height)))
        aspect_ratio = width / height
        _, width, height = min((abs(aspect_ratio - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
        multiple = self.source_multiple()
        return width // multiple * multiple, height // multiple * multiple

    def sampling_keywords(self, resolution: int, sources: list[Any] | None = None) -> dict[str, Any]:
        """The sources at the size given (the training's), not resized to a preferred Kontext resolution, and the
        edit at ``resolution`` (``max_area`` would rescale it to 1024^2 pixels otherwise)."""
        keywords = super().sampling_keywords(resolution, sources)
        return {**keywords, "max_area": resolution * resolution, "_auto_resize": False}

    def call_denoiser(
        self, model: torch.nn.Module, sample: torch.Tensor, timestep: torch.Tensor, conditioning: dict[str, object]
    ) -> torch.Tensor:
        from diffusers import FluxKontextPipeline  # slow to import: only when the model runs

        conditioning = dict(conditioning)
        source = conditioning.pop("source_latents")[:, 0].to(sample.dtype)  # [N, C, h', w']
        n, channels, height, width = sample.shape
        pack, ids = FluxKontextPipeline._pack_latents, FluxKontextPipeline._prepare_latent_image_ids
        target_tokens = pack(sample, n, channels, height, width)
        source_tokens = pack(source, n, channels, *source.shape[-2:])
        target_ids = ids(n, height // 2, width // 2, sample.device, sample.dtype)
        source_ids = ids(n, source.shape[-2] // 2, source.shape[-1] // 2, sample.device, sample.dtype)
        source_ids[..., 0] = 1
        out = model(
            hidden_states=torch.cat([target_tokens, source_tokens], dim=1),
            timestep=timestep / 1000,
            guidance=self.guidance(n, sample.device),
            img_ids=torch.cat([target_ids, source_ids], dim=0),
            **conditioning,
            return_dict=False,
        )[0][:, : target_tokens.shape[1]]
        out = out.view(n, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(n, channels, height, width)
