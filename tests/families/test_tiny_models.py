"""The tiny pipelines' width arguments: RoPE axes that do not split the head width are refused when the pipeline is
built, naming the arguments, instead of failing later inside diffusers' first forward pass."""

from __future__ import annotations

import pytest

from trl_diffusion_sdpo.tiny_models import (
    build_tiny_flux2_klein_pipeline,
    build_tiny_flux2_pipeline,
    build_tiny_flux_pipeline,
    build_tiny_qwen_image21_pipeline,
    build_tiny_qwen_image_pipeline,
    build_tiny_z_image_pipeline,
)
from trl_diffusion_sdpo.tiny_models.components import rope_axes, two_rope_heads


@pytest.mark.parametrize(
    "build, widths, message",
    [
        (build_tiny_flux_pipeline, {"attention_head_dim": 16}, r"head_dim=16, axes_dims_rope=\(2, 2, 4\).*16"),
        (build_tiny_qwen_image_pipeline, {"axes_dims_rope": (4, 4, 4)}, r"axes_dims_rope=\(4, 4, 4\).*sum to 12"),
        (build_tiny_flux2_pipeline, {"axes_dims_rope": (2, 2, 2)}, r"axes_dims_rope=\(2, 2, 2\).*head width 8"),
        (build_tiny_flux2_klein_pipeline, {"attention_head_dim": 12}, r"attention_head_dim=12.*head width 12"),
        (build_tiny_z_image_pipeline, {"dim": 64}, r"dim=64, axes_dims=\(4, 6, 6\).*sum to 16.*head width 32"),
        (build_tiny_qwen_image21_pipeline, {"attention_head_dim": 12}, r"attention_head_dim=12.*head width 12"),
    ],
    ids=["flux", "qwen-image", "flux2", "flux2-klein", "z-image", "qwen-image-2.1"],
)
def test_rope_axes_that_do_not_split_the_head_are_refused_naming_the_arguments(build, widths, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        build(seed=0, tokenizer_dir=str(tmp_path), **widths)


def test_the_width_keywords_are_two_heads_of_the_given_width():
    assert two_rope_heads(96, [24, 36, 36]) == {
        "attention_head_dim": 96,
        "num_attention_heads": 2,
        "axes_dims_rope": (24, 36, 36),
    }
    assert rope_axes((32, 40, 40), 112, "dim=224") == (32, 40, 40)
