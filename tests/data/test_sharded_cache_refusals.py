"""``trl-diffusion-sdpo cache`` writes only where a cache belongs: a folder holding anything a cache did not write is
refused before anything is written, and a cache of other settings is replaced only with ``overwrite``; resuming a
cache of the same settings needs neither."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset

from tests.helpers.latent_cache import _rows
from trl_diffusion_sdpo.config.messages import OutputExistsError, command_line
from trl_diffusion_sdpo.data.sharded_cache import build_sharded_latent_cache

from .test_sharded_cache import _args, family  # noqa: F401  (the tiny SD family, built once per module)


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return Dataset.from_list(_rows(4))


def test_a_folder_holding_other_files_is_refused_before_anything_is_written(tmp_path, family, dataset):  # noqa: F811
    folder = tmp_path / "run"
    (folder / "checkpoint-2").mkdir(parents=True)
    (folder / "training_config.json").write_text("{}")
    with pytest.raises(OutputExistsError, match=r"run holds checkpoint-2, training_config.json, which a latent cache"):
        build_sharded_latent_cache(dataset, _args(tmp_path), family, str(folder))
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-2", "training_config.json"]
    with command_line(), pytest.raises(OutputExistsError, match=r"Pass --overwrite .* new --latent_cache\."):
        build_sharded_latent_cache(dataset, _args(tmp_path), family, str(folder))
    cache = build_sharded_latent_cache(dataset, _args(tmp_path), family, str(folder), overwrite=True)
    assert cache.manifest["num_pairs"] == 4 and (folder / "training_config.json").read_text() == "{}"


def test_a_resumed_cache_needs_no_overwrite_and_other_settings_need_it(tmp_path, family, dataset):  # noqa: F811
    folder = str(tmp_path / "cache")
    assert build_sharded_latent_cache(dataset, _args(tmp_path), family, folder, chunk_size=2, max_chunks=1) is None
    resumed = build_sharded_latent_cache(dataset, _args(tmp_path), family, folder, chunk_size=2)  # its own files
    assert resumed.manifest["num_pairs"] == 4
    other = _args(tmp_path, resolution=64)
    with pytest.raises(ValueError, match=r"resolution: 32 there, 64 now.*\), which this cache would replace\. Resume"):
        build_sharded_latent_cache(dataset, other, family, folder, chunk_size=2)
    replaced = build_sharded_latent_cache(dataset, other, family, folder, chunk_size=2, overwrite=True)
    with open(f"{folder}/spec.json") as f:
        assert json.load(f)["resolution"] == 64
    assert replaced.manifest["num_pairs"] == 4 and replaced.manifest["resolution"] == 64
    assert len(replaced.manifest["shards"]) == 2  # the earlier cache's shards are gone
