"""The random crop (``random_crop``), drawn by the trainer with keyed draws so that a resumed run crops exactly as the
uninterrupted one: the collator hands on each pair resized, not cropped, zero-padded to the batch's largest
(:func:`padded_pairs`, with each image's size), and the step crops them on the device (:func:`crop_pairs`). A run
without ``random_crop`` never loads this module.
"""

from __future__ import annotations

import torch

__all__ = ["crop_pairs", "padded_pairs"]


def padded_pairs(pairs: list[list[torch.Tensor]], pixel_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Resized pairs (``[3, h, w]`` each, or ``[3, F, h, w]`` video clips) zero-padded into ``[B, 2, 3, H, W]`` (or
    ``[B, 2, 3, F, H, W]``), and their sizes ``[B, 2, 2]``; ``pixel_shape`` is one cropped item's, for no pair."""
    if not pairs:
        return torch.empty(0, 2, *pixel_shape), torch.empty(0, 2, 2)
    height = max(image.shape[-2] for pair in pairs for image in pair)
    width = max(image.shape[-1] for pair in pairs for image in pair)
    padded = torch.zeros(len(pairs), 2, *pairs[0][0].shape[:-2], height, width)
    sizes = torch.zeros(len(pairs), 2, 2)
    for i, pair in enumerate(pairs):
        for k, image in enumerate(pair):
            padded[i, k, ..., : image.shape[-2], : image.shape[-1]] = image
            sizes[i, k, 0], sizes[i, k, 1] = image.shape[-2], image.shape[-1]
    return padded, sizes


def crop_pairs(inputs: dict[str, torch.Tensor], fractions: torch.Tensor, resolution: int) -> dict[str, torch.Tensor]:
    """Random-crop a batch of resized pairs (``pixel_values [B, 2, 3, H, W]`` zero-padded, or video pairs
    ``[B, 2, 3, F, H, W]``; ``crop_sizes [B, 2, 2]`` their ``(h, w)``) to ``resolution``, on the device with no host
    read.

    ``fractions [B, 2]`` (``(top, left)`` uniforms in [0, 1) shared by the pair) or ``[B, 2, 2]`` (one per image)
    give the offsets as torchvision's ``RandomCrop`` draws them, each valid offset equally likely:
    ``offset = min(floor(f * (size - res + 1)), size - res)``. Returns the inputs with the cropped ``pixel_values``,
    ``time_ids`` holding the offsets, and ``time_ids_flipped`` (when present) the offsets in the mirrored view
    (``width - res - left``). A ``loss_mask [B, 2, 1, H, W]`` is cropped with its image.
    """
    pixels, sizes = inputs["pixel_values"], inputs["crop_sizes"].to(inputs["pixel_values"].device)
    masked = "loss_mask" in inputs
    if masked:  # one more channel, cropped alike (for a video, every frame's)
        mask = inputs["loss_mask"].to(pixels)
        if pixels.dim() == 6:
            mask = mask.unsqueeze(3).expand(-1, -1, -1, pixels.shape[3], -1, -1)
        pixels = torch.cat([pixels, mask], dim=2)
    leading = pixels.shape[2:-2]  # (3,) for images, (3, F) for video clips: every frame gets its video's crop
    pixels = pixels.reshape(*pixels.shape[:2], -1, *pixels.shape[-2:])
    batch, _, channels, height, width = pixels.shape
    fractions = fractions.to(sizes).reshape(batch, -1, 2).expand(batch, 2, 2)
    margin = sizes - resolution
    offsets = torch.minimum(torch.floor(fractions * (margin + 1)), margin)  # [B, 2, (top, left)]
    span = torch.arange(resolution, device=pixels.device)
    rows = (offsets[..., 0].long().reshape(-1, 1) + span)[:, :, None]  # [2B, R, 1]
    cols = (offsets[..., 1].long().reshape(-1, 1) + span)[:, None, :]  # [2B, 1, R]
    images = torch.arange(2 * batch, device=pixels.device)[:, None, None]
    flat = pixels.reshape(2 * batch, channels, height, width).permute(0, 2, 3, 1)  # [2B, H, W, C]
    cropped = flat[images, rows, cols].permute(0, 3, 1, 2).reshape(batch, 2, *leading, resolution, resolution)
    time_ids = inputs["time_ids"].clone()
    time_ids[..., 2:4] = offsets.to(time_ids)
    out = dict(inputs, pixel_values=cropped, time_ids=time_ids)
    if masked:
        out["pixel_values"], mask = cropped[:, :, :-1], cropped[:, :, -1:]
        out["loss_mask"] = mask[:, :, :, 0] if mask.dim() == 6 else mask
    if "time_ids_flipped" in inputs:
        flipped = time_ids.clone()
        flipped[..., 3] = (sizes[..., 1] - resolution - offsets[..., 1]).to(flipped)
        out["time_ids_flipped"] = flipped
    return out
