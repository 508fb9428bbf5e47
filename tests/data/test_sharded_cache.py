"""The sharded latent cache: what ``cache_latents`` stores, split over processes and chunks, resumable, streamed."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from datasets import Dataset

import trl_diffusion_sdpo.data.sharded_cache as sharded_cache
from tests.helpers.common import cpu_launch_flags, worker_environment
from tests.helpers.latent_cache import _rows
from trl_diffusion_sdpo import DiffusionSDPOConfig, DiffusionSDPOTrainer
from trl_diffusion_sdpo.data.latent_cache import CachedPreferenceCollator, build_latent_cache
from trl_diffusion_sdpo.data.preparation import prepare_preference_dataset
from trl_diffusion_sdpo.data.sharded_cache import build_sharded_latent_cache, load_sharded_latent_cache
from trl_diffusion_sdpo.families import family_for_pipeline
from trl_diffusion_sdpo.testing import build_tiny_sd_pipeline

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "examples" / "accelerate_configs"
RESOLUTION = 32


def _args(tmp_path, **overrides) -> DiffusionSDPOConfig:
    settings = dict(
        output_dir=str(tmp_path / "out"),
        resolution=RESOLUTION,
        random_flip=True,
        report_to="none",
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    settings.update(overrides)
    return DiffusionSDPOConfig(**settings)


@pytest.fixture(scope="module")
def family():
    return family_for_pipeline(build_tiny_sd_pipeline(seed=0))


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    rows = _rows(7)
    rows[2]["label_0"] = 0.5  # a tie: dropped and counted
    return Dataset.from_list(rows)


def _batch(cache) -> dict[str, torch.Tensor]:
    return cache.collator()(list(cache.dataset))


def _tables(directory: Path) -> dict[str, pa.Table]:
    shards = directory / "shards"
    return {p.name: pa.ipc.open_stream(pa.memory_map(str(p))).read_all() for p in sorted(shards.iterdir())}


def test_the_sharded_cache_holds_what_cache_latents_holds(tmp_path, family, dataset):
    args = _args(tmp_path)
    # One pair per VAE batch on both sides: a convolution's float result may depend on the batch it runs in.
    cache = build_sharded_latent_cache(dataset, args, family, str(tmp_path / "sharded"), chunk_size=3, batch_size=1)
    prepared, columns, _ = prepare_preference_dataset(dataset, args)
    reference = build_latent_cache(
        prepared,
        columns,
        family,
        resolution=RESOLUTION,
        random_flip=True,
        cache_dir=str(tmp_path / "map"),
        batch_size=1,
    )
    expected = CachedPreferenceCollator(with_flipped=True)([reference.dataset[i] for i in range(len(prepared))])
    got = _batch(cache)
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
    manifest = cache.manifest
    assert (manifest["rows_read"], manifest["num_pairs"], manifest["ties_dropped"]) == (7, 6, 1)
    assert len(manifest["shards"]) == 3  # 7 rows in chunks of 3
    torch.testing.assert_close(cache.empty_prompt.encoder_hidden_states, reference.empty_prompt.encoder_hidden_states)


def test_two_processes_of_a_streamed_dataset_encode_every_pair_once(tmp_path, family, dataset):
    """Processes 0 and 1 of 2 (run one after the other here) split a streamed dataset; together they hold every
    pair once, and whichever finishes last completes the manifest."""
    args = _args(tmp_path)
    stream = dataset.to_iterable_dataset(num_shards=2)
    folder = str(tmp_path / "two")
    first = build_sharded_latent_cache(stream, args, family, folder, rank=0, world_size=2, chunk_size=2, batch_size=1)
    assert first is None and not os.path.exists(os.path.join(folder, "manifest.json"))
    cache = build_sharded_latent_cache(stream, args, family, folder, rank=1, world_size=2, chunk_size=2, batch_size=1)
    single = build_sharded_latent_cache(dataset, args, family, str(tmp_path / "one"), chunk_size=7, batch_size=1)
    assert cache.manifest["num_pairs"] == single.manifest["num_pairs"] == 6
    assert {n.split("-chunk")[0] for n in cache.manifest["shards"]} == {"rank-00000-of-00002", "rank-00001-of-00002"}
    ours, theirs = _batch(cache), _batch(single)
    key = lambda mean: mean.flatten().tolist()  # noqa: E731
    assert sorted(map(key, ours["latent_mean"])) == sorted(map(key, theirs["latent_mean"]))


def test_an_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, family, dataset, monkeypatch):
    args = _args(tmp_path)
    stream = dataset.to_iterable_dataset(num_shards=1)
    straight = tmp_path / "straight"
    build_sharded_latent_cache(stream, args, family, str(straight), chunk_size=2)

    folder = tmp_path / "interrupted"
    assert build_sharded_latent_cache(stream, args, family, str(folder), chunk_size=2, max_chunks=1) is None
    encode = sharded_cache._encode_chunk

    def killed_midway(rows, columns, family, args, output_dir, scratch, *rest):
        os.makedirs(scratch, exist_ok=True)
        Path(scratch, "half-written.arrow").write_bytes(b"garbage")  # what a kill inside a chunk leaves
        raise KeyboardInterrupt

    monkeypatch.setattr(sharded_cache, "_encode_chunk", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        build_sharded_latent_cache(stream, args, family, str(folder), chunk_size=2)
    assert json.loads((folder / "progress" / "rank-00000.json").read_text())["chunks"] == 1
    monkeypatch.setattr(sharded_cache, "_encode_chunk", encode)
    calls = []
    monkeypatch.setattr(sharded_cache, "_encode_chunk", lambda *a: calls.append(a[8]) or encode(*a))
    resumed = build_sharded_latent_cache(stream, args, family, str(folder), chunk_size=2)
    assert calls == [1, 2, 3]  # chunk 0 was not encoded again
    a, b = _tables(straight), _tables(folder)
    assert a.keys() == b.keys() and all(a[k].equals(b[k]) for k in a)
    assert resumed.manifest["num_pairs"] == 6 and not (folder / "progress" / "scratch-00000").exists()


def test_a_resumed_run_with_other_settings_is_refused(tmp_path, family, dataset):
    folder = str(tmp_path / "cache")
    build_sharded_latent_cache(dataset, _args(tmp_path), family, folder, chunk_size=4, max_chunks=1)
    with pytest.raises(ValueError, match="resolution: 32 there, 64 now"):
        build_sharded_latent_cache(dataset, _args(tmp_path, resolution=64), family, folder, chunk_size=4)


def test_an_invalid_row_is_named_or_skipped_and_counted(tmp_path, family):
    rows = _rows(4)
    rows[1]["jpg_1"] = b"not an image"
    data = Dataset.from_list(rows)
    with pytest.raises(ValueError, match="row 1 of this process's shard, column 'rejected'"):  # label_0 1
        build_sharded_latent_cache(data, _args(tmp_path), family, str(tmp_path / "strict"))
    cache = build_sharded_latent_cache(data, _args(tmp_path, skip_invalid_rows=True), family, str(tmp_path / "skip"))
    assert (cache.manifest["num_pairs"], cache.manifest["invalid_skipped"]) == (3, 1)
    assert cache.report().num_kept == 3


def test_training_streams_the_cache_as_it_would_stream_the_images(tmp_path):
    """The same rows in the same order, once from the streamed cache and once encoded at every step: the same
    draws and posteriors, so the same losses; the trainer never loads the cache whole (an IterableDataset)."""
    dataset = Dataset.from_list(_rows(6))  # no tie: a streamed batch would lose the tied row, the cache never has it
    # mu=0.9 (the authors' SD1.5 margin): the rel=1e-3 below is float noise amplified by beta at that margin; at
    # mu=0.5 the third step's loss differs by 2.3e-3 (a larger lambda carries more of the noise)
    args = _args(tmp_path, max_steps=3, safeguard_mu=0.9)
    pipe = build_tiny_sd_pipeline(seed=0)
    cache = build_sharded_latent_cache(dataset, args, family_for_pipeline(pipe), str(tmp_path / "c"), chunk_size=3)
    cached = DiffusionSDPOTrainer(pipe, None, args, cache)
    assert type(cached.train_dataset).__name__ == "IterableDataset"
    cached.train()
    uncached = DiffusionSDPOTrainer(build_tiny_sd_pipeline(seed=0), None, args, dataset.to_iterable_dataset())
    uncached.train()
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (cached, uncached)]
    assert len(losses[0]) == 3 and all(math.isfinite(x) for x in losses[0])
    # Up to float noise: the VAE encodes in other batches (a few 1e-7 in the latents, amplified by beta = 5000).
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)
    assert losses[0][0] == pytest.approx(math.log(2), abs=1e-6)


def test_a_cache_for_another_resolution_is_refused_by_the_trainer(tmp_path, dataset):
    pipe = build_tiny_sd_pipeline(seed=0)
    cache = build_sharded_latent_cache(dataset, _args(tmp_path), family_for_pipeline(pipe), str(tmp_path / "c"))
    with pytest.raises(ValueError, match="resolution: built with 32, this run has 64"):
        DiffusionSDPOTrainer(pipe, None, _args(tmp_path, resolution=64), cache)


# ------------------------------------------------------------------------------- the command under accelerate launch


def _cache_command(assets: Path, folder: Path, *extra: str) -> list[str]:
    """`accelerate launch` of `trl-diffusion-sdpo cache` on 2 processes (the multi-GPU config; on a machine without
    GPUs with accelerate's CPU mode, as training needs it)."""
    launch = f"-m accelerate.commands.launch --config_file {CONFIGS / 'multi_gpu.yaml'} --num_processes 2"
    launch += " --mixed_precision no --main_process_port 0 -m trl_diffusion_sdpo cache"
    options = f"--resolution {RESOLUTION} --random_flip true --cache_chunk_size 1 --cache_batch_size 1"
    options += f" --output_dir {assets / 'unused'} --report_to none"
    options += " " + " ".join(cpu_launch_flags(CONFIGS / "multi_gpu.yaml"))
    paths = ["--model_name_or_path", str(assets / "pipeline"), "--dataset_name", str(assets / "data")]
    return [sys.executable, *launch.split(), *paths, "--latent_cache", str(folder), *options.split(), *extra]


@pytest.mark.slow
def test_the_cache_command_killed_midway_under_accelerate_launch_resumes_to_the_uninterrupted_result(tmp_path):
    """Two processes write the cache; a SIGKILL to the whole launch stops them mid-run; the same command resumes
    and the shards equal those of a run that was never interrupted (and one process's cache, in order)."""
    pipe = build_tiny_sd_pipeline(seed=0, tokenizer_dir=str(tmp_path / "tokenizer"))
    pipe.save_pretrained(tmp_path / "pipeline")
    Dataset.from_list(_rows(16)).save_to_disk(str(tmp_path / "data"))
    env = worker_environment()

    straight = tmp_path / "straight"
    done = subprocess.run(_cache_command(tmp_path, straight), cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "16 pairs from 16 rows" in done.stdout

    folder = tmp_path / "killed"
    proc = subprocess.Popen(
        _cache_command(tmp_path, folder),
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    progress = folder / "progress" / "rank-00000.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if progress.exists() and json.loads(progress.read_text())["chunks"] >= 2:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (folder / "manifest.json").exists()  # really interrupted
    chunks_before = json.loads(progress.read_text())["chunks"]
    assert 2 <= chunks_before < 8

    resumed = subprocess.run(_cache_command(tmp_path, folder), cwd=ROOT, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    a, b = _tables(straight), _tables(folder)
    assert len(a) == 16 and a.keys() == b.keys() and all(a[k].equals(b[k]) for k in a)
    assert {name.split("-chunk")[0] for name in a} == {"rank-00000-of-00002", "rank-00001-of-00002"}  # 8 rows each
    # A map-style dataset is split in contiguous blocks: process 0's chunks then process 1's are the rows in order.
    one = build_sharded_latent_cache(
        Dataset.from_list(_rows(16)),
        _args(tmp_path),
        family_for_pipeline(pipe),
        str(tmp_path / "one"),
        chunk_size=16,
        batch_size=1,
    )
    torch.testing.assert_close(
        _batch(load_sharded_latent_cache(str(folder)))["latent_mean"], _batch(one)["latent_mean"], rtol=0, atol=0
    )


def test_the_cache_command_reads_the_training_yaml_with_its_training_only_keys(tmp_path, capsys):
    from trl_diffusion_sdpo.cli.main import main

    pipe = build_tiny_sd_pipeline(seed=0, tokenizer_dir=str(tmp_path / "tokenizer"))
    pipe.save_pretrained(tmp_path / "pipeline")
    Dataset.from_list(_rows(5)).save_to_disk(str(tmp_path / "data"))
    config = tmp_path / "train.yaml"
    config.write_text(
        f"model_name_or_path: {tmp_path / 'pipeline'}\ndataset_name: {tmp_path / 'data'}\nuse_peft: true\n"
        f"lora_r: 4\nlearning_rate: 1.0e-4\nresolution: {RESOLUTION}\nrandom_flip: false\n"
        f"output_dir: {tmp_path / 'out'}\nreport_to: none\n"
    )
    folder = tmp_path / "cache"
    assert main(["cache", "--config", str(config), "--latent_cache", str(folder), "--cache_chunk_size", "2"]) == 0
    assert "5 pairs from 5 rows" in capsys.readouterr().out
    cache = load_sharded_latent_cache(str(folder))
    assert cache.manifest["resolution"] == RESOLUTION and not cache.flipped and len(cache.manifest["shards"]) == 3
    with pytest.raises(SystemExit) as exit_info:  # a mistyped flag is an error naming it, not ignored
        main(["cache", "--config", str(config), "--latent_cache", str(folder), "--cache_chunk_sise", "2"])
    assert exit_info.value.code == 2 and "cache_chunk_sise" in capsys.readouterr().err


def test_a_cache_encoded_under_other_image_conversion_rules_is_refused_by_the_trainer(tmp_path, dataset):
    pipe = build_tiny_sd_pipeline(seed=0)
    folder = tmp_path / "c"
    build_sharded_latent_cache(dataset, _args(tmp_path), family_for_pipeline(pipe), str(folder))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["settings"]["image_conversion"] = "digest before an edit of data/transforms.py"  # edited on disk
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="image-conversion rules"):
        DiffusionSDPOTrainer(pipe, None, _args(tmp_path), load_sharded_latent_cache(str(folder)))


def test_an_sd3_cache_built_at_another_max_sequence_length_is_refused_naming_it(tmp_path):
    """The tokens per prompt shape the cached T5 embeddings: a cache built at 4 does not serve a run at 12."""
    from trl_diffusion_sdpo.testing import build_tiny_sd3_pipeline

    pipe = build_tiny_sd3_pipeline(seed=0, tokenizer_dir=str(tmp_path / "tok"), max_length=16)
    pairs = Dataset.from_list(_rows(3))
    at_4 = _args(tmp_path, max_sequence_length=4)
    cache = build_sharded_latent_cache(
        pairs, at_4, family_for_pipeline(pipe, max_sequence_length=4), str(tmp_path / "c")
    )
    with pytest.raises(
        ValueError, match=r"max_sequence_length \(tokens per prompt\): built with .*4.*this run has .*12"
    ):
        DiffusionSDPOTrainer(pipe, None, _args(tmp_path, max_sequence_length=12), cache)
    DiffusionSDPOTrainer(pipe, None, at_4, load_sharded_latent_cache(str(tmp_path / "c")))  # the same settings train


@pytest.mark.parametrize("other", [{"num_frames": 9}, {"frame_stride": 2}])
def test_a_wan_cache_built_for_other_frames_is_refused_naming_them(tmp_path, other):
    pytest.importorskip("av")
    from tests.helpers.video import video_rows
    from trl_diffusion_sdpo.testing import build_tiny_wan_pipeline

    pipe = build_tiny_wan_pipeline(seed=0, tokenizer_dir=str(tmp_path / "tok"), max_length=16)
    settings = dict(resolution=16, num_frames=5, max_sequence_length=16)
    cache = build_sharded_latent_cache(
        Dataset.from_list(video_rows(2)),
        _args(tmp_path, **settings),
        family_for_pipeline(pipe, max_sequence_length=16),
        str(tmp_path / "c"),
    )
    with pytest.raises(ValueError, match=r"video frames \(num_frames, frame_stride\): built with"):
        DiffusionSDPOTrainer(pipe, None, _args(tmp_path, **{**settings, **other}), cache)
