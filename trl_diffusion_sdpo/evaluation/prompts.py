"""Prompt sets for evaluation: a text file (one prompt per line), a ``datasets`` dataset / Hub id / local folder with a
prompt column, or a named preset of the benchmarks the Diffusion-DPO/SDPO papers report on.

Presets (the loading code is the same for the Hub and a local copy: pass ``path=`` to point a preset at a folder):

- ``pickapic_v2``: Pick-a-Pic v2 test prompts, ``yuvalkirstain/pickapic_v2`` split ``validation_unique``, column
  ``caption``, deduplicated in order (487 prompts in the SDPO authors' list), read with ``streaming=True`` so the
  image columns of the other splits are not downloaded;
- ``partiprompts``: ``nateraw/parti-prompts`` split ``train``, column ``Prompt`` (1632 prompts);
- ``hpdv2``: the HPDv2 benchmark prompts, ``zhwang/HPDv2`` ``benchmark/{anime,concept-art,paintings,photo}.json``
  (800 each, 3200 in all, kept with their duplicates as the benchmark does). Those files are JSON lists of strings,
  which ``datasets``' JSON builder cannot read, so they are fetched with ``hf_hub_download`` (or read from a local
  folder holding the four files).
- ``hpdv3``: the prompts of HPDv3's test pairs, ``MizzenAI/HPDv3`` ``test.json`` (a JSON array of pair records:
  ``prompt``, ``path1`` the preferred image, ``path2``, ``choice_dist``, ``confidence``, ``model1``, ``model2``; the
  layout ``data.formats.read_hpd`` reads for training), deduplicated in order, since a prompt has several pairs.
  Only ``test.json`` is fetched (``hf_hub_download``), not the images; ``path=`` is a folder holding ``test.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

__all__ = ["PROMPT_PRESETS", "PromptPreset", "load_prompts"]


@dataclass(frozen=True)
class PromptPreset:
    """Where a benchmark's prompts live and how to read them."""

    path: str
    column: str | None
    split: str | None = None
    deduplicate: bool = False
    streaming: bool = False
    # JSON files inside ``path`` instead of a ``datasets`` dataset: lists of strings (HPDv2) or, with ``column``,
    # arrays of records holding the prompt under ``column`` (HPDv3's pair annotations).
    files: tuple[str, ...] = ()

    def at(self, path: str) -> PromptPreset:
        """The same preset read from another location (a local copy)."""
        return replace(self, path=path)


PROMPT_PRESETS: dict[str, PromptPreset] = {
    "pickapic_v2": PromptPreset(
        "yuvalkirstain/pickapic_v2", "caption", split="validation_unique", deduplicate=True, streaming=True
    ),
    "partiprompts": PromptPreset("nateraw/parti-prompts", "Prompt", split="train"),
    "hpdv2": PromptPreset(
        "zhwang/HPDv2",
        None,
        files=tuple(f"benchmark/{style}.json" for style in ("anime", "concept-art", "paintings", "photo")),
    ),
    "hpdv3": PromptPreset("MizzenAI/HPDv3", "prompt", deduplicate=True, files=("test.json",)),
}


def _dedupe(prompts: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(prompts))


def _json_prompts(values: object, column: str | None, path: str) -> list[str]:
    """The prompts of one preset file: a JSON list of strings, or (``column`` set) of records with a string
    prompt under ``column``; anything else is an error naming the first entry that does not fit."""
    if not isinstance(values, list):
        raise ValueError(f"{path} should hold a JSON list, not a {type(values).__name__}.")
    if column is None:
        if not all(isinstance(v, str) for v in values):
            raise ValueError(f"{path} should hold a JSON list of prompt strings.")
        return list(values)
    prompts = []
    for index, record in enumerate(values):
        prompt = record.get(column) if isinstance(record, dict) else None
        if not isinstance(prompt, str):
            found = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"{path}: record {index} has no string {column!r} (found {found}).")
        prompts.append(prompt)
    return prompts


def _from_json_lists(preset: PromptPreset) -> list[str]:
    prompts: list[str] = []
    for name in preset.files:
        local = os.path.join(preset.path, name)
        if os.path.isdir(preset.path):
            if not os.path.isfile(local):
                raise FileNotFoundError(f"{local} is missing; the preset reads {list(preset.files)} in {preset.path}.")
            path = local
        else:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(preset.path, name, repo_type="dataset")
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
        prompts += _json_prompts(values, preset.column, path)
    return prompts


def _from_dataset(dataset, column: str | None, source: str) -> list[str]:
    names = list(dataset.column_names or [])
    if column is None:
        candidates = [c for c in ("prompt", "caption", "Prompt", "text") if c in names]
        if not candidates:
            raise ValueError(f"{source} has no prompt column among {names}; pass column=... to name it.")
        column = candidates[0]
    if names and column not in names:
        raise ValueError(f"{source} has no column {column!r}; its columns are {names}.")
    return [str(row[column]) for row in dataset.select_columns([column])]


def _load_dataset_prompts(path: str, column: str | None, split: str | None, streaming: bool) -> list[str]:
    from datasets import DatasetDict, IterableDatasetDict, load_dataset

    loaded = load_dataset(path, split=split, streaming=streaming)
    if isinstance(loaded, (DatasetDict, IterableDatasetDict)):
        if len(loaded) != 1:
            raise ValueError(f"{path} has splits {list(loaded)}; pass split=... to choose one.")
        loaded = next(iter(loaded.values()))
    return _from_dataset(loaded, column, path)


def load_prompts(
    source: str | Sequence[str] | object,
    column: str | None = None,
    split: str | None = None,
    path: str | None = None,
    limit: int | None = None,
    deduplicate: bool | None = None,
) -> list[str]:
    """The prompts of ``source``, in order.

    Args:
        source: a preset name (see `PROMPT_PRESETS`), a ``.txt`` file (one prompt per line, blank lines skipped), a
            ``datasets`` ``Dataset``, a Hub dataset id or local dataset folder/file, or a list of strings.
        column: the prompt column (default: the preset's, else the first of prompt, caption, Prompt, text).
        split: the split to read (default: the preset's; a dataset with a single split needs none).
        path: read a preset from this location (a local copy) instead of its Hub id.
        limit: keep the first ``limit`` prompts (after deduplication).
        deduplicate: drop repeated prompts, keeping the first (default: the preset's choice, else False).
    """
    preset = PROMPT_PRESETS.get(source) if isinstance(source, str) else None
    if path is not None and preset is None:
        raise ValueError(f"path= relocates a preset; {source!r} is not one of {sorted(PROMPT_PRESETS)}.")
    if preset is not None:
        preset = preset.at(path) if path is not None else preset
        if preset.files:
            prompts = _from_json_lists(preset)
        else:
            prompts = _load_dataset_prompts(
                preset.path, column or preset.column, split or preset.split, preset.streaming
            )
        dedupe = preset.deduplicate if deduplicate is None else deduplicate
    elif isinstance(source, str) and source.endswith(".txt"):
        if not os.path.isfile(source):
            raise FileNotFoundError(f"Prompt file {source} does not exist.")
        with open(source, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
        dedupe = bool(deduplicate)
    elif isinstance(source, str):
        prompts = _load_dataset_prompts(source, column, split, streaming=False)
        dedupe = bool(deduplicate)
    elif hasattr(source, "column_names"):
        prompts = _from_dataset(source, column, type(source).__name__)
        dedupe = bool(deduplicate)
    else:
        prompts = [str(p) for p in source]
        dedupe = bool(deduplicate)
    if dedupe:
        prompts = _dedupe(prompts)
    if limit is not None:
        prompts = prompts[:limit]
    if not prompts:
        raise ValueError(f"No prompts found in {source!r}.")
    return prompts
