"""A sharded, resumable latent cache for datasets one process cannot hold: ``trl-diffusion-sdpo cache``.

``cache_latents=True`` (:mod:`.latent_cache`) encodes a map-style dataset on the main process. For Pick-a-Pic-sized
data (about a million pairs) this module spreads the same encoding over every process of an ``accelerate launch``
and over time:

* each process takes its own shard of the dataset (a contiguous block of a map-style dataset, or
  ``datasets.distributed.split_dataset_by_node`` of a streamed one) and reads it as a stream;
* it encodes the shard in chunks of ``chunk_size`` source rows, each chunk through :func:`.build_latent_cache` itself
  (the same VAE posterior, flipped views, prompt embeddings, ``time_ids`` and scores, stored the same way), and moves
  the chunk's Arrow table into ``shards/`` under a name that says which process and chunk wrote it;
* after each chunk it records its progress (chunks and rows done, the counts of dropped rows and, for a stream,
  ``IterableDataset.state_dict()``), so a run that is killed resumes after its last finished chunk and writes the
  same files as an uninterrupted one;
* when every process is done the main process writes ``manifest.json``; training reads the shards streamed with
  :func:`load_sharded_latent_cache`, never loading them whole.

Layout of the cache folder::

    spec.json                    settings (model, resolution, flips, columns, processes, chunk size, dataset)
    empty_prompt.safetensors     the empty prompt's embedding, for prompt dropout
    shards/rank-00000-of-00002-chunk-000000.arrow ...
    progress/rank-00000.json     each process's progress (what a resumed run continues from)
    manifest.json                written last: the shards and the counts

Ties are dropped and counted as in :func:`~trl_diffusion_sdpo.data.prepare_preference_dataset`; an invalid row
raises a ``ValueError`` naming its row and column unless ``skip_invalid_rows``, which drops and counts it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import torch
from datasets import Dataset, IterableDataset, load_dataset
from datasets import logging as datasets_logging
from datasets.distributed import split_dataset_by_node
from datasets.formatting.formatting import NumpyArrowExtractor
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ..config.messages import OutputExistsError, advice, overwrite_advice, replacing_refusal
from ..families import ModelFamily, PromptEmbeddings
from .columns import PreferenceColumns, is_tie
from .latent_cache import (
    CACHE_VERSION,
    CachedPreferenceCollator,
    LatentCache,
    build_latent_cache,
    encoding_settings,
    settings_mismatches,
)
from .pickapic import as_trl_form
from .validation import (
    DataReport,
    resolve_columns,
    row_check,
    video_clip,
    with_undecoded_images,
)

__all__ = [
    "ArrowRowsCollator",
    "ShardedLatentCache",
    "build_sharded_latent_cache",
    "load_sharded_latent_cache",
    "refuse_other_files",
]

logger = logging.getLogger(__name__)

SPEC_NAME = "spec.json"
MANIFEST_NAME = "manifest.json"
EMPTY_PROMPT_NAME = "empty_prompt.safetensors"
# What a cache folder holds, each with the temporary files of its atomic writes (named after it): anything else there
# was not written by a cache.
CACHE_ENTRIES = (SPEC_NAME, MANIFEST_NAME, EMPTY_PROMPT_NAME, "shards", "progress")


@dataclass
class ShardProgress:
    """What one process has finished: written after every chunk, read back on resume."""

    chunks: int = 0
    rows_read: int = 0
    pairs: int = 0
    ties_dropped: int = 0
    invalid_skipped: int = 0
    finished: bool = False
    dataset_state: dict[str, Any] | None = None  # IterableDataset.state_dict() after the last finished chunk
    # The kept pairs' images by decoded size ("WxH" -> how many), read by the row checks; None in the progress of a
    # cache begun by a version that did not count them, so that a resumed cache never reports part of its images.
    image_sizes: dict[str, int] | None = None


@dataclass
class ShardedLatentCache(LatentCache):
    """A cache written by :func:`build_sharded_latent_cache`, read streamed: ``dataset`` is an ``IterableDataset``
    of one-row Arrow tables, which :class:`ArrowRowsCollator` turns into the cached collator's tensors."""

    manifest: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def columns(self) -> PreferenceColumns:
        columns = dict(self.manifest["columns"])
        columns.pop("label", None)  # written by caches made before the label form was mapped to TRL's
        return PreferenceColumns(**columns)

    def report(self) -> DataReport:
        m = self.manifest
        sizes = m.get("image_sizes")  # absent from the manifests of caches written before sizes were counted
        return DataReport(
            num_rows=m["rows_read"],
            invalid_skipped=m["invalid_skipped"],
            ties_dropped=m["ties_dropped"],
            num_kept=m["num_pairs"],
            image_sizes=None if sizes is None else {_size_of(key): count for key, count in sizes.items()},
            image_sizes_unknown="" if sizes is not None or self.columns.clip else "a cache that did not record them",
        )

    def collator(self) -> ArrowRowsCollator:
        """The batch collator for this cache: flipped views when it has them, pair scores when it has scores."""
        return ArrowRowsCollator(CachedPreferenceCollator(with_flipped=self.flipped))

    def check_matches(self, family: ModelFamily, args) -> None:
        """Raise, naming each setting, if this cache was not encoded as the run ``args`` (a ``DiffusionSDPOConfig``)
        with ``family`` would encode: the same :func:`~.latent_cache.encoding_settings` the in-trainer cache's
        fingerprint hashes (family, frozen weights and configs, tokenizers and ``max_sequence_length``, resolution,
        flips, video frames, image conversion), and a loss mask where the run trains on one."""
        wanted = encoding_settings(family, args.resolution, bool(args.random_flip), video_clip(args))
        problems = settings_mismatches(self.manifest["settings"], wanted)
        masked = bool(getattr(args, "loss_mask", False))
        if masked != self.columns.masked:
            problems.append(
                f"loss masks: built {'with' if self.columns.masked else 'without'}, wanted "
                f"{'with' if masked else 'without'}"
            )
        if problems:
            raise ValueError(
                f"The latent cache in {self.directory} was not built for this run: {'; '.join(problems)}. Rebuild "
                "it with `trl-diffusion-sdpo cache` for this model and these settings, or train with the settings "
                "it was built with."
            )


class ArrowRowsCollator:
    """Batch one-row Arrow tables from a streamed cache into the tensors :class:`CachedPreferenceCollator` expects.

    The rows are concatenated and read with ``datasets``' own Arrow-to-NumPy extraction (no Python lists, dtypes
    kept: ``scores`` stay float64, so the pair scores equal those of the uncached path), then handed to ``collate``.
    """

    def __init__(self, collate: CachedPreferenceCollator) -> None:
        self.collate = collate
        self._extract = NumpyArrowExtractor()

    def __call__(self, rows: list[pa.Table]) -> dict[str, torch.Tensor]:
        batch = self._extract.extract_batch(pa.concat_tables(rows))
        n = len(rows)
        as_rows = [
            {k: (v[i].tolist() if k == "scores" else torch.from_numpy(v[i])) for k, v in batch.items()}
            for i in range(n)
        ]
        return self.collate(as_rows)


# ---------------------------------------------------------------------------------------------------------- writing


def _write_json(path: str, value: Any, tag: str = "") -> None:
    """Write ``value`` as JSON atomically (a reader never sees half a file, a kill never leaves one); ``tag`` keeps
    the temporary files of processes writing the same file apart."""
    temporary = f"{path}.{tag}.tmp"
    with open(temporary, "w") as f:
        json.dump(value, f, indent=1, sort_keys=True)
    os.replace(temporary, path)


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def shard_name(rank: int, world_size: int, chunk: int) -> str:
    return f"rank-{rank:05d}-of-{world_size:05d}-chunk-{chunk:06d}.arrow"


def process_shard(dataset: Dataset | IterableDataset, rank: int, world_size: int) -> IterableDataset:
    """This process's part of ``dataset``, as a stream: a contiguous block of a map-style dataset, or
    ``split_dataset_by_node`` of a streamed one (whole files per process when their count divides evenly, else every
    ``world_size``-th row)."""
    if isinstance(dataset, Dataset):
        return dataset.shard(world_size, rank, contiguous=True).to_iterable_dataset()
    return split_dataset_by_node(dataset, rank=rank, world_size=world_size)


def _chunks(stream: IterableDataset, chunk_size: int) -> Iterator[tuple[list[dict], dict[str, Any]]]:
    """``(rows, state)`` per chunk of ``chunk_size`` rows, ``state`` being the stream's state after the chunk."""
    rows: list[dict] = []
    for row in stream:
        rows.append(row)
        if len(rows) == chunk_size:
            yield rows, stream.state_dict()
            rows = []
    if rows:
        yield rows, stream.state_dict()


def build_sharded_latent_cache(
    dataset: Dataset | IterableDataset,
    args: Any,
    family: ModelFamily,
    output_dir: str,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    chunk_size: int = 1000,
    batch_size: int = 8,
    barrier: Callable[[], None] = lambda: None,
    dataset_id: dict[str, Any] | None = None,
    progress: bool = True,
    max_chunks: int | None = None,
    overwrite: bool = False,
) -> ShardedLatentCache | None:
    """Encode this process's shard of ``dataset`` into ``output_dir`` (resuming where an earlier run stopped); every
    process must call it. Returns the finished cache on every process, or ``None`` when ``max_chunks`` stopped this
    call early (the folder is then resumable).

    Args:
        dataset: the raw preference dataset (map-style or streamed), TRL form (Pick-a-Pic's is mapped to it:
            :func:`~.pickapic.as_trl_form`).
        args: a :class:`~trl_diffusion_sdpo.DiffusionSDPOConfig` (columns, ``resolution``, ``random_flip``,
            ``random_crop`` (must be ``False``), ``skip_invalid_rows``, ``loss_type`` for score columns).
        family: the pipeline's model family (VAE, text encoders, tokenizers).
        output_dir: the cache folder.
        rank: this process's index.
        world_size: the number of processes.
        device: where to encode.
        chunk_size: source rows per chunk: the unit of resumption and of one shard file.
        batch_size: pairs per VAE batch.
        barrier: waits for every process (``accelerator.wait_for_everyone``).
        dataset_id: what identifies the dataset (name, split, streaming, row limit): a resumed run must match it.
        progress: show a progress bar per process.
        max_chunks: stop after encoding this many chunks in this call (to test resumption; ``None``: all).
        overwrite: replace a cache ``output_dir`` holds that was built with other settings, and write the cache into
            a folder holding other files; both are refused otherwise, before anything is written (resuming a cache of
            the same settings never needs it).
    """
    if chunk_size < 1 or batch_size < 1:
        raise ValueError(f"chunk_size and batch_size must be >= 1, got {chunk_size} and {batch_size}")
    if getattr(args, "random_crop", False):
        raise ValueError(
            "The latent cache stores center crops: set random_crop=False (a random crop cannot be cached)"
        )
    dataset = as_trl_form(dataset, args)
    if isinstance(dataset, Dataset):
        names = dataset.column_names
    else:
        names = dataset.column_names or list(next(iter(dataset)).keys())
    columns = resolve_columns(names, args)
    if columns.edits:
        raise ValueError(
            f"the sharded cache does not store editing data yet (column {columns.source!r}): train with "
            "cache_latents=True, which caches the source latents beside the edited images', or without a cache"
        )
    spec = {
        "cache_version": CACHE_VERSION,
        # What the cached values depend on besides the data, as the in-trainer cache's fingerprint hashes it.
        "settings": encoding_settings(family, args.resolution, bool(args.random_flip), columns.clip),
        "family": family.name,
        "resolution": args.resolution,
        "flipped": bool(args.random_flip),
        "columns": dataclasses.asdict(columns),
        "skip_invalid_rows": bool(args.skip_invalid_rows),
        "world_size": world_size,
        "chunk_size": chunk_size,
        "map_style": isinstance(dataset, Dataset),
        "dataset": dataset_id or {},
    }
    refuse_other_files(output_dir, overwrite)  # read by every process before any writes
    spec_path = os.path.join(output_dir, SPEC_NAME)
    if rank == 0:
        if overwrite and os.path.exists(spec_path) and _read_json(spec_path) != spec:
            logger.warning("Replacing the latent cache in %s, built with other settings (overwrite)", output_dir)
            _remove_cache(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        if not os.path.exists(spec_path):
            _write_json(spec_path, spec, "0")
    barrier()
    for folder in ("shards", "progress"):
        os.makedirs(os.path.join(output_dir, folder), exist_ok=True)
    _check_spec(_read_json(spec_path), spec, output_dir)

    progress_path = os.path.join(output_dir, "progress", f"rank-{rank:05d}.json")
    fresh = ShardProgress(image_sizes={})  # a cache begun now counts its images' sizes from its first row
    done = ShardProgress(**_read_json(progress_path)) if os.path.exists(progress_path) else fresh
    if not done.finished:
        stream = with_undecoded_images(process_shard(dataset, rank, world_size).select_columns(columns.all), columns)
        if done.dataset_state is not None:
            stream.load_state_dict(done.dataset_state)
        total = None
        if isinstance(dataset, Dataset):
            total = len(dataset) // world_size + (rank < len(dataset) % world_size)
        bar = tqdm(
            total=total,
            initial=done.rows_read,
            desc=f"Caching latents (process {rank})",
            unit="row",
            position=rank,
            disable=not progress,
        )
        encoded = 0
        scratch = os.path.join(output_dir, "progress", f"scratch-{rank:05d}")
        for rows, state in _chunks(stream, chunk_size):
            if max_chunks is not None and encoded == max_chunks:
                break
            kept = _usable_rows(rows, columns, args.skip_invalid_rows, done)
            if kept:
                _encode_chunk(
                    kept, columns, family, args, output_dir, scratch, rank, world_size, done.chunks, device, batch_size
                )
            done.chunks += 1
            done.rows_read += len(rows)
            done.pairs += len(kept)
            done.dataset_state = state
            _write_json(progress_path, dataclasses.asdict(done), str(rank))
            encoded += 1
            bar.update(len(rows))
        else:
            done.finished = True
            _write_json(progress_path, dataclasses.asdict(done), str(rank))
        bar.close()
        shutil.rmtree(scratch, ignore_errors=True)
    barrier()
    # Every process that finds all finished writes the (identical) manifest: after the barrier that is all of them,
    # and it also completes a cache whose processes ran one after another.
    if _all_finished(output_dir, world_size):
        _write_manifest(output_dir, spec, world_size, tag=str(rank))
    barrier()
    if not os.path.exists(os.path.join(output_dir, MANIFEST_NAME)):
        return None
    return load_sharded_latent_cache(output_dir)


def _written_by_a_cache(name: str) -> bool:
    """Whether an entry of a cache folder is one a cache writes (:data:`CACHE_ENTRIES` or a temporary file of one)."""
    return any(name == entry or name.startswith(f"{entry}.") for entry in CACHE_ENTRIES)


def _other_entries(output_dir: str) -> list[str]:
    """What ``output_dir`` holds that a cache did not write, sorted."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(name for name in os.listdir(output_dir) if not _written_by_a_cache(name))


def refuse_other_files(output_dir: str, overwrite: bool = False) -> None:
    """Refuse, unless ``overwrite``, a cache folder holding anything a cache did not write (a training run, other
    files): ``trl-diffusion-sdpo cache`` asks before it loads the model, :func:`build_sharded_latent_cache` again."""
    others = _other_entries(output_dir)
    if others and not overwrite:
        ways = [f"pass {overwrite_advice()} to write it among them"]
        ways.append(f"write it into a new {advice('--latent_cache', 'output_dir')}")
        raise OutputExistsError(replacing_refusal(output_dir, "a latent cache", ways, found=others))


def _remove_cache(output_dir: str) -> None:
    """Delete a cache's own files from ``output_dir``, leaving anything else there."""
    for name in os.listdir(output_dir):
        if _written_by_a_cache(name):
            path = os.path.join(output_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)


def _check_spec(found: dict[str, Any], expected: dict[str, Any], output_dir: str) -> None:
    differing = sorted(k for k in set(found) | set(expected) if found.get(k) != expected.get(k))
    if differing:
        details = "; ".join(f"{k}: {found.get(k)!r} there, {expected.get(k)!r} now" for k in differing)
        ways = ["resume it with the same settings and number of processes"]
        ways += [f"pass {overwrite_advice()} to replace it", "use a new folder"]
        held = f"a latent cache built with other settings ({details})"
        raise ValueError(replacing_refusal(output_dir, "this cache", ways, held))


# Skipped rows named in a warning per process; the manifest counts them all.
_NAMED_SKIPS = 5


def _usable_rows(
    rows: list[dict], columns: PreferenceColumns, skip_invalid_rows: bool, done: ShardProgress
) -> list[dict]:
    """The rows to encode: ties dropped and counted; an invalid row raises (naming it) or is dropped and counted."""
    kept = []
    for offset, row in enumerate(rows):
        column, reason, sizes = row_check(row, columns)
        if column:
            if not skip_invalid_rows:
                raise ValueError(
                    f"Invalid row {done.rows_read + offset} of this process's shard, column {column!r}: {reason}. "
                    f"Fix the data or set {advice('--skip_invalid_rows true', 'skip_invalid_rows=True')} to skip and "
                    "count such rows."
                )
            done.invalid_skipped += 1
            if done.invalid_skipped <= _NAMED_SKIPS:  # the first few named, the rest counted in the manifest
                logger.warning(
                    "Skipping invalid row %d of this process's shard (skip_invalid_rows=True), column %r: %s",
                    done.rows_read + offset,
                    column,
                    reason,
                )
        elif is_tie(row, columns):
            done.ties_dropped += 1
        else:
            kept.append(row)
            if done.image_sizes is not None:
                for width, height in sizes:
                    key = f"{width}x{height}"
                    done.image_sizes[key] = done.image_sizes.get(key, 0) + 1
    return kept


def _size_of(key: str) -> tuple[int, int]:
    """``(width, height)`` of a ``"WxH"`` key of :attr:`ShardProgress.image_sizes`."""
    width, height = key.split("x")
    return int(width), int(height)


def _encode_chunk(
    rows: list[dict],
    columns: PreferenceColumns,
    family: ModelFamily,
    args: Any,
    output_dir: str,
    scratch: str,
    rank: int,
    world_size: int,
    chunk: int,
    device: torch.device | str,
    batch_size: int,
) -> None:
    """Encode ``rows`` with :func:`build_latent_cache` in a scratch folder and move its table into ``shards/``."""
    shutil.rmtree(scratch, ignore_errors=True)  # a chunk an earlier run was killed in the middle of
    table = Dataset.from_list(rows)
    was_enabled = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()  # one bar per process, not one per chunk
    try:
        cache = build_latent_cache(
            table,
            columns,
            family,
            resolution=args.resolution,
            random_flip=args.random_flip,
            cache_dir=scratch,
            device=device,
            batch_size=batch_size,
            split=f"chunk {chunk}",
        )
    finally:
        if was_enabled:
            datasets_logging.enable_progress_bar()
    source = os.path.join(cache.directory, "latents.arrow")
    empty = os.path.join(output_dir, EMPTY_PROMPT_NAME)
    if not os.path.exists(empty):
        shutil.copyfile(os.path.join(cache.directory, EMPTY_PROMPT_NAME), empty + f".{rank}.tmp")
        os.replace(empty + f".{rank}.tmp", empty)
    del cache
    os.replace(source, os.path.join(output_dir, "shards", shard_name(rank, world_size, chunk)))
    shutil.rmtree(scratch, ignore_errors=True)


def _all_finished(output_dir: str, world_size: int) -> bool:
    paths = [os.path.join(output_dir, "progress", f"rank-{r:05d}.json") for r in range(world_size)]
    return all(os.path.exists(p) and _read_json(p)["finished"] for p in paths)


def _write_manifest(output_dir: str, spec: dict[str, Any], world_size: int, tag: str) -> None:
    progress = [_read_json(os.path.join(output_dir, "progress", f"rank-{r:05d}.json")) for r in range(world_size)]
    shards = sorted(os.listdir(os.path.join(output_dir, "shards")))
    manifest = {
        **spec,
        "shards": shards,
        "num_pairs": sum(p["pairs"] for p in progress),
        "rows_read": sum(p["rows_read"] for p in progress),
        "ties_dropped": sum(p["ties_dropped"] for p in progress),
        "invalid_skipped": sum(p["invalid_skipped"] for p in progress),
        "image_sizes": _summed_sizes([p.get("image_sizes") for p in progress]),
    }
    _write_json(os.path.join(output_dir, MANIFEST_NAME), manifest, tag)
    logger.info("Latent cache complete in %s: %d pairs in %d shards", output_dir, manifest["num_pairs"], len(shards))


# ---------------------------------------------------------------------------------------------------------- reading


def _summed_sizes(counts: list[dict[str, int] | None]) -> dict[str, int] | None:
    """The processes' image counts by size added up; ``None`` when one of them did not count."""
    if any(count is None for count in counts):
        return None
    total: dict[str, int] = {}
    for count in counts:
        for key, n in count.items():
            total[key] = total.get(key, 0) + n
    return total


def load_sharded_latent_cache(directory: str) -> ShardedLatentCache:
    """Open a finished cache for streamed reading: ``datasets.load_dataset("arrow", ..., streaming=True)`` over its
    shards in (process, chunk) order, formatted as one-row Arrow tables (batched by :class:`ArrowRowsCollator`).

    Pass it as the trainer's ``train_dataset`` (and set ``max_steps``: a stream has no length).
    """
    path = os.path.join(directory, MANIFEST_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{directory} holds no finished latent cache (no {MANIFEST_NAME}); run `trl-diffusion-sdpo cache` "
            "(again, to resume) until every process has finished."
        )
    manifest = _read_json(path)
    if manifest["cache_version"] != CACHE_VERSION:
        raise ValueError(
            f"The latent cache in {directory} has version {manifest['cache_version']}, this package writes "
            f"{CACHE_VERSION}; rebuild it."
        )
    files = [os.path.join(directory, "shards", name) for name in manifest["shards"]]
    stream = load_dataset("arrow", data_files=files, split="train", streaming=True).with_format("arrow")
    empty = load_file(os.path.join(directory, EMPTY_PROMPT_NAME))
    return ShardedLatentCache(
        dataset=stream,
        empty_prompt=PromptEmbeddings(empty["prompt_embeds"], empty.get("pooled_prompt_embeds")),
        directory=directory,
        flipped=manifest["flipped"],
        manifest=manifest,
    )
