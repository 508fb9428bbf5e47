"""Text-to-video flow families: what Wan and HunyuanVideo 1.5 share about video data.

Both train on clips of ``num_frames = Tk + 1`` frames (a causal 3D VAE keeps the first frame and compresses the others
``T``-fold in time, ``T = 4`` for both), whose latents are ``[N, C, F', h, w]`` with ``F' = (num_frames - 1) / T + 1``
and ``h, w`` the frame size over the VAE's spatial factor, as the pipelines' ``prepare_latents`` size them. A subclass
states where its VAE keeps the two factors and its latent channel count
(:attr:`~VideoFlowMatchingFamily.temporal_compression`, :attr:`~VideoFlowMatchingFamily.spatial_compression`,
:attr:`~VideoFlowMatchingFamily.latent_channels`); the clip-length checks and the latent shape are here, once.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

from .flow import FlowMatchingFamily, FlowNoiser

__all__ = ["VideoFlowMatchingFamily"]


class VideoFlowMatchingFamily(FlowMatchingFamily):
    """A rectified-flow text-to-video family: video pairs, clip lengths ``Tk + 1``, latents ``[N, C, F', h, w]``."""

    video = True
    # The clip lengths the num_frames refusal suggests: what the pipeline samples by default, and shorter ones.
    suggested_num_frames: ClassVar[str]
    # Frames per clip, from the config (:meth:`noiser`): what online training samples.
    num_frames: int | None = None

    @property
    @abc.abstractmethod
    def temporal_compression(self) -> int:
        """Frames per latent frame after the first (the VAE's temporal factor)."""

    @property
    @abc.abstractmethod
    def latent_channels(self) -> int:
        """Channels of the VAE's latents."""

    def latent_shape(self, resolution: int, num_frames: int = 1) -> tuple[int, int, int, int]:
        """``(C, F', h, w)`` of the latents of a ``num_frames``-frame clip of ``resolution``-pixel square frames: the
        VAE keeps the first frame and compresses the others :attr:`temporal_compression`-fold in time and
        :attr:`spatial_compression`-fold in space."""
        side = resolution // self.spatial_compression
        return self.latent_channels, (num_frames - 1) // self.temporal_compression + 1, side, side

    def sampling_keywords(self, resolution: int, sources: list[Any] | None = None) -> dict[str, Any]:
        """Clips of the training's length (``num_frames``, set from the config by :meth:`noiser`)."""
        return {**super().sampling_keywords(resolution, sources), "num_frames": self.num_frames}

    def noiser(self, args: Any) -> FlowNoiser:
        """The flow noiser (see :meth:`FlowMatchingFamily.noiser`), after checking the clip length (video data,
        ``num_frames``, of ``Tk + 1`` frames) and that no image validation grids are asked for."""
        frames = getattr(args, "num_frames", None)
        temporal = self.temporal_compression
        if frames is None:
            raise ValueError(
                f"{self.name} trains on videos: set num_frames (frames per clip, {temporal}k + 1, e.g. "
                f"{self.suggested_num_frames}) and optionally frame_stride"
            )
        if (frames - 1) % temporal != 0:
            raise ValueError(
                f"num_frames must be {temporal}k + 1 for {self.name} (its VAE keeps the first frame and compresses "
                f"the others {temporal}x in time), got {frames}"
            )
        self.num_frames = frames
        return super().noiser(args)

    def check_validation_sampling(self) -> None:
        """The validation callback samples and logs image grids; clips are sampled with evaluation.sample_videos."""
        raise ValueError(
            f"ValidationCallback samples image grids during training, which {self.name} (video) does not support "
            "yet; leave it out and evaluate with trl_diffusion_sdpo.evaluation.sample_videos / score_videos"
        )
