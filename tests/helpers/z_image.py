"""The Z-Image test case."""

from __future__ import annotations

from diffusers import ZImagePipeline, ZImageTransformer2DModel

from tests.helpers.flow_family_checks import FlowCase
from trl_diffusion_sdpo.families import ZImageFamily
from trl_diffusion_sdpo.testing import build_tiny_z_image_pipeline

SEQ = 32  # tokens in the tests (the pipeline's default is 512)
CASE = FlowCase(
    build=build_tiny_z_image_pipeline,
    pipeline_class=ZImagePipeline,
    transformer_class=ZImageTransformer2DModel,
    sequence_length=SEQ,
    lora_targets=ZImageFamily.lora_target_modules,
)
