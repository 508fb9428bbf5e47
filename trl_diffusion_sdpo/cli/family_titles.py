"""The model families as the command line's helps name them, importing nothing (the family registry imports torch,
which a ``--help`` does not): ``train --help`` lists every family, ``evaluate --help`` those it samples, the image
families (:func:`evaluated_family_titles`). ``tests/training/test_cli_help.py`` holds both to the family registry
(:func:`~trl_diffusion_sdpo.families.registered_families`, each family's ``video``)."""

from __future__ import annotations

__all__ = ["FAMILY_TITLES", "VIDEO_FAMILIES", "evaluated_family_titles"]

# Each registered family (trl_diffusion_sdpo.families) as the helps name it, in the order they list them.
FAMILY_TITLES = {
    "stable-diffusion": "SD 1.x/2.x",
    "stable-diffusion-xl": "SDXL",
    "stable-diffusion-3": "SD3/SD3.5",
    "flux": "FLUX.1",
    "flux-kontext": "FLUX.1 Kontext",
    "flux2": "FLUX.2",
    "flux2-klein": "FLUX.2 [klein]",
    "qwen-image": "Qwen-Image",
    "qwen-image-2.1": "Qwen-Image 2.1",
    "qwen-image-edit": "Qwen-Image-Edit",
    "qwen-image-edit-plus": "Qwen-Image-Edit Plus",
    "z-image": "Z-Image",
    "wan": "Wan",
    "hunyuan-video-1.5": "HunyuanVideo 1.5",
}
# The families whose samples are clips (a family's ``video``): ``evaluate`` samples images, and clips are evaluated
# from Python (trl_diffusion_sdpo.evaluation.sample_videos, docs/evaluation.md).
VIDEO_FAMILIES = frozenset({"wan", "hunyuan-video-1.5"})


def evaluated_family_titles() -> list[str]:
    """The families ``evaluate`` samples (every family of :data:`FAMILY_TITLES` but the video ones), as named."""
    return [title for name, title in FAMILY_TITLES.items() if name not in VIDEO_FAMILIES]
