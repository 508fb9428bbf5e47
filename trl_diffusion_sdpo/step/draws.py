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

__all__ = ["MicroBatchDraws", "keyed_generator", "rank_rows"]


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


class MicroBatchDraws:
    """Where a micro-batch's random draws come from, and which of them this process keeps.

    Training: a generator keyed by ``(seed, optimizer step, micro-batch within the step)``; evaluation: one CPU
    generator seeded with ``eval_seed`` for a whole ``evaluate()`` (:meth:`start_evaluation`). Every draw is made for
    the global micro-batch (``num_processes`` times the per-device batch) and each process keeps its own rows.
    """

    def __init__(
        self,
        seed: int,
        train_rows: int,
        eval_rows: int,
        process_index: int,
        num_processes: int,
        device: torch.device | str,
    ) -> None:
        self.seed, self.device = seed, device
        self.rows_per_process = {"train": train_rows, "eval": eval_rows}
        self.process_index, self.num_processes = process_index, num_processes
        self._step, self._index = -1, 0  # which micro-batch of which step the training draws are for
        self._eval_generator: torch.Generator | None = None

    def generator(self, mode: str, step: int) -> torch.Generator:
        """The generator of the next micro-batch of optimizer step ``step`` (or of the running evaluation)."""
        if mode == "eval" and self._eval_generator is not None:
            return self._eval_generator
        if step != self._step:
            self._step, self._index = step, 0
        self._index += 1
        return keyed_generator(self.seed, step, self._index - 1, self.device)

    def replay_step(self) -> None:
        """Make the next micro-batch draw again what the current step's first micro-batch drew."""
        self._step = -1

    def start_evaluation(self, eval_seed: int) -> None:
        self._eval_generator = torch.Generator().manual_seed(eval_seed)

    def end_evaluation(self) -> None:
        self._eval_generator = None

    def rows(
        self,
        generator: torch.Generator,
        mode: str,
        local_rows: int,
        draw: Callable[[int, torch.device], tuple[torch.Tensor, ...]],
    ) -> tuple[torch.Tensor, ...]:
        """``draw(n, device)`` for the global micro-batch, on the generator's device; this process's rows, moved to
        the training device."""
        return tuple(
            t.to(self.device)
            for t in rank_rows(
                lambda n: draw(n, generator.device),
                local_rows,
                self.rows_per_process[mode],
                self.process_index,
                self.num_processes,
            )
        )

    def augmentation(
        self, generator: torch.Generator, mode: str, batch: int, independent: bool, cropping: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``flip`` booleans (``[B]``, or ``[B, 2]`` when each image of a pair is augmented on its own), ``drop``
        uniforms ``[B]`` (prompt dropout) and, when ``cropping``, crop fractions (``[B, 2]`` top and left per pair, or
        ``[B, 4]`` per image).

        The winner's flip and the dropout are the first two rows of the draw whatever the options (a generator fills
        rows in order), so the options add rows without changing the others."""
        rows = (3 if independent else 2) + (2 * (2 if independent else 1) if cropping else 0)
        draws = self.rows(
            generator, mode, batch, lambda n, device: tuple(torch.rand((rows, n), generator=generator, device=device))
        )
        flip = torch.stack([draws[0], draws[2]], dim=1) < 0.5 if independent else draws[0] < 0.5
        crop = None
        if cropping:
            first = 3 if independent else 2
            crop = torch.stack(draws[first:], dim=1)  # [B, 2] or [B, 4]: (top, left) per pair or per image
        return flip, draws[1], crop
