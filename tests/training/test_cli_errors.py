"""Every error a user can fix ends the command line with one line and its exit status (1 for the data, 2 for the
rest), no traceback; ``--debug`` or ``TRL_DIFFUSION_SDPO_DEBUG=1`` shows the traceback. A dataset that does not exist
is named as such, in seconds, without asking the Hub for a name that can only be a path."""

from __future__ import annotations

import os
import sys

try:
    import httpx2 as httpx  # huggingface_hub's HTTP client
except ImportError:
    import httpx
import pytest

from tests.helpers.cli_runs import FAST, pair_folders
from trl_diffusion_sdpo.cli.console import DEBUG_ENV, run_command
from trl_diffusion_sdpo.cli.main import main
from trl_diffusion_sdpo.config.extras import require_extra
from trl_diffusion_sdpo.data.formats import DatasetNotFoundError, hub_dataset_problem

TINY = "trl-diffusion-sdpo:tiny"


@pytest.fixture
def no_hub(monkeypatch):
    """The Hub must not be asked: any request or ``load_dataset`` of a Hub name fails the test."""
    import datasets
    from huggingface_hub import HfApi

    # A module that binds load_dataset when first imported must bind the real one, not the stand-in below, or the
    # stand-in outlives this test (the sharded cache reads its shards with it).
    import trl_diffusion_sdpo.data.sharded_cache  # noqa: F401

    def asked(*args, **kwargs):
        raise AssertionError(f"the Hub was asked: {args} {kwargs}")

    monkeypatch.setattr(HfApi, "dataset_info", asked)
    monkeypatch.setattr(datasets, "load_dataset", asked)
    monkeypatch.delenv(DEBUG_ENV, raising=False)


def run(argv: list[str], capsys) -> tuple[int, list[str]]:
    status = main(argv)
    err = capsys.readouterr().err
    return status, [line for line in err.splitlines() if line.strip()]


def error_line(lines: list[str], command: str = "train") -> str:
    """The one error line, the last of stderr (INFO logs may come before it), with no traceback anywhere."""
    assert lines, "nothing on stderr"
    assert not any("Traceback" in line for line in lines), "\n".join(lines)
    assert lines[-1].startswith(f"trl-diffusion-sdpo {command}: error: "), lines[-1]
    return lines[-1]


def test_a_dataset_name_that_does_not_exist_offline_is_one_line_naming_the_path_layouts_and_hub_forms(
    tmp_path, capsys, monkeypatch, no_hub
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["train", "--model_name_or_path", str(tmp_path / "no-model"), "--output_dir", "out", "--use_cpu"]
    status, lines = run([*argv, "--dataset_name", "my-pairz"], capsys)
    line = error_line(lines)
    assert status == 1
    assert f"dataset_name my-pairz: no such file or folder ({tmp_path / 'my-pairz'})" in line
    assert "HF_HUB_OFFLINE=1" in line
    for form in ("pair folders", ".jsonl", "metadata.jsonl", "save_to_disk", "NAMESPACE/NAME"):
        assert form in line, form


@pytest.mark.parametrize("name", ["./my-pairz", "my-pairz/", "data/my-pairz", "pairs.jsonl", "bad name!"])
def test_a_name_that_can_only_be_a_path_or_no_hub_id_is_refused_without_asking_the_hub(
    name, tmp_path, capsys, monkeypatch, no_hub
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    (tmp_path / "data").mkdir()  # data/my-pairz: its folder exists here, so it is a path
    argv = ["train", "--model_name_or_path", "no-model", "--output_dir", "out", "--dataset_name", name]
    status, lines = run(argv, capsys)
    line = error_line(lines)
    assert status == 1
    assert f"dataset_name {name}: no such file or folder ({os.path.abspath(name)})" in line
    expected = "not a Hub dataset id" if name == "bad name!" else "written as a local path"
    assert expected in line


def test_the_hub_is_asked_once_for_a_plausible_id_and_its_answers_are_named(monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    calls = []

    def unreachable(self, repo_id, **kwargs):
        calls.append(repo_id)
        raise ConnectionError("no route to host")

    monkeypatch.setattr(HfApi, "dataset_info", unreachable)
    assert "the Hub cannot be reached (ConnectionError)" in hub_dataset_problem("someone/pairs")
    assert calls == ["someone/pairs"]

    def missing(self, repo_id, **kwargs):
        request = httpx.Request("GET", f"https://huggingface.co/api/datasets/{repo_id}")
        raise RepositoryNotFoundError("404", response=httpx.Response(404, request=request))

    monkeypatch.setattr(HfApi, "dataset_info", missing)
    assert "the Hub has no dataset of that name" in hub_dataset_problem("someone/pairs")
    monkeypatch.setattr(HfApi, "dataset_info", lambda self, repo_id, **kwargs: object())
    assert hub_dataset_problem("someone/pairs") is None  # it exists: load_dataset reads it


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(how, tmp_path, capsys, monkeypatch, no_hub):
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--model_name_or_path", "no-model", "--output_dir", "out", "--dataset_name", "./missing"]
    if how == "flag":
        argv.append("--debug")
    else:
        monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(DatasetNotFoundError, match=r"dataset_name \./missing: no such file or folder"):
        main(argv)


def test_an_empty_prompt_file_is_named_as_empty_in_one_line_with_exit_1(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    data = pair_folders(tmp_path / "pairs", prompt="a red circle")
    (data / "p2" / "prompt.txt").write_text("  \n")
    argv = ["train", "--model_name_or_path", TINY, "--dataset_name", str(data), "--output_dir", str(tmp_path / "o")]
    status, lines = run([*argv, *FAST], capsys)
    line = error_line(lines)
    assert status == 1
    assert "row 2, column 'prompt'" in line and f"pair folder {data / 'p2'}: prompt.txt is empty" in line
    assert "--skip_invalid_rows true" in line  # the flag that skips such rows
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_a_bad_image_is_one_line_with_exit_1(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    data = pair_folders(tmp_path / "pairs")
    (data / "p1" / "rejected.png").write_bytes(b"not a png")
    argv = ["train", "--model_name_or_path", TINY, "--dataset_name", str(data), "--output_dir", str(tmp_path / "o")]
    status, lines = run([*argv, *FAST], capsys)
    line = error_line(lines)
    assert status == 1 and "row 1, column 'rejected'" in line


def test_a_refused_option_and_a_missing_extra_are_one_line_with_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    data = pair_folders(tmp_path / "pairs")
    argv = ["train", "--model_name_or_path", TINY, "--dataset_name", str(data), "--output_dir", str(tmp_path / "o")]
    status, lines = run([*argv, "--attn_implementation", "sdpa"], capsys)
    assert status == 2 and "attn_implementation" in error_line(lines)

    def needs_an_extra() -> int:
        require_extra("plots", "no_such_module_for_the_test", "the figures")
        return 0

    assert run_command("trl-diffusion-sdpo demo", needs_an_extra) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "trl-diffusion-sdpo demo: error: the figures: no_such_module_for_the_test is not installed. Install the "
        "package's 'plots' extra: pip install \"trl-diffusion-sdpo[plots]\" (from a clone: pip install -e "
        '".[plots]").'
    ]


def test_a_bug_keeps_its_traceback(capsys, monkeypatch):
    """An error the package did not raise for a user (here a ValueError from outside the package) is not shortened."""
    monkeypatch.delenv(DEBUG_ENV, raising=False)

    def bug() -> int:
        return int("not a number")  # raised inside the interpreter, not by the package

    with pytest.raises(ValueError, match="invalid literal"):
        run_command("trl-diffusion-sdpo train", bug)
    assert capsys.readouterr().err == ""


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
