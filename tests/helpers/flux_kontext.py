"""The FLUX.1 Kontext test case."""

from __future__ import annotations

from diffusers import FluxKontextPipeline, FluxTransformer2DModel

from tests.helpers.flow_family_checks import FlowCase
from trl_diffusion_sdpo.families import FluxKontextFamily
from trl_diffusion_sdpo.testing import build_tiny_flux_kontext_pipeline

SEQ = 16
CASE = FlowCase(
    build=build_tiny_flux_kontext_pipeline,
    pipeline_class=FluxKontextPipeline,
    transformer_class=FluxTransformer2DModel,
    sequence_length=SEQ,
    lora_targets=FluxKontextFamily.lora_target_modules,
)

# The tiny models' pixels per side over the real ones': Kontext's preferred source sizes shrunk by it.
TINY_SCALE = 32


def tiny_preferred_source_sizes(monkeypatch) -> None:
    """FluxKontextPipeline called with its defaults (``_auto_resize=True``) resizes its input image to the entry of
    ``PREFERRED_KONTEXT_RESOLUTIONS`` nearest the image's aspect ratio: about 1024^2 pixels, the real model's source
    size, over 4,000 source tokens beside a tiny target's 16. For the tiny pipeline the same table divided by
    :data:`TINY_SCALE` (32x32 for a square): each call still resizes its source by the pipeline's own rule."""
    from diffusers.pipelines.flux import pipeline_flux_kontext

    sizes = [(w // TINY_SCALE, h // TINY_SCALE) for w, h in pipeline_flux_kontext.PREFERRED_KONTEXT_RESOLUTIONS]
    monkeypatch.setattr(pipeline_flux_kontext, "PREFERRED_KONTEXT_RESOLUTIONS", sizes)
