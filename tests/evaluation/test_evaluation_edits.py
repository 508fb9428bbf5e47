"""Evaluation and pairs on image edits: prompt sets of edits (JSONL, datasets, rows), bad sources named before any
generation, the sources reaching a tiny FluxKontextPipeline (and FLUX.2 [klein] for several reference images), an
editing scorer that receives them, and pairs that load back with their sources."""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import os

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
from diffusers import FluxKontextPipeline
from PIL import Image

from tests.helpers.flux_kontext import tiny_preferred_source_sizes
from trl_diffusion_sdpo.cli.main import main
from trl_diffusion_sdpo.data import load_preference_data
from trl_diffusion_sdpo.evaluation import (
    EditPrompt,
    EditScorer,
    GenerationSettings,
    Scorer,
    evaluate,
    load_edits,
    load_prompt_set,
    make_pairs,
    register_scorer,
    sample_images,
)
from trl_diffusion_sdpo.evaluation.generation import _prepare, load_base_pipeline
from trl_diffusion_sdpo.testing import build_tiny_flux2_klein_pipeline, build_tiny_flux_pipeline

torch.set_num_threads(1)
FAST = GenerationSettings(num_inference_steps=2, guidance_scale=1.0)


def closeness(edit: Image.Image, source: Image.Image) -> float:
    """The test's own score of an edit: minus the mean absolute difference to the source (resized to the edit's
    size), over 255. An edit identical to its source scores 0; any change lowers it."""
    a = np.asarray(edit.convert("RGB"), dtype=np.float64)
    b = np.asarray(source.convert("RGB").resize(edit.size, Image.Resampling.BILINEAR), dtype=np.float64)
    return float(-np.abs(a - b).mean() / 255)


class SourceCloseness(EditScorer):
    """An editing scorer made for the test: prefers edits close to their (first) source, and records what it got."""

    name = "closeness"
    scale = "-mean|edit - source| / 255"
    received: list = []

    def score(self, images, prompts, sources) -> torch.Tensor:
        type(self).received += [(p, [np.asarray(s) for s in group]) for p, group in zip(prompts, sources)]
        return torch.tensor([closeness(image, group[0]) for image, group in zip(images, sources)])


class Redness(Scorer):
    """A text-to-image scorer: mean red minus mean blue, over 255."""

    name = "redness"
    scale = "mean(R - B) / 255"

    def score(self, images, prompts) -> torch.Tensor:
        arrays = [np.asarray(image.convert("RGB"), dtype=np.float64) for image in images]
        return torch.tensor([(a[..., 0] - a[..., 2]).mean() / 255 for a in arrays])


register_scorer("test-closeness", SourceCloseness, overwrite=True)
register_scorer("test-edit-redness", Redness, overwrite=True)


def picture(colour: tuple[int, int, int], size: tuple[int, int] = (32, 32), corner: int = 250) -> Image.Image:
    """A flat colour with a lighter square in the top-left corner, so sources differ in layout too."""
    image = Image.new("RGB", size, colour)
    image.paste((corner, corner, corner), (0, 0, size[0] // 3, size[1] // 3))
    return image


@pytest.fixture(autouse=True)
def tiny_kontext_sources(monkeypatch) -> None:
    """Kontext resizes each source to its preferred size, here scaled to the tiny model's (see
    ``tiny_preferred_source_sizes``)."""
    tiny_preferred_source_sizes(monkeypatch)


@pytest.fixture(scope="module")
def kontext_dir(tmp_path_factory) -> str:
    """A tiny FluxKontextPipeline saved as a pipeline folder: the tiny FLUX.1 components, Kontext's pipeline."""
    root = tmp_path_factory.mktemp("kontext")
    components = build_tiny_flux_pipeline(seed=0, tokenizer_dir=str(root / "tok")).components
    FluxKontextPipeline(**components).save_pretrained(str(root / "base"))
    return str(root / "base")


@pytest.fixture
def sources(tmp_path) -> dict[str, str]:
    """Three source PNGs in ``tmp_path/src``: red, green and blue, the blue one 48x32."""
    folder = tmp_path / "src"
    folder.mkdir()
    paths = {}
    for name, colour, size in [("red", (200, 30, 30), (32, 32)), ("green", (30, 190, 40), (32, 32)),
                               ("blue", (20, 40, 210), (48, 32))]:  # fmt: skip
        paths[name] = str(folder / f"{name}.png")
        picture(colour, size).save(paths[name])
    return paths


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


@pytest.fixture
def count_calls(monkeypatch):
    """Count FluxKontextPipeline calls and keep each call's ``image`` argument."""
    state = {"calls": 0, "images": []}
    original = FluxKontextPipeline.__call__

    @functools.wraps(original)  # keeps the signature: sampling reads the `image` argument from it
    def counted(self, *args, **kwargs):
        state["calls"] += 1
        state["images"].append(kwargs.get("image"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FluxKontextPipeline, "__call__", counted)
    return state


# -- prompt sets of edits --------------------------------------------------------------------------------------------


def test_a_jsonl_of_edits_resolves_sources_against_its_folder_and_matches_a_dataset_of_the_same_images(
    tmp_path, sources, monkeypatch
):
    rows = [
        {"prompt": "make it blue", "source_image": "src/red.png"},
        {"caption": "add a hat", "source_images": ["src/green.png", os.path.abspath(sources["blue"])]},
    ]
    path = write_jsonl(tmp_path / "edits.jsonl", rows)
    monkeypatch.chdir(tmp_path / "src")  # not the file's folder: paths are relative to the file, not to the cwd
    edits = load_edits(path)
    assert [(e.prompt, e.column, len(e.sources)) for e in edits] == [
        ("make it blue", "source_image", 1),
        ("add a hat", "source_images", 2),
    ]
    assert edits[0].paths() == [sources["red"]] and edits[1].paths() == [sources["green"], sources["blue"]]
    assert np.array_equal(np.asarray(edits[1].images()[1]), np.asarray(Image.open(sources["blue"])))

    # The same pictures as bytes in a datasets Image column: the same edits (the cache key is the pixels).
    def png(name: str) -> bytes:
        with open(sources[name], "rb") as f:
            return f.read()

    dataset = Dataset.from_dict(
        {"prompt": ["make it blue"], "source_image": [{"bytes": png("red"), "path": None}]},
        features=Features({"prompt": Value("string"), "source_image": ImageFeature()}),
    )
    from_bytes = load_prompt_set(dataset)
    assert isinstance(from_bytes[0], EditPrompt) and from_bytes[0].digest == edits[0].digest
    assert from_bytes[0].paths() == [None]
    dataset.save_to_disk(str(tmp_path / "saved"))
    assert load_prompt_set(str(tmp_path / "saved"))[0].digest == edits[0].digest
    assert EditPrompt("x", (Image.open(sources["green"]),)).digest != edits[0].digest  # other pixels, other key
    # A list of row dicts; a text file stays a list of prompts; limit and deduplication count edits.
    assert load_prompt_set([{"text": "make it blue", "source_image": sources["red"]}])[0].digest == edits[0].digest
    (tmp_path / "prompts.txt").write_text("a cat\n")
    assert load_prompt_set(str(tmp_path / "prompts.txt")) == ["a cat"]
    twice = write_jsonl(tmp_path / "twice.jsonl", [rows[0], rows[0], rows[1]])
    assert [e.prompt for e in load_edits(twice, deduplicate=True)] == ["make it blue", "add a hat"]
    assert len(load_edits(twice, limit=2)) == 2


def test_every_bad_source_is_named_by_row_and_column_before_any_generation(tmp_path, sources, kontext_dir,
                                                                           count_calls):  # fmt: skip
    (tmp_path / "not-an-image.png").write_text("hello")
    rows = [
        {"prompt": "fine", "source_image": "src/red.png"},
        {"prompt": "missing file", "source_image": "src/nowhere.png"},
        {"prompt": "not an image", "source_image": "not-an-image.png"},
        {"prompt": "second of two", "source_images": ["src/red.png", "src/gone.png"]},
        {"prompt": "no source", "source_image": None},
        {"prompt": "both", "source_image": "src/red.png", "source_images": ["src/red.png"]},
        {"prompt": "", "source_image": "src/red.png"},
        {"prompt": "a list in the one-image column", "source_image": ["src/red.png"]},
    ]
    path = write_jsonl(tmp_path / "edits.jsonl", rows)
    with pytest.raises(ValueError) as caught:
        evaluate(kontext_dir, {}, prompts=path, scorers=["test-closeness"], output_dir=str(tmp_path / "out"),
                 settings=FAST, device="cpu", progress=False)  # fmt: skip
    message = str(caught.value)
    assert "8 problem(s)" not in message and "7 problem(s)" in message and "nothing was generated" in message
    for expected in (
        "row 1, column 'source_image': cannot read '" + os.path.join(str(tmp_path), "src", "nowhere.png"),
        "row 2, column 'source_image': cannot read",
        "row 3, column 'source_images' (image 1): cannot read '" + os.path.join(str(tmp_path), "src", "gone.png"),
        "row 4, column 'source_image': the source image is missing",
        "row 5: both 'source_image' and 'source_images' are set",
        "row 6, column 'prompt': no instruction",
        "row 7, column 'source_image': holds a list of 1",
    ):
        assert expected in message, expected
    assert "row 0" not in message and "row 3, column 'source_images' (image 0)" not in message
    assert count_calls["calls"] == 0 and not os.path.exists(tmp_path / "out" / "images")
    with pytest.raises(ValueError, match=r"row 1, column 'source_image': cannot read"):
        make_pairs(kontext_dir, prompts=path, scorer="test-closeness", output_dir=str(tmp_path / "p"),
                   settings=FAST, device="cpu", progress=False, prompt_kwargs={"limit": 2})  # fmt: skip
    assert count_calls["calls"] == 0


# -- generation ------------------------------------------------------------------------------------------------------


def test_the_source_reaches_the_kontext_pipeline_and_changes_the_edit(kontext_dir, sources, count_calls):
    pipe = load_base_pipeline(kontext_dir, FAST, torch.device("cpu"))
    assert isinstance(pipe, FluxKontextPipeline)
    red, green = Image.open(sources["red"]).convert("RGB"), Image.open(sources["green"]).convert("RGB")
    edits = sample_images(pipe, ["make it blue"] * 2, [0, 0], FAST, sources=[[red], [green]])
    assert count_calls["images"][0] is red and count_calls["images"][1] is green  # one source: `image=` PIL
    assert not np.array_equal(np.asarray(edits[0]), np.asarray(edits[1]))  # same seed and instruction, other source
    again = sample_images(pipe, ["make it blue"], [0], FAST, sources=[[red]])
    assert np.array_equal(np.asarray(again[0]), np.asarray(edits[0]))  # the seed fixes the noise
    # The edit has the source's size (48x32 here) unless a resolution is set.
    blue = Image.open(sources["blue"]).convert("RGB")
    assert sample_images(pipe, ["x"], [0], FAST, sources=[[blue]])[0].size == (48, 32)
    square = GenerationSettings(num_inference_steps=2, guidance_scale=1.0, height=32, width=32)
    assert sample_images(pipe, ["x"], [0], square, sources=[[blue]])[0].size == (32, 32)
    # Two seeds of one edit are one call, each seed its own noise, as two calls of one seed each.
    count_calls["calls"] = 0
    both = sample_images(pipe, ["make it blue"] * 2, [0, 1], FAST, batch_size=2, sources=[[red], [red]])
    assert count_calls["calls"] == 1
    np.testing.assert_allclose(np.asarray(both[0], float), np.asarray(edits[0], float), atol=2)
    seed1 = sample_images(pipe, ["make it blue"], [1], FAST, sources=[[red]])[0]
    np.testing.assert_allclose(np.asarray(both[1], float), np.asarray(seed1, float), atol=2)
    with pytest.raises(ValueError, match="FluxKontextPipeline edits one source image per instruction, but an edit "
                                         "has 2"):  # fmt: skip
        sample_images(pipe, ["x"], [0], FAST, sources=[[red, green]])


def test_several_reference_images_reach_flux2_klein_as_a_list(tmp_path):
    pipe = _prepare(build_tiny_flux2_klein_pipeline(seed=0, tokenizer_dir=str(tmp_path / "tok")), FAST,
                    torch.device("cpu"))  # fmt: skip
    a, b = picture((200, 30, 30), (64, 64)), picture((30, 30, 200), (64, 64), corner=0)
    seen = []
    original = type(pipe).__call__

    @functools.wraps(original)
    def record(self, *args, **kwargs):
        seen.append(kwargs["image"])
        return original(self, *args, **kwargs)

    type(pipe).__call__, saved = record, original
    try:
        settings = GenerationSettings(num_inference_steps=2, guidance_scale=1.0, height=32, width=32)
        out = sample_images(pipe, ["x", "x"], [0, 0], settings, sources=[[a, b], [b, a]])
    finally:
        type(pipe).__call__ = saved
    assert [len(images) for images in seen] == [2, 2] and seen[0][0] is a and seen[1][0] is b
    assert not np.array_equal(np.asarray(out[0]), np.asarray(out[1]))


def test_edits_are_refused_for_a_text_to_image_pipeline_and_an_editing_scorer_without_edits(tmp_path, sources):
    build_tiny_flux_pipeline(seed=0, tokenizer_dir=str(tmp_path / "tok")).save_pretrained(str(tmp_path / "flux"))
    path = write_jsonl(tmp_path / "edits.jsonl", [{"prompt": "make it blue", "source_image": sources["red"]}])
    with pytest.raises(ValueError, match="FluxPipeline takes no source image"):
        evaluate(str(tmp_path / "flux"), {}, prompts=path, scorers=["test-closeness"], settings=FAST,
                 output_dir=str(tmp_path / "out"), device="cpu", progress=False)  # fmt: skip
    assert not [f for _, _, files in os.walk(tmp_path / "out") for f in files if f.endswith(".png")]
    with pytest.raises(ValueError, match="closeness scores edits: it needs source images"):
        evaluate(str(tmp_path / "flux"), {}, prompts=["a cat"], scorers=["test-closeness"], settings=FAST,
                 output_dir=str(tmp_path / "out2"), device="cpu", progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="closeness scores edits"):
        make_pairs(str(tmp_path / "flux"), prompts=["a cat"], scorer="test-closeness", settings=FAST,
                   output_dir=str(tmp_path / "p"), device="cpu", progress=False)  # fmt: skip
    assert not os.path.exists(tmp_path / "out2" / "images") and not os.path.exists(tmp_path / "p" / "images")


# -- evaluate --------------------------------------------------------------------------------------------------------


def test_evaluate_on_edits_hands_each_image_its_source_and_caches_per_source(tmp_path, kontext_dir, sources,
                                                                             count_calls, caplog):  # fmt: skip
    path = write_jsonl(
        tmp_path / "edits.jsonl",
        [
            {"prompt": "make it blue", "source_image": "src/red.png"},
            {"prompt": "make it blue", "source_image": "src/green.png"},  # same instruction, another source
            {"prompt": "add a hat", "source_image": "src/blue.png"},
        ],
    )
    out = str(tmp_path / "eval")
    kwargs = dict(prompts=path, scorers=["test-closeness", "test-edit-redness"], output_dir=out, settings=FAST,
                  device="cpu", n_resamples=50, progress=False)  # fmt: skip
    SourceCloseness.received = []
    with caplog.at_level(logging.WARNING):
        result = evaluate(kontext_dir, {}, **kwargs)
    assert result.generated == {"base": 3} and count_calls["calls"] == 3
    paths = result.image_paths["base"]
    assert len(set(paths)) == 3  # one image per source, though two edits share the instruction

    # The editing scorer got each image's own source, in order; its scores are the test's computation.
    expected_sources = [sources["red"], sources["green"], sources["blue"]]
    assert [p for p, _ in SourceCloseness.received] == ["make it blue", "make it blue", "add a hat"]
    for (_, got), source in zip(SourceCloseness.received, expected_sources):
        assert len(got) == 1 and np.array_equal(got[0], np.asarray(Image.open(source).convert("RGB")))
    recomputed = [closeness(Image.open(p), Image.open(s)) for p, s in zip(paths, expected_sources)]
    assert result.scores["base"]["closeness"] == pytest.approx(recomputed)
    assert Image.open(paths[2]).size == (48, 32)  # the blue source's size
    # The text-to-image scorer scored the edits against the instruction, and said so once.
    said = [r for r in caplog.records if "redness is a text-to-image scorer" in r.getMessage()]
    assert len(said) == 1 and len(result.scores["base"]["redness"]) == 3

    with open(os.path.join(out, "scores.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["source"] for r in rows] == expected_sources and rows[1]["prompt"] == "make it blue"
    assert os.path.isfile(os.path.join(out, "grid.png"))
    with open(os.path.join(out, "run.json")) as f:
        assert json.load(f)["edits"] is True

    count_calls["calls"] = 0  # a rerun samples nothing
    again = evaluate(kontext_dir, {}, **kwargs, overwrite=True)
    assert count_calls["calls"] == 0 and again.generated == {"base": 0} and again.scores == result.scores


# By default: test_evaluate_on_edits_hands_each_image_its_source_... (a JSONL of edits read into scores.csv) and
# test_evaluation.py's test_cli_evaluate_end_to_end (the command's --prompts file reaches evaluate)
@pytest.mark.slow
def test_cli_evaluate_reads_a_jsonl_of_edits(tmp_path, kontext_dir, sources, capsys):
    path = write_jsonl(tmp_path / "edits.jsonl", [{"prompt": "make it blue", "source_image": "src/red.png"}])
    code = main(["evaluate", "--base", kontext_dir, "--prompts", path, "--scorer", "test-closeness", "--output-dir",
                 str(tmp_path / "cli"), "--steps", "2", "--guidance-scale", "1", "--device", "cpu",
                 "--bootstrap-resamples", "20", "--no-progress"])  # fmt: skip
    assert code == 0 and "closeness" in capsys.readouterr().out
    with open(tmp_path / "cli" / "scores.csv") as f:
        assert [r["source"] for r in csv.DictReader(f)] == [sources["red"]]


# -- pairs -----------------------------------------------------------------------------------------------------------


def _decoded(value) -> Image.Image:
    return value if isinstance(value, Image.Image) else Image.open(io.BytesIO(value["bytes"]))


def test_pairs_on_edits_write_rows_with_their_source_that_load_back(tmp_path, kontext_dir, sources, count_calls):
    path = write_jsonl(
        tmp_path / "edits.jsonl",
        [
            {"prompt": "make it blue", "source_image": "src/red.png"},
            {"prompt": "make it blue", "source_image": "src/green.png"},
        ],
    )
    out = str(tmp_path / "pairs")
    SourceCloseness.received = []
    result = make_pairs(kontext_dir, prompts=path, num_images=2, scorer="test-closeness", output_dir=out, seed=3,
                        settings=FAST, batch_size=2, device="cpu", progress=False)  # fmt: skip
    assert count_calls["calls"] == 2 and result.generated == 4  # the two seeds of an edit in one call
    expected_sources = [sources["red"], sources["green"]]
    scores = [[closeness(Image.open(p), Image.open(s)) for p in ps] for ps, s in zip(result.image_paths,
                                                                                     expected_sources)]  # fmt: skip
    assert sum(result.scores, []) == pytest.approx(sum(scores, []))

    dataset = load_preference_data(result.dataset_dir)  # the reader training uses
    assert {"prompt", "source_image", "chosen", "rejected"} <= set(dataset.column_names)
    assert "source_images" not in dataset.column_names and len(dataset) == 2
    for k, row in enumerate(dataset):
        source = np.asarray(Image.open(expected_sources[k]).convert("RGB"))
        assert np.array_equal(np.asarray(_decoded(row["source_image"]).convert("RGB")), source)
        i, j = row["chosen_seed"] - 3, row["rejected_seed"] - 3
        assert scores[k][i] > scores[k][j] and row["chosen_score"] == pytest.approx(scores[k][i])
        assert np.array_equal(np.asarray(_decoded(row["chosen"])), np.asarray(Image.open(result.image_paths[k][i])))
    with open(os.path.join(out, "scores.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["source_image"] for r in records] == [sources["red"]] * 2 + [sources["green"]] * 2


def test_pairs_on_multi_image_edits_write_source_images_lists(tmp_path):
    """FLUX.2 [klein] with two reference images per edit, given as bytes in a datasets column: the dataset keeps
    the list, and scores.jsonl names the sources by paths written under sources/."""
    build_tiny_flux2_klein_pipeline(seed=0, tokenizer_dir=str(tmp_path / "tok")).save_pretrained(str(tmp_path / "b"))
    a, b = picture((200, 30, 30), (64, 64)), picture((30, 30, 200), (64, 64), corner=0)

    def png(image: Image.Image) -> dict:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    from datasets import List

    edits = Dataset.from_dict(
        {"prompt": ["mix them", "mix them"], "source_images": [[png(a), png(b)], [png(b), png(a)]]},
        features=Features({"prompt": Value("string"), "source_images": List(ImageFeature())}),
    )
    settings = GenerationSettings(num_inference_steps=2, guidance_scale=1.0, height=32, width=32)
    SourceCloseness.received = []
    result = make_pairs(str(tmp_path / "b"), prompts=edits, num_images=3, scorer="test-closeness",
                        output_dir=str(tmp_path / "p"), settings=settings, batch_size=3, device="cpu",
                        progress=False)  # fmt: skip
    assert [len(group) for _, group in SourceCloseness.received] == [2] * 6
    dataset = load_preference_data(result.dataset_dir)
    assert "source_images" in dataset.column_names and "source_image" not in dataset.column_names
    firsts = set()
    for row in dataset:
        got = [np.asarray(_decoded(v).convert("RGB")) for v in row["source_images"]]
        assert len(got) == 2
        firsts.add(tuple(got[0][20, 40]))
    assert firsts == {tuple(np.asarray(a)[20, 40]), tuple(np.asarray(b)[20, 40])}  # each row its own edit's sources
    with open(os.path.join(str(tmp_path / "p"), "scores.jsonl")) as f:
        record = json.loads(f.readline())
    assert len(record["source_images"]) == 2
    assert np.array_equal(np.asarray(Image.open(record["source_images"][1]).convert("RGB")), np.asarray(b))
