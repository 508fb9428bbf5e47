"""Videos to training pixels: reading a clip of ``num_frames`` frames at ``frame_stride`` from a file or from frames,
and resizing and cropping both videos of a pair the same way.

A video value is one of: a path to a file (mp4, webm, anything FFmpeg reads), its encoded bytes, a ``{"bytes",
"path"}`` dict (an undecoded ``datasets.Video``), a ``uint8`` array ``[F, H, W, 3]`` (or the nested lists
``datasets`` stores it as), or a list of frames (PIL images, ``[H, W, 3]`` arrays, image bytes or dicts). Files are
decoded with PyAV (the ``video`` extra: ``pip install trl-diffusion-sdpo[video]``), only as far as the last frame
the clip needs.

The clip is frames ``0, s, 2s, ..., (n - 1) s`` (``n = num_frames``, ``s = frame_stride``): a video with fewer than
``(n - 1) s + 1`` frames is a bad value (the row is named and refused, or skipped with ``skip_invalid_rows``).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from .transforms import PairTransform, load_image, mirrored_time_ids

__all__ = ["VideoClip", "VideoPairTransform", "clip_problem", "read_video"]


@dataclass(frozen=True)
class VideoClip:
    """Which frames of a video the model sees: ``num_frames`` frames, every ``frame_stride``-th from the first."""

    num_frames: int
    frame_stride: int = 1

    def __post_init__(self) -> None:
        if self.num_frames < 1 or self.frame_stride < 1:
            raise ValueError(f"num_frames and frame_stride must be >= 1, got {self.num_frames}, {self.frame_stride}")

    @property
    def span(self) -> int:
        """Frames of the source video the clip reaches: ``(num_frames - 1) * frame_stride + 1``."""
        return (self.num_frames - 1) * self.frame_stride + 1

    def pick(self, frames: list[Image.Image]) -> list[Image.Image]:
        """The clip's frames of ``frames`` (the first :attr:`span` frames of a video, or more)."""
        if len(frames) < self.span:
            raise ValueError(
                f"video has {len(frames)} frames; num_frames={self.num_frames} at frame_stride={self.frame_stride} "
                f"needs {self.span}"
            )
        return frames[: self.span : self.frame_stride]


def _decode_file(source: str | bytes, limit: int) -> list[Image.Image]:
    """The first ``limit`` frames of an encoded video (a path or its bytes), RGB."""
    try:
        import av
    except ImportError:
        raise ImportError(
            "Reading video files needs PyAV: pip install 'trl-diffusion-sdpo[video]' (or pip install av)"
        ) from None
    frames: list[Image.Image] = []
    with av.open(io.BytesIO(source) if isinstance(source, bytes) else source) as container:
        if not container.streams.video:
            raise ValueError("the file has no video stream")
        for frame in container.decode(video=0):
            frames.append(frame.to_image().convert("RGB"))
            if len(frames) >= limit:
                break
    if not frames:
        raise ValueError("the video has no frames")
    return frames


def _frame(value: Any) -> Image.Image:
    if isinstance(value, np.ndarray):
        return Image.fromarray(_uint8_rgb(value, "frame"))
    return load_image(value)


def _uint8_rgb(array: np.ndarray, what: str) -> np.ndarray:
    if array.dtype != np.uint8:
        raise ValueError(f"{what} array must be uint8 (0-255), got {array.dtype}")
    if array.shape[-1] != 3:
        raise ValueError(f"{what} array must have 3 (RGB) channels last, got shape {tuple(array.shape)}")
    return array


def read_video(value: Any, clip: VideoClip) -> list[Image.Image]:
    """The ``clip.num_frames`` frames of ``value`` (see the module docstring for the accepted forms), RGB; a
    ValueError saying why when the value is missing, unreadable or too short."""
    if value is None:
        raise ValueError("video is missing (None)")
    if isinstance(value, dict) and (value.get("bytes") is not None or value.get("path")):
        value = value["bytes"] if value.get("bytes") is not None else value["path"]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return clip.pick(_decode_file(bytes(value), clip.span))
    if isinstance(value, str):
        return clip.pick(_decode_file(value, clip.span))
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], (list, tuple)):
        value = np.asarray(value, dtype=np.uint8)  # datasets' nested lists of an array feature
    if isinstance(value, np.ndarray):
        if value.ndim != 4:
            raise ValueError(f"video array must be [frames, height, width, 3], got shape {tuple(value.shape)}")
        array = _uint8_rgb(value, "video")
        return clip.pick([Image.fromarray(array[i]) for i in range(min(len(array), clip.span))])
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("video has no frames (empty list)")
        return clip.pick([_frame(frame) for frame in value[: clip.span]])
    raise ValueError(f"cannot read a video from a {type(value).__name__}")


def clip_problem(value: Any, clip: VideoClip) -> str:
    """Empty string if the clip of ``value`` reads (every frame it needs decoded), else the reason."""
    try:
        read_video(value, clip)
        return ""
    except Exception as err:  # PyAV and PIL raise many types for corrupt data
        return f"cannot read video: {err}"


class VideoPairTransform:
    """Read both videos of a pair and give ``pixels [2, 3, F, R, R]`` in [-1, 1] (winner, loser) and ``time_ids
    [2, 6]`` (those of the first frames; only SDXL reads them).

    Every frame of both videos is resized (shorter side ``resolution``) and centre-cropped like an image
    (:class:`~.transforms.PairTransform`), so the pair shares the crop. With ``random_crop`` the collator only
    resizes (:meth:`resized_pair`) and the trainer crops each clip with its keyed draws, every frame of a video at
    the same offset and both videos at the same relative position (each its own with ``independent_augmentation``;
    :func:`~trl_diffusion_sdpo.data.random_crop.crop_pairs`). The flip is the trainer's too, over the width axis, which
    mirrors every frame at once.
    """

    def __init__(self, resolution: int, clip: VideoClip, random_crop: bool = False) -> None:
        self.resolution = resolution
        self.clip = clip
        self.random_crop = random_crop
        self._frames = PairTransform(resolution)

    @property
    def pixel_shape(self) -> tuple[int, ...]:
        """The shape of one video's pixels: ``(3, num_frames, resolution, resolution)``."""
        return 3, self.clip.num_frames, self.resolution, self.resolution

    def mask(self, mask: Image.Image, resized_only: bool = False) -> torch.Tensor:
        """A pair's loss mask ``[1, R, R]`` (one for every frame), resized and cropped as each frame is."""
        return self._frames.mask(mask, resized_only)

    def load(self, value: Any) -> list[Image.Image]:
        """The clip's frames of ``value`` (:func:`read_video`)."""
        return read_video(value, self.clip)

    def __call__(
        self, winner: list[Image.Image], loser: list[Image.Image], train: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self._frames(w, lo, train=False) for w, lo in zip(winner, loser)]  # [2, 3, R, R] per frame
        pixels = torch.stack([p for p, _ in pairs], dim=2)  # [2, 3, F, R, R]
        return pixels, pairs[0][1]

    def resized_pair(
        self, winner: list[Image.Image], loser: list[Image.Image]
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """For the trainer's keyed random crop: both clips resized, not cropped (``[3, F, h, w]`` each, in [-1, 1]),
        and the ``time_ids [2, 6]`` of their first frames with crop offsets 0."""
        pixels, time_ids = [], []
        for video in (winner, loser):
            frames, ids = zip(*(self._frames.resized_pair(frame, frame) for frame in video))
            pixels.append(torch.stack([f[0] for f in frames], dim=1))  # [3, F, h, w]
            time_ids.append(ids[0][0])
        return pixels, torch.stack(time_ids)

    def center_crop_pair(
        self, winner: list[Image.Image], loser: list[Image.Image], flip: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The centre-cropped view of a pair, mirrored or not, as the trainer sees it (for the latent cache)."""
        pixels, time_ids = self(winner, loser, train=False)
        if flip:
            return pixels.flip(-1), mirrored_time_ids(time_ids)
        return pixels, time_ids
