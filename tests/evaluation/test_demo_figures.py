"""The demo's figures, read from the matplotlib objects that build them: panels of one measure share their y scale,
no two texts overlap or leave the figure, legends stay off the data; and the console report, which leads with the
breaking regime and prints the recommendation as plain text.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")  # the `plots` extra

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from trl_diffusion_sdpo.demo.plots import (  # noqa: E402
    breaking_regime_figure,
    error_delta_figure,
    lambda_figure,
    smooth,
)
from trl_diffusion_sdpo.demo.report import (  # noqa: E402
    RECOMMENDATION_FILE,
    format_breaking_table,
    format_closing,
    format_report,
    format_table,
    plain_text,
    recommendation_line,
    safeguard_recommendation,
)

LABELS = {
    "dpo": "Diffusion-DPO",
    "sdpo-output": "SDPO output mu=0.9",
    "sdpo-output-mu0.6": "SDPO output mu=0.6",
    "sdpo-output-mu0.2": "SDPO output mu=0.2",
    "sdpo-parameter": "SDPO parameter mu=0.9",
}


def _histories(steps: int = 50) -> dict[str, dict[str, list[float]]]:
    """Per method, logged steps on very different scales (Diffusion-DPO's errors rise by ~0.005, ``mu=0.9``'s fall
    by ~0.05): where each panel had its own scale, the two would look alike."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0.0, 1.0, steps)
    scales = {"dpo": 0.005, "sdpo-output": -0.05, "sdpo-output-mu0.6": 0.001, "sdpo-output-mu0.2": 0.005}
    scales["sdpo-parameter"] = -0.04
    out = {}
    for key, scale in scales.items():
        noise = rng.normal(0.0, abs(scale) / 5, (2, steps))
        out[key] = {
            "step": list(range(1, steps + 1)),
            "delta/winner": list(scale * ramp + noise[0]),
            "delta/loser": list(1.5 * scale * ramp + noise[1]),
            "implicit_acc": list(np.clip(0.5 + np.sign(scale) * 0.3 * ramp + rng.normal(0, 0.1, steps), 0, 1)),
            "safeguard/lambda_mean": list(np.clip(0.2 + 0.8 * (scale > 0) + rng.normal(0, 0.05, steps), 0, 1)),
        }
    return out


def _texts(fig: Figure) -> list[tuple[str, object]]:
    """Every drawn, non-empty text of ``fig`` with its extent in display pixels (after a draw): titles, labels,
    legends, figure texts, and the tick labels of ticks inside their axis's view (the others are not drawn)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    tick_labels, drawn = set(), []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                tick_labels.update((id(tick.label1), id(tick.label2)))
                if low - 1e-9 * (high - low) <= tick.get_loc() <= high + 1e-9 * (high - low):
                    drawn += [label for label in (tick.label1, tick.label2) if ax.get_visible()]
    others = [t for t in fig.findobj(Text) if id(t) not in tick_labels and all(a.get_visible() for a in _ancestors(t))]
    return [
        (t.get_text(), t.get_window_extent(renderer))
        for t in drawn + others
        if t.get_visible() and t.get_text().strip()
    ]


def _ancestors(text: Text) -> list:
    """The axes or legend a text belongs to, if any (a hidden one hides its texts)."""
    return [a for a in (text.axes, getattr(text, "_legend", None)) if a is not None]


def _overlaps(texts: list[tuple[str, object]]) -> list[tuple[str, str]]:
    """Pairs of ``texts`` (:func:`_texts`) whose extents overlap by more than a pixel each way."""
    clashes = []
    for (a, box_a), (b, box_b) in itertools.combinations(texts, 2):
        width = min(box_a.x1, box_b.x1) - max(box_a.x0, box_b.x0)
        height = min(box_a.y1, box_b.y1) - max(box_a.y0, box_b.y0)
        if width > 1 and height > 1:
            clashes.append((a, b))
    return clashes


def _outside(fig: Figure, texts: list[tuple[str, object]]) -> list[str]:
    """The ``texts`` of ``fig`` (:func:`_texts`) that reach past the figure's edge (cut off in the saved file)."""
    width, height = fig.canvas.get_width_height()
    return [t for t, box in texts if box.x0 < -1 or box.y0 < -1 or box.x1 > width + 1 or box.y1 > height + 1]


def _breaking_inputs(rows: int = 8, prompts: int = 6, size: int = 32):
    rng = np.random.default_rng(1)
    keys = ["dpo", *(f"guard-{i}" for i in range(1, rows))]
    labels = ["Diffusion-DPO", "SDPO output mu=0.5", "DPO on_pathology=rewind", "SDPO output mu=auto"]
    labels += ["DPO max_margin=5", "DPO sft_weight=1", "DPO auto_beta", "DPO ema_decay=0.99"]
    regime = {
        "settings": {
            "learning_rate": 2e-4,
            "max_steps": 50,
            "batch_size": 2,
            "seed": 0,
            "eval_steps": [25, 50],
            "eval_seeds_per_prompt": 4,
        },
        "base_reward": 0.862,
        "methods": {
            key: {"label": label, "reward_change": {"25": -0.077, "50": -0.096}} for key, label in zip(keys, labels)
        },
    }
    for row in regime["methods"].values():  # the rewinding row's label carries its rewinds and stop
        if "rewind" in row["label"]:
            row["rewind"] = {"rewinds": [[10, 0], [20, 0]], "stopped_at": 20}
    names = ["red square on black", "green square on black", "blue circle on white", "yellow square on white"]
    names += ["purple triangle on white", "orange square on black"]
    images = {key: rng.random((3, prompts, size, size, 3)) for key in keys}
    return regime, names[:prompts], images, size


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# ---------------------------------------------------------------------------------------------------- losses.png


def test_error_delta_panels_of_one_measure_share_a_y_scale_that_fits_every_method():
    histories = _histories()
    fig = error_delta_figure(histories, LABELS)
    top, bottom = fig.axes[: len(histories)], fig.axes[len(histories) : 2 * len(histories)]
    assert {ax.get_ylabel() for ax in top[:1]} == {"denoising error\npolicy − reference"}
    assert len({ax.get_ylim() for ax in top}) == 1, [ax.get_ylim() for ax in top]
    assert len({ax.get_ylim() for ax in bottom}) == 1, [ax.get_ylim() for ax in bottom]
    # the shared scale holds the largest method's smoothed curves and zero (computed here from the histories)
    low, high = top[0].get_ylim()
    window = max(1, 50 // 15)
    curves = [smooth(h[k], window) for h in histories.values() for k in ("delta/winner", "delta/loser")]
    assert low <= min(0.0, *(c.min() for c in curves)) and high >= max(0.0, *(c.max() for c in curves))
    assert low < -0.04 and high > 0.005  # Diffusion-DPO's rise and mu=0.9's fall on one axis
    assert bottom[0].get_ylim() == pytest.approx((-0.02, 1.02))
    # each title carries the method's last-10% means, the figures the console's table holds
    dpo = histories["dpo"]
    winner = np.mean(np.asarray(dpo["delta/winner"])[np.asarray(dpo["step"]) > 45])
    assert f"winner {winner:+.4f}" in top[0].get_title()


def test_error_delta_figure_texts_neither_overlap_nor_leave_the_figure():
    for methods in (list(LABELS), ["dpo"], ["dpo", "sdpo-output"]):
        histories = {k: v for k, v in _histories().items() if k in methods}
        fig = error_delta_figure(histories, LABELS)
        texts = _texts(fig)  # one draw: the figure is not changed after it
        assert _overlaps(texts) == [], methods
        assert _outside(fig, texts) == [], methods
        assert not [t for t, _ in texts if "`" in t or "](" in t]  # no raw markdown in an image


# ---------------------------------------------------------------------------------------------------- lambda.png


def test_lambda_legend_sits_off_the_curves_and_no_text_overlaps():
    histories = {k: v for k, v in _histories().items() if k != "dpo"}
    fig = lambda_figure(histories, LABELS, 1.0)
    (ax,) = fig.axes
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend, plot = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
    assert legend.x0 >= plot.x1 or legend.y1 <= plot.y0 or legend.y0 >= plot.y1, (legend, plot)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    means = {k: np.mean(h["safeguard/lambda_mean"]) for k, h in histories.items()}
    assert labels[:-1] == [f"{LABELS[k]} (mean {mean:.3f})" for k, mean in means.items()]
    assert ax.get_ylim() == pytest.approx((0.0, 1.08))
    texts = _texts(fig)
    assert _overlaps(texts) == [] and _outside(fig, texts) == []


# ---------------------------------------------------------------------------------------- breaking_regime.png


@pytest.mark.parametrize("rows,prompts", [(8, 6), (2, 6), (8, 3)])
def test_breaking_regime_figure_texts_neither_overlap_nor_leave_the_figure(rows, prompts):
    regime, names, images, size = _breaking_inputs(rows, prompts)
    fig = breaking_regime_figure(regime, names, images, size)
    texts = _texts(fig)
    assert _overlaps(texts) == [] and _outside(fig, texts) == []
    # one row per method, one column per moment (the base, then each evaluation step), each a strip of the prompts
    assert len(fig.axes) == rows * 3
    strip = fig.axes[0].get_images()[0].get_array()
    assert strip.shape[0] == size and strip.shape[1] > prompts * size


# ---------------------------------------------------------------------------------------------------- console text


def test_the_console_recommendation_is_plain_text_with_every_word_of_the_shipped_markdown():
    shipped = json.loads(RECOMMENDATION_FILE.read_text())["text"]
    line = recommendation_line(safeguard_recommendation())
    assert "`" not in line and "](" not in line and "**" not in line
    for code in re.findall(r"`([^`]*)`", shipped):
        assert code in line
    assert plain_text(shipped) in line
    assert plain_text("See [the page](docs/x.md): **set** `mu=0.5`.") == "See the page (docs/x.md): set mu=0.5."
    assert plain_text("- plain line\n- another") == "- plain line\n- another"


def test_the_console_report_leads_with_the_breaking_regime():
    """The summary of the run behind the docs' figures (``--full``): the breaking regime's table, then the tables of
    every method; without the regime, the tables alone."""
    summary = json.loads((Path(__file__).resolve().parents[2] / "docs/images/demo_summary.json").read_text())
    report = format_report(summary)
    breaking, tables, closing = (
        format_breaking_table(summary["breaking_regime"]),
        format_table(summary),
        format_closing(summary),
    )
    assert report == f"{breaking}\n\n{tables}\n\n{closing}"
    assert report.index("Breaking regime: lr") < report.index("Held-out reward (base")
    without = {**summary, "breaking_regime": None}
    assert format_report(without) == f"{tables}\n\n{format_closing(without)}"
    assert "In the breaking regime" in closing and "In the breaking regime" not in format_closing(without)
