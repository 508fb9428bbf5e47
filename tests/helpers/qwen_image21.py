"""The Qwen-Image 2.1 test case."""

from __future__ import annotations

from diffusers import QwenImage21Pipeline, QwenImage21Transformer2DModel

from tests.helpers.flow_family_checks import FlowCase
from trl_diffusion_sdpo.families import QwenImage21Family
from trl_diffusion_sdpo.testing import build_tiny_qwen_image21_pipeline

SEQ = 48  # kept prompt tokens in the tests: the user turn's 5 opening and closing template tokens and the prompt
CASE = FlowCase(
    build=build_tiny_qwen_image21_pipeline,
    pipeline_class=QwenImage21Pipeline,
    transformer_class=QwenImage21Transformer2DModel,
    sequence_length=SEQ,
    lora_targets=QwenImage21Family.lora_target_modules,
)
