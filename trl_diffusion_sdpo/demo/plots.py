"""The demo's figures: the breaking regime's samples along the run, each guard's row beside Diffusion-DPO's (the
headline), error deltas over steps (the paper's diagnostic) and lambda over steps. Each ``*_figure`` function
builds the figure and returns it (the tests read its axes); each ``plot_*`` saves it."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from ..config.extras import require_extra
from .report import rewind_text

# Figures built as matplotlib Figure objects, never through pyplot: no backend is chosen and no figure registered
# in the caller's process; savefig writes the files.
matplotlib = require_extra("plots", "matplotlib", "The demo's figures")

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

__all__ = ["breaking_regime_figure", "error_delta_figure", "lambda_figure", "smooth"]

_WINNER, _LOSER = "#1f77b4", "#d62728"


def _figure(**kwargs: Any) -> Figure:
    """A figure on its own Agg canvas (matplotlib without pyplot: it writes files and measures text extents)."""
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def smooth(values: list[float] | np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (shorter windows at the start), so the curve starts at the first value."""
    values = np.asarray(values, dtype=np.float64)
    if window <= 1 or len(values) == 0:
        return values
    cumulative = np.cumsum(np.insert(values, 0, 0.0))
    out = np.empty_like(values)
    for i in range(len(values)):
        lo = max(0, i + 1 - window)
        out[i] = (cumulative[i + 1] - cumulative[lo]) / (i + 1 - lo)
    return out


def _window(num_points: int) -> int:
    return max(1, num_points // 15)


def _limits(curves: list[np.ndarray]) -> tuple[float, float]:
    """Y limits that fit the smoothed curves and zero with some room; raw per-step values may fall outside."""
    low = min(0.0, *(float(c.min()) for c in curves))
    high = max(0.0, *(float(c.max()) for c in curves))
    pad = 0.15 * (high - low or 1e-6)
    return low - pad, high + pad


def error_delta_figure(histories: dict[str, dict[str, list[float]]], titles: dict[str, str]) -> Figure:
    """Top row: winner and loser ``policy - reference`` error per step, one panel per method, every panel on the same
    y scale (so a method's rise or fall reads against the others'); each title ends with the mean of the last 10% of
    steps. Bottom row: the implicit accuracy (fraction of pairs with ``u > 0``), i.e. whether the preference margin
    grows, on one scale from 0 to 1. Thin lines: per step; thick: moving average."""
    methods = list(histories)
    fig = _figure(figsize=(3.3 * len(methods) + 0.8, 5.4), layout="constrained")
    axes = fig.subplots(
        2, len(methods), sharex=True, sharey="row", gridspec_kw={"height_ratios": [2.2, 1]}, squeeze=False
    )
    smoothed = []
    for column, method in enumerate(methods):
        history = histories[method]
        steps = np.asarray(history["step"])
        window = _window(len(steps))
        top, bottom = axes[0, column], axes[1, column]
        finals = []
        for key, colour, label in (("delta/winner", _WINNER, "winner"), ("delta/loser", _LOSER, "loser")):
            curve = smooth(history[key], window)
            smoothed.append(curve)
            top.plot(steps, history[key], color=colour, alpha=0.15, linewidth=0.7)
            top.plot(steps, curve, color=colour, linewidth=2.0, label=label)
            finals.append(f"{label} {float(np.mean(np.asarray(history[key])[steps > 0.9 * steps[-1]])):+.4f}")
        top.axhline(0.0, color="black", linewidth=0.8)
        top.set_title(f"{titles[method]}\n{', '.join(finals)}", fontsize=9)
        top.grid(alpha=0.3)
        bottom.plot(steps, history["implicit_acc"], color="#555555", alpha=0.15, linewidth=0.7)
        bottom.plot(steps, smooth(history["implicit_acc"], window), color="#333333", linewidth=2.0)
        bottom.axhline(0.5, color="black", linewidth=0.8, linestyle=":")
        bottom.set_xlabel("optimizer step")
        bottom.grid(alpha=0.3)
    axes[0, 0].set_ylim(*_limits(smoothed))  # shared by the row: the limits fit every method's curves
    axes[1, 0].set_ylim(-0.02, 1.02)
    axes[0, 0].set_ylabel("denoising error\npolicy − reference")
    axes[1, 0].set_ylabel("implicit\naccuracy")
    fig.align_ylabels(axes[:, 0])
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=9)
    title = (
        "Denoising error relative to the frozen base (above 0: worse than the base), mean over seeds; "
        "titles: the mean of the last 10% of steps"
    )
    fig.suptitle(textwrap.fill(title, width=int(11 * fig.get_figwidth())), fontsize=10)
    return fig


def plot_error_deltas(histories: dict[str, dict[str, list[float]]], titles: dict[str, str], path: Path) -> None:
    """:func:`error_delta_figure`, saved to ``path``."""
    _save(error_delta_figure(histories, titles), path)


def lambda_figure(histories: dict[str, dict[str, list[float]]], titles: dict[str, str], max_lambda: float) -> Figure:
    """The safeguard's ``lambda`` per optimizer step (thin) and its moving average (thick), one colour per method;
    the legend sits beside the axes, off the curves."""
    fig = _figure(figsize=(9.0, 4.0), layout="constrained")
    ax = fig.subplots()
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (method, history) in enumerate(histories.items()):
        steps = np.asarray(history["step"])
        values = history["safeguard/lambda_mean"]
        colour = colours[(i + 2) % len(colours)]
        ax.plot(steps, values, color=colour, alpha=0.25, linewidth=0.7)
        ax.plot(
            steps,
            smooth(values, _window(len(steps))),
            color=colour,
            linewidth=2.0,
            label=f"{titles[method]} (mean {np.mean(values):.3f})",
        )
    ax.axhline(max_lambda, color="black", linewidth=0.8, linestyle=":", label=f"λ = {max_lambda:g}: plain DPO")
    ax.set_ylim(0.0, max_lambda * 1.08)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loser-gradient scale λ")
    ax.set_title("Diffusion-SDPO safeguard: λ over training (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
    return fig


def plot_lambda(
    histories: dict[str, dict[str, list[float]]], titles: dict[str, str], max_lambda: float, path: Path
) -> None:
    """:func:`lambda_figure`, saved to ``path``."""
    _save(lambda_figure(histories, titles, max_lambda), path)


def _save(fig: Figure, path: Path, dpi: int = 110) -> None:
    fig.savefig(path, dpi=dpi)


def _strip(images: np.ndarray, gap: int) -> np.ndarray:
    """``[P, H, W, 3]`` side by side with ``gap`` white pixels between them."""
    height, _, channels = images.shape[1:]
    spacer = np.ones((height, gap, channels))
    parts = [part for image in images for part in (np.clip(image, 0.0, 1.0), spacer)]
    return np.concatenate(parts[:-1], axis=1)


def breaking_regime_figure(
    regime: dict[str, Any], prompts: list[str], images: dict[str, np.ndarray], image_size: int
) -> Figure:
    """One row per method of the breaking regime (``regime``: its summary entry), one column per moment: the base,
    then each evaluation step; a cell shows the first sample of every held-out prompt, left to right, with the same
    noise in every row, so a row is read against Diffusion-DPO's by eye. ``images[key]``: ``[1 + steps, P, H, W, 3]``.
    Under each cell, the held-out reward's change from the base at that step (mean over every sample)."""
    settings, rows = regime["settings"], regime["methods"]
    steps = [str(s) for s in settings["eval_steps"]]
    titles = ["base", *(f"step {s}" + (" (end)" if s == steps[-1] else "") for s in steps)]
    gap = max(1, image_size // 16)
    # inches: a strip's height, the label column, the gaps; the figure is sized so that every strip fits whole
    labels = {key: _row_label(row) for key, row in rows.items()}
    # the label column fits the longest label line (about 13 characters of 9-point text to the inch)
    longest = max(len(line) for text in labels.values() for line in text.splitlines())
    strip_height, label, gap_x, gap_y, bottom = 0.6, max(1.9, 0.2 + longest / 13), 0.12, 0.3, 0.25
    strip_width = strip_height * (len(prompts) * (image_size + gap) - gap) / image_size
    width = label + len(titles) * strip_width + (len(titles) - 1) * gap_x + 0.1
    heading = [
        f"Breaking regime: lr {settings['learning_rate']:g}, {settings['max_steps']} steps of "
        f"{settings['batch_size']} pairs, seed {settings['seed']}; the first held-out sample of each prompt, the "
        "same noise in every row",
        f"Prompts, left to right: {'; '.join(prompts)}. Labels: held-out reward change from the base "
        f"({regime['base_reward']:.3f}), mean of {settings['eval_seeds_per_prompt']} sample(s) per prompt",
    ]
    # about 12 characters of 9-point text to the inch; the top margin grows with the heading's lines
    lines = [line for part in heading for line in textwrap.wrap(part, width=int(12 * width))]
    top = 0.45 + 0.17 * len(lines)
    height = top + bottom + len(rows) * strip_height + (len(rows) - 1) * gap_y
    fig = _figure(figsize=(width, height))
    axes = fig.subplots(len(rows), len(titles), squeeze=False)
    fig.subplots_adjust(
        left=label / width,
        right=1 - 0.1 / width,
        top=1 - top / height,
        bottom=bottom / height,
        wspace=gap_x / strip_width,
        hspace=gap_y / strip_height,
    )
    for i, (key, row) in enumerate(rows.items()):
        for j, title in enumerate(titles):
            ax = axes[i, j]
            ax.imshow(_strip(images[key][j], gap), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if i == 0:
                ax.set_title(title, fontsize=10)
            if j > 0:
                change = row["reward_change"][steps[j - 1]]
                ax.set_xlabel(f"reward {change:+.3f}", fontsize=8, labelpad=1)
        axes[i, 0].text(
            -0.03,
            0.5,
            labels[key],
            transform=axes[i, 0].transAxes,
            ha="right",
            va="center",
            fontsize=9,
            fontweight="bold" if key == "dpo" else "normal",
        )
    fig.suptitle("\n".join(lines), fontsize=9)
    return fig


def _row_label(row: dict[str, Any]) -> str:
    """A row's label: its method, its held-out reward change at the end and, for a rewinding row, its rewinds."""
    steps = list(row["reward_change"])
    text = f"{row['label']}\nreward {row['reward_change'][steps[-1]]:+.3f}"
    return text + (f"\n{rewind_text(row['rewind'])}" if "rewind" in row else "")


def plot_breaking_regime(
    regime: dict[str, Any], prompts: list[str], images: dict[str, np.ndarray], image_size: int, path: Path
) -> None:
    """:func:`breaking_regime_figure`, saved to ``path``."""
    _save(breaking_regime_figure(regime, prompts, images, image_size), path, dpi=120)
