"""``cache`` into a folder holding other files refuses before it opens the model or reads the data: with every loader
replaced by one that raises, the command still ends in its one-line refusal naming the folder and ``--overwrite``;
with ``--overwrite`` it goes on to load (the loaders are reached), so the refusal is what stopped it."""

from __future__ import annotations

from pathlib import Path

import pytest

from trl_diffusion_sdpo.cli import cache as cache_cli
from trl_diffusion_sdpo.cli.main import main


class _Loaded(Exception):
    """Raised where ``cache`` would open a model or read data."""


def _loading(*args, **kwargs):
    raise _Loaded


@pytest.fixture
def nothing_loads(monkeypatch):
    import datasets
    from diffusers import DiffusionPipeline

    for module, name in [
        (cache_cli, "build_pipeline"),
        (cache_cli, "load_train_split"),
        (datasets, "load_dataset"),
    ]:
        monkeypatch.setattr(module, name, _loading)
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", classmethod(_loading))


def _argv(tmp_path: Path, folder: Path, *extra: str) -> list[str]:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "model_index.json").write_text("not json")  # opening it as a pipeline would fail
    data = tmp_path / "pairs"
    data.mkdir(exist_ok=True)
    return ["cache", "--model_name_or_path", str(model), "--dataset_name", str(data), "--output_dir",
            str(tmp_path / "run"), "--latent_cache", str(folder), *extra]  # fmt: skip


def test_cache_into_a_folder_with_other_files_refuses_before_loading(tmp_path, nothing_loads, capsys):
    folder = tmp_path / "latents"
    folder.mkdir()
    (folder / "notes.txt").write_text("someone else's")
    status = main(_argv(tmp_path, folder))
    err = capsys.readouterr().err.strip()
    assert status != 0
    assert len(err.splitlines()) == 1, err
    assert str(folder) in err and "--overwrite" in err and "notes.txt" in err
    assert (folder / "notes.txt").read_text() == "someone else's"
    with pytest.raises(_Loaded):  # allowed, it goes on to the model: what the refusal kept it from
        main(_argv(tmp_path, folder, "--overwrite"))
