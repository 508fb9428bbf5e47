"""Preference pairs from a reward model: sample K images per prompt, score them, keep the pairs whose score gap
exceeds a margin, and write a dataset the trainer reads with ``--dataset_name``.

This is the AI-feedback variant of Diffusion-DPO (Wallace et al., 2023, sec. 5.4: pairs labelled by a reward model
instead of people) and, run from the model being tuned, the on-policy rounds of iterative DPO: pairs -> train -> pairs
from the tuned model. Sampling and the image cache are `generation`'s (one PNG per (model, prompt, seed, settings),
so a rerun resamples nothing); scores are cached per scorer configuration beside the dataset.

Pairing, for the K scores ``s_1..s_K`` of one prompt (``margin`` m >= 0):

* ``best-worst``: the single pair (argmax s, argmin s) when ``max s - min s > m`` (the first index on ties);
* ``all``: every pair ``(i, j)`` with ``s_i - s_j > m``, the higher-scored image chosen (at most K(K-1)/2 pairs).

The dataset (``datasets.save_to_disk``, TRL preference columns) has ``prompt``, ``chosen``, ``rejected`` (images, PNG
bytes embedded), ``chosen_score``, ``rejected_score``, ``margin`` (their difference) and ``chosen_seed``,
``rejected_seed``. SmPO reads the scores renamed ``score_0`` and ``score_1`` (``train --rename_columns``).

Edits (a prompt set whose rows carry ``source_image`` or ``source_images``): the K images of an edit are K samples of
the editing pipeline from its source(s), scored with them by an `EditScorer` (any other scorer scores them against
the instruction), and each row also carries the edit's source: ``source_image`` (one image) or, when some edit has
several, ``source_images`` (a list), its bytes embedded as given. ``scores.jsonl`` names the sources by path (a
source given as bytes or a PIL image is written once under ``sources/``).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ..config.checks import Choice
from ..rewards.scorers.base import Scorer, Sources, build_scorer
from ..rewards.scorers.preflight import check_models, check_prompts
from .generation import GenerationSettings, ModelSpec, generate_images, split_edits
from .progress import Progress, note
from .prompts import EditPrompt, load_prompt_set
from .run import _scorer_arguments, check_scorers, refuse_earlier_outputs

__all__ = ["PairsResult", "make_pairs", "select_pairs"]

PAIR_MODES = ("best-worst", "all")
DATASET_FOLDER = "dataset"


def select_pairs(scores: Sequence[float], mode: str = "best-worst", margin: float = 0.0) -> list[tuple[int, int]]:
    """The (chosen, rejected) indices among one prompt's scores whose score difference exceeds ``margin``.

    ``best-worst``: at most one pair, (argmax, argmin); ``all``: every pair ``i, j`` with ``s_i - s_j > margin``,
    in order of ``i`` then ``j``. Non-finite scores are never paired.
    """
    Choice(PAIR_MODES).check("mode", mode)
    if margin < 0:
        raise ValueError(f"margin must be >= 0 (a pair's score gap is positive), got {margin}.")
    finite = [i for i, s in enumerate(scores) if np.isfinite(s)]
    if len(finite) < 2:
        return []
    if mode == "best-worst":
        best = max(finite, key=lambda i: scores[i])
        worst = min(finite, key=lambda i: scores[i])
        return [(best, worst)] if scores[best] - scores[worst] > margin else []
    return [(i, j) for i in finite for j in finite if scores[i] - scores[j] > margin]


def margin_summary(margins: Sequence[float], num_prompts: int, prompts_without_pair: Sequence[str]) -> dict[str, Any]:
    """Count, mean, min, quantiles (10, 25, 50, 75, 90 %, numpy's linear interpolation) and max of the kept pairs'
    margins, and the prompts that gave no pair."""
    values = np.asarray(margins, dtype=np.float64)
    quantiles = {f"q{q}": float(np.quantile(values, q / 100)) for q in (10, 25, 50, 75, 90)} if values.size else {}
    return {
        "pairs": int(values.size),
        "prompts": num_prompts,
        "prompts_with_pair": num_prompts - len(prompts_without_pair),
        "margin_mean": float(values.mean()) if values.size else None,
        "margin_min": float(values.min()) if values.size else None,
        **quantiles,
        "margin_max": float(values.max()) if values.size else None,
        "prompts_without_pair": list(prompts_without_pair),
    }


@dataclass
class PairsResult:
    """What `make_pairs` made: the dataset folder, the summary, each prompt's image paths and scores, and how many
    images were sampled in this call (0 when everything came from the cache)."""

    dataset_dir: str
    summary: dict[str, Any]
    image_paths: list[list[str]]
    scores: list[list[float]]
    generated: int
    files: dict[str, str] = field(default_factory=dict)


def _scorer_key(name: str, kwargs: Mapping[str, Any]) -> str:
    payload = json.dumps([name, {k: str(v) for k, v in sorted(kwargs.items())}])
    return hashlib.sha1(payload.encode()).hexdigest()[:12]


def _score_images(
    make_scorer: Callable[[], Scorer],
    paths: Sequence[str],
    prompts: Sequence[str],
    cache_file: str,
    batch_size: int,
    progress: bool,
    sources: Sources | None = None,
) -> list[float]:
    """Scores of ``paths`` (with their prompts and, for edits, their ``sources``), reading and extending the JSON
    cache ``cache_file`` (keyed by image path, which `ImageCache` derives from model, prompt, sources, seed and
    settings; rewritten atomically after every batch). The scorer is built only when some image has no cached
    score."""
    cached: dict[str, float] = {}
    if os.path.isfile(cache_file):
        with open(cache_file) as f:
            cached = json.load(f)
    missing = [i for i, p in enumerate(paths) if p not in cached]
    scorer = make_scorer() if missing else None
    missing_paths, missing_prompts = [paths[i] for i in missing], [prompts[i] for i in missing]
    missing_sources = [sources[i] for i in missing] if sources is not None else None
    batches = (
        scorer.score_files(missing_paths, missing_prompts, batch_size, "scoring", False, missing_sources)
        if scorer
        else []
    )
    note(f"scoring {len(missing)} of {len(paths)} images ({len(paths) - len(missing)} scores cached)", progress)
    with Progress("scoring", len(missing), "images", progress, -(-len(missing) // batch_size)) as bar:
        for start, values in zip(range(0, len(missing), batch_size), batches):
            chunk = missing_paths[start : start + batch_size]
            cached.update({path: float(v) for path, v in zip(chunk, values, strict=True)})
            tmp = f"{cache_file}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(cached, f)
            os.replace(tmp, cache_file)
            bar.update(len(chunk))
    return [cached[p] for p in paths]


def _image_bytes(value: Any) -> dict:
    """A source image as a ``datasets`` image value with its bytes embedded as they were given (a file's bytes, a
    ``datasets`` image's bytes, raw bytes, or a PIL image encoded as PNG)."""
    import io

    from PIL import Image

    if isinstance(value, Mapping):
        if value.get("bytes") is not None:
            return {"bytes": bytes(value["bytes"]), "path": None}
        value = value["path"]
    if isinstance(value, str):
        with open(value, "rb") as f:
            return {"bytes": f.read(), "path": None}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"bytes": bytes(value), "path": None}
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}
    raise ValueError(f"Cannot embed a source image given as a {type(value).__name__}.")


def _source_files(edit: EditPrompt, folder: str) -> list[str]:
    """The paths of an edit's sources: as given where they are files, else decoded and written once as
    ``folder/<digest>-<k>.png``."""
    paths = edit.paths()
    if all(paths):
        return [str(p) for p in paths]
    os.makedirs(folder, exist_ok=True)
    out = []
    for k, (path, image) in enumerate(zip(paths, edit.images())):
        if path is None:
            path = os.path.join(folder, f"{edit.digest}-{k}.png")
            if not os.path.isfile(path):
                image.save(path, format="PNG")
        out.append(path)
    return out


def _write_dataset(rows: dict[str, list], folder: str) -> None:
    from datasets import Dataset, Features, List, Value
    from datasets import Image as ImageFeature

    sources = {c: rows[c] for c in ("source_image", "source_images") if c in rows}
    features = Features(
        {
            "prompt": Value("string"),
            **({"source_image": ImageFeature()} if "source_image" in sources else {}),
            **({"source_images": List(ImageFeature())} if "source_images" in sources else {}),
            "chosen": ImageFeature(),
            "rejected": ImageFeature(),
            "chosen_score": Value("float64"),
            "rejected_score": Value("float64"),
            "margin": Value("float64"),
            "chosen_seed": Value("int64"),
            "rejected_seed": Value("int64"),
        }
    )

    def embedded(paths: list[str]) -> list[dict]:  # PNG bytes in the dataset: it survives the cache being deleted
        out = []
        for path in paths:
            with open(path, "rb") as f:
                out.append({"bytes": f.read(), "path": None})
        return out

    data = {**rows, "chosen": embedded(rows["chosen"]), "rejected": embedded(rows["rejected"])}
    if "source_image" in sources:
        data["source_image"] = [_image_bytes(value) for value in sources["source_image"]]
    if "source_images" in sources:
        data["source_images"] = [[_image_bytes(v) for v in values] for values in sources["source_images"]]
    staging = f"{folder}.{os.getpid()}.tmp"
    Dataset.from_dict(data, features=features).save_to_disk(staging)
    if os.path.isdir(folder):  # replace a previous run's dataset only once the new one is whole
        import shutil

        shutil.rmtree(folder)
    os.replace(staging, folder)


def make_pairs(
    base: str,
    model: str | ModelSpec | None = None,
    prompts: str | Sequence[str] = "pickapic_v2",
    num_images: int = 4,
    scorer: str | Scorer = "pickscore",
    margin: float = 0.0,
    mode: str = "best-worst",
    output_dir: str = "pairs",
    seed: int = 0,
    settings: GenerationSettings | None = None,
    batch_size: int = 1,
    score_batch_size: int = 16,
    cache_dir: str | None = None,
    device: str | None = None,
    scorer_kwargs: Mapping[str, Any] | None = None,
    prompt_kwargs: Mapping[str, Any] | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> PairsResult:
    """Sample ``num_images`` images per prompt, score them and write the pairs above ``margin`` as a dataset.

    Args:
        base: the base pipeline (Hub id or local folder).
        model: what to sample from instead of the base: a LoRA folder/file or a full-tuning output of this package
            (anything `ModelSpec` accepts; see docs/evaluation.md), or None for the base itself.
        prompts: a preset, ``.txt`` file, dataset id/folder or list (`load_prompts`; ``prompt_kwargs`` passes
            ``column``, ``split``, ``path``, ``limit``, ``deduplicate``), or a prompt set of edits (rows with
            ``source_image`` or ``source_images``, `load_edits`): the pairs are then edits of the same source(s).
        num_images: K, images per prompt, from seeds ``seed, seed + 1, ..., seed + K - 1``.
        scorer: a registered scorer name (``scorer_kwargs`` are its arguments) or a `Scorer`.
        margin, mode: see the module docstring.
        output_dir: gets ``dataset/`` (``--dataset_name OUTPUT_DIR/dataset``), ``summary.json``, ``scores.jsonl``
            (every image's score), ``run.json`` and, unless ``cache_dir``, the image cache ``images/``.
        batch_size, score_batch_size: prompts per pipeline call, images per scorer call.
        overwrite: replace the dataset an earlier run left in ``output_dir`` (refused otherwise, before anything is
            sampled: training may be reading it); its cached images and scores are reused either way.
    """
    if num_images < 2:
        raise ValueError(f"num_images must be at least 2 to form a pair, got {num_images}.")
    Choice(PAIR_MODES).check("mode", mode)
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}.")
    check_scorers([scorer], edits=True)  # an unknown name, before reading the prompts
    refuse_earlier_outputs(output_dir, [DATASET_FOLDER], "this run's pairs", overwrite)
    settings = settings or GenerationSettings()
    prompt_set = load_prompt_set(prompts, **dict(prompt_kwargs or {}))
    prompt_list, edits = split_edits(prompt_set)
    check_scorers([scorer], edits is not None)  # an editing scorer needs edits; before any sampling
    if not prompt_list:
        raise ValueError(f"No prompts in {prompts!r}.")
    check_prompts([scorer], prompt_list)
    if isinstance(scorer, str):
        check_models([scorer], {scorer: dict(scorer_kwargs or {})})
    spec = model if isinstance(model, ModelSpec) else ModelSpec("base", None, "base")
    if isinstance(model, str):
        spec = ModelSpec("policy", model)
    seeds = [seed + k for k in range(num_images)]
    os.makedirs(output_dir, exist_ok=True)
    cache_dir = cache_dir or os.path.join(output_dir, "images")
    scorer_kwargs = dict(scorer_kwargs or {})
    run = {
        "base": base,
        "model": asdict(spec),
        "num_prompts": len(prompt_list),
        "edits": edits is not None,
        "seeds": seeds,
        "scorer": scorer if isinstance(scorer, str) else scorer.name,
        "scorer_kwargs": {k: str(v) for k, v in scorer_kwargs.items()},
        "margin": margin,
        "mode": mode,
        "settings": asdict(settings),
        "cache_dir": cache_dir,
    }
    with open(os.path.join(output_dir, "run.json"), "w") as f:
        json.dump(run, f, indent=2)

    paths, generated = generate_images(
        base, [spec], prompt_set, seeds, settings, cache_dir, batch_size, device, progress
    )
    gc.collect()  # the sampling pipeline is gone before the scorer is built
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    flat_paths = paths[spec.name]  # prompts outer, seeds inner
    flat_prompts = [p for p in prompt_list for _ in seeds]
    flat_sources = [edit.images for edit in edits for _ in seeds] if edits else None
    if isinstance(scorer, Scorer):
        key, arguments = f"{scorer.name}-instance", {}
    else:
        arguments = _scorer_arguments(scorer, {scorer: scorer_kwargs}, device)
        key = f"{scorer}-{_scorer_key(scorer, scorer_kwargs)}"
    flat_scores = _score_images(
        lambda: build_scorer(scorer, **arguments),
        flat_paths,
        flat_prompts,
        os.path.join(output_dir, f"scores-{key}.json"),
        score_batch_size,
        progress,
        flat_sources,
    )

    k = num_images
    per_prompt_paths = [flat_paths[i * k : (i + 1) * k] for i in range(len(prompt_list))]
    per_prompt_scores = [flat_scores[i * k : (i + 1) * k] for i in range(len(prompt_list))]
    rows: dict[str, list] = {c: [] for c in ("prompt", "chosen", "rejected", "chosen_score", "rejected_score")}
    rows.update(margin=[], chosen_seed=[], rejected_seed=[])
    # One source column for the whole dataset: source_image when every edit has one, else source_images (lists).
    source_column = None
    if edits:
        source_column = "source_images" if any(e.column == "source_images" for e in edits) else "source_image"
        rows[source_column] = []
    without_pair = []
    for index, (prompt, images, scores) in enumerate(zip(prompt_list, per_prompt_paths, per_prompt_scores)):
        selected = select_pairs(scores, mode, margin)
        if not selected:
            without_pair.append(prompt)
        for i, j in selected:
            if source_column == "source_image":
                rows[source_column].append(edits[index].sources[0])
            elif source_column == "source_images":
                rows[source_column].append(list(edits[index].sources))
            rows["prompt"].append(prompt)
            rows["chosen"].append(images[i])
            rows["rejected"].append(images[j])
            rows["chosen_score"].append(scores[i])
            rows["rejected_score"].append(scores[j])
            rows["margin"].append(scores[i] - scores[j])
            rows["chosen_seed"].append(seeds[i])
            rows["rejected_seed"].append(seeds[j])

    dataset_dir = os.path.join(output_dir, DATASET_FOLDER)
    summary = margin_summary(rows["margin"], len(prompt_list), without_pair)
    summary.update(scorer=run["scorer"], mode=mode, margin=margin, num_images=k, generated=generated[spec.name])
    files = {"dataset": dataset_dir, "summary": os.path.join(output_dir, "summary.json")}
    with open(files["summary"], "w") as f:
        json.dump(summary, f, indent=2)
    files["scores"] = os.path.join(output_dir, "scores.jsonl")
    with open(files["scores"], "w") as f:
        for index, (prompt, images, scores) in enumerate(zip(prompt_list, per_prompt_paths, per_prompt_scores)):
            source = {}
            if edits:
                found = _source_files(edits[index], os.path.join(output_dir, "sources"))
                source = {"source_image": found[0]} if source_column == "source_image" else {"source_images": found}
            for s, path, value in zip(seeds, images, scores):
                f.write(json.dumps({"prompt": prompt, **source, "seed": s, "image": path, "score": value}) + "\n")
    if not rows["prompt"]:
        if os.path.isdir(dataset_dir):  # a previous run's pairs would no longer match this run's settings
            import shutil

            shutil.rmtree(dataset_dir)
        raise ValueError(
            f"No pair of the {len(prompt_list)} prompts' {k} images differs by more than margin={margin} "
            f"({files['scores']} lists every score); lower the margin or sample more images per prompt."
        )
    _write_dataset(rows, dataset_dir)
    return PairsResult(dataset_dir, summary, per_prompt_paths, per_prompt_scores, generated[spec.name], files)
