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

A prompt set of **edits** (`load_prompt_set`, `load_edits`) pairs each instruction with its source image(s): a JSONL
file (or a JSON array) of records, a ``datasets`` dataset / Hub id / ``save_to_disk`` folder, or a list of dicts,
whose rows carry the instruction in the prompt column and either ``source_image`` (one image) or ``source_images``
(a list, multi-image editing). An image is a path (relative to the JSONL file's folder), bytes, a ``datasets`` image
or a PIL image. Every source is decoded (`trl_diffusion_sdpo.data.transforms.load_image`) when the set is read, so a
missing or unreadable source is named by row and column before anything is generated.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .. import data as preference_data  # light: its modules are imported when a name is first used
from ..config.messages import advice, file_syntax_error

__all__ = ["PROMPT_PRESETS", "EditPrompt", "PromptPreset", "load_edits", "load_prompt_set", "load_prompts"]

# The columns of an editing row that hold its source image(s): one image, or a list of them (multi-image editing).
SOURCE_COLUMNS = ("source_image", "source_images")
PROMPT_COLUMNS = ("prompt", "caption", "Prompt", "text")


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


def _hub_dataset_unreachable(path: str) -> str | None:
    """Why the Hub dataset ``path`` cannot be read here (not local, in neither cache, and the Hub not asked,
    unreachable or without it: :func:`~trl_diffusion_sdpo.data.formats.hub_dataset_problem`), or ``None``."""
    if os.path.exists(path):
        return None
    from datasets import config
    from huggingface_hub import constants

    cached = [
        os.path.join(constants.HF_HUB_CACHE, "datasets--" + path.replace("/", "--")),
        os.path.join(config.HF_DATASETS_CACHE, path.replace("/", "___")),
    ]
    if any(os.path.isdir(folder) for folder in cached):
        return None  # the loaders read their caches, offline too
    return preference_data.hub_dataset_problem(path)


def check_prompt_dataset(path: str, preset: str | None = None) -> None:
    """Refuse in one line, before the ``datasets`` loader retries an unreachable Hub for half a minute, prompts from a
    Hub dataset (``preset``'s, if one names it) that cannot be read here."""
    problem = _hub_dataset_unreachable(path)
    if problem is not None:
        named = f"{preset} (the Hub dataset {path})" if preset else path
        raise FileNotFoundError(
            f"{advice('--prompts', 'prompts')} {named}: no such file or folder, not in the Hugging Face cache, "
            f"{problem}. Give a .txt file of prompts (one a line), a local dataset folder, or a preset's local copy "
            f"({advice('--prompt_path PATH', 'path=...')})."
        )


def _from_json_lists(preset: PromptPreset, name_of: str | None = None) -> list[str]:
    prompts: list[str] = []
    if not os.path.isdir(preset.path):
        check_prompt_dataset(preset.path, name_of)
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
        candidates = [c for c in PROMPT_COLUMNS if c in names]
        if not candidates:
            raise ValueError(f"{source} has no prompt column among {names}; pass column=... to name it.")
        column = candidates[0]
    if names and column not in names:
        raise ValueError(f"{source} has no column {column!r}; its columns are {names}.")
    return [str(row[column]) for row in dataset.select_columns([column])]


def _load_dataset(path: str, split: str | None, streaming: bool, preset: str | None = None):
    """``load_dataset(path)`` (or ``load_from_disk`` for a ``save_to_disk`` folder), reduced to one split; a Hub
    dataset that cannot be read here is refused first (:func:`check_prompt_dataset`)."""
    from datasets import DatasetDict, IterableDatasetDict, load_dataset, load_from_disk

    if os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json")):
        loaded = load_from_disk(path)
        if isinstance(loaded, DatasetDict) and split is not None:
            loaded = loaded[split]
    else:
        check_prompt_dataset(path, preset)
        loaded = load_dataset(path, split=split, streaming=streaming)
    if isinstance(loaded, (DatasetDict, IterableDatasetDict)):
        if len(loaded) != 1:
            raise ValueError(f"{path} has splits {list(loaded)}; pass split=... to choose one.")
        loaded = next(iter(loaded.values()))
    return loaded


def _load_dataset_prompts(
    path: str, column: str | None, split: str | None, streaming: bool, preset: str | None = None
) -> list[str]:
    return _from_dataset(_load_dataset(path, split, streaming, preset), column, path)


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
            prompts = _from_json_lists(preset, source)
        else:
            prompts = _load_dataset_prompts(
                preset.path, column or preset.column, split or preset.split, preset.streaming, source
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


# -- edits ----------------------------------------------------------------------------------------------------------


def _pixels_digest(images: Sequence[Any]) -> str:
    """SHA-1 of decoded RGB images (size and pixels, in order): the same picture read from a file, from bytes or
    from a PIL image gives the same digest."""
    digest = hashlib.sha1()
    for image in images:
        digest.update(f"{image.size[0]}x{image.size[1]};".encode())
        digest.update(image.tobytes())
    return digest.hexdigest()[:20]


@dataclass(frozen=True, eq=False)
class EditPrompt:
    """An editing instruction and its source image(s), one row of a prompt set of edits.

    ``sources`` holds the images as the set gave them (absolute paths, bytes, ``datasets`` image dicts or PIL
    images), decoded again by `images` when they are needed, so a large set is not held decoded in memory.
    ``column`` is ``"source_image"`` (one source) or ``"source_images"`` (a list: multi-image editing); pairs are
    written back under the same column. ``digest`` is the SHA-1 of the decoded pixels (computed, and every source
    decoded, when left empty): it keys the image cache, so an edited image is never reused for another source.
    """

    prompt: str
    sources: tuple[Any, ...]
    column: str = "source_image"
    digest: str = field(default="")

    def __post_init__(self) -> None:
        if self.column not in SOURCE_COLUMNS:
            raise ValueError(f"column must be one of {list(SOURCE_COLUMNS)}, got {self.column!r}.")
        if not self.sources:
            raise ValueError(f"An edit needs at least one source image ({self.prompt!r} has none).")
        if self.column == "source_image" and len(self.sources) != 1:
            raise ValueError(f"source_image holds one image; {len(self.sources)} sources go in source_images.")
        object.__setattr__(self, "sources", tuple(self.sources))
        if not self.digest:
            object.__setattr__(self, "digest", _pixels_digest(self.images()))

    def images(self) -> list:
        """The sources decoded to 8-bit RGB PIL images (`trl_diffusion_sdpo.data.transforms.load_image`)."""
        return [preference_data.load_image(value) for value in self.sources]

    def paths(self) -> list[str | None]:
        """Each source's file path where it was given as one (a string, or a ``datasets`` image dict with a path and
        no bytes), else None."""
        out: list[str | None] = []
        for value in self.sources:
            if isinstance(value, str):
                out.append(value)
            elif isinstance(value, Mapping) and value.get("bytes") is None and isinstance(value.get("path"), str):
                out.append(value["path"])
            else:
                out.append(None)
        return out


def _is_blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _edit_row(row: Mapping[str, Any], index: int, column: str | None, base: str | None, problems: list[str]):
    """The `EditPrompt` of one row, or None after appending its problems (named by row and column) to ``problems``.
    Every source is decoded here, so an unreadable one is found before any generation."""
    prompt_column = column or next((c for c in PROMPT_COLUMNS if c in row), PROMPT_COLUMNS[0])
    prompt = row.get(prompt_column)
    bad = len(problems)
    if not isinstance(prompt, str) or not prompt.strip():
        problems.append(f"row {index}, column {prompt_column!r}: no instruction (got {prompt!r})")
    present = [c for c in SOURCE_COLUMNS if not _is_blank(row.get(c))]
    if not present:
        named = [c for c in SOURCE_COLUMNS if c in row] or list(SOURCE_COLUMNS)
        problems.append(f"row {index}, column {' / '.join(repr(c) for c in named)}: the source image is missing")
        return None
    if len(present) == 2:
        problems.append(f"row {index}: both 'source_image' and 'source_images' are set; a row has one or the other")
        return None
    source_column = present[0]
    value = row[source_column]
    if source_column == "source_image":
        if isinstance(value, (list, tuple)):
            problems.append(
                f"row {index}, column 'source_image': holds a list of {len(value)}; several sources go in "
                "source_images"
            )
            return None
        values, labels = [value], [f"row {index}, column 'source_image'"]
    else:
        if not isinstance(value, (list, tuple)) or not value:
            problems.append(
                f"row {index}, column 'source_images': should be a non-empty list of images, got {value!r}"
            )
            return None
        values = list(value)
        labels = [f"row {index}, column 'source_images' (image {k})" for k in range(len(values))]
    resolved, decoded = [], []
    for value, label in zip(values, labels):
        if base is not None:
            if isinstance(value, str):
                value = preference_data.resolve_path(value, base)
            elif isinstance(value, Mapping) and value.get("bytes") is None and isinstance(value.get("path"), str):
                value = {**value, "path": preference_data.resolve_path(value["path"], base)}
        try:
            decoded.append(preference_data.load_image(value))
        except Exception as err:  # missing file, not an image, undecodable mode: named, not raised one by one
            problems.append(f"{label}: cannot read {_shown(value)} ({type(err).__name__}: {err})")
            continue
        resolved.append(value)
    if len(problems) > bad:
        return None
    return EditPrompt(prompt.strip(), tuple(resolved), source_column, _pixels_digest(decoded))


def _shown(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, Mapping):
        return repr(value.get("path")) if value.get("bytes") is None else f"{len(value['bytes'])} bytes"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"{len(value)} bytes"
    return f"a {type(value).__name__}"


def _edits_from_rows(rows: Iterable[Mapping[str, Any]], column: str | None, base: str | None, where: str):
    problems: list[str] = []
    edits = [_edit_row(row, index, column, base, problems) for index, row in enumerate(rows)]
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ValueError(
            f"{where}: {len(problems)} problem(s) in the prompt set of edits (rows counted from 0; nothing was "
            f"generated):\n  {shown}{more}"
        )
    return edits


def _json_records(path: str) -> list | None:
    """The records of a JSONL file or a JSON array of objects; None for anything else (a dict of columns, ...)."""
    with open(path, encoding="utf-8") as f:
        if path.lower().endswith(".jsonl"):
            records = []
            for number, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        records.append(json.loads(line.rstrip("\r\n")))  # an error located on its line
                    except json.JSONDecodeError as err:
                        raise ValueError(file_syntax_error(path, err, line=number)) from err
        else:
            try:
                records = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(file_syntax_error(path, err)) from err
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        return None
    return records


def _has_sources(names: Iterable[str]) -> bool:
    return any(c in SOURCE_COLUMNS for c in names)


def _undecoded(dataset):
    """``dataset`` with its source image columns left undecoded (``{"bytes", "path"}`` dicts), so reading the rows
    does not hold every image decoded."""
    from datasets import Image as ImageFeature
    from datasets import List

    for name in SOURCE_COLUMNS:
        feature = (dataset.features or {}).get(name)
        if isinstance(feature, ImageFeature) and feature.decode:
            dataset = dataset.cast_column(name, ImageFeature(decode=False))
        elif isinstance(getattr(feature, "feature", None), ImageFeature) and feature.feature.decode:
            dataset = dataset.cast_column(name, List(ImageFeature(decode=False)))
    return dataset


def _dataset_edits(dataset, column: str | None, where: str, base: str | None, limit: int | None, dedupe: bool):
    names = list(dataset.column_names or [])
    if column is not None and column not in names:
        raise ValueError(f"{where} has no column {column!r}; its columns are {names}.")
    if column is None and not any(c in names for c in PROMPT_COLUMNS):
        raise ValueError(f"{where} has no prompt column among {names}; pass column=... to name it.")
    if limit is not None and not dedupe and hasattr(dataset, "select"):
        dataset = dataset.select(range(min(limit, len(dataset))))
    keep = [c for c in names if c in SOURCE_COLUMNS or c == column or (column is None and c in PROMPT_COLUMNS)]
    dataset = _undecoded(dataset.select_columns(keep))
    return _edits_from_rows(iter(dataset), column, base, where)


def _finish_edits(edits: list[EditPrompt], limit: int | None, dedupe: bool, source: object) -> list[EditPrompt]:
    if dedupe:  # the first of each (instruction, source pixels), in order
        seen: set[tuple[str, str]] = set()
        edits = [e for e in edits if (e.prompt, e.digest) not in seen and not seen.add((e.prompt, e.digest))]
    if limit is not None:
        edits = edits[:limit]
    if not edits:
        raise ValueError(f"No edits found in {source!r}.")
    return edits


def load_edits(
    source: str | Sequence[Mapping[str, Any] | EditPrompt] | object,
    column: str | None = None,
    split: str | None = None,
    limit: int | None = None,
    deduplicate: bool | None = None,
) -> list[EditPrompt]:
    """The edits of ``source``, in order: a ``.jsonl`` file or ``.json`` array of records (source paths relative to
    the file's folder), a ``datasets`` ``Dataset``, a Hub id / local dataset folder / ``save_to_disk`` folder, or a
    list of row dicts or `EditPrompt`. Each row holds the instruction (``column``, default the first of prompt,
    caption, Prompt, text) and ``source_image`` or ``source_images``.

    Every source is decoded here: a missing or unreadable source, a row with no source, with both columns or without
    an instruction is named by row (counted from 0) and column in one ``ValueError``, before any generation.
    ``limit`` keeps the first edits; ``deduplicate`` drops a repeated (instruction, source pixels) pair.
    """
    edits = _read_edits(source, column, split, limit, bool(deduplicate))
    if edits is None:
        raise ValueError(
            f"{source!r} holds no source_image or source_images column: it is a text-to-image prompt set "
            "(load it with load_prompts)."
        )
    return edits


def _read_edits(source, column, split, limit, dedupe) -> list[EditPrompt] | None:
    """`load_edits`' reading, or None when ``source`` has no source column (a text-to-image prompt set)."""
    if isinstance(source, str) and source in PROMPT_PRESETS:
        return None
    if isinstance(source, str) and source.lower().endswith((".jsonl", ".json")) and os.path.isfile(source):
        records = _json_records(source)
        if records is None or not any(_has_sources(r) for r in records):
            return None
        if limit is not None and not dedupe:
            records = records[:limit]
        base = os.path.dirname(os.path.abspath(source))
        return _finish_edits(_edits_from_rows(records, column, base, source), limit, dedupe, source)
    if isinstance(source, str) and source.lower().endswith(".txt"):
        return None
    if isinstance(source, str):
        dataset = _load_dataset(source, split, streaming=False)
        if not _has_sources(dataset.column_names or []):
            return None
        base = source if os.path.isdir(source) else None
        return _finish_edits(_dataset_edits(dataset, column, source, base, limit, dedupe), limit, dedupe, source)
    if hasattr(source, "column_names"):
        if not _has_sources(source.column_names or []):
            return None
        where = type(source).__name__
        return _finish_edits(_dataset_edits(source, column, where, None, limit, dedupe), limit, dedupe, where)
    items = list(source)
    if items and all(isinstance(item, EditPrompt) for item in items):
        return _finish_edits(items, limit, dedupe, "the edits")
    if items and all(isinstance(item, Mapping) for item in items):
        if not any(_has_sources(item) for item in items):
            return None
        rows = items[:limit] if limit is not None and not dedupe else items
        return _finish_edits(_edits_from_rows(rows, column, os.getcwd(), "the edit rows"), limit, dedupe, "rows")
    if any(isinstance(item, (EditPrompt, Mapping)) for item in items):
        raise ValueError(
            "A list prompt set holds strings (text-to-image) or edits (row dicts or EditPrompt), not both."
        )
    return None


def load_prompt_set(
    source: str | Sequence[str] | Sequence[Mapping[str, Any] | EditPrompt] | object,
    column: str | None = None,
    split: str | None = None,
    path: str | None = None,
    limit: int | None = None,
    deduplicate: bool | None = None,
) -> list[str] | list[EditPrompt]:
    """What `evaluate` and `make_pairs` sample: the edits of ``source`` when its rows carry ``source_image`` or
    ``source_images`` (`load_edits`), else its prompts (`load_prompts`, which also reads the presets)."""
    if path is None:
        edits = _read_edits(source, column, split, limit, bool(deduplicate))
        if edits is not None:
            return edits
    return load_prompts(source, column=column, split=split, path=path, limit=limit, deduplicate=deduplicate)
