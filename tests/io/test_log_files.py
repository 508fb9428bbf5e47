"""Every command with its output written to a file, as a job script or ``> run.log 2>&1`` leaves it: no progress
bar (no carriage-return redraws, no cursor-up escapes, no tqdm fragments), whether the bar is the package's,
diffusers' (pipeline loading, sampling) or ``datasets``' (``Generating train split``), and none of the library noise
a user cannot act on (``torch_dtype`` deprecation, ``No LoRA keys associated to CLIPTextModel``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers.log_checks import assert_plain

ROOT = Path(__file__).resolve().parents[2]


def run_to_file(args: list[str], cwd: Path, log: Path) -> str:
    """``trl-diffusion-sdpo ARGS`` with stdout and stderr into the file ``log``; its text, once it succeeded."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    with open(log, "w") as out:
        code = subprocess.run(
            [sys.executable, "-m", "trl_diffusion_sdpo", *args], cwd=cwd, env=env, stdout=out, stderr=out, timeout=600
        ).returncode
    text = log.read_text()
    assert code == 0, text[-4000:]
    return text


def write_jsonl_pairs(root: Path, pairs: int = 4) -> Path:
    """A JSONL of image paths (``datasets`` builds a train split from it, with its own bar)."""
    root.mkdir()
    colours = ("red", "blue", "green", "yellow")
    rows = []
    for i in range(pairs):
        asked, other = colours[i % 4], colours[(i + 1) % 4]
        Image.new("RGB", (32, 32), asked).save(root / f"{i}-chosen.png")
        Image.new("RGB", (32, 32), other).save(root / f"{i}-rejected.png")
        rows.append({"prompt": f"{asked} square", "chosen": f"{i}-chosen.png", "rejected": f"{i}-rejected.png"})
    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow  # by default: test_host_settings.py's test_written_to_a_file_each_log_is_a_line_...
def test_train_on_jsonl_and_export_merge_write_no_bars_to_a_log_file(tmp_path: Path) -> None:
    data = write_jsonl_pairs(tmp_path / "data")
    config = str(ROOT / "examples" / "configs" / "tiny_cpu.yaml")
    train = ["train", "--config", config, "--dataset_name", str(data), "--output_dir", "tuned", "--max_steps", "2"]
    train += ["--logging_steps", "1"]
    text = run_to_file(train, tmp_path, tmp_path / "train.log")
    assert_plain(text, "train")
    assert text.count("'loss'") >= 2  # each log a line of its own

    merge = ["export", "--lora", "tuned", "--base", "trl-diffusion-sdpo:tiny", "--merge", "--output", "merged"]
    assert_plain(run_to_file(merge, tmp_path, tmp_path / "export.log"), "export --merge")
    assert (tmp_path / "merged" / "model_index.json").is_file()


@pytest.mark.slow
def test_evaluate_writes_no_bars_to_a_log_file(tmp_path: Path) -> None:
    data = write_jsonl_pairs(tmp_path / "data")
    config = str(ROOT / "examples" / "configs" / "tiny_cpu.yaml")
    train = ["train", "--config", config, "--dataset_name", str(data), "--output_dir", "tuned", "--max_steps", "1"]
    run_to_file(train, tmp_path, tmp_path / "train.log")
    (tmp_path / "prompts.txt").write_text("red circle on white\nblue square on white\n")
    evaluate = ["evaluate", "--base", "trl-diffusion-sdpo:tiny", "--model", "tuned=tuned", "--prompts", "prompts.txt"]
    evaluate += ["--scorer", "colour", "--steps", "2", "--resolution", "32", "--device", "cpu"]
    text = run_to_file([*evaluate, "--bootstrap-resamples", "10"], tmp_path, tmp_path / "evaluate.log")
    assert_plain(text, "evaluate")
    assert "Results in evaluation" in text


@pytest.mark.slow
def test_pairs_writes_no_bars_to_a_log_file(tmp_path: Path) -> None:
    (tmp_path / "prompts.txt").write_text("red circle on white\nblue square on white\n")
    pairs = ["pairs", "--base", "trl-diffusion-sdpo:tiny", "--prompts", "prompts.txt", "--scorer", "colour"]
    pairs += ["--num-images", "2", "--steps", "2", "--resolution", "32", "--device", "cpu", "--margin", "0"]
    text = run_to_file(pairs, tmp_path, tmp_path / "pairs.log")
    assert_plain(text, "pairs")
    assert "Dataset in" in text


@pytest.mark.slow
def test_the_quick_demo_writes_plain_lines_to_a_log_file(tmp_path: Path) -> None:
    text = run_to_file(["demo", "--quick", "--output-dir", "demo"], tmp_path, tmp_path / "demo.log")
    assert_plain(text, "demo")
    assert "run 1/" in text  # a plain line per run instead of the bar
