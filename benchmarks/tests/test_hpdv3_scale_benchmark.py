"""benchmarks/speed/hpdv3_scale.py at a tiny size: its counts come from the dataset it read, checked against the
synthetic annotation read independently with ``json``."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "speed" / "hpdv3_scale.py"


def _script():
    spec = importlib.util.spec_from_file_location("hpdv3_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hpdv3_scale_reports_the_pairs_prompts_and_images_of_the_annotation_it_wrote(tmp_path):
    output = tmp_path / "result.json"
    args = ["--rows", "97", "--validate-rows", "0", "--in-process", "--keep", "--workdir", str(tmp_path)]
    _script().main([*args, "--output", str(output)])
    (size,) = json.loads(output.read_text())["sizes"]
    records = json.loads((Path(size["folder"]) / "train.json").read_text())
    assert size["written"]["records"] == len(records) == 97
    assert {"prompt", "choice_dist", "confidence", "path1", "path2", "model1", "model2"} == set(records[0])
    images = {r["path1"] for r in records} | {r["path2"] for r in records}
    # HPDv3's proportions: 4 images a prompt, 1.17M comparisons of 1.08M images.
    prompts = {r["prompt"] for r in records}
    assert len(images) == 4 * len(prompts) == 4 * round(97 / (1.17 / 1.08 * 4))
    for stage in ("load_cold", "load_warm"):
        figures = size[stage]
        assert figures["pairs"] == len(records)
        assert figures["distinct_prompts"] == len(prompts) == size["written"]["prompts"]
        assert figures["distinct_images"] == len(images) == size["written"]["images"]
        assert figures["first_chosen"] == os.path.join(size["folder"], records[0]["path1"])
        assert figures["wall_s"] > 0 and figures["cpu_s"] >= 0 and figures["peak_rss_mb"] > 0
    assert size["cache_bytes"] > 0  # the cold read wrote Arrow files into the stage's own cache


@pytest.mark.slow
def test_hpdv3_scale_in_child_processes_validates_the_rows_with_placeholders_and_collates_a_batch(tmp_path):
    """The script as run for the result files: each stage a child process, validation on the placeholder rows."""
    output = tmp_path / "result.json"
    args = ["--rows", "120", "--validate-rows", "30", "--resolution", "64", "--batch-size", "3"]
    _script().main([*args, "--workdir", str(tmp_path), "--keep", "--output", str(output)])
    (size,) = json.loads(output.read_text())["sizes"]
    records = json.loads((Path(size["folder"]) / "train.json").read_text())
    validate = size["validate"]
    assert validate["validated_rows"] == validate["validated_kept"] == 30
    assert validate["first_batch_pixel_shape"] == [3, 2, 3, 64, 64]
    assert validate["pairs"] == size["load_cold"]["pairs"] == 120
    # Placeholders for the distinct images of the first 30 records, and for no other.
    placed = {r[k] for r in records[:30] for k in ("path1", "path2")}
    assert size["written"]["placeholder_images"] == len(placed)
    on_disk = {str(p.relative_to(size["folder"])) for p in (Path(size["folder"]) / "images").iterdir()}
    assert on_disk == placed
    assert validate["check_1024px_jpeg_ms_median"] > 0 and validate["remembered_check_us_median"] > 0
