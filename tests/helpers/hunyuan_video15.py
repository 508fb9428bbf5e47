"""The HunyuanVideo 1.5 test case."""

from __future__ import annotations

from diffusers import HunyuanVideo15Pipeline, HunyuanVideo15Transformer3DModel

from tests.helpers.flow_family_checks import FlowCase
from tests.helpers.video import FRAMES
from trl_diffusion_sdpo.families import HunyuanVideo15Family
from trl_diffusion_sdpo.testing import build_tiny_hunyuan_video15_pipeline

SEQ = 24  # Qwen2.5-VL tokens kept after the template in the tests (the pipeline's 1000 where it is compared whole)
SIZE = 32  # pixels: 2x2 latents at the VAE's 16x
SHAPE = (2, 4, 2, 2, 2)  # the latents of 5-frame 32x32 clips, [N, C, F', h, w]

CASE = FlowCase(
    build=build_tiny_hunyuan_video15_pipeline,
    pipeline_class=HunyuanVideo15Pipeline,
    transformer_class=HunyuanVideo15Transformer3DModel,
    sequence_length=SEQ,
    lora_targets=HunyuanVideo15Family.lora_target_modules,
    config_values={"resolution": SIZE, "num_frames": FRAMES},
    sample_shape=SHAPE,
    pipeline_loads_lora=False,  # diffusers 0.42 has no LoRA loader for HunyuanVideo15Pipeline
    command_args=("--num_frames", str(FRAMES), "--frame_stride", "1"),
)
