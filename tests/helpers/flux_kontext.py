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
