"""`evaluate`: generate images for a prompt set from a base model and its variants, score them with the named reward
models and write the comparison (scores, summaries with bootstrap intervals, win rates, plots and a grid)."""

from __future__ import annotations

import csv
import gc
import importlib.util
import inspect
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from PIL import Image

from ..config.messages import OutputExistsError, advice, overwrite_advice, replacing_refusal
from ..rewards.scorers.base import Scorer, available_scorers, build_scorer, scorer_factory, scores_edits
from ..rewards.scorers.preflight import check_models, check_prompts
from ..rewards.scorers.registry import unknown_scorer_message
from .compare import (
    GRID_CELL,
    GRID_COLUMNS,
    GRID_PAGE_SAMPLES,
    MetricSummary,
    WinRate,
    image_grid,
    plot_intervals,
    summarise,
    win_rate_table,
    write_rows,
)
from .generation import GenerationSettings, ModelSpec, generate_images, split_edits
from .progress import Progress, note
from .prompts import EditPrompt, load_prompt_set

__all__ = ["EvaluationResult", "evaluate"]

logger = logging.getLogger(__name__)


# What evaluate writes into its output folder; the image cache (images/) is not among them: a cached image is reused,
# never replaced.
OUTPUT_NAMES = (
    "run.json",
    "scores.csv",
    "summary.csv",
    "summary.json",
    "win_rates.csv",
    "win_rates.json",
    "plots",
    "grid.png",
)


def refuse_earlier_outputs(output_dir: str, names: Sequence[str], writer: str, overwrite: bool) -> None:
    """Refuse, unless ``overwrite``, an ``output_dir`` holding any of ``names`` (what ``writer`` writes there), which
    an earlier run wrote and this one would replace; the cached images are reused either way."""
    found = [name for name in names if os.path.exists(os.path.join(output_dir, name))]
    if found and not overwrite:
        flag = overwrite_advice()
        ways = [
            f"pass {flag} to replace them (the cached images are reused either way)",
            f"write to a new {advice('--output_dir', 'output_dir')}",
        ]
        raise OutputExistsError(replacing_refusal(output_dir, writer, ways, "an earlier run's files", found))


@dataclass
class EvaluationResult:
    """What `evaluate` computed and where it wrote it."""

    summary: list[MetricSummary]
    win_rates: list[WinRate]
    scores: dict[str, dict[str, list[float]]]
    image_paths: dict[str, list[str]]
    generated: dict[str, int]
    files: dict[str, str] = field(default_factory=dict)


def _model_specs(base: str, models: Mapping[str, str] | Sequence[str | ModelSpec]) -> list[ModelSpec]:
    if isinstance(models, Mapping):
        variants = [ModelSpec(name, path) for name, path in models.items()]
    else:
        variants = [m if isinstance(m, ModelSpec) else ModelSpec.parse(m) for m in models]
    specs = [ModelSpec("base", None, "base"), *variants]
    if "base" in [v.name for v in variants]:
        raise ValueError("The name 'base' is reserved for the base model; name the variants differently.")
    return specs


def _scorer_arguments(entry: str | Scorer, scorer_kwargs: Mapping[str, Mapping[str, Any]], device: str | None):
    """The keyword arguments for a named scorer; ``device`` is passed on when its factory takes one."""
    if isinstance(entry, Scorer):
        return {}
    kwargs = dict(scorer_kwargs.get(entry, {}))
    if device is not None and "device" not in kwargs:
        try:
            parameters = inspect.signature(scorer_factory(entry)).parameters.values()
            accepts = any(p.name == "device" or p.kind is p.VAR_KEYWORD for p in parameters)
        except (TypeError, ValueError):  # a factory without an inspectable signature
            accepts = False
        if accepts:
            kwargs["device"] = device
    return kwargs


def check_scorers(scorers: Sequence[str | Scorer], edits: bool) -> None:
    """Refuse, before any generation, an unknown scorer name and an editing scorer for a text-to-image prompt set."""
    for scorer in scorers:
        if not isinstance(scorer, Scorer) and scorer not in available_scorers():
            raise KeyError(unknown_scorer_message(scorer, advice("--scorer", "scorer")))
        if not edits and scores_edits(scorer):
            name = scorer if isinstance(scorer, str) else scorer.name
            raise ValueError(
                f"{name} scores edits: it needs source images, and the prompt set has no source_image or "
                "source_images column."
            )


def source_label(edit: EditPrompt) -> str:
    """How ``scores.csv`` names an edit's sources: their paths joined by ``;``, or ``pixels:<digest>``."""
    paths = edit.paths()
    return ";".join(paths) if all(paths) else f"pixels:{edit.digest}"


def _write_scores(
    path: str, pairs: list[tuple[str, int]], image_paths, scores, root: str, sources: list[str] | None = None
) -> None:
    metrics = sorted({m for per_model in scores.values() for m in per_model})
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "prompt", *(["source"] if sources else []), "seed", "image", *metrics])
        for model, paths in image_paths.items():
            for i, (prompt, seed) in enumerate(pairs):
                values = [scores.get(model, {}).get(m, [None] * len(pairs))[i] for m in metrics]
                source = [sources[i]] if sources else []
                writer.writerow([model, prompt, *source, seed, os.path.relpath(paths[i], root), *values])


def grid_page_name(page: int) -> str:
    """The file of the grid's page ``page`` (from 1): ``grid.png``, then ``grid-2.png``, ..."""
    return "grid.png" if page == 1 else f"grid-{page}.png"


def _opened(path: str) -> Image.Image:
    """The image at ``path``, read and its file closed (a page opens one file per tile)."""
    with Image.open(path) as image:
        return image.convert("RGB")


def write_grid(
    output_dir: str,
    names: Sequence[str],
    image_paths: Mapping[str, Sequence[str]],
    captions: Sequence[str],
    sources: Sequence[Any] | None = None,
) -> list[str]:
    """Every sample of every model in grid pages: one row per model (for edits a first row with each edit's first
    source), one column per sample captioned ``captions[i]``, :data:`~.compare.GRID_COLUMNS` samples side by side,
    :data:`~.compare.GRID_PAGE_SAMPLES` samples a page, tiles of the images' width up to :data:`~.compare.GRID_CELL`
    pixels. Pages of an earlier, larger run beyond the last written are removed. Returns the pages' paths."""
    paths = []
    labels = (["source"] if sources else []) + list(names)
    for page, start in enumerate(range(0, len(captions), GRID_PAGE_SAMPLES), start=1):
        shown = range(start, min(start + GRID_PAGE_SAMPLES, len(captions)))
        rows = [[_opened(image_paths[name][i]) for i in shown] for name in names]
        if sources:  # the (first) source above each edit
            rows = [[sources[i]()[0].convert("RGB") for i in shown], *rows]
        cell = min(rows[-1][0].width, GRID_CELL)
        grid = image_grid(rows, labels, [captions[i] for i in shown], cell=cell, columns=GRID_COLUMNS)
        paths.append(os.path.join(output_dir, grid_page_name(page)))
        grid.save(paths[-1])
    stale = len(paths) + 1
    while os.path.isfile(os.path.join(output_dir, grid_page_name(stale))):
        os.remove(os.path.join(output_dir, grid_page_name(stale)))
        stale += 1
    return paths


def evaluate(
    base: str,
    models: Mapping[str, str] | Sequence[str | ModelSpec] = (),
    prompts: str | Sequence[str] = "partiprompts",
    scorers: Sequence[str | Scorer] = ("pickscore",),
    output_dir: str = "evaluation",
    seeds: Sequence[int] = (0,),
    settings: GenerationSettings | None = None,
    batch_size: int = 1,
    score_batch_size: int = 16,
    cache_dir: str | None = None,
    device: str | None = None,
    scorer_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    prompt_kwargs: Mapping[str, Any] | None = None,
    n_resamples: int = 1000,
    bootstrap_seed: int = 0,
    progress: bool = True,
    overwrite: bool = False,
) -> EvaluationResult:
    """Generate, score and compare ``base`` and its variants.

    Args:
        base: the base pipeline (Hub id or local folder).
        models: the variants, ``{name: path}`` or ``["name=path", ModelSpec(...)]`` (LoRA folder or file, UNet or
            pipeline folder, Hub id, ``.pth`` UNet state dict); the base is always included, named ``base``.
        prompts: a preset name, text file, dataset id/folder or list (see `load_prompts`; ``prompt_kwargs`` passes
            ``column``, ``split``, ``path``, ``limit``, ``deduplicate``), or a prompt set of edits: a JSONL file,
            dataset or list of rows with ``source_image`` or ``source_images`` (`load_edits`), sampled by an editing
            pipeline with the sources as its ``image``.
        scorers: registered scorer names or `Scorer` instances; ``scorer_kwargs[name]`` configures a named one. On
            edits an `EditScorer` also receives each image's sources; any other scorer scores the edited image
            against its instruction.
        output_dir: where tables, plots, the grid and (unless ``cache_dir``) the image cache go.
        seeds: each prompt is sampled once per seed, every prompt from the same noise for a given seed.
        settings: `GenerationSettings` (default: the SDPO authors' protocol).
        batch_size: prompts per pipeline call.
        score_batch_size: images per scorer call.
        overwrite: replace the tables, plots and grid an earlier evaluation left in ``output_dir`` (refused
            otherwise, before anything is generated; its cached images are reused either way).

    Writes ``scores.csv`` (one row per model and sample; for edits with a ``source`` column), ``summary.{csv,json}``
    (mean and bootstrap 95% interval per model and metric), ``win_rates.{csv,json}``, ``plots/<metric>.png``,
    ``grid.png`` (every sample of every model, continued in ``grid-2.png``, ... beyond a page: `write_grid`; for
    edits, the sources in the first row) and ``run.json``. ``progress``: tqdm bars, else a log line per model and per
    batch, generating and scoring (:mod:`.progress`).
    """
    settings = settings or GenerationSettings()
    scorer_kwargs = dict(scorer_kwargs or {})
    for scorer in scorers:  # fail before reading the prompts on an unknown name
        if not isinstance(scorer, Scorer) and scorer not in available_scorers():
            raise KeyError(unknown_scorer_message(scorer, advice("--scorer", "scorer")))
    refuse_earlier_outputs(output_dir, OUTPUT_NAMES, "this evaluation", overwrite)
    prompt_set = load_prompt_set(prompts, **dict(prompt_kwargs or {}))
    prompt_list, edits = split_edits(prompt_set)
    check_scorers(scorers, edits is not None)  # before any generation
    check_prompts(scorers, prompt_list)
    check_models(scorers, scorer_kwargs)
    specs = _model_specs(base, models)
    cache_dir = cache_dir or os.path.join(output_dir, "images")
    image_paths, generated = generate_images(
        base, specs, prompt_set, seeds, settings, cache_dir, batch_size, device, progress
    )
    # Written with the tables, after sampling: a run that failed or was stopped before leaves nothing a rerun into the
    # folder would have to overwrite (its cached images are reused).
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "run.json"), "w") as f:
        json.dump(
            {
                "base": base,
                "models": [asdict(s) for s in specs],
                "num_prompts": len(prompt_list),
                "edits": edits is not None,
                "seeds": list(seeds),
                "settings": asdict(settings),
                "cache_dir": cache_dir,
            },
            f,
            indent=2,
        )
    pairs = [(p, int(s)) for p in prompt_list for s in seeds]
    sample_prompts = [p for p, _ in pairs]
    # Per sample, its edit's sources, decoded when an editing scorer reads that batch.
    sample_sources = [edit.images for edit in edits for _ in seeds] if edits else None
    source_labels = [source_label(edit) for edit in edits for _ in seeds] if edits else None
    scores: dict[str, dict[str, list[float]]] = {spec.name: {} for spec in specs}
    scales: dict[str, str] = {}
    floors: dict[str, float | None] = {}
    scores_path = os.path.join(output_dir, "scores.csv")
    for number, entry in enumerate(scorers, start=1):
        note(f"scorer {number}/{len(scorers)}: loading {entry if isinstance(entry, str) else entry.name}", progress)
        scorer = build_scorer(entry, **_scorer_arguments(entry, scorer_kwargs, device))
        scales[scorer.name], floors[scorer.name] = scorer.scale, scorer.mean_floor
        for name, paths in image_paths.items():
            batches = -(-len(paths) // score_batch_size)
            with Progress(f"scoring {name} ({scorer.name})", len(paths), "images", progress, batches) as bar:
                values: list[float] = []
                for batch in scorer.score_files(
                    paths, sample_prompts, score_batch_size, f"{scorer.name}: {name}", False, sample_sources
                ):
                    values += batch
                    bar.update(len(batch))
            scores[name][scorer.name] = values
        del scorer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        _write_scores(scores_path, pairs, image_paths, scores, output_dir, source_labels)  # kept after each metric

    files = {"scores": scores_path, "run": os.path.join(output_dir, "run.json")}
    summary = summarise(scores, scales, floors, n_resamples=n_resamples, seed=bootstrap_seed)
    wins = win_rate_table(scores)
    files["summary"] = write_rows(summary, os.path.join(output_dir, "summary"))[0]
    files["win_rates"] = write_rows(wins, os.path.join(output_dir, "win_rates"))[0]
    # The plots repeat the summary's numbers: without matplotlib (the `plots` extra) the run keeps its tables.
    if importlib.util.find_spec("matplotlib") is None:
        logger.warning('No interval plots: matplotlib is not installed (pip install "trl-diffusion-sdpo[plots]").')
    else:
        for metric in scales:
            path = os.path.join(output_dir, "plots", f"{metric}.png")
            files[f"plot/{metric}"] = plot_intervals(summary, metric, path)
    captions = [prompt if len(seeds) == 1 else f"{prompt} (seed {seed})" for prompt, seed in pairs]
    pages = write_grid(output_dir, [s.name for s in specs], image_paths, captions, sample_sources)
    files.update({"grid" if page == 1 else f"grid/{page}": path for page, path in enumerate(pages, start=1)})
    note(
        f"wrote the tables and the grid ({len(specs) * len(pairs)} images on {len(pages)} page"
        f"{'' if len(pages) == 1 else 's'}) to {output_dir}",
        progress,
    )
    return EvaluationResult(summary, wins, scores, image_paths, generated, files)
