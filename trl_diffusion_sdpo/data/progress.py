"""``datasets``' progress bars follow the trainer's ``disable_tqdm``, within what the program allows."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import datasets

__all__ = ["datasets_progress_bars"]


@contextmanager
def datasets_progress_bars(enabled: bool) -> Iterator[None]:
    """Hide ``datasets``' progress bars (``map``, ``filter``, ...) inside the block unless ``enabled``, then restore
    the global setting, so one trainer's ``disable_tqdm`` does not leak into the rest of the program. Bars the
    program turned off (``datasets.disable_progress_bars()``, as every command does off a terminal) stay off."""
    was_enabled = datasets.is_progress_bar_enabled()
    if enabled or not was_enabled:
        yield
        return
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.enable_progress_bars()
