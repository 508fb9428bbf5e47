"""The one pass's buffer in pieces (``safeguards/gradients/one_pass.py``): how many, and where they are cut.

The store takes a piece's memory when the backward first reaches one of its weights and gives it back before the
next forward, so where activations set the peak the pass adds about two pieces' rows to it; ``estimate.py`` counts
that. Decided here, read by both.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["MAX_PIECES", "PIECE_ELEMENTS", "piece_bounds", "piece_count"]

# The one pass's buffer (safeguards/gradients/one_pass.py) is held in pieces of about this many weights (256 MiB of a
# float32 row), at most MAX_PIECES of them (each costs a few operations a step). SD1.5's UNet (860M weights) takes 13
# pieces: where activations set the peak the pass adds two pieces' rows (about 0.5 GiB) to it; SDXL's (2.6B) 16
# pieces, about 1.3 GiB.
PIECE_ELEMENTS = 1 << 26
MAX_PIECES = 16


def piece_count(elements: int) -> int:
    """How many pieces the one pass's buffer over ``elements`` trained weights takes: ``ceil(elements /``
    :data:`PIECE_ELEMENTS` ``)``, at least 1 and at most :data:`MAX_PIECES`."""
    return max(1, min(MAX_PIECES, -(-elements // max(PIECE_ELEMENTS, 1))))


def piece_bounds(sizes: Sequence[int]) -> list[int]:
    """Where the one pass's pieces start and end, as indices into ``sizes`` (the weights' element counts, in order):
    ``[0, ..., len(sizes)]``, consecutive weights cut into :func:`piece_count` pieces of similar size (fewer where
    there are fewer weights: a weight is never cut)."""
    total = sum(sizes)
    count = min(piece_count(total), max(1, len(sizes)))
    bounds, filled = [0], 0
    for i, size in enumerate(sizes[:-1]):
        filled += size
        if len(bounds) < count and filled >= total * len(bounds) / count:
            bounds.append(i + 1)
    bounds.append(len(sizes))
    return bounds
