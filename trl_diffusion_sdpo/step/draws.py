"""Keyed random draws: every random choice of a training micro-batch comes from a generator seeded by
``(seed, optimizer step, micro-batch index)``, and is drawn for the global micro-batch.

A resumed run then draws exactly what the uninterrupted one did (the draws depend on no global RNG state), and a
pair gets the same flip, prompt dropout, timestep, noise and posterior sample whatever the number of processes, as
long as the global batch is the same.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch

__all__ = ["keyed_generator", "rank_rows"]


def keyed_generator(seed: int, step: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded by a hash of ``(seed, step, index)`` (independent streams for neighbouring keys)."""
    key = f"{seed}/{step}/{index}".encode()
    derived = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
    return torch.Generator(device=device).manual_seed(derived)


def rank_rows(
    draw: Callable[[int], tuple[torch.Tensor, ...]],
    local_rows: int,
    rows_per_process: int,
    process_index: int,
    num_processes: int,
) -> tuple[torch.Tensor, ...]:
    """This process's rows of draws made for all processes at once.

    ``draw(n)`` returns tensors of ``n`` rows each; every process makes the same draw for
    ``num_processes * rows_per_process`` rows (same generator state) and keeps rows
    ``[process_index * rows_per_process, ... + local_rows)`` of each.
    """
    rows_per_process = max(rows_per_process, local_rows)
    start = process_index * rows_per_process
    return tuple(t[start : start + local_rows] for t in draw(num_processes * rows_per_process))
