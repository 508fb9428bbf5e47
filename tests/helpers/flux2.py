"""The FLUX.2 test cases."""

from __future__ import annotations

from diffusers import Flux2KleinPipeline, Flux2Pipeline, Flux2Transformer2DModel

from tests.helpers.flow_family_checks import (
    FlowCase,
)
from trl_diffusion_sdpo.families import Flux2Family
from trl_diffusion_sdpo.testing import build_tiny_flux2_klein_pipeline, build_tiny_flux2_pipeline

SEQ = 48  # tokens in the tests (the pipelines' default is 512); [dev]'s system message takes about 30 of them

# The tiny transformer has one single-stream block: its output projection is the script's per-block target.
TARGETS = (*Flux2Family.lora_target_modules, "single_transformer_blocks.0.attn.to_out")

CASES = {
    "dev": FlowCase(build_tiny_flux2_pipeline, Flux2Pipeline, Flux2Transformer2DModel, SEQ, TARGETS),
    "klein": FlowCase(build_tiny_flux2_klein_pipeline, Flux2KleinPipeline, Flux2Transformer2DModel, SEQ, TARGETS),
}
