"""Video preference rows for the video families."""

from __future__ import annotations

import io

import numpy as np
import pytest
from diffusers import WanPipeline, WanTransformer3DModel

from tests.helpers.common import LORA_TARGETS
from tests.helpers.flow_family_checks import (
    FlowCase,
)
from trl_diffusion_sdpo.testing import build_tiny_wan_pipeline

av = pytest.importorskip("av")

SEQ = 16  # UMT5 tokens in the tests

FRAMES = 5  # 4k + 1: two latent frames

SIZE = (24, 20)  # width, height of the test videos (not square: the crop matters)


def write_video(colour: tuple[int, int, int], frames: int = 6, size: tuple[int, int] = SIZE) -> bytes:
    """An mp4 (MPEG-4 part 2) of :func:`video_frames`."""
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for array in video_frames(colour, frames, size):
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def video_frames(colour: tuple[int, int, int], frames: int = 6, size: tuple[int, int] = SIZE) -> np.ndarray:
    """``[frames, H, W, 3]`` uint8: ``colour`` with a white bar of ``2 + i`` columns in frame ``i``."""
    array = np.zeros((frames, size[1], size[0], 3), np.uint8)
    array[:] = colour
    for i in range(frames):
        array[i, :, : 2 + i] = 255
    return array


def video_rows(n: int = 4) -> list[dict]:
    return [
        {
            "prompt": f"a clip number {i}",
            "chosen": write_video((30 * i, 0, 90)),
            "rejected": write_video((0, 30 * i, 0)),
        }
        for i in range(n)
    ]


CASE = FlowCase(
    build=build_tiny_wan_pipeline,
    pipeline_class=WanPipeline,
    transformer_class=WanTransformer3DModel,
    sequence_length=SEQ,
    lora_targets=tuple(LORA_TARGETS),
    config_values={"resolution": 16, "num_frames": FRAMES},
    sample_shape=(2, 16, 2, 2, 2),  # video latents [N, C, F', h, w]
)
