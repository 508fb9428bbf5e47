"""The Qwen-Image-Edit and Qwen-Image-Edit-Plus test cases."""

from __future__ import annotations

from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline, QwenImageTransformer2DModel

from tests.helpers.flow_family_checks import FlowCase
from trl_diffusion_sdpo.families import QwenImageFamily
from trl_diffusion_sdpo.testing import build_tiny_qwen_image_edit_pipeline, build_tiny_qwen_image_edit_plus_pipeline

SEQ = 32  # text tokens after the images in the tests (the pipelines' default is 512)
# Plus: each image's "Picture k: " label takes 11 of them with the tiny byte-level tokenizer (4 with Qwen's)
PLUS_SEQ = 64
EDITING = {"random_flip": False, "proportion_empty_prompts": 0.0}  # what a prompt that reads its sources needs
EDIT_CASE = FlowCase(
    build=build_tiny_qwen_image_edit_pipeline,
    pipeline_class=QwenImageEditPipeline,
    transformer_class=QwenImageTransformer2DModel,
    sequence_length=SEQ,
    lora_targets=QwenImageFamily.lora_target_modules,
    config_values=EDITING,
)
PLUS_CASE = FlowCase(
    build=build_tiny_qwen_image_edit_plus_pipeline,
    pipeline_class=QwenImageEditPlusPipeline,
    transformer_class=QwenImageTransformer2DModel,
    sequence_length=PLUS_SEQ,
    lora_targets=QwenImageFamily.lora_target_modules,
    config_values=EDITING,
    sources=2,
)
