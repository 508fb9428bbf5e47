"""The Qwen-Image test case."""

from __future__ import annotations

from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

from tests.helpers.flow_family_checks import FlowCase
from trl_diffusion_sdpo.families import QwenImageFamily
from trl_diffusion_sdpo.testing import build_tiny_qwen_image_pipeline

SEQ = 24  # kept prompt tokens in the tests (the pipeline's default is 512)

CASE = FlowCase(
    build=build_tiny_qwen_image_pipeline,
    pipeline_class=QwenImagePipeline,
    transformer_class=QwenImageTransformer2DModel,
    sequence_length=SEQ,
    lora_targets=QwenImageFamily.lora_target_modules,
)
