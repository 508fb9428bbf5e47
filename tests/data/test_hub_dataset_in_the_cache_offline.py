"""A Hub dataset already on this machine is read with the Hub switched off (``HF_HUB_OFFLINE=1``) or unreachable, as a
cached Hub model is: from the ``datasets`` cache an earlier ``load_dataset`` left, or from the snapshot
``hf download --repo-type dataset`` leaves in the Hugging Face cache. One in neither is still refused in one line
naming the cause. The caches are built here as the libraries lay them out, in a temporary ``HF_HOME``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from huggingface_hub import constants

from trl_diffusion_sdpo.cli import train as train_cli
from trl_diffusion_sdpo.cli.main import main
from trl_diffusion_sdpo.data.formats import DatasetNotFoundError, load_preference_data

REPO = "someone/tiny-pairs"
ROWS = [{"prompt": f"a red circle {i}", "chosen": f"c{i}.png", "rejected": f"r{i}.png"} for i in range(3)]


def _no_hub(how: str, monkeypatch, tmp_path) -> str:
    """Empty caches under ``tmp_path``; the Hub switched off, or an endpoint nothing listens on. The cause a refusal
    must name."""
    from datasets import config

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    if how == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(config, "HF_HUB_OFFLINE", True)
        return "the Hub is not asked (HF_HUB_OFFLINE=1)"
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: the connection is refused
    monkeypatch.setattr(config, "HF_ENDPOINT", "http://127.0.0.1:9")
    return "the Hub cannot be reached"


def _table(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path


def _in_hub_cache(tmp_path: Path, repo_id: str = REPO) -> None:
    """What ``hf download --repo-type dataset someone/tiny-pairs`` leaves: a snapshot and the ref naming it."""
    repo = Path(constants.HF_HUB_CACHE) / f"datasets--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    _table(repo / "snapshots" / commit / "data")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def _in_datasets_cache(tmp_path: Path, repo_id: str = REPO) -> None:
    """What ``load_dataset("someone/tiny-pairs")`` leaves in the ``datasets`` cache: the prepared split under
    ``someone___tiny-pairs/default/0.0.0/<commit>/``, written by datasets' own JSON builder."""
    from datasets import config
    from datasets.packaged_modules.json.json import Json

    namespace, name = repo_id.split("/")
    staging = tmp_path / "staging"
    builder = Json(
        cache_dir=str(staging),
        dataset_name=name,
        data_files={"train": str(_table(tmp_path / "source"))},
        hash="1" * 40,
        config_id="default",
    )
    builder.download_and_prepare()
    Path(config.HF_DATASETS_CACHE).mkdir(parents=True, exist_ok=True)
    os.rename(staging / name, Path(config.HF_DATASETS_CACHE) / f"{namespace}___{name}")


# The loader itself retries an unreachable Hub (about 25 s) before it reads its own cache: that case is not run here.
@pytest.mark.parametrize(
    "how, cache",
    [("offline", _in_datasets_cache), ("offline", _in_hub_cache), ("unreachable", _in_hub_cache)],
    ids=["offline-datasets-cache", "offline-hub-cache", "unreachable-hub-cache"],
)
def test_a_cached_hub_dataset_is_read_without_the_hub(how, cache, tmp_path, monkeypatch):
    cause = _no_hub(how, monkeypatch, tmp_path)
    with pytest.raises(DatasetNotFoundError) as refused:
        load_preference_data(REPO)
    assert cause in str(refused.value)
    cache(tmp_path)
    assert load_preference_data(REPO).to_list() == ROWS


def test_a_name_written_as_a_local_path_is_never_read_from_a_cache(tmp_path, monkeypatch):
    """``data/my-pairz`` where ``data/`` exists here means that folder: a Hub dataset of the same id in either cache
    is not read in its place."""
    _no_hub("offline", monkeypatch, tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    _in_datasets_cache(tmp_path, "data/my-pairz")
    _in_hub_cache(tmp_path, "data/my-pairz")
    with pytest.raises(DatasetNotFoundError, match="written as a local path, it is not looked for on the Hub"):
        load_preference_data("data/my-pairz")


def test_train_takes_a_cached_hub_dataset_offline_and_reads_it_before_the_model(tmp_path, monkeypatch):
    """The command reads the cached rows and goes on to the model, which is not this test's: the first model load
    ends it."""
    _no_hub("offline", monkeypatch, tmp_path)

    class ModelLoads(Exception):
        pass

    read = []
    real = train_cli.load_train_split

    def recording(*args, **kwargs):
        dataset = real(*args, **kwargs)
        read.append(dataset)
        return dataset

    def model_loads(*args, **kwargs):
        raise ModelLoads

    monkeypatch.setattr(train_cli, "load_train_split", recording)
    monkeypatch.setattr(train_cli, "build_pipeline", model_loads)
    _in_hub_cache(tmp_path)
    argv = ["train", "--model_name_or_path", "trl-diffusion-sdpo:tiny", "--dataset_name", REPO, "--use_cpu"]
    argv += ["--output_dir", str(tmp_path / "out"), "--report_to", "none", "--dataset_streaming", "false"]
    with pytest.raises(ModelLoads):
        main(argv)
    assert len(read) == 1 and [row["prompt"] for row in read[0]] == [row["prompt"] for row in ROWS]
