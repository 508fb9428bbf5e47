"""Comparing models from per-sample scores: means with seeded percentile-bootstrap 95% intervals, per-sample A/B win
rates (ties count half, as the SDPO authors' ``*_vs_utils.py``), CSV/JSON tables, one interval plot per metric and
an image grid.

A sample is one (prompt, seed) image; models are compared on the same samples in the same order, so ``scores[a][i]``
and ``scores[b][i]`` come from the same prompt and noise.
"""

from __future__ import annotations

import csv
import json
import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import scipy.stats
from PIL import Image, ImageDraw, ImageFont

from ..config.extras import require_extra

__all__ = [
    "GRID_CELL",
    "GRID_COLUMNS",
    "GRID_PAGE_SAMPLES",
    "MetricSummary",
    "WinRate",
    "bootstrap_mean_ci",
    "image_grid",
    "summarise",
    "win_rate",
    "win_rate_table",
]


@dataclass(frozen=True)
class MetricSummary:
    model: str
    metric: str
    scale: str
    mean: float
    ci_low: float
    ci_high: float
    n: int


@dataclass(frozen=True)
class WinRate:
    """``win_rate = (wins + 0.5 * ties) / n`` of ``model`` against ``opponent``."""

    metric: str
    model: str
    opponent: str
    wins: int
    ties: int
    losses: int
    n: int
    win_rate: float


def bootstrap_mean_ci(
    values: Sequence[float] | np.ndarray, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """``(mean, low, high)``: the sample mean and the percentile bootstrap interval of the mean
    (``scipy.stats.bootstrap``, ``n_resamples`` resamples with replacement from a ``numpy`` generator seeded with
    ``seed``); constant values give the point interval."""
    array = np.asarray(values, dtype=np.float64).ravel()
    if array.size == 0:
        raise ValueError("Cannot summarise an empty set of scores.")
    mean = float(array.mean())
    if np.all(array == array[0]):  # scipy refuses a degenerate sample; every resample's mean is the value itself
        return mean, mean, mean
    result = scipy.stats.bootstrap(
        (array,),
        np.mean,
        n_resamples=n_resamples,
        confidence_level=confidence,
        method="percentile",
        vectorized=True,
        rng=np.random.default_rng(seed),
    )
    return mean, float(result.confidence_interval.low), float(result.confidence_interval.high)


def win_rate(
    scores: Sequence[float], opponent_scores: Sequence[float], metric: str = "", model: str = "A", opponent: str = "B"
) -> WinRate:
    """Pairwise comparison sample by sample: a win when strictly higher, a tie when equal, ties counting half."""
    a, b = np.asarray(scores, dtype=np.float64), np.asarray(opponent_scores, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"{model} has {a.size} scores and {opponent} {b.size}; win rates need the same samples.")
    if a.size == 0:
        raise ValueError("Cannot compute a win rate over no samples.")
    wins, ties = int((a > b).sum()), int((a == b).sum())
    losses = a.size - wins - ties
    return WinRate(metric, model, opponent, wins, ties, losses, int(a.size), (wins + 0.5 * ties) / a.size)


def summarise(
    scores: Mapping[str, Mapping[str, Sequence[float]]],
    scales: Mapping[str, str] | None = None,
    mean_floors: Mapping[str, float | None] | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
) -> list[MetricSummary]:
    """One row per (model, metric) from ``scores[model][metric]``. Where a metric has a mean floor (torchmetrics'
    CLIP score clamps its mean at 0), the mean and both bounds are clamped; clamping is monotone, so the clamped
    bounds are the interval of the clamped mean."""
    rows = []
    for model, metrics in scores.items():
        for metric, values in metrics.items():
            mean, low, high = bootstrap_mean_ci(values, n_resamples=n_resamples, seed=seed)
            floor = (mean_floors or {}).get(metric)
            if floor is not None:
                mean, low, high = max(mean, floor), max(low, floor), max(high, floor)
            rows.append(MetricSummary(model, metric, (scales or {}).get(metric, ""), mean, low, high, len(values)))
    return rows


def win_rate_table(scores: Mapping[str, Mapping[str, Sequence[float]]]) -> list[WinRate]:
    """Win rates of every later-listed model against every earlier one, per metric: with the base listed first, the
    first rows are each model against the base, the rest are the pairs of variants."""
    models = list(scores)
    rows = []
    for j, model in enumerate(models):
        for opponent in models[:j]:
            for metric in scores[model]:
                if metric in scores[opponent]:
                    rows.append(win_rate(scores[model][metric], scores[opponent][metric], metric, model, opponent))
    return rows


def write_rows(rows: Sequence[object], path_stem: str) -> tuple[str, str]:
    """Write dataclass rows as ``path_stem.csv`` and ``path_stem.json``; returns both paths."""
    records = [asdict(row) for row in rows]
    os.makedirs(os.path.dirname(path_stem) or ".", exist_ok=True)
    csv_path, json_path = f"{path_stem}.csv", f"{path_stem}.json"
    with open(csv_path, "w", newline="") as f:
        if records:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    with open(json_path, "w") as f:
        json.dump(records, f, indent=2)
    return csv_path, json_path


def plot_intervals(rows: Sequence[MetricSummary], metric: str, path: str) -> str:
    """A dot-and-whisker plot of each model's mean and 95% interval for ``metric``, saved as PNG."""
    require_extra("plots", "matplotlib", "evaluate's interval plots").use("Agg")
    import matplotlib.pyplot as plt

    selected = [r for r in rows if r.metric == metric]
    fig, ax = plt.subplots(figsize=(max(3.0, 1.2 * len(selected) + 1.5), 3.2))
    x = np.arange(len(selected))
    means = np.array([r.mean for r in selected])
    errors = np.array([[r.mean - r.ci_low for r in selected], [r.ci_high - r.mean for r in selected]])
    ax.errorbar(x, means, yerr=errors, fmt="o", capsize=4)
    ax.set_xticks(x, [r.model for r in selected], rotation=20, ha="right")
    scale = selected[0].scale if selected else ""
    ax.set_ylabel(textwrap.fill(f"{metric} ({scale})" if scale else metric, 40))  # a scorer's scale is a sentence
    ax.set_title(f"{metric}:\nmean and 95% bootstrap interval")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    # "tight": the saved area grows to hold the title and labels, however long the metric's name and scale
    fig.savefig(path, dpi=100, bbox_inches="tight", pad_inches=0.1)
    plt.close(fig)
    return path


# The widest a grid's cell grows so that the longest word of a column label fits it whole; a longer word (a URL, a
# file name) is broken inside.
MAX_WORD_CELL = 256
#: evaluate's grid: samples side by side in one band (more continue in the next band, below, with their captions)
GRID_COLUMNS = 8
#: evaluate's grid: the largest tile edge in pixels (larger images are shrunk to it), so that a page stays small
GRID_CELL = 256
#: evaluate's grid: samples on one page (``grid.png``, then ``grid-2.png``, ...), so that a page of 1024-pixel
#: images is a few megapixels however many prompts a set has
GRID_PAGE_SAMPLES = 32


def image_grid(
    rows: Sequence[Sequence[Image.Image]],
    row_labels: Sequence[str] = (),
    column_labels: Sequence[str] = (),
    cell: int | None = None,
    columns: int | None = None,
) -> Image.Image:
    """A grid with one row per entry of ``rows`` (e.g. a model) and one column per image (e.g. a sample), each cell
    resized to ``cell`` pixels (default: the first image's width, at least 64 under column labels), widened where a
    column label's longest word is wider (up to :data:`MAX_WORD_CELL`), so that captions wrap between words.
    ``columns``: at most this many columns side by side; the rest continue in bands below, each band with its own
    column labels and every row (default: one band). Optional text labels: every label whole, a column's wrapped onto
    as many lines as its cell's width needs (its band's caption strip as tall as its longest), the row labels'
    column as wide as the widest; no label reaches into another's cell or onto an image."""
    if not rows or not rows[0]:
        raise ValueError("An image grid needs at least one image.")
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    words = [word for label in column_labels for word in str(label).split()]
    widest_word = max((math.ceil(measure.textlength(word, font=font)) for word in words), default=0)
    line_height = measure.textbbox((0, 0), "Ag", font=font)[3] + 2
    cell = max(
        cell or max(rows[0][0].width, 64 if column_labels else 0),
        min(widest_word + 4, MAX_WORD_CELL),
        line_height + 2 if row_labels else 0,  # a row label's line stays within its own row
    )
    wrapped = [wrap_label(str(label), cell - 4, font) for label in column_labels]
    label_width = max((int(measure.textlength(str(label), font=font)) + 6 for label in row_labels), default=0)
    n_cols = max(len(r) for r in rows)
    columns = min(columns or n_cols, n_cols)
    starts = range(0, n_cols, columns)
    strips = [max((len(lines) * line_height + 2 for lines in wrapped[s : s + columns]), default=0) for s in starts]
    grid = Image.new("RGB", (label_width + columns * cell, sum(strips) + len(starts) * len(rows) * cell), "white")
    draw = ImageDraw.Draw(grid)
    top = 0
    for start, strip in zip(starts, strips):
        for c, lines in enumerate(wrapped[start : start + columns]):
            for i, line in enumerate(lines):
                draw.text((label_width + c * cell + 2, top + 1 + i * line_height), line, fill="black", font=font)
        top += strip
        for r, images in enumerate(rows):
            if r < len(row_labels):
                draw.text((2, top + r * cell + 2), str(row_labels[r]), fill="black", font=font)
            for c, image in enumerate(images[start : start + columns]):
                grid.paste(image.convert("RGB").resize((cell, cell)), (label_width + c * cell, top + r * cell))
        top += len(rows) * cell
    return grid


def wrap_label(text: str, width: int, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> list[str]:
    """``text`` in lines of at most ``width`` pixels in ``font``: broken between words, and inside a word only where
    the word alone is wider; no character dropped."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def fits(line: str) -> bool:
        return measure.textlength(line, font=font) <= width

    lines: list[str] = []
    for word in text.split():
        if lines and fits(f"{lines[-1]} {word}"):
            lines[-1] = f"{lines[-1]} {word}"
            continue
        piece = ""
        for char in word:
            if piece and not fits(piece + char):
                lines.append(piece)
                piece = ""
            piece += char
        lines.append(piece)
    return lines or [""]
