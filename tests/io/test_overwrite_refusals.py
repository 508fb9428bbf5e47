"""Every command that writes refuses to replace what it did not write in this run, as ``train`` refuses a folder
holding another run: an existing export, a folder a merge would write into, an earlier evaluation's tables, a folder
that is not a latent cache (or a cache of other settings). Each refusal names the file or folder, what it holds and
the flag that allows it, in the one wording they share; the flag then does what it says."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tests.helpers.lora_files import write_base_and_lora
from trl_diffusion_sdpo.cli.main import main
from trl_diffusion_sdpo.config.messages import OutputExistsError, command_line, replacing_refusal
from trl_diffusion_sdpo.io.export import export_lora


@pytest.fixture(scope="module")
def sd_case(tmp_path_factory):
    return write_base_and_lora("sd", tmp_path_factory.mktemp("sd"))


def _digests(folder: str) -> dict[str, str]:
    return {
        os.path.relpath(os.path.join(root, name), folder): hashlib.sha256(Path(root, name).read_bytes()).hexdigest()
        for root, _, names in os.walk(folder)
        for name in names
    }


def _error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert "Traceback" not in "\n".join(lines)
    return lines[-1]


def test_the_refusals_share_one_wording():
    """The path, what it holds, what would replace it, then the ways out, the first capitalised and the last after
    ``or``; a long listing is cut with a count."""
    folder = replacing_refusal("out", "a new run", ["continue it", "delete it"], "another run's files", ["unet"])
    assert folder == "out holds another run's files (unet), which a new run would replace. Continue it, or delete it."
    assert replacing_refusal("x.safetensors", "this export", ["pass --overwrite"]) == (
        "x.safetensors already exists, which this export would replace. Pass --overwrite."
    )
    many = replacing_refusal("d", "it", ["stop"], found=[f"f{i}" for i in range(9)])
    assert "holds f0, f1, f2, f3, f4, f5 and 3 more," in many


def test_export_refuses_an_existing_file_and_replaces_it_with_overwrite(sd_case, tmp_path, capsys):
    base, lora = sd_case
    out = tmp_path / "tiny.safetensors"
    out.write_bytes(b"someone else's file")
    command = ["export", "--lora", lora, "--base", base, "--format", "kohya", "--output", str(out)]
    assert main(command) == 2
    line = _error(capsys)
    assert f"{out} already exists, which this export would replace. Pass --overwrite to replace it" in line
    assert out.read_bytes() == b"someone else's file"
    assert main([*command, "--overwrite"]) == 0
    assert out.read_bytes() != b"someone else's file" and out.stat().st_size > 1000
    with pytest.raises(OutputExistsError, match=r"Pass overwrite=True to replace it, or write to a new output\."):
        export_lora(lora, base, "kohya", str(out))  # from Python: the keyword's words


def test_merge_refuses_a_folder_holding_a_run_and_never_modifies_the_base(sd_case, tmp_path, capsys):
    base, lora = sd_case
    run = tmp_path / "run"
    (run / "checkpoint-2").mkdir(parents=True)
    (run / "training_config.json").write_text("{}")
    (run / "notes.txt").write_text("mine")
    command = ["export", "--lora", lora, "--base", base, "--merge", "--output", str(run)]
    assert main(command) == 2
    line = _error(capsys)
    assert f"{run} holds another run's files (checkpoint-2, training_config.json), which the merged pipeline" in line
    assert "Pass --overwrite" in line and not (run / "model_index.json").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main([*command[:-1], str(other)]) == 2
    assert f"{other} holds notes.txt, which the merged pipeline would replace" in _error(capsys)

    before = _digests(base)
    merged = tmp_path / "merged"
    assert main([*command[:-1], str(merged)]) == 0
    said = capsys.readouterr().out
    assert f"Wrote the merged copy to {merged}" in said and "the base itself is unchanged" in said
    assert (merged / "model_index.json").is_file() and _digests(base) == before
    assert main([*command[:-1], str(merged)]) == 2  # its own earlier output is not this run's either
    assert main([*command[:-1], str(merged), "--overwrite"]) == 0


def test_evaluate_refuses_an_earlier_evaluations_tables_before_sampling(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("red square on white\n")
    out = tmp_path / "evaluation"
    out.mkdir()
    (out / "scores.csv").write_text("model,prompt\n")
    (out / "grid.png").write_bytes(b"an earlier grid")
    command = ["evaluate", "--base", "trl-diffusion-sdpo:tiny", "--prompts", str(prompts), "--scorer", "colour"]
    command += ["--steps", "1", "--resolution", "32", "--device", "cpu", "--no_progress", "--output_dir", str(out)]
    assert main(command) == 2
    line = _error(capsys)
    assert f"{out} holds an earlier run's files (scores.csv, grid.png), which this evaluation would replace" in line
    assert "Pass --overwrite to replace them" in line and "--output_dir" in line
    assert not (out / "images").exists() and (out / "grid.png").read_bytes() == b"an earlier grid"
    assert main([*command, "--overwrite"]) == 0
    assert (out / "grid.png").read_bytes() != b"an earlier grid" and (out / "summary.json").is_file()


def test_pairs_refuses_an_earlier_dataset(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("red square on white\n")
    out = tmp_path / "pairs"
    (out / "dataset").mkdir(parents=True)
    command = ["pairs", "--base", "trl-diffusion-sdpo:tiny", "--prompts", str(prompts), "--scorer", "colour"]
    assert main([*command, "--output_dir", str(out)]) == 2
    assert f"{out} holds an earlier run's files (dataset), which this run's pairs would replace" in _error(capsys)


def test_the_python_refusal_names_keywords_and_the_command_line_flags(tmp_path):
    from trl_diffusion_sdpo.evaluation.run import OUTPUT_NAMES, refuse_earlier_outputs

    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(OutputExistsError, match=r"Pass overwrite=True .* write to a new output_dir\."):
        refuse_earlier_outputs(str(tmp_path), OUTPUT_NAMES, "this evaluation", overwrite=False)
    with command_line(), pytest.raises(OutputExistsError, match=r"Pass --overwrite .* write to a new --output_dir\."):
        refuse_earlier_outputs(str(tmp_path), OUTPUT_NAMES, "this evaluation", overwrite=False)
    refuse_earlier_outputs(str(tmp_path), OUTPUT_NAMES, "this evaluation", overwrite=True)  # allowed
