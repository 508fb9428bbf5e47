"""The held-out probe's pairs in an online run (``probe_steps``): prompts the training never samples, each paired once
before training with the run's own generation, then kept fixed for every probe.

    held-out prompts (the eval prompts' first ``probe_pairs``, or ``probe_pairs`` held back from the training prompts)
    -> K samples each with the policy as it is before its first optimizer step (the run's sampler settings and
    reward; the noise keyed by the probe's seed) -> the best against the worst -> this process's share of the pairs

An online run's pairs are its own samples, so the probe's are too: sampled as the run samples, scored by the run's
reward, but with image seeds under the probe's key (:func:`~trl_diffusion_sdpo.callbacks.probe.probe_seed` in place
of the run's ``seed``, generation 0, the prompt's index among the held-out ones), never the training stream's. The
prompts are encoded outside the training's prompt cache, and the process's random states (torch, numpy, Python) are
put back after the pairing, so a run whose probe never acts trains bit for bit as the same run without it. The pairs
are made when the trainer is built, from the initial policy, so a run resumed from a checkpoint holds the same pairs
as the uninterrupted one. Every process samples every held-out prompt (the seeds do not depend on the process) and
keeps its share of the pairs; the probe reduces the sums over processes.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from datasets import Dataset, IterableDataset

from ..callbacks.probe import first_rows, held_back_seed, hold_back_rows, probe_seed
from .generation import GeneratedPairs, GenerationSettings, GenerationStage

__all__ = [
    "PROBE_PAIR_MODE",
    "ProbePairs",
    "held_out_pairs",
    "hold_back_prompts",
    "pair_share",
    "probe_generation_settings",
    "random_states_kept",
]

#: the probe's pairs are the best sample of a prompt against its worst, whatever the run's ``pair_mode``
PROBE_PAIR_MODE = "best-worst"


def hold_back_prompts(train_dataset: Any, eval_dataset: Any, args: Any) -> tuple[Any, Dataset | None]:
    """``(train_dataset, held)``: the online run's probe prompts (``None`` without ``probe_steps``): the first
    ``probe_pairs`` of ``eval_dataset``'s prompts, else ``probe_pairs`` prompts held back from ``train_dataset`` as
    the offline probe holds rows back (:func:`~trl_diffusion_sdpo.callbacks.probe.hold_back_pairs`): drawn at random
    with ``probe_pairs_seed`` (else the run's ``seed``), stratified where prompts repeat; a streamed dataset's first
    ones. The trainer pairs them."""
    if not getattr(args, "probe_steps", None):
        return train_dataset, None
    count = args.probe_pairs
    if eval_dataset is None:
        if isinstance(train_dataset, IterableDataset):
            return hold_back_rows(train_dataset, count, "prompts")
        return hold_back_rows(train_dataset, count, "prompts", seed=held_back_seed(args))
    held = first_rows(eval_dataset, count)
    if len(held) < count:
        raise ValueError(
            f"probe_pairs={count}: the eval_dataset holds only {len(held)} prompts; lower probe_pairs or give more "
            "prompts"
        )
    return train_dataset, Dataset.from_list(held)


def probe_generation_settings(settings: GenerationSettings) -> GenerationSettings:
    """The run's generation settings with the probe's seed and one pair per prompt (best against worst), scored in
    the calling thread."""
    return dataclasses.replace(
        settings, seed=probe_seed(settings.seed), pair_mode=PROBE_PAIR_MODE, async_rewards=False
    )


@contextmanager
def random_states_kept(device: torch.device | str) -> Iterator[None]:
    """Whatever draws from the process's global generators inside (a pipeline, a reward function) leaves torch's,
    numpy's and Python's as they were (``torch.random.fork_rng``, ``np.random.get_state``, ``random.getstate``)."""
    devices = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


@dataclass
class ProbePairs:
    """The probe's pairs: this process's share (``batch``, ``None`` for none) and what the start summary states."""

    batch: dict[str, Any] | None
    prompts: int
    pairs: int
    generated: GeneratedPairs


def pair_share(batch: dict[str, Any], pairs: int, index: int, processes: int) -> dict[str, Any] | None:
    """Process ``index``'s share of a pair batch of ``pairs`` pairs: pairs ``[index * s, (index + 1) * s)`` with
    ``s = pairs // processes`` (the rest evaluated by none, as offline), its tensors sliced along their first
    dimension."""
    share = pairs // processes
    if share == 0:
        raise ValueError(
            f"the probe's held-out prompts gave {pairs} pairs for {processes} processes (a prompt whose samples score "
            "alike, or closer than reward_margin, gives none): raise probe_pairs"
        )
    rows = slice(index * share, (index + 1) * share)
    out: dict[str, Any] = {}
    for key, value in batch.items():
        out[key] = value[rows] if isinstance(value, torch.Tensor) and value.dim() and len(value) == pairs else value
    return out


def held_out_pairs(trainer: Any, prompts: Dataset) -> ProbePairs:
    """``prompts``' pairs for the probe of the online ``trainer``, sampled now (before its first optimizer step) and
    this process's share kept on the device."""
    args, accelerator = trainer.args, trainer.accelerator
    settings = probe_generation_settings(trainer.generation.settings)
    cache: dict[str, Any] = {}  # the training's prompt cache is left as a run without the probe fills it
    stage = GenerationStage(
        trainer.family,
        trainer.rewards,
        settings,
        lambda texts, sources=None: trainer.encode_prompts(texts, sources, cache=cache),
        args.device,
        accelerator.autocast,
    )
    rows = [prompts[i] for i in range(len(prompts))]
    inputs = {name: [row[name] for row in rows] for name in rows[0]}
    with random_states_kept(args.device):
        generated = stage(inputs, generation=0, first_row=0)
    pairs = len(generated.pairs)
    batch = pair_share(generated.batch, pairs, accelerator.process_index, accelerator.num_processes)
    return ProbePairs(batch, len(rows), pairs, generated)
