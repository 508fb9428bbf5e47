"""The flow families' tiny assets and arguments for multi-process runs."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from tests.helpers.video import FRAMES
from trl_diffusion_sdpo.testing import (
    build_tiny_flux2_klein_pipeline,
    build_tiny_flux2_pipeline,
    build_tiny_flux_kontext_pipeline,
    build_tiny_flux_pipeline,
    build_tiny_hunyuan_video15_pipeline,
    build_tiny_qwen_image21_pipeline,
    build_tiny_qwen_image_edit_pipeline,
    build_tiny_qwen_image_edit_plus_pipeline,
    build_tiny_qwen_image_pipeline,
    build_tiny_sd3_pipeline,
    build_tiny_wan_pipeline,
    build_tiny_z_image_pipeline,
)

FLOW_ARGS = ("--beta", "100", "--max_sequence_length", "16")

EDITING_ARGS = ("--random_flip", "false", "--proportion_empty_prompts", "0")


@dataclasses.dataclass(frozen=True)
class Family:
    """How to build a family's widened tiny pipeline and train it: ``build``'s keyword arguments (besides the seed and
    the tokenizer folder), the training script's arguments beyond :data:`FLOW_ARGS`, and video data instead of image
    pairs (``video``) or editing pairs (``edits``: one source image each, or two reference images)."""

    build: Callable
    build_kwargs: dict
    extra: tuple[str, ...] = ()
    video: bool = False
    edits: str | None = None  # editing rows: "one source" (source_image) or "references" (source_images, two each)


# Widened: head dim 96 (two heads) and RoPE axes that add up to it; Z-Image has no head-dim argument, its width is dim.
FAMILIES = {
    "sd3": Family(build_tiny_sd3_pipeline, {"attention_head_dim": 96, "max_length": 16}),
    "flux": Family(
        build_tiny_flux_pipeline, {"attention_head_dim": 96, "axes_dims_rope": (24, 36, 36), "max_length": 16}
    ),
    "flux-kontext": Family(
        build_tiny_flux_kontext_pipeline,
        {"attention_head_dim": 96, "axes_dims_rope": (24, 36, 36), "max_length": 16},
        edits="one source",
    ),
    "qwen-image": Family(build_tiny_qwen_image_pipeline, {"attention_head_dim": 96, "axes_dims_rope": (32, 32, 32)}),
    "z-image": Family(build_tiny_z_image_pipeline, {"dim": 224, "axes_dims": (32, 40, 40)}),
    "wan": Family(
        build_tiny_wan_pipeline,
        {"attention_head_dim": 96, "ffn_dim": 768, "max_length": 16},
        ("--num_frames", str(FRAMES), "--resolution", "16"),
        video=True,
    ),
    # [dev]'s system message takes about 30 tokens of its prompt
    "flux2": Family(
        build_tiny_flux2_pipeline,
        {"attention_head_dim": 96, "axes_dims_rope": (24, 24, 24, 24)},
        ("--max_sequence_length", "48"),
    ),
    "flux2-klein": Family(build_tiny_flux2_klein_pipeline, {"attention_head_dim": 96, "axes_dims_rope": (24,) * 4}),
    # the same pipelines trained on reference images
    "flux2-references": Family(
        build_tiny_flux2_pipeline,
        {"attention_head_dim": 96, "axes_dims_rope": (24, 24, 24, 24)},
        ("--max_sequence_length", "48"),
        edits="references",
    ),
    "flux2-klein-references": Family(
        build_tiny_flux2_klein_pipeline, {"attention_head_dim": 96, "axes_dims_rope": (24,) * 4}, edits="references"
    ),
    # Not widened: its ByT5 projection (2048 x 2048, a width fixed in diffusers) is past ZeRO-3's threshold anyway;
    # 24 Qwen2.5-VL tokens hold the test prompts whole, 5-frame 32x32 clips are 2x2 latents at its VAE's 16x.
    "hunyuan-video-1.5": Family(
        build_tiny_hunyuan_video15_pipeline,
        {"max_length": 24},
        ("--num_frames", str(FRAMES), "--resolution", "32", "--max_sequence_length", "24"),
        video=True,
    ),
    # editing rows (one source; two for Plus); the prompt encoding reads the sources: no flips, no prompt dropout
    "qwen-image-edit": Family(
        build_tiny_qwen_image_edit_pipeline,
        {"attention_head_dim": 96, "axes_dims_rope": (32, 32, 32)},
        ("--max_sequence_length", "32", *EDITING_ARGS),
        edits="one source",
    ),
    "qwen-image-edit-plus": Family(
        build_tiny_qwen_image_edit_plus_pipeline,
        {"attention_head_dim": 96, "axes_dims_rope": (32, 32, 32)},
        ("--max_sequence_length", "64", *EDITING_ARGS),
        edits="references",
    ),
    # The user turn's template takes 8 tokens of its prompt. A call pads its prompts to the longest, which moves the
    # image's RoPE frame index (docs/qwen_image21.md): with prompt dropout's empty prompt in some micro-batches, one
    # process's padding would differ from each of two processes', whatever the engine. The captions are equally long.
    "qwen-image-2.1": Family(
        build_tiny_qwen_image21_pipeline,
        {"attention_head_dim": 96, "axes_dims_rope": (32, 32, 32)},
        ("--max_sequence_length", "32", "--proportion_empty_prompts", "0"),
    ),
}

_DATA = {None: "data", "one source": "edit-data", "references": "reference-data"}  # the saved datasets by kind

_ASSETS: dict[tuple[str, str], dict] = {}


def family_assets(root: Path, kind: str) -> dict:
    """The family's widened tiny pipeline saved under ``root`` (built once), as a user's local folders."""
    if (str(root), kind) not in _ASSETS:
        family = FAMILIES[kind]
        pipe = family.build(seed=0, tokenizer_dir=str(root / f"tok-{kind}"), **family.build_kwargs)
        pipe.save_pretrained(root / kind)
        _ASSETS[str(root), kind] = {
            "root": root / f"runs-{kind}",
            "pipeline": root / kind,
            "data": root / _DATA[family.edits] if not family.video else root / "video-data",
            "example": "flow",
        }
        _ASSETS[str(root), kind]["root"].mkdir()
    return _ASSETS[str(root), kind]
