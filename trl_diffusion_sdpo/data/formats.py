"""Preference data as people keep it, read into the columns the trainer already reads.

Every reader returns an ordinary ``datasets.Dataset`` in TRL's preference form (``prompt``, ``chosen``, ``rejected``,
the images as absolute file paths) or, for a table in Pick-a-Pic form, ``caption``, ``jpg_0``, ``jpg_1``, ``label_0``
(mapped onto TRL's by :mod:`.pickapic`), so that validation (:mod:`.validation`: every bad row named by row and column,
skipped and counted with ``skip_invalid_rows``), the latent cache and training work unchanged. A reader never drops a
row and never opens an image: a missing file, a URL, an unpaired image or an empty caption is kept as a row whose value
validation rejects, and :data:`~.columns.SOURCE_COLUMN` says where it came from (the pair's file name, the
annotation record).

Formats (:func:`detect_format`, or named with ``format=``; see ``docs/data.md`` for a small example of each):

* ``pair_folders`` (read by :mod:`.pair_folders`): one folder per side, files paired by their path inside it, as
  kohya-ss/sd-scripts' preference pull request #1427 lays them out (``w/`` and ``l/``, a caption file beside each
  image), SimpleTuner's Flow-DPO (``win/`` preferred, ``lose/`` rejected) or ``chosen/`` and ``rejected/``; or one
  folder per pair holding ``chosen.<ext>``, ``rejected.<ext>`` and ``prompt.txt`` (this package's convention).
  Captions: ``<name>.txt`` or ``<name>.caption`` beside the chosen image, else beside the rejected one, else at the
  top. The files may be videos (``.mp4``, ``.webm``, ``.mov``, ``.mkv``, ``.avi``, ``.m4v``) instead of images, for the
  video families (Wan): their paths fill the same ``chosen``/``rejected`` columns, read as clips by
  ``VideoPairTransform``; a pair of one image and one video is a bad row, named.
* ``table``: a JSONL, JSON, CSV or TSV file of ``prompt, chosen, rejected`` image paths (relative to the file,
  absolute or ``file://``), read with ``datasets``' ``json`` / ``csv`` builders. Aliases ``caption`` (prompt),
  ``winner`` / ``preferred`` (chosen) and ``loser`` (rejected); ``chosen_score`` / ``rejected_score`` become the
  SmPO score columns ``score_0`` / ``score_1``. Pick-a-Pic columns with paths (``jpg_0``, ``jpg_1``) are kept.
* ``imagefolder``: ``datasets``' image folder with ``metadata.jsonl`` / ``metadata.csv`` naming
  ``chosen_file_name`` and ``rejected_file_name`` (``datasets`` makes them ``chosen`` and ``rejected`` images).
* ``hpd``: the HPDv3 annotation files (``train.json``, ``test.json``, ``all.json``: records of ``prompt``,
  ``path1`` the preferred image, ``path2`` the other, ``choice_dist``, ``confidence``, ``model1``, ``model2``; as
  MizzenAI/HPSv3's README documents them) and HPDv2's ranked form (``prompt``, ``image_path`` a list, ``rank`` a list,
  lower preferred), turned into pairs by ``ranking_pairs``: ``"all"`` (every two images of different rank, better
  first) or ``"best_worst"`` (one pair per prompt).
* Editing rows (docs/editing.md) add the source: a ``source_image`` column (aliases ``input_image``, ``source``) or
  ``source_images`` (a list; alias ``input_images``; in CSV/TSV a JSON array) in a table, paths resolved as the
  others; ``source.<ext>`` (or ``source_0.<ext>``, ``source_1.<ext>``, ... for several) in a pair's folder, or a
  ``source/`` folder beside the side folders holding ``source/<key>.<ext>``; ``source_image_file_name`` in an image
  folder's metadata.
* Loss masks (``loss_mask=True``, docs/masked-loss.md): a ``mask`` column of image paths in a table, resolved as the
  others; ``mask.<ext>`` in a pair's folder, or a ``mask/`` folder beside the side folders holding
  ``mask/<key>.<ext>``; ``mask_file_name`` in an image folder's metadata.
* ``disk`` (a ``save_to_disk`` folder) and ``hub`` (``datasets.load_dataset``: a Hub id or a local data folder), as
  before.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from itertools import combinations
from typing import Any
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

from datasets import Dataset, DatasetDict, IterableDataset

from ..config.checks import Choice
from ..config.messages import file_syntax_error
from .columns import SOURCE_COLUMN
from .errors import DatasetNotFoundError
from .image_files import _URL
from .names import HUB_ID, TABLE_EXTENSIONS, hub_dataset_problem, looks_local, not_found_message
from .pair_folders import SIDE_FOLDERS, pair_root, prompt_text, read_pair_folders
from .pickapic import pickapic_to_trl
from .validation import DataError

__all__ = [
    "COLUMN_LAYOUTS",
    "DatasetNotFoundError",
    "FORMATS",
    "RANKING_PAIRS",
    "detect_format",
    "hub_dataset_problem",
    "load_preference_data",
    "load_preference_dataset",
    "no_data_message",
    "pickapic_to_trl",
    "read_hpd",
    "read_pair_folders",
    "read_table",
    "resolve_path",
]

logger = logging.getLogger(__name__)

FORMATS = ("auto", "pair_folders", "table", "imagefolder", "hpd", "disk", "hub")
RANKING_PAIRS = ("all", "best_worst")
# The column layouts a loader maps onto TRL's (``columns=``): TRL's own, or Pick-a-Pic's (pickapic_to_trl).
COLUMN_LAYOUTS = ("trl", "pickapic")
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
# Names the tables use for the TRL columns, where the TRL name itself is absent.
ALIASES = {"prompt": ("caption",), "chosen": ("winner", "preferred"), "rejected": ("loser",)}
SCORE_ALIASES = {"score_0": "chosen_score", "score_1": "rejected_score"}
# Editing tables: the source column(s) and their aliases (EditReward-style data names the source "input_image").
SOURCE_ALIASES = {"source_image": ("input_image", "source"), "source_images": ("input_images",)}


def load_preference_data(
    name_or_path: str,
    format: str = "auto",
    split: str = "train",
    streaming: bool = False,
    max_rows: int | None = None,
    config_name: str | None = None,
    ranking_pairs: str = "all",
    columns: str = "trl",
    pickapic_names: tuple[str, str, str, str] = ("caption", "jpg_0", "jpg_1", "label_0"),
) -> Dataset | IterableDataset:
    """Load ``split`` of a preference dataset in any of the :data:`FORMATS` (``"auto"``: :func:`detect_format`).

    Local formats are read whole into a ``Dataset`` (``streaming`` then iterates over it); ``max_rows`` keeps the
    first rows; ``config_name`` is ``load_dataset``'s configuration name (``hub`` only). ``columns="pickapic"`` maps
    Pick-a-Pic's columns (``pickapic_names``: caption, image 0, image 1, label 0) onto TRL's
    (:func:`~.pickapic.pickapic_to_trl`: every row kept, ties and bad labels marked for validation to count).
    """
    Choice(FORMATS).check("dataset_format", format)
    Choice(RANKING_PAIRS).check("ranking_pairs", ranking_pairs)
    Choice(COLUMN_LAYOUTS).check("dataset_columns", columns)
    if format == "auto":
        format = detect_format(name_or_path, split)
        logger.info("Reading %s as %s", name_or_path, format)
    if format == "hub":
        from datasets.data_files import EmptyDatasetError

        try:
            dataset = _load_hub_dataset(name_or_path, config_name, split, streaming)
        except EmptyDatasetError:
            if not os.path.isdir(name_or_path):
                raise
            raise DataError(no_data_message(name_or_path, split)) from None
    else:
        dataset = _load_local(name_or_path, format, split, ranking_pairs)
        if streaming:
            dataset = dataset.to_iterable_dataset()
    if max_rows is not None:
        dataset = (
            dataset.take(max_rows)
            if isinstance(dataset, IterableDataset)
            else dataset.select(range(min(max_rows, len(dataset))))
        )
    return pickapic_to_trl(dataset, *pickapic_names) if columns == "pickapic" else dataset


def detect_format(name_or_path: str, split: str = "train") -> str:
    """The format of a local path, or ``"hub"`` for anything else (a Hub id, a folder ``load_dataset`` reads).

    A folder is, in this order: a ``save_to_disk`` folder (``disk``); an image folder with a metadata file
    (``imagefolder``); a folder holding ``<split>.jsonl|json|csv|tsv`` (``hpd`` if its records have ``path1`` and
    ``path2`` or ``image_path`` and ``rank``, else ``table``); a folder of pair folders (``pair_folders``, at the top
    or in ``<split>/``). A file is ``hpd`` or ``table`` by its first record.
    """
    if os.path.isfile(name_or_path):
        if name_or_path.lower().endswith(TABLE_EXTENSIONS):
            return "hpd" if _is_hpd_file(name_or_path) else "table"
        raise DataError(
            f"{name_or_path} is a file but not a table: give a .jsonl, .json, .csv or .tsv file, or a folder"
        )
    if not os.path.isdir(name_or_path):
        return "hub"
    if any(os.path.isfile(os.path.join(name_or_path, f)) for f in ("state.json", "dataset_dict.json")):
        return "disk"
    if _metadata_files(name_or_path):
        return "imagefolder"
    table = _split_file(name_or_path, split)
    if table is not None:
        return "hpd" if _is_hpd_file(table) else "table"
    if pair_root(name_or_path, split) is not None:
        return "pair_folders"
    return "hub"


def no_data_message(path: str, split: str = "train") -> str:
    """Why a local folder gave no pairs: the layouts that are read (``docs/data.md``)."""
    sides = ", ".join(f"{winner}/ and {loser}/" for winner, loser in SIDE_FOLDERS)
    return (
        f"{path} holds no preference data for split {split!r}. The layouts read (docs/data.md): pair folders (side "
        f"folders {sides}, or one folder per pair holding chosen.<ext>, rejected.<ext> and prompt.txt; at the top or "
        f"in {split}/); a {split}.jsonl, .json, .csv or .tsv of prompt, chosen and rejected paths; an image folder "
        "with metadata.jsonl or metadata.csv; HPDv3 annotation files; a save_to_disk folder; or data files "
        "(parquet, arrow, ...) that datasets.load_dataset reads."
    )


def _load_hub_dataset(name: str, config_name: str | None, split: str, streaming: bool) -> Dataset | IterableDataset:
    """``datasets.load_dataset`` of ``name`` (a Hub id, or a folder it reads). A Hub id the Hub cannot answer for (not
    asked under ``HF_HUB_OFFLINE``, unreachable, or without it) is read from what this machine holds, as a cached
    model is: the ``datasets`` cache of an earlier load (which the loader falls back to), else the snapshot ``hf
    download --repo-type dataset`` leaves in the Hugging Face cache (which the loader does not read offline: read
    as the folder it is). In neither: the Hub's problem in one line (:func:`not_found_message`), with no retries."""
    from datasets import load_dataset

    problem = None if os.path.exists(name) else hub_dataset_problem(name)
    if problem is None or in_datasets_cache(name):
        return load_dataset(name, config_name, split=split, streaming=streaming)
    snapshot = hub_cache_snapshot(name)
    if snapshot is None:
        raise DatasetNotFoundError(not_found_message(name, problem))
    logger.info("Reading %s from the Hugging Face cache (%s): %s", name, snapshot, problem.removeprefix("and "))
    return load_dataset(snapshot, config_name, split=split, streaming=streaming)


def in_datasets_cache(name: str) -> bool:
    """Whether the ``datasets`` cache holds Hub dataset ``name`` from an earlier ``load_dataset``, which the loader
    reads when the Hub cannot answer. ``datasets`` offers no call that asks without asking the Hub first: its cache's
    folder is looked for where the loader's fallback looks (``<namespace>___<name in snake case>``)."""
    if looks_local(name) or not HUB_ID.match(name):
        return False
    from datasets import config
    from datasets.naming import camelcase_to_snakecase

    *namespace, dataset = name.split("/")
    folder = os.path.join(
        os.path.expanduser(str(config.HF_DATASETS_CACHE)), "___".join([*namespace, camelcase_to_snakecase(dataset)])
    )
    return os.path.isdir(folder) and bool(glob.glob(os.path.join(folder, "*", "*", "*")))


def hub_cache_snapshot(name: str) -> str | None:
    """The folder of Hub dataset ``name``'s snapshot in the Hugging Face cache (``huggingface_hub``'s
    ``snapshot_download`` with ``local_files_only``: nothing is asked of the Hub), or ``None``."""
    if looks_local(name) or not HUB_ID.match(name):
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(name, repo_type="dataset", local_files_only=True)
    except (LocalEntryNotFoundError, ValueError):
        return None


def _load_local(path: str, format: str, split: str, ranking_pairs: str) -> Dataset:
    if not os.path.exists(path):
        raise DatasetNotFoundError(f"{path} does not exist (dataset_format={format!r} reads a local path)")
    if format == "disk":
        from datasets import load_from_disk

        loaded = load_from_disk(path)
        return loaded[split] if isinstance(loaded, DatasetDict) else loaded
    if format == "imagefolder":
        from datasets import load_dataset

        return load_dataset("imagefolder", data_dir=path, split=split)
    if format == "pair_folders":
        root = pair_root(path, split)
        if root is None:
            raise DataError(
                f"{path} has no pair folders for split {split!r}: expected side folders "
                f"{[f'{w}/ and {lose}/' for w, lose in SIDE_FOLDERS]} or folders each holding chosen.<ext> and "
                f"rejected.<ext>, at the top (the train split) or in {split}/"
            )
        return read_pair_folders(root)
    file = path if os.path.isfile(path) else _split_file(path, split)
    if file is None:
        raise DataError(f"{path} has no {split}.jsonl, .json, .csv or .tsv file for split {split!r}")
    if os.path.isfile(path) and split != "train" and format in ("table", "hpd"):
        raise DataError(
            f"{path} is a single file, read as the train split; split {split!r} needs a folder holding {split}.jsonl "
            "(or .json, .csv, .tsv)"
        )
    return read_hpd(file, ranking_pairs) if format == "hpd" else read_table(file)


# -- paths --------------------------------------------------------------------------------------------------------


def resolve_path(value: Any, base: str) -> Any:
    """An image reference as an absolute path: relative to ``base``, ``~`` expanded, ``file://`` unwrapped. URLs and
    non-strings are returned unchanged (validation names a URL); an empty string becomes ``None``."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if not text:
        return None
    if _URL.match(text):
        parsed = urlparse(text)
        if parsed.scheme.lower() != "file":
            return text
        return url2pathname(unquote(parsed.path))
    path = os.path.expanduser(text)
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base, path))


# -- tables -------------------------------------------------------------------------------------------------------


def read_table(path: str) -> Dataset:
    """A JSONL/JSON/CSV/TSV file of preference rows, with image paths resolved against the file's folder.

    Row ``i`` of the result is record ``i`` of the file (counted from 0). Columns other than the images and the
    prompt are kept as they are (extra columns are ignored by training).
    """
    from datasets import load_dataset

    path = os.path.abspath(path)
    if path.lower().endswith((".csv", ".tsv")):
        delimiter = "\t" if path.lower().endswith(".tsv") else ","
        dataset = load_dataset("csv", data_files=path, split="train", delimiter=delimiter)
    else:
        dataset = _load_json_table(path)
    names = set(dataset.column_names)
    if {"jpg_0", "jpg_1"} <= names:  # Pick-a-Pic form with paths
        prompt, images = "caption", ("jpg_0", "jpg_1")
    else:
        renames = {}
        for target, aliases in ALIASES.items():
            alias = next((a for a in aliases if a in names), None)
            if target not in names and alias is not None:
                renames[alias] = target
        for target, alias in SCORE_ALIASES.items():
            if target not in names and alias in names:
                renames[alias] = target
        for target, aliases in SOURCE_ALIASES.items():
            alias = next((a for a in aliases if a in names), None)
            if not names & set(SOURCE_ALIASES) and alias is not None:
                renames[alias] = target
        if renames:
            dataset = dataset.rename_columns(renames)
        prompt, images = "prompt", ("chosen", "rejected")
    missing = [c for c in (prompt, *images) if c not in dataset.column_names]
    if missing:
        raise DataError(
            f"{path} has no column(s) {missing}: expected prompt, chosen, rejected (image paths; aliases caption, "
            f"winner/preferred, loser) or Pick-a-Pic's caption, jpg_0, jpg_1, label_0; found {sorted(names)}"
        )
    base = os.path.dirname(path)

    def resolve(batch: dict[str, list]) -> dict[str, list]:
        out = {prompt: [prompt_text(v) for v in batch[prompt]]}
        for column in images:
            out[column] = [resolve_path(v, base) for v in batch[column]]
        if "source_image" in batch:
            out["source_image"] = [resolve_path(v, base) for v in batch["source_image"]]
        if "source_images" in batch:
            out["source_images"] = [_source_list(v, base) for v in batch["source_images"]]
        if "mask" in batch:
            out["mask"] = [resolve_path(v, base) for v in batch["mask"]]
        return out

    return dataset.map(resolve, batched=True, desc=f"Resolving image paths of {os.path.basename(path)}")


def _source_list(value: Any, base: str) -> Any:
    """A row's list of source paths resolved against ``base``; a CSV cell holding a JSON array is parsed first.
    Anything else is kept for validation to name."""
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return value
    if isinstance(value, list):
        return [resolve_path(v, base) for v in value]
    return value


# -- HPDv3 / HPDv2 annotations ------------------------------------------------------------------------------------


def _first_record(path: str) -> dict | None:
    """The first record of a JSONL file or of a JSON array, read from the file's start only."""
    with open(path, encoding="utf-8") as f:
        if path.lower().endswith(".jsonl"):
            for line in f:
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        return None
                    return record if isinstance(record, dict) else None
            return None
        if not path.lower().endswith(".json"):
            return None
        head = f.read(1 << 16)
    start = head.find("{")
    if start < 0 or not head.lstrip().startswith("["):
        return None
    try:
        record, _ = json.JSONDecoder().raw_decode(head, start)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def _is_hpd_record(record: dict | None) -> bool:
    return isinstance(record, dict) and (
        {"path1", "path2"} <= record.keys() or {"image_path", "rank"} <= record.keys()
    )


def _is_hpd_file(path: str) -> bool:
    return _is_hpd_record(_first_record(path))


def _split_file(folder: str, split: str) -> str | None:
    for extension in TABLE_EXTENSIONS:
        candidate = os.path.join(folder, split + extension)
        if os.path.isfile(candidate):
            return candidate
    return None


def _metadata_files(folder: str) -> list[str]:
    return [p for name in METADATA_FILES for p in glob.glob(os.path.join(folder, "**", name), recursive=True)]


def _image_root(path: str, first_image: str | None) -> str:
    """The folder HPD image paths are relative to: the annotation file's folder (HPDv3: ``images/...`` beside
    ``train.json``), or ``<folder>/<split>/`` when the first image is found there (HPDv2: ``test/`` beside
    ``test.json``)."""
    folder = os.path.dirname(path)
    if isinstance(first_image, str) and not os.path.isabs(first_image):
        nested = os.path.join(folder, os.path.splitext(os.path.basename(path))[0])
        if not os.path.exists(os.path.join(folder, first_image)) and os.path.exists(os.path.join(nested, first_image)):
            return nested
    return folder


def ranked_pairs(ranks: list, mode: str) -> list[tuple[int, int]]:
    """``(better, worse)`` image indices of a ranking (a lower rank is preferred; equal ranks give no pair):
    ``"all"``, every two images of different rank, in index order; ``"best_worst"``, the first best against the
    first worst, or nothing when all ranks are equal."""
    if mode == "best_worst":
        best, worst = ranks.index(min(ranks)), ranks.index(max(ranks))
        return [] if ranks[best] == ranks[worst] else [(best, worst)]
    pairs = []
    for i, j in combinations(range(len(ranks)), 2):
        if ranks[i] != ranks[j]:
            pairs.append((i, j) if ranks[i] < ranks[j] else (j, i))
    return pairs


def _ranking_problem(paths: Any, ranks: Any) -> str:
    if not isinstance(paths, list) or not isinstance(ranks, list):
        return f"image_path and rank must be lists, got {type(paths).__name__} and {type(ranks).__name__}"
    if len(paths) != len(ranks):
        return f"image_path has {len(paths)} images but rank has {len(ranks)} values"
    if any(isinstance(r, bool) or not isinstance(r, (int, float)) for r in ranks):
        return f"rank holds a value that is not a number: {ranks!r}"
    return ""


def _load_json_table(path: str) -> Dataset:
    """``load_dataset("json")`` of a table; a file that is not valid JSON (JSON Lines) is refused naming the line and
    column of its first error (``datasets`` says only that generating the dataset failed)."""
    from datasets import load_dataset
    from datasets.exceptions import DatasetGenerationError

    try:
        return load_dataset("json", data_files=path, split="train")
    except DatasetGenerationError as err:
        problem = json_syntax_error(path)
        if problem is None:
            raise
        raise DataError(problem) from err


def json_syntax_error(path: str) -> str | None:
    """Where ``path`` (a JSON file, or JSON Lines: one record a line) first fails to parse, in the one wording of a
    file that does not parse (:func:`~trl_diffusion_sdpo.config.messages.file_syntax_error`); None if it parses. Read
    only once loading has failed, so a good file is read once."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        json.loads(text)
        return None  # one JSON document
    except json.JSONDecodeError as whole:
        document = whole
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), "")
    try:
        json.loads(first)
    except json.JSONDecodeError:
        return file_syntax_error(path, document)  # not a record a line: one document, broken where the parser says
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as err:
                return file_syntax_error(path, err, line=number)
    return None


def _load_json(path: str) -> Dataset:
    """``load_dataset("json")`` of one file. ``datasets`` reads JSON Lines in 10 MB blocks and types each column from
    the first: a column that is ``null`` throughout it and set later (HPDv3's ``choice_dist`` when Midjourney records
    come first) fails to cast, and such a file is read again as one block, typed from all its records."""
    from datasets import load_dataset
    from datasets.exceptions import DatasetGenerationError

    try:
        return load_dataset("json", data_files=path, split="train")
    except DatasetGenerationError as err:
        if "Couldn't cast" not in str(err.__cause__):
            raise
        logger.info("%s: a column is null throughout its first block; reading it again as one block", path)
        return load_dataset("json", data_files=path, split="train", chunksize=os.path.getsize(path) + 1)


def read_hpd(path: str, ranking_pairs: str = "all") -> Dataset:
    """An HPDv3 (or HPDv2) annotation file as preference pairs.

    HPDv3 records (``path1`` preferred, ``path2`` not) give one row each, in file order, keeping ``choice_dist``,
    ``confidence``, ``model1`` and ``model2``. Ranked records (``image_path``, ``rank``) give the pairs of
    :func:`ranked_pairs`; a record whose lists do not match gives one row with no images, named by its record
    number. Image paths are relative to :func:`_image_root`.
    """

    path = os.path.abspath(path)
    first = _first_record(path)
    if not _is_hpd_record(first):
        raise DataError(
            f"{path} does not look like HPD annotations: its first record needs path1 and path2 (HPDv3) or "
            f"image_path and rank (HPDv2); found {sorted(first) if isinstance(first, dict) else first!r}"
        )
    dataset = _load_json(path)
    name = os.path.basename(path)
    if {"path1", "path2"} <= set(dataset.column_names):
        base = _image_root(path, first.get("path1"))

        def pairs(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
            return {
                "prompt": [prompt_text(v) for v in batch["prompt"]],
                "chosen": [resolve_path(v, base) for v in batch["path1"]],
                "rejected": [resolve_path(v, base) for v in batch["path2"]],
                SOURCE_COLUMN: [f"{name} record {i}" for i in indices],
            }

        return dataset.map(
            pairs, batched=True, with_indices=True, remove_columns=["path1", "path2"], desc=f"Reading {name}"
        )
    base = _image_root(path, (first.get("image_path") or [None])[0])
    counts = {"prompts without a pair (all ranks equal)": 0}

    def expand(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {"prompt": [], "chosen": [], "rejected": [], SOURCE_COLUMN: []}
        for prompt, paths, ranks, index in zip(batch["prompt"], batch["image_path"], batch["rank"], indices):
            problem = _ranking_problem(paths, ranks)
            found = [] if problem else ranked_pairs(ranks, ranking_pairs)
            if problem:  # one row with no images, so validation names the record (stop, or skip and count)
                out["prompt"].append(prompt_text(prompt))
                out["chosen"].append(None)
                out["rejected"].append(None)
                out[SOURCE_COLUMN].append(f"{name} record {index}: {problem}")
            elif not found:
                counts["prompts without a pair (all ranks equal)"] += 1
            for better, worse in found:
                out["prompt"].append(prompt_text(prompt))
                out["chosen"].append(resolve_path(paths[better], base))
                out["rejected"].append(resolve_path(paths[worse], base))
                out[SOURCE_COLUMN].append(f"{name} record {index}, images {better} > {worse}")
        return out

    pairs = dataset.map(
        expand,
        batched=True,
        with_indices=True,
        remove_columns=dataset.column_names,
        desc=f"Pairing the rankings of {name} ({ranking_pairs})",
        load_from_cache_file=False,  # re-run so the count of records without a pair is logged every time
    )
    logger.info(
        "%s: %d ranked records -> %d pairs (ranking_pairs=%r); %d records give no pair (all ranks equal)",
        name,
        len(dataset),
        len(pairs),
        ranking_pairs,
        counts["prompts without a pair (all ranks equal)"],
    )
    return pairs


def load_preference_dataset(
    name_or_path: str,
    split: str = "train",
    streaming: bool = False,
    max_rows: int | None = None,
    config_name: str | None = None,
    dataset_format: str = "auto",
    ranking_pairs: str = "all",
    dataset_columns: str = "trl",
    pickapic_names: tuple[str, str, str, str] = ("caption", "jpg_0", "jpg_1", "label_0"),
) -> Dataset | IterableDataset:
    """Load a preference dataset from the Hub, a local data folder, a folder written by ``save_to_disk``, or the
    file layouts of this module (pair folders, a JSONL/CSV of image paths, an image folder with metadata, HPDv3
    annotations), detected unless ``dataset_format`` names one (``config_name``: the dataset configuration, as
    ``load_dataset``'s ``name``; ``ranking_pairs``: how ranked HPD records become pairs; ``dataset_columns``:
    ``"pickapic"`` maps Pick-a-Pic's ``caption``, ``jpg_0``, ``jpg_1``, ``label_0`` (or the names in
    ``pickapic_names``, ``(caption, image_0, image_1, label_0)``) onto TRL's ``prompt``, ``chosen``, ``rejected``,
    :func:`~.pickapic.pickapic_to_trl`). Pair folders' and HPD annotations' rows carry a ``__source__`` string column
    (:data:`~.columns.SOURCE_COLUMN`) naming the folder or record each came from, which a bad row's error quotes
    and training ignores."""
    return load_preference_data(
        name_or_path,
        format=dataset_format,
        split=split,
        streaming=streaming,
        max_rows=max_rows,
        config_name=config_name,
        ranking_pairs=ranking_pairs,
        columns=dataset_columns,
        pickapic_names=pickapic_names,
    )
