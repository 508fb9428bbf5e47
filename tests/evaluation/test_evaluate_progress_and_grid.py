"""`evaluate` (and `pairs`) report each model and batch in a log, take train's --threads, and the grid shows every
sample of every model with captions inside their own tiles' columns."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig, get_peft_model_state_dict
from PIL import Image, ImageDraw, ImageFont

from trl_diffusion_sdpo.cli.main import build_parser, main
from trl_diffusion_sdpo.evaluation import Scorer, evaluate, register_scorer
from trl_diffusion_sdpo.evaluation import progress as progress_module
from trl_diffusion_sdpo.evaluation.compare import GRID_CELL, GRID_COLUMNS, GRID_PAGE_SAMPLES
from trl_diffusion_sdpo.evaluation.progress import Progress
from trl_diffusion_sdpo.io.cpu_threads import CPU_THREADS
from trl_diffusion_sdpo.testing import build_tiny_sd_pipeline

ROOT = Path(__file__).resolve().parents[2]


class MeanRedScorer(Scorer):
    """The mean red channel in [0, 1]: cheap and deterministic."""

    name = "mean_red"
    scale = "mean(R) / 255"

    def score(self, images, prompts) -> torch.Tensor:
        return torch.tensor(
            [np.asarray(image.convert("RGB"), dtype=np.float64)[..., 0].mean() / 255 for image in images]
        )


register_scorer("progress-test-mean-red", MeanRedScorer, overwrite=True)


# -- progress --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """A saved tiny base pipeline and a LoRA folder for it."""
    root = tmp_path_factory.mktemp("progress-models")
    base = build_tiny_sd_pipeline(seed=0, tokenizer_dir=str(root / "tok"))
    base.save_pretrained(str(root / "base"))
    base.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    )
    lora_state = convert_state_dict_to_diffusers(get_peft_model_state_dict(base.unet))
    StableDiffusionPipeline.save_lora_weights(str(root / "lora"), unet_lora_layers=lora_state)
    return {"base": str(root / "base"), "lora": str(root / "lora")}


def test_evaluate_logs_each_model_and_each_batch_as_it_goes_off_a_terminal(
    tmp_path, tiny_models, monkeypatch, capsys, torch_threads
):
    """Off a terminal (pytest's stderr), run as from a shell (no logging configured), the command writes a line per
    model and per batch to stderr, generating and scoring, as the package's INFO messages; a line follows each
    pipeline call before the next one starts."""
    events: list[str] = []
    original = StableDiffusionPipeline.__call__

    def recorded(self, *args, **kwargs):
        events.append("call")
        return original(self, *args, **kwargs)

    class Recorder(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            events.append(record.getMessage())

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", recorded)
    batch = 2

    def run(prompts: list[str], *flags: str) -> tuple[list[str], str]:
        """The command's log lines for ``prompts``, and its stderr."""
        events.clear()
        (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
        package, root = logging.getLogger("trl_diffusion_sdpo"), logging.getLogger()
        saved = (root.handlers[:], package.handlers[:], package.level)
        recorder = Recorder()
        logging.getLogger("trl_diffusion_sdpo.evaluation").addHandler(recorder)
        root.handlers, package.handlers = [], []  # as a shell runs the command: logging not configured
        package.setLevel(logging.NOTSET)
        try:
            code = main(
                ["evaluate", "--base", tiny_models["base"], "--model", f"lora={tiny_models['lora']}", "--prompts",
                 str(tmp_path / "prompts.txt"), "--scorer", "progress-test-mean-red", "--output-dir",
                 str(tmp_path / "out"), "--steps", "1", "--resolution", "32", "--batch-size", str(batch),
                 "--score-batch-size", "2", "--device", "cpu", "--bootstrap-resamples", "20", *flags]
            )  # fmt: skip
        finally:
            logging.getLogger("trl_diffusion_sdpo.evaluation").removeHandler(recorder)
            root.handlers, package.handlers = saved[:2]
            package.setLevel(saved[2])
        assert code == 0
        return list(events), capsys.readouterr().err

    prompts = ["a red cube", "a blue ball", "a tree"]
    events_seen, err = run(prompts)
    batches = math.ceil(len(prompts) / batch)
    assert events_seen.count("call") == 2 * batches  # two models
    lines = [event for event in events_seen if event != "call"]
    assert lines and all(f"trl_diffusion_sdpo.evaluation.progress: {line}" in err for line in lines), err
    for number, name in enumerate(("base", "lora"), start=1):
        assert any(line.startswith(f"model {number}/2 {name}: generating {len(prompts)} of") for line in lines), lines
        for b in range(1, batches + 1):
            done = min(b * batch, len(prompts))
            pattern = rf"generating {name}: {done}/{len(prompts)} images, batch {b}/{batches}, \d+\.\d s"
            assert any(re.match(pattern, line) for line in lines), (pattern, lines)
            pattern = rf"scoring {name} \(mean_red\): {done}/{len(prompts)} images, batch {b}/{batches}, \d+\.\d s"
            assert any(re.match(pattern, line) for line in lines), (pattern, lines)
    calls = [i for i, event in enumerate(events_seen) if event == "call"]
    for this, following in zip(calls, calls[1:]):  # never two batches without a line between them
        assert any(event.startswith("generating") for event in events_seen[this:following]), events_seen
    assert any(event.startswith("generating") for event in events_seen[calls[-1] :])

    # One prompt more: the counts are of the images this run generates, the cached ones said apart.
    events_seen, _ = run([*prompts, "a boat"], "--overwrite")
    lines = [event for event in events_seen if event != "call"]
    assert lines[0].startswith("2 models x 4 prompts x 1 seed = 8 images, 2 to generate (6 in "), lines
    for number, name in enumerate(("base", "lora"), start=1):
        assert f"model {number}/2 {name}: generating 1 of 4 images" in lines, lines
        assert any(re.match(rf"generating {name}: 1/1 images, batch 1/1, \d+\.\d s$", line) for line in lines)


def test_pairs_logs_each_scoring_batch_off_a_terminal(tmp_path, monkeypatch, caplog):
    """``pairs`` scores its samples with a log line per batch where no bar shows (``progress=False``)."""
    import trl_diffusion_sdpo.evaluation.pairs as pairs_module

    monkeypatch.setattr(pairs_module, "generate_images", _solid_generation(16))
    caplog.set_level(logging.INFO, logger="trl_diffusion_sdpo")
    prompts, k, batch = ["a", "b", "c"], 3, 4
    pairs_module.make_pairs(
        "unused-base", prompts=prompts, num_images=k, scorer="progress-test-mean-red", output_dir=str(tmp_path),
        score_batch_size=batch, progress=False, device="cpu",
    )  # fmt: skip
    total, batches = len(prompts) * k, math.ceil(len(prompts) * k / batch)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("trl_diffusion_sdpo")]
    for b in range(1, batches + 1):
        pattern = rf"scoring: {min(b * batch, total)}/{total} images, batch {b}/{batches}, \d+\.\d s"
        assert sum(bool(re.match(pattern, line)) for line in lines) == 1, (pattern, lines)


def test_the_time_left_is_the_rate_so_far_times_what_remains(monkeypatch, caplog):
    """After ``k`` of ``n`` images in ``t`` seconds a log line says about ``t / k * (n - k)`` seconds are left (the
    images still to make, not all of them); the last line, nothing left, gives no estimate. The clock is this
    test's: the stage starts at 100 s and its batches end at 110, 130 and 160 s."""
    clock = iter([100.0, 110.0, 130.0, 160.0])
    monkeypatch.setattr(progress_module, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    caplog.set_level(logging.INFO, logger=progress_module.logger.name)
    total = 8
    with Progress("generating", total, "images", bar=False, batches=3) as progress:
        for count in (2, 2, 4):
            progress.update(count)
    lines = [r.getMessage() for r in caplog.records if r.name == progress_module.logger.name]
    assert len(lines) == 3
    done, elapsed = [2, 4, 8], [10.0, 30.0, 60.0]
    for line, k, t in zip(lines[:2], done, elapsed):
        left = float(re.search(r"about (\d+) s left$", line).group(1))
        assert left == pytest.approx(t / k * (total - k), abs=0.5), line  # 30 s each time, as printed rounded
    assert lines[2] == "generating: 8/8 images, batch 3/3, 60.0 s"


# -- threads ---------------------------------------------------------------------------------------------------------


def test_threads_is_trains_option_with_its_default_and_help():
    """The flag of both sampling commands is train's: the same default and the same help text."""
    from trl_diffusion_sdpo.cli.train import DiffusionScriptArguments

    trains = next(f for f in dataclasses.fields(DiffusionScriptArguments) if f.name == "threads")
    parser = build_parser()
    for command in ("evaluate", "pairs"):
        sub = parser._subparsers._group_actions[0].choices[command]
        action = next(a for a in sub._actions if "--threads" in a.option_strings)
        assert (action.default, action.help, action.type) == (trains.default, trains.metadata["help"], int), command


@pytest.mark.parametrize("command", ["evaluate", "pairs"])
def test_threads_set_torchs_threads_for_the_command_before_it_samples(command, monkeypatch, torch_threads):
    """``--threads N`` on the CPU: torch computes with N threads when the command hands over to the library;
    unset, the command line's CPU default (train's rule); 0 and a GPU device leave torch's setting alone."""
    from trl_diffusion_sdpo.cli import evaluate as evaluate_command
    from trl_diffusion_sdpo.cli import pairs as pairs_command

    class Called(Exception):
        """Ends the command where it hands over to the library."""

    seen: list[int] = []

    def record(*args, **kwargs):
        seen.append(torch.get_num_threads())
        raise Called

    monkeypatch.setattr(evaluate_command, "evaluate", record)
    monkeypatch.setattr(pairs_command, "make_pairs", record)
    for flags, expected in (
        (["--device", "cpu", "--threads", "2"], 2),
        (["--device", "cpu"], CPU_THREADS),
        (["--device", "cpu", "--threads", "0"], 3),
        (["--device", "cuda", "--threads", "2"], 3),  # a GPU run: its CPU threads only feed the device
    ):
        torch.set_num_threads(3)
        with pytest.raises(Called):
            main([command, "--base", "b", "--prompts", "p.txt", *flags])
        assert seen.pop() == expected, flags


def test_negative_threads_end_the_command_in_one_line_naming_the_flag(capsys):
    assert main(["evaluate", "--base", "b", "--device", "cpu", "--threads", "-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--threads -1" in err[0], err


# -- grid ------------------------------------------------------------------------------------------------------------


def _colour(i: int) -> tuple[int, int, int]:
    """Distinct light colours, never grey (every channel at least 130 and no two equal: never the captions' ink nor
    its anti-aliased edges)."""
    return 130 + 25 * (i % 5), 131 + 25 * (i // 5 % 5), 132 + 25 * (i // 25)


def _solid_generation(size: int):
    """A stand-in for `generate_images` that writes one solid-colour PNG per (model, prompt, seed), a colour each."""

    def generate(base, specs, prompts, seeds, settings, cache_dir, batch_size, device, progress):
        os.makedirs(cache_dir, exist_ok=True)
        paths, index = {}, 0
        for spec in specs:
            paths[spec.name] = []
            for p in range(len(prompts)):
                for s in seeds:
                    path = os.path.join(cache_dir, f"{spec.name}-{p}-{s}.png")
                    Image.new("RGB", (size, size), _colour(index)).save(path)
                    paths[spec.name].append(path)
                    index += 1
        return paths, {spec.name: len(paths[spec.name]) for spec in specs}

    return generate


def _ink(pixels: np.ndarray) -> int:
    return int((pixels.astype(np.float64).mean(axis=-1) < 128).sum())


def _text_ink(text: str) -> int:
    """The dark pixels of ``text``'s words drawn alone in the grid's font."""
    font = ImageFont.load_default()
    total = 0
    for word in text.split():
        canvas = Image.new("RGB", (600, 40), "white")
        ImageDraw.Draw(canvas).text((2, 2), word, fill="black", font=font)
        total += _ink(np.asarray(canvas))
    return total


def _tiles(pixels: np.ndarray, colours: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Per colour found, its tile ``(left, top, size)``: the colour fills exactly a square (nothing drawn on it)."""
    tiles = []
    for colour in colours:
        where = np.argwhere((pixels == colour).all(axis=-1))
        if where.size == 0:
            tiles.append(None)
            continue
        (top, left), (bottom, right) = where.min(axis=0), where.max(axis=0)
        size = int(right - left + 1)
        assert bottom - top + 1 == size and len(where) == size * size, (colour, left, top, size)
        tiles.append((int(left), int(top), size))
    return tiles


def test_the_grid_shows_every_sample_of_every_model_with_each_caption_over_its_own_column(tmp_path, monkeypatch):
    """More samples than a band holds and than a page holds: every image appears exactly once, whole, on the pages in
    order (a model per row, the samples in order along bands and pages); each caption's ink lies in its own column
    above its band, and nothing else is drawn outside the tiles but the model names."""
    import trl_diffusion_sdpo.evaluation.run as run_module

    monkeypatch.setattr(run_module, "generate_images", _solid_generation(40))
    names = ["base", "a-much-longer-model-name"]
    # captions of 1 to 4 lines, so that the bands' caption strips differ in height
    prompts = [f"prompt {i}: " + " extraordinarily" * (1 + i // 4 % 4) for i in range(GRID_PAGE_SAMPLES // 2 + 3)]
    seeds = [0, 1]
    out = tmp_path / "eval"
    kwargs = dict(
        prompts=prompts, scorers=["progress-test-mean-red"], output_dir=str(out), seeds=seeds, n_resamples=20,
        progress=False, device="cpu",
    )  # fmt: skip
    result = evaluate("unused-base", {names[1]: "unused-lora"}, **kwargs)
    samples = [(p, s) for p in prompts for s in seeds]
    captions = [f"{p} (seed {s})" for p, s in samples]
    pages = math.ceil(len(samples) / GRID_PAGE_SAMPLES)
    assert pages > 1 and len(samples) > GRID_COLUMNS
    files = [out / ("grid.png" if page == 1 else f"grid-{page}.png") for page in range(1, pages + 1)]
    assert [result.files["grid"], *(result.files[f"grid/{p}"] for p in range(2, pages + 1))] == list(map(str, files))
    assert not (out / f"grid-{pages + 1}.png").exists()

    colours = {name: [_colour(m * len(samples) + i) for i in range(len(samples))] for m, name in enumerate(names)}
    shown = 0
    for file in files:
        pixels = np.asarray(Image.open(file).convert("RGB"))
        per_model = {name: _tiles(pixels, colours[name]) for name in names}
        on_page = [i for i, tile in enumerate(per_model["base"]) if tile is not None]
        assert on_page == list(range(shown, shown + len(on_page))), on_page  # the next samples, in order
        for name in names:
            assert [i for i, t in enumerate(per_model[name]) if t is not None] == on_page, name
        tiles = [[per_model[name][i] for name in names] for i in on_page]
        size = tiles[0][0][2]
        for column in tiles:  # a sample's models stacked in order, one tile below the other
            assert [(t[0], t[1] - column[0][1]) for t in column] == [(column[0][0], r * size) for r in range(2)]
        covered = np.zeros(pixels.shape[:2], bool)
        for column in tiles:
            for left, top, side in column:
                covered[top : top + side, left : left + side] = True
        # Each caption's ink: in its column, between the band above (or the top) and its own tiles.
        band_tops = sorted({column[0][1] for column in tiles})
        per_band = [sum(column[0][1] == top for column in tiles) for top in band_tops]
        assert max(per_band) == min(len(on_page), GRID_COLUMNS) and sum(per_band) == len(on_page), per_band
        captions_ink = 0
        for k, column in enumerate(tiles):
            left, top, side = column[0]
            band = band_tops.index(top)
            above = band_tops[band - 1] + 2 * side if band else 0
            strip = pixels[above:top, left : left + side]
            expected = _text_ink(captions[on_page[k]])
            assert _ink(strip) == pytest.approx(expected, rel=0.05), captions[on_page[k]]
            captions_ink += _ink(strip)
        labels_ink = len(band_tops) * sum(_text_ink(name) for name in names)
        left_edge = min(column[0][0] for column in tiles)
        assert _ink(pixels[:, :left_edge]) == pytest.approx(labels_ink, rel=0.05)  # the model names, once a band
        assert _ink(pixels) == pytest.approx(captions_ink + labels_ink, rel=0.02)  # no ink anywhere else
        assert not covered[:, :left_edge].any()
        shown += len(on_page)
    assert shown == len(samples)

    # A smaller rerun into the folder: its pages, and none of the earlier run's beyond them.
    kwargs.update(prompts=prompts[:3], overwrite=True)
    again = evaluate("unused-base", {names[1]: "unused-lora"}, **kwargs)
    assert [k for k in again.files if k.startswith("grid")] == ["grid"]
    assert sorted(f for f in os.listdir(out) if f.startswith("grid")) == ["grid.png"]


def test_an_edits_grid_shows_each_source_above_its_edits(tmp_path):
    """For edits, the first row holds each sample's (first) source, above that sample's tile of every model."""
    from trl_diffusion_sdpo.evaluation.run import write_grid

    names, samples = ["base", "tuned"], 3
    colours = [_colour(i) for i in range(len(names) * samples + samples)]
    image_paths = {}
    for m, name in enumerate(names):
        image_paths[name] = []
        for i in range(samples):
            image_paths[name].append(str(tmp_path / f"{name}-{i}.png"))
            Image.new("RGB", (24, 24), colours[m * samples + i]).save(image_paths[name][-1])
    sources = [(lambda i=i: [Image.new("RGB", (24, 24), colours[len(names) * samples + i])]) for i in range(samples)]
    pages = write_grid(str(tmp_path), names, image_paths, ["make it red", "make it blue", "add a hat"], sources)
    pixels = np.asarray(Image.open(pages[0]).convert("RGB"))
    for i in range(samples):
        column = _tiles(pixels, [sources[i]()[0].getpixel((0, 0)), *(colours[m * samples + i] for m in range(2))])
        assert None not in column, i
        left, top, size = column[0]
        assert [(t[0], t[1]) for t in column] == [(left, top + r * size) for r in range(3)], column


def test_a_row_label_stays_within_its_row_over_images_smaller_than_a_line():
    """8-pixel images under two model names: each name's ink lies in its own row of the label column."""
    from trl_diffusion_sdpo.evaluation import image_grid

    names = ["base", "lora"]
    rows = [[Image.new("RGB", (8, 8), _colour(r))] for r in range(2)]
    grid = np.asarray(image_grid(rows, row_labels=names).convert("RGB"))
    tiles = _tiles(grid, [_colour(0), _colour(1)])
    for (left, top, size), name in zip(tiles, names):
        assert _ink(grid[top : top + size, :left]) == pytest.approx(_text_ink(name), rel=0.05), name


def test_the_evaluation_page_states_the_grids_layout_from_its_constants():
    """The docs' line on grid.png restates the layout's numbers: they are the code's."""
    text = (ROOT / "docs" / "evaluation.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `grid.png`"))
    assert f"{GRID_COLUMNS} samples side by side" in row and f"{GRID_PAGE_SAMPLES} samples a page" in row, row
    assert f"at most {GRID_CELL} pixels" in row, row
