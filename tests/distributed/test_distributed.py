"""Two processes on CPU over gloo: DDP, DeepSpeed ZeRO-1/2/3, FSDP2, LoRA and full UNet tuning.

Each case launches the train command with the shipped accelerate config (``accelerate launch
--num_processes 2 --mixed_precision no``) through ``tests/distributed_worker.py``, and compares it with the same
script on one process (the worker's jobs run in the pytest process) with the same global batch and seed. The tiny UNet
is widened (128 channels) so that some of its tensors exceed ZeRO-3's persistence threshold and really are
partitioned; the worker reports how many were.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from tests.helpers.common import cpu_launch_flags, worker_environment
from tests.helpers.distributed import (
    _REPORTS,
    CONFIGS,
    ROOT,
    STEPS,
    Run,
    _assert_resumed_like_straight,
    _free_port,
    _launch,
    _weights,
    assert_one_pass_like_one_process,
    random_stream_rows,
    run,
    tiny_assets,
)

pytest.importorskip("deepspeed")


def random_stream(assets: dict, seed: int) -> str:
    """The folder of :func:`random_stream_rows` ``(seed)``, written once."""
    path = assets["root"] / f"data-random-{seed}"
    if not path.exists():
        Dataset.from_list(random_stream_rows(seed)).save_to_disk(str(path))
    return str(path)


@pytest.fixture(scope="module")
def sdxl_assets(assets) -> dict[str, Path]:
    return tiny_assets(assets["root"] / "sdxl", "sdxl", data=assets["data"])


# ------------------------------------------------------------------------------------------------ running trainings
# Interpreter start-up and imports (a launcher and two workers importing torch, diffusers, transformers and DeepSpeed:
# ~15 s of a quiet 2-core machine per launch) cost more than a 3-step training of these tiny models, so trainings run
# one after the other in the same processes (distributed_worker.py --jobs): this pytest process computes every
# one-process reference (helpers.distributed.train_here: no interpreter of its own), and one two-process launch serves
# every accelerate configuration. The launch is a real
# `accelerate launch --config_file` of the first configuration; each training of another configuration carries the
# ACCELERATE_* / FSDP_* environment that `accelerate launch` builds from its shipped yaml (accelerate's own launch
# code computes it, _launch_environment), and the worker swaps it in before that training. A training is keyed by its
# arguments: tests that need the same one share it.

_FAILED: dict[tuple, str] = {}  # group -> why its launch failed, so its other tests fail at once


class Runs:
    """The trainings of :data:`RUNS` (the default suite) and :data:`SLOW_RUNS`, by name; the first request of a group
    launches all of that table's group."""

    def __init__(self, assets: dict[str, dict]) -> None:
        self.assets = assets

    def __getitem__(self, name: str) -> dict:
        table = RUNS if name in RUNS else SLOW_RUNS  # each tier launches its own trainings only
        spec = table[name]
        group = (table is RUNS, spec.group)
        key = spec.key(self.assets[spec.assets])
        if key not in _REPORTS:
            if group in _FAILED:
                pytest.fail(_FAILED[group])
            jobs, keys = [], set()
            for other, run_ in table.items():
                other_key = run_.key(self.assets[run_.assets])
                if run_.group == spec.group and other_key not in _REPORTS and other_key not in keys:
                    keys.add(other_key)
                    jobs.append((self.assets[run_.assets], other, run_))
            try:
                _launch(jobs)
            except AssertionError as error:
                _FAILED[group] = str(error)
                raise
        return _REPORTS[key]


PARAMETER = ("--safeguard_space", "parameter")
UPDATE = ("--safeguard_space", "update")
BETA_500 = ("--beta", "500")
ACCUMULATE = ("--gradient_accumulation_steps", "2")
SAVE_AT_STEP_2 = ("--save_strategy", "steps", "--save_steps", "2")
POISON = ("--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1")  # checkpoints after steps 1 and 2
FSDP2 = "fsdp2.yaml"


# A stream of 12 rows, one pair per process per micro-batch, two micro-batches per step: micro-batch k gives process
# 0 row 2k and process 1 row 2k+1. Process 1's first micro-batch is a tie (row 1: nothing to replay yet), process 0's
# whole second step is ties (rows 4, 6), process 1 loses row 9 (a broken image) at step 3.
def random_stream_arguments(folder: str) -> tuple[str, ...]:
    """A random stream (:func:`random_stream_rows`), one pair per process per micro-batch, two per step."""
    return ("--dataset_name", folder, "--dataset_streaming", "true", "--per_device_train_batch_size", "1", *ACCUMULATE)


RANDOM_STREAM_0 = random_stream_arguments("{root}/data-random-0")
PLAIN_DPO = ("--safeguard_space", "none")
STREAMED_TIES = (
    "--dataset_name", "{root}/data-ties", "--dataset_streaming", "true", "--per_device_train_batch_size", "1",
    *ACCUMULATE,
)  # fmt: skip
# The same stream layout, with every row of step 2 a tie: no process has a pair in that optimizer step.
EMPTY_STEP = (
    "--dataset_name", "{root}/data-empty-step", "--dataset_streaming", "true", "--per_device_train_batch_size", "1",
    *ACCUMULATE,
)  # fmt: skip

# Every training of the default suite, grouped by launch (see Run.group); within a group, in this order (ZeRO-3, whose
# registration with transformers the worker undoes after each training, last). One case per mechanism: DDP, ZeRO-2
# and FSDP2 against one process, a sharded reduction with an accumulation window (ZeRO-2, parameter space), the
# global parameter space under DDP, the update space in one pass on ZeRO-2's optimizer partitions (the default case
# of test_one_pass_engines.py's matrix, trained here to share this launch), and the stream guards (ties, empty steps,
# a random stream).
RUNS: dict[str, Run] = {
    # one plain process: the references
    "single-lora": Run("sd15", None, True),
    "single-parameter-lora": Run("sd15", None, True, PARAMETER),
    "single-update-lora": Run("sd15", None, True, UPDATE),
    "single-parameter-lora-accumulated": Run(
        "sd15", None, True, (*PARAMETER, *ACCUMULATE, "--per_device_train_batch_size", "2")
    ),
    "accumulate-single": Run(
        "sd15", None, False, ("--per_device_train_batch_size", "2", *ACCUMULATE, "--learning_rate", "1e-4")
    ),
    # DDP
    "multi_gpu-lora": Run("sd15", "multi_gpu.yaml", True),
    "accumulate-ddp": Run(
        "sd15", "multi_gpu.yaml", False, ("--per_device_train_batch_size", "1", *ACCUMULATE, "--learning_rate", "1e-4")
    ),
    "ddp-parameter-global-lora": Run("sd15", "multi_gpu.yaml", True, PARAMETER),
    "ddp-streamed-ties-lora": Run("sd15", "multi_gpu.yaml", True, STREAMED_TIES),
    "ddp-empty-step-lora": Run("sd15", "multi_gpu.yaml", True, EMPTY_STEP),
    # FSDP2
    "fsdp2-lora": Run("sd15", FSDP2, True),
    "fsdp2-random-stream-0-parameter": Run("sd15", FSDP2, True, (*RANDOM_STREAM_0, *PARAMETER)),
    # its lambdas against one process's: shard inner products summed over processes (not the ranks' mere agreement)
    "fsdp2-parameter-lora": Run("sd15", FSDP2, True, PARAMETER),
    # DeepSpeed ZeRO-2
    "deepspeed_zero2-lora": Run("sd15", "deepspeed_zero2.yaml", True),
    "deepspeed_zero2-empty-step-lora": Run("sd15", "deepspeed_zero2.yaml", True, EMPTY_STEP),
    "deepspeed_zero2-parameter-lora-accumulated": Run(
        "sd15", "deepspeed_zero2.yaml", True, (*PARAMETER, *ACCUMULATE, "--per_device_train_batch_size", "1")
    ),
    "deepspeed_zero2-update-lora": Run("sd15", "deepspeed_zero2.yaml", True, UPDATE),
}
# The slow tests' trainings, launched the same way (a group of their own, in this order: ZeRO-2's full-tuning run
# saves checkpoint-2, which the next run resumes from; ZeRO-3 last).
SLOW_RUNS: dict[str, Run] = {
    "single-full": Run("sd15", None, False),
    "sdxl-single-full": Run("sdxl", None, False, BETA_500),
    "bf16-single-beta500": Run("sd15", None, True, ("--bf16", "true", "--use_cpu", "true", *BETA_500)),
    "multi_gpu-full": Run("sd15", "multi_gpu.yaml", False),
    "poisoned-multi_gpu": Run("sd15", "multi_gpu.yaml", False, POISON, poison_step=2),
    "ddp-cached": Run(
        "sd15", "multi_gpu.yaml", True, ("--cache_latents", "true", "--latent_cache_dir", "{root}/latent-cache")
    ),
    "ddp-update-lora": Run("sd15", "multi_gpu.yaml", True, UPDATE),
    "bf16-ddp": Run("sd15", "multi_gpu.yaml", True, ("--bf16", "true", *BETA_500)),
    "ddp-streamed-ties-parameter-lora": Run("sd15", "multi_gpu.yaml", True, (*STREAMED_TIES, *PARAMETER)),
    "ddp-random-stream-0-dpo": Run("sd15", "multi_gpu.yaml", True, (*RANDOM_STREAM_0, *PLAIN_DPO)),
    "fsdp2-full": Run("sd15", FSDP2, False),
    "deepspeed_zero1-lora": Run("sd15", "deepspeed_zero1.yaml", True),
    "deepspeed_zero1-full": Run("sd15", "deepspeed_zero1.yaml", False),
    "deepspeed_zero2-full": Run("sd15", "deepspeed_zero2.yaml", False, SAVE_AT_STEP_2),
    "resumed-deepspeed_zero2-full": Run(
        "sd15",
        "deepspeed_zero2.yaml",
        False,
        ("--resume_from_checkpoint", "{root}/deepspeed_zero2-full/model/checkpoint-2"),
    ),
    "poisoned-deepspeed_zero2": Run("sd15", "deepspeed_zero2.yaml", False, POISON, poison_step=2),
    "deepspeed_zero2-random-stream-0-output": Run("sd15", "deepspeed_zero2.yaml", True, RANDOM_STREAM_0),
    "deepspeed_zero3-lora": Run("sd15", "deepspeed_zero3.yaml", True),
    "deepspeed_zero3-full": Run("sd15", "deepspeed_zero3.yaml", False),
    "deepspeed_zero3-empty-step-lora": Run("sd15", "deepspeed_zero3.yaml", True, EMPTY_STEP),
    "sdxl-zero3-full": Run("sdxl", "deepspeed_zero3.yaml", False, BETA_500),
}


@pytest.fixture(scope="module")
def runs(request, assets) -> Runs:
    return Runs(_Assets(request, assets))


class _Assets(dict):
    """The assets by kind: the SD ones, and the SDXL ones built when a training first needs them (the slow tier's)."""

    def __init__(self, request, assets: dict) -> None:
        super().__init__(sd15=assets)
        self.request = request

    def __missing__(self, kind: str) -> dict:
        self[kind] = self.request.getfixturevalue(f"{kind}_assets")
        return self[kind]


def _named_run(runs: Runs, assets: dict, name: str, config: str | None, lora: bool, *extra: str) -> dict:
    """``runs[name]`` for a training of :data:`RUNS` (checking that its arguments are these), else a launch of its
    own (slow tests)."""
    if name in RUNS or name in SLOW_RUNS:
        spec = {**RUNS, **SLOW_RUNS}[name]
        assert (spec.config, spec.lora, spec.arguments(assets)) == (config, lora, extra), name
        return runs[name]
    return run(assets, name, config, lora, *extra)


CASES = [
    ("multi_gpu.yaml", None),
    ("deepspeed_zero1.yaml", 1),
    ("deepspeed_zero2.yaml", 2),
    ("deepspeed_zero3.yaml", 3),
]


# DDP and a sharding engine (ZeRO-2) with LoRA by default; the other stages and full tuning in the slow tier
DEFAULT_CASES = {("multi_gpu.yaml", True), ("deepspeed_zero2.yaml", True)}


@pytest.mark.parametrize(
    "config,stage,lora",
    [
        pytest.param(c, s, lora, marks=() if (c, lora) in DEFAULT_CASES else pytest.mark.slow)
        for lora in (True, False)
        for c, s in CASES
    ],
    ids=[f"{c}-{'lora' if lora else 'full'}" for lora in (True, False) for c, _ in CASES],
)
def test_two_processes_train_like_one(runs, config, stage, lora):
    tuning = "lora" if lora else "full"
    report = runs[f"{config.removesuffix('.yaml')}-{tuning}"]
    single = runs[f"single-{tuning}"]

    assert report["num_processes"] == 2 and report["zero_stage"] == stage
    assert report["distributed_type"].endswith("DEEPSPEED" if stage else "MULTI_CPU")
    assert report["global_step"] == STEPS
    losses = report["losses"]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
    # Same global batch, same seed: the same pairs, flips, prompt dropout, timesteps and noise, and with the global
    # safeguard scope the same lambda, so the logged losses agree up to float summation order (amplified by
    # beta = 5000: a 1e-7 change in the error gap moves the loss by ~5e-4; the losses themselves move ~20% a step).
    assert losses == pytest.approx(single["losses"], rel=1e-3)
    assert report["lambdas"] == pytest.approx(single["lambdas"], rel=1e-3)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at the start

    # The frozen parts are whole; the reference did not move; the run trained something.
    assert not any(report["frozen_partitioned"].values())
    assert report["reference_max_abs_change"] == 0.0
    assert report["original_vs_trained_max_abs_diff"] > 1e-3
    # What was saved is what was trained, in the files one process writes, loaded back by diffusers.
    assert report["saved_vs_trained_max_abs_diff"] < 1e-5
    assert report["saved_files"] == single["saved_files"]

    if stage == 3:
        # The policy really is sharded (not every tensor: small ones stay whole below the persistence threshold) ...
        assert 0 < report["policy_partitioned"] < report["policy_parameters"]
        # ... and so is a reference copy, as a DeepSpeed engine; with LoRA there is no copy at all.
        if lora:
            assert "reference_is_engine" not in report
        else:
            assert report["reference_is_engine"] and report["reference_partitioned"] > 0
        # Without load_pipeline, transformers would have built the text encoder sharded: the guard matters.
        assert report["naive_load_partitions_text_encoder"]
    else:
        assert report["policy_partitioned"] == 0
        if not lora:
            assert report["reference_is_engine"] is False


@pytest.mark.slow  # resume by default: test_checkpoints.py's kill-and-resume on one process
def test_checkpoint_saved_under_zero2_resumes_under_the_same_stage(runs):
    """The ZeRO-2 full-tuning run saves checkpoint-2 on its way to step 3; a second run resumes from it (weights,
    DeepSpeed's optimizer state, the step) and ends where the uninterrupted run did."""
    straight = runs["deepspeed_zero2-full"]
    resumed = runs["resumed-deepspeed_zero2-full"]
    _assert_resumed_like_straight(straight, resumed, Path(straight["model_dir"]) / "checkpoint-2", lora=False)


@pytest.mark.slow  # ZeRO-3 resume takes a minute on 2 cores; ZeRO-2 keeps resume in every run
def test_checkpoint_saved_under_zero3_resumes_under_the_same_stage(assets):
    config, lora, tag = "deepspeed_zero3.yaml", True, "deepspeed_zero3-lora"
    straight = run(assets, f"straight-{tag}", config, lora)
    run(assets, f"interrupted-{tag}", config, lora, "--max_steps", "2", *SAVE_AT_STEP_2)
    resumed = run(
        assets, f"resumed-{tag}", config, lora, "--resume_from_checkpoint",
        str(assets["root"] / f"interrupted-{tag}" / "model" / "checkpoint-2"),
    )  # fmt: skip
    _assert_resumed_like_straight(
        straight, resumed, assets["root"] / f"interrupted-{tag}" / "model" / "checkpoint-2", lora
    )


@pytest.mark.slow  # the skip itself by default: test_nonfinite_gradients.py (one process)
@pytest.mark.parametrize("config", ["multi_gpu", "deepspeed_zero2"])
def test_a_nan_loss_on_one_process_skips_the_step_on_all(runs, assets, config):
    """Process 1's loss is NaN at step 2 (checkpoints after steps 1 and 2): no process applies that update (the
    weights saved at the end are checkpoint-1's, bit for bit, on every process), the skip is counted, the log stays
    finite. Step 1 was an ordinary step: the clean run's loss, and weights that moved."""
    poisoned = runs[f"poisoned-{config}"]
    logs = [h for h in poisoned["log_history"] if "loss" in h]
    assert [h["nonfinite_skipped"] for h in logs] == [0, 1]
    assert all(math.isfinite(h["loss"]) for h in logs)
    assert logs[0]["loss"] == pytest.approx(runs[f"{config}-full"]["losses"][0], rel=1e-6)
    model_dir = Path(poisoned["model_dir"])
    after_step_1 = _weights(model_dir / "checkpoint-1", lora=False)
    final = _weights(model_dir, lora=False)
    original = _weights(assets["pipeline"], lora=False)
    assert final.keys() == after_step_1.keys() == original.keys()
    assert any(not torch.equal(after_step_1[key], original[key]) for key in original)
    for key in final:
        torch.testing.assert_close(final[key], after_step_1[key], rtol=0, atol=0, msg=key)
    assert poisoned["process_weight_spread"] == 0.0


@pytest.mark.parametrize("space", ["output", pytest.param("parameter", marks=pytest.mark.slow)])
def test_streamed_ties_and_broken_rows_keep_the_replicas_identical(runs, space):
    """The collator drops streamed ties and broken rows whatever skip_invalid_rows says (here False). A
    process whose first micro-batch is a tie joins its peer with a zero-weighted placeholder pair (it used to raise),
    a process whose whole step is ties drops its gradients only when the summed count says the step is empty (it used
    to drop them alone, after DDP had averaged them: the replicas drifted), and both processes enter the same
    collectives in the same order (the parameter space's output-lambda metric used to reduce on one only)."""
    report = runs["ddp-streamed-ties-lora" if space == "output" else "ddp-streamed-ties-parameter-lora"]
    assert report["global_step"] == STEPS
    skipped = [h["data/skipped_rows"] for h in report["log_history"] if "loss" in h]
    assert skipped == [1.0, 2.0, 1.0]  # the ties and the broken row were in the stream where they were put
    assert report["collectives_match"], report["first_collective_mismatch"]
    assert min(report["collective_counts"]) > 0
    assert report["process_weight_spread"] == 0.0
    assert report["original_vs_trained_max_abs_diff"] > 1e-3
    assert report["saved_vs_trained_max_abs_diff"] < 1e-5


ZERO3_EMPTY_STEP = pytest.param("deepspeed_zero3-empty-step-lora", marks=pytest.mark.slow)


@pytest.mark.parametrize("name", ["deepspeed_zero2-empty-step-lora", ZERO3_EMPTY_STEP])
def test_an_offline_step_without_a_pair_on_any_process_is_not_applied_under_deepspeed(runs, name):
    """Step 2 of a stream is ties on both processes. DDP drops its gradients before the optimizer step; DeepSpeed
    steps inside the backward, so the guard's summed count is taken before it and the ZeRO optimizer leaves the step
    unapplied (its torch optimizer's fused step told to skip, as a gradient scaler tells it): the weights end where
    DDP's do (1.2e-4 apart under ZeRO-2, 6e-5 under ZeRO-3: Adam's first steps
    magnify the engines' float differences). Applied, AdamW's moments from step 1 move the weights at step 2 and step 3
    starts elsewhere: 1.9e-3 apart under ZeRO-2."""
    report, ddp = runs[name], runs["ddp-empty-step-lora"]
    assert report["global_step"] == ddp["global_step"] == STEPS
    skipped = [h["data/skipped_rows"] for h in report["log_history"] if "loss" in h]
    assert skipped == [0.0, 4.0, 0.0]  # the whole of step 2 was ties
    # skipped through the optimizer's own found_inf, no method of DeepSpeed's optimizers replaced, the flag cleared
    assert report["zero_optimizer_shadowed"] == [] and report["zero_inner_found_inf"] is False
    a, b = _weights(Path(ddp["model_dir"]), True), _weights(Path(report["model_dir"]), True)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=5e-4, msg=key)


def _assert_ranks_agree(report: dict) -> None:
    """Every process entered the same collectives and, where weights are replicated, ends with the same ones."""
    assert report["global_step"] == STEPS
    assert report["collectives_match"], report["first_collective_mismatch"]
    assert min(report["collective_counts"]) > 0
    if "process_weight_spread" in report:  # DDP, ZeRO-1/2 (sharded weights have no replicas to compare)
        assert report["process_weight_spread"] == 0.0
    assert all(math.isfinite(x) for x in report["losses"])
    assert report["original_vs_trained_max_abs_diff"] > 1e-3
    assert report["saved_vs_trained_max_abs_diff"] < 1e-5


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("ddp-random-stream-0-dpo", marks=pytest.mark.slow),
        pytest.param("deepspeed_zero2-random-stream-0-output", marks=pytest.mark.slow),
        "fsdp2-random-stream-0-parameter",
    ],
)
def test_a_random_stream_of_valid_rows_ties_and_broken_images_keeps_the_ranks_in_agreement(runs, name):
    """The default suite's slice of the randomized invariance test (the full matrix: the slow test below): one
    engine per safeguard space on the seed-0 stream, accumulation 2. A hang fails the launch's timeout."""
    _assert_ranks_agree(runs[name])


RANDOM_ENGINES = ["multi_gpu.yaml", "deepspeed_zero2.yaml", FSDP2]
RANDOM_SPACES = {"dpo": PLAIN_DPO, "output": (), "parameter": PARAMETER}


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_random_streams_keep_every_rank_in_agreement_under_every_engine_and_space(assets, seed):
    """Randomized invariance: a seeded stream mixing valid rows, ties and broken images; DDP, ZeRO-2 and
    FSDP2, each with plain DPO, the output-space and the parameter-space safeguard, accumulation 2, in one two-process
    launch (a hang fails its timeout). Every process enters the same collectives; replicated weights are equal on
    every process; FSDP2's sharded run logs DDP's losses (a process that dropped its shard's gradients alone would
    leave half the weights one update behind, which moves the next losses by far more than 1e-3 at beta 5000; the
    weights themselves are not compared across engines: AdamW turns float summation noise in near-zero LoRA
    gradients into +-lr updates)."""
    folder = random_stream(assets, seed)
    jobs = []
    for config in RANDOM_ENGINES:
        for space, extra in RANDOM_SPACES.items():
            name = f"random-{seed}-{config.removesuffix('.yaml')}-{space}"
            jobs.append((assets, name, Run("sd15", config, True, (*random_stream_arguments(folder), *extra))))
    _launch(jobs)
    reports = {name: _REPORTS[run.key(a)] for a, name, run in jobs}
    for name, report in reports.items():
        try:
            _assert_ranks_agree(report)
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from error
    for space in RANDOM_SPACES:
        ddp = reports[f"random-{seed}-multi_gpu-{space}"]
        fsdp = reports[f"random-{seed}-fsdp2-{space}"]
        assert fsdp["losses"] == pytest.approx(ddp["losses"], rel=1e-3), space


@pytest.mark.slow  # the cache itself: test_latent_cache.py and test_sharded_cache.py by default
def test_latent_cache_is_built_once_and_trains_like_the_uncached_single_process(runs, assets):
    """Under two processes the main process encodes, the other loads the same cache; the draws match an uncached
    single process (the cache holds the posterior, not a sample)."""
    cache_dir = assets["root"] / "latent-cache"
    report = runs["ddp-cached"]
    assert report["losses"] == pytest.approx(runs["single-lora"]["losses"], rel=1e-3)
    assert len([p for p in cache_dir.iterdir() if p.is_dir()]) == 1  # one fingerprinted cache, written once


@pytest.mark.slow  # ZeRO-3 by default: test_one_pass_engines.py's zero3 case
def test_sdxl_example_under_zero3_trains_like_one_process(runs):
    """The train command on SDXL under ZeRO-3: both text encoders stay whole (the naive load would partition them),
    the reference copy is a DeepSpeed engine, and losses, saved weights and the reference behave as on one process."""
    # beta 500: with the default 5000 this tiny SDXL's loss reaches 2.8 in 3 steps, where float summation noise
    # (1e-7 in the errors) is amplified past 1e-3 in the loss.
    single, report = runs["sdxl-single-full"], runs["sdxl-zero3-full"]
    assert report["zero_stage"] == 3 and report["num_processes"] == 2
    assert set(report["frozen_partitioned"]) == {"vae", "text_encoder", "text_encoder_2"}
    assert not any(report["frozen_partitioned"].values())
    assert report["naive_load_partitions_text_encoder"]
    assert report["reference_is_engine"] and report["reference_max_abs_change"] == 0.0
    assert report["losses"] == pytest.approx(single["losses"], rel=1e-3)
    assert report["saved_vs_trained_max_abs_diff"] < 1e-5 and report["original_vs_trained_max_abs_diff"] > 1e-3
    assert report["saved_files"] == single["saved_files"]


def test_gradient_accumulation_over_two_processes_matches_one_process(runs):
    """2 processes x 1 pair x 2 accumulated micro-batches against 1 process x 2 pairs x 2: the same micro-batches,
    draws and lambdas (global scope), hence the same logged losses. (Weights are not compared element-wise: AdamW
    turns float noise in near-zero gradients into +-lr updates.) A learning rate of 1e-4 keeps the loss away from 0,
    where beta = 5000 turns float summation order into relative differences above 1e-3 (at 1e-3 the third loss is
    ~0.002)."""
    single, report = runs["accumulate-single"], runs["accumulate-ddp"]
    assert report["global_step"] == single["global_step"] == STEPS
    assert single["losses"][1] != pytest.approx(single["losses"][0], rel=1e-2)  # the weights moved between steps
    assert report["losses"] == pytest.approx(single["losses"], rel=1e-3)
    assert report["lambdas"] == pytest.approx(single["lambdas"], rel=1e-3)


def test_zero3_init_disabled_lifts_and_restores_the_zero3_registration():
    from transformers.integrations.deepspeed import (
        HfDeepSpeedConfig,
        is_deepspeed_zero3_enabled,
        unset_hf_deepspeed_config,
    )

    from trl_diffusion_sdpo import zero3_init_disabled

    config = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    try:
        assert is_deepspeed_zero3_enabled()
        with zero3_init_disabled():
            assert not is_deepspeed_zero3_enabled()
        assert is_deepspeed_zero3_enabled()
        with pytest.raises(RuntimeError, match="inside"), zero3_init_disabled():
            raise RuntimeError("inside")
        assert is_deepspeed_zero3_enabled()  # restored even when the block raises
    finally:
        unset_hf_deepspeed_config()
        del config
    with zero3_init_disabled():  # nothing registered: a no-op
        assert not is_deepspeed_zero3_enabled()


@pytest.mark.slow
def test_bf16_mixed_precision_under_ddp_behaves_as_one_process(runs):
    """bf16 autocast on two processes (DDP; DeepSpeed's bf16 needs a GPU): the same lambdas as one bf16 process, a
    bf16 reference equal to the original rounded to bf16, finite losses. beta 500, as in the SDXL tests: at 5000 the
    bf16 rounding of the tiny latents' errors, times beta, moved the third loss by 40% with TRL's LoRA settings."""
    single, report = runs["bf16-single-beta500"], runs["bf16-ddp"]
    assert report["distributed_type"].endswith("MULTI_CPU")
    assert all(math.isfinite(x) for x in report["losses"]) and report["losses"][0] == pytest.approx(math.log(2))
    assert report["lambdas"] == pytest.approx(single["lambdas"], rel=1e-3)
    # The logged losses agree only loosely: bf16 rounding of 64-element latents, times beta = 5000, moves u by
    # ~0.1 (on SD's 16384-element latents the noise averages out); their trend must agree.
    assert report["losses"] == pytest.approx(single["losses"], rel=0.25)
    assert report["reference_max_abs_change"] == 0.0
    assert report["original_vs_trained_max_abs_diff"] > 1e-3
    assert report["saved_files"] == single["saved_files"]


# ------------------------------------------------------------------------- the parameter-space safeguard under DDP


def _parameter_space_global_scope_on_two_processes_trains_like_one(single: dict, report: dict) -> None:
    assert report["num_processes"] == 2 and report["global_step"] == STEPS
    # lambda from the globally averaged g_w and g_l is the one-process lambda of the same global batch, and the
    # combined gradient, all-reduced once, is the one-process gradient.
    assert report["lambdas"] == pytest.approx(single["lambdas"], rel=1e-3)
    assert report["losses"] == pytest.approx(single["losses"], rel=1e-3)
    assert single["losses"][0] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at the start: u = 0
    assert any(lam < 1.0 for lam in single["lambdas"])  # the safeguard engaged: the test tells the scopes apart
    assert report["process_weight_spread"] == 0.0
    assert report["reference_max_abs_change"] == 0.0
    assert report["saved_vs_trained_max_abs_diff"] < 1e-5


def test_parameter_space_global_scope_on_two_processes_trains_like_one(runs):
    _parameter_space_global_scope_on_two_processes_trains_like_one(
        runs["single-parameter-lora"], runs["ddp-parameter-global-lora"]
    )


@pytest.mark.slow  # by default: test_the_update_space_in_one_pass_under_zero2_trains_like_one_process
def test_update_space_on_two_processes_trains_like_one(runs):
    """The update space under DDP: the engine averages g_w and h_l over processes, so every process searches the
    same lambda on the same AdamW update as one process with the same global batch; one all-reduced step."""
    single, report = runs["single-update-lora"], runs["ddp-update-lora"]
    assert report["num_processes"] == 2 and report["global_step"] == STEPS == len(single["lambdas"])
    # the search's resolution is max_lambda / 2^11; summation order across processes moves D by rounding only
    assert report["lambdas"] == pytest.approx(single["lambdas"], abs=2e-3)
    assert report["losses"] == pytest.approx(single["losses"], rel=1e-3)
    assert any(lam < 1.0 for lam in single["lambdas"])  # the safeguard engaged: a per-process lambda would differ
    assert report["process_weight_spread"] == 0.0
    assert report["reference_max_abs_change"] == 0.0
    assert report["saved_vs_trained_max_abs_diff"] < 1e-5


def test_the_update_space_in_one_pass_under_zero2_trains_like_one_process(runs, assets):
    """The update space's one pass on ZeRO-2 (LoRA): both branches averaged over processes, AdamW's moments read on
    each process's flat float32 partition (DeepSpeed's ``_hp_mapping``) and every sum added up over processes; the
    lambdas, losses, gradient norms and weights of one process. The default case of test_one_pass_engines.py's
    matrix (every engine, space, scope and family: the slow tier), trained in this file's launch."""
    single, report = runs["single-update-lora"], runs["deepspeed_zero2-update-lora"]
    assert_one_pass_like_one_process(
        single, report, "deepspeed_zero2.yaml", "update-lora", lora=True, pipeline=assets["pipeline"]
    )


@pytest.mark.slow  # compiles in each process; one process's compiled step: test_compiled_exact_rule.py
def test_a_compiled_exact_rule_on_two_ddp_processes_trains_like_one_eager_process(assets):
    """``torch_compile`` under DDP: each process runs the per-branch passes through its compiled denoiser (accelerate's
    wrapper is left pointing at DDP), and the global scope's lambda and the losses are one eager process's."""
    compiled = ("--torch_compile", "true", "--torch_compile_backend", "aot_eager")
    report = run(assets, "ddp-parameter-compiled-lora", "multi_gpu.yaml", True, *PARAMETER, *compiled)
    assert "compiled" in report["per_branch_reason"]  # the passes ran through the compiled denoiser
    _parameter_space_global_scope_on_two_processes_trains_like_one(
        run(assets, "single-parameter-eager-lora", None, True, *PARAMETER), report
    )


@pytest.mark.slow  # compiles in each process
@pytest.mark.parametrize("config", [FSDP2, "deepspeed_zero1.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def test_a_compiled_exact_rule_under_a_sharding_engine_trains_like_one_eager_process(assets, config):
    """``torch_compile`` under FSDP2 and DeepSpeed ZeRO-1, 2 and 3: lambda from the processes' gradients is one eager
    process's with the same global batch."""
    compiled = ("--torch_compile", "true", "--torch_compile_backend", "aot_eager")
    single = run(assets, "single-parameter-eager-lora", None, True, *PARAMETER)
    name = f"{config.removesuffix('.yaml')}-parameter-compiled-lora"
    report = run(assets, name, config, True, *PARAMETER, *compiled)
    assert report["num_processes"] == 2 and report["global_step"] == STEPS
    assert "compiled" in report["per_branch_reason"]  # the passes ran through the compiled denoiser
    assert single["per_branch_reason"] is None  # the eager run took the tapped one pass
    assert any(lam < 1.0 for lam in single["lambdas"])
    assert report["lambdas"] == pytest.approx(single["lambdas"], rel=1e-3)
    assert report["losses"] == pytest.approx(single["losses"], rel=1e-3)
    assert report["saved_vs_trained_max_abs_diff"] < 1e-5


@pytest.mark.slow
def test_parameter_space_global_scope_on_two_processes_trains_like_one_full_tuning(assets):
    _parameter_space_global_scope_on_two_processes_trains_like_one(
        run(assets, "single-parameter-full", None, False, *PARAMETER),
        run(assets, "ddp-parameter-global-full", "multi_gpu.yaml", False, *PARAMETER),
    )


@pytest.mark.slow
def test_parameter_space_local_scope_gives_each_process_its_own_lambda_and_one_reduced_gradient(assets):
    single = run(assets, "single-parameter-lora", None, True, *PARAMETER)
    report = run(assets, "ddp-parameter-local-lora", "multi_gpu.yaml", True, *PARAMETER, "--safeguard_scope", "local")
    assert report["losses"][0] == pytest.approx(math.log(2), abs=1e-6)  # step 1: policy == reference, u = 0
    assert report["lambdas"] != pytest.approx(single["lambdas"], rel=1e-3)  # per-process lambdas, averaged in the log
    assert all(0.0 <= lam <= 1.0 for lam in report["lambdas"])
    assert report["process_weight_spread"] == 0.0  # the combined gradient was all-reduced: weights stay in sync
    assert report["saved_vs_trained_max_abs_diff"] < 1e-5


@pytest.mark.parametrize(
    "config,lora,accumulate",
    [
        ("deepspeed_zero2.yaml", True, True),
        pytest.param("deepspeed_zero1.yaml", True, False, marks=pytest.mark.slow),
        pytest.param("deepspeed_zero2.yaml", False, False, marks=pytest.mark.slow),
    ],
    ids=["zero2-lora-accumulated", "zero1-lora", "zero2-full"],
)
def test_parameter_space_under_zero_1_2_trains_like_one_process(runs, assets, config, lora, accumulate):
    """The engine keeps the reduced sum: the winner pass goes through it, the loser's gradient is taken beside it and
    handed over scaled by lambda. Global scope: the one-process lambdas, and losses that follow the same weights.
    (Weights are not compared element-wise: AdamW turns float noise in near-zero gradients into +-lr updates.)"""
    tuning = "lora" if lora else "full"
    batch = ("--gradient_accumulation_steps", "2") if accumulate else ()
    suffix = "-accumulated" if accumulate else ""
    single = _named_run(
        runs, assets, f"single-parameter-{tuning}{suffix}", None, lora, *PARAMETER, *batch,
        *(("--per_device_train_batch_size", "2") if accumulate else ()),
    )  # fmt: skip
    report = _named_run(
        runs, assets, f"{config.removesuffix('.yaml')}-parameter-{tuning}{suffix}", config, lora, *PARAMETER, *batch,
        *(("--per_device_train_batch_size", "1") if accumulate else ()),
    )  # fmt: skip
    assert report["num_processes"] == 2 and report["zero_stage"] == int(config[len("deepspeed_zero")])
    assert report["global_step"] == single["global_step"] == STEPS
    assert any(lam < 1.0 for lam in single["lambdas"])  # the safeguard engaged
    assert report["lambdas"] == pytest.approx(single["lambdas"], rel=1e-3)
    assert report["losses"] == pytest.approx(single["losses"], rel=1e-3)
    assert report["losses"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert report["reference_max_abs_change"] == 0.0
    assert report["original_vs_trained_max_abs_diff"] > 1e-3
    assert report["saved_vs_trained_max_abs_diff"] < 1e-5


@pytest.mark.slow
def test_parameter_space_local_scope_under_zero2_keeps_the_processes_in_step(assets):
    """The default scope: each process's lambda from its own g_w (captured before the engine reduces it) and h_l;
    the engine averages g_w + lambda_p h_l,p over processes, so every process holds the same weights."""
    single = run(assets, "single-parameter-lora", None, True, *PARAMETER)
    report = run(
        assets, "zero2-parameter-local-lora", "deepspeed_zero2.yaml", True, *PARAMETER, "--safeguard_scope", "local"
    )
    assert report["losses"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert report["lambdas"] != pytest.approx(single["lambdas"], rel=1e-3)  # per-process lambdas
    assert all(0.0 <= lam <= 1.0 for lam in report["lambdas"])
    assert report["process_weight_spread"] == 0.0
    assert report["saved_vs_trained_max_abs_diff"] < 1e-5


@pytest.mark.slow  # the refusal itself is unit-tested in test_engines.py; this runs the real launch
def test_parameter_space_under_zero3_with_the_local_scope_is_refused_before_training(assets):
    """ZeRO-3 averages each branch's gradient as it partitions it: the local scope is refused, naming the global scope
    (the default; test_zero3_parameter_space.py trains with it) and the engines with a per-process lambda."""
    out = assets["root"] / "zero3-parameter"
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CONFIGS / "deepspeed_zero3.yaml"),
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "--main_process_port",
        str(_free_port()),
        "--module",  # the train command, as docs/distributed.md launches it
        "trl_diffusion_sdpo",
        "train",
        "--model_name_or_path",
        str(assets["pipeline"]),
        "--dataset_name",
        str(assets["data"]),
        "--output_dir",
        str(out),
        "--resolution",
        "32",
        "--max_steps",
        "1",
        "--per_device_train_batch_size",
        "1",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--use_peft",
        *PARAMETER,
        "--safeguard_scope",
        "local",
        *cpu_launch_flags(CONFIGS / "deepspeed_zero3.yaml"),
    ]
    env = worker_environment()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "safeguard_space='parameter' under DeepSpeed ZeRO-3 needs safeguard_scope='global'" in proc.stderr
    assert "deepspeed_zero2.yaml" in proc.stderr


# ------------------------------------------------------------------------------------------------------------- FSDP2
# accelerate engages FSDP only on accelerators; the worker lifts that gate on CPU (tests only), so these runs go
# through accelerate's own FSDP2 path (fully_shard over the gloo group) with the shipped fsdp2.yaml.


@pytest.mark.parametrize("lora", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["lora", "full"])
def test_fsdp2_two_processes_train_like_one(runs, lora):
    tuning = "lora" if lora else "full"
    report, single = runs[f"fsdp2-{tuning}"], runs[f"single-{tuning}"]
    assert report["distributed_type"].endswith("FSDP") and report["num_processes"] == 2
    assert report["global_step"] == STEPS
    assert report["losses"] == pytest.approx(single["losses"], rel=1e-3)
    assert report["lambdas"] == pytest.approx(single["lambdas"], rel=1e-3)
    assert report["losses"][0] == pytest.approx(math.log(2), abs=1e-6)
    # Every policy weight is a shard; a full-tuning reference copy is sharded too (half of it on each process).
    assert report["policy_sharded"] == report["policy_parameters"]
    if not lora:
        assert report["reference_sharded"] == report["policy_parameters"]
        assert report["reference_local_fraction"] == pytest.approx(0.5, abs=0.01)
    assert not any(report["frozen_partitioned"].values())
    assert report["reference_max_abs_change"] == 0.0
    assert report["original_vs_trained_max_abs_diff"] > 1e-3
    # Gathered and saved in diffusers' format: diffusers loads what was trained.
    assert report["saved_vs_trained_max_abs_diff"] < 1e-5
    assert report["saved_files"] == single["saved_files"]


@pytest.mark.parametrize("lora", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["lora", "full"])
def test_fsdp2_parameter_space_safeguard_on_two_processes_trains_like_one(runs, assets, lora):
    """FSDP2 reduce-scatters each branch's gradient: lambda from the shards' inner products, summed over processes,
    is that of one process with the same global batch."""
    tuning = "lora" if lora else "full"
    single = _named_run(runs, assets, f"single-parameter-{tuning}", None, lora, *PARAMETER)
    report = _named_run(runs, assets, f"fsdp2-parameter-{tuning}", FSDP2, lora, *PARAMETER)
    assert report["distributed_type"].endswith("FSDP") and report["global_step"] == STEPS
    assert any(lam < 1.0 for lam in single["lambdas"])
    assert report["lambdas"] == pytest.approx(single["lambdas"], rel=1e-3)
    assert report["losses"] == pytest.approx(single["losses"], rel=1e-3)
    assert report["saved_vs_trained_max_abs_diff"] < 1e-5


@pytest.mark.slow
def test_fsdp2_parameter_space_with_gradient_accumulation_matches_one_process(assets):
    single = run(
        assets,
        "accumulate-parameter-single",
        None,
        True,
        *PARAMETER,
        "--per_device_train_batch_size",
        "2",
        "--gradient_accumulation_steps",
        "2",
    )
    report = run(
        assets,
        "accumulate-parameter-fsdp2",
        FSDP2,
        True,
        *PARAMETER,
        "--per_device_train_batch_size",
        "1",
        "--gradient_accumulation_steps",
        "2",
    )
    assert report["lambdas"] == pytest.approx(single["lambdas"], rel=1e-3)
    assert report["losses"] == pytest.approx(single["losses"], rel=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize(
    "lora,state_dict_type",
    [(True, "FULL_STATE_DICT"), (False, "FULL_STATE_DICT"), (False, "SHARDED_STATE_DICT")],
    ids=["lora", "full", "full-sharded-optimizer"],
)
def test_fsdp2_checkpoint_resumes_to_the_uninterrupted_run(assets, lora, state_dict_type):
    tag = f"fsdp2-{'lora' if lora else 'full'}-{state_dict_type}"
    launch = ("--fsdp_state_dict_type", state_dict_type)
    straight = run(assets, f"straight-{tag}", FSDP2, lora, launch=launch)
    run(
        assets,
        f"interrupted-{tag}",
        FSDP2,
        lora,
        "--max_steps",
        "2",
        "--save_strategy",
        "steps",
        "--save_steps",
        "2",
        launch=launch,
    )
    checkpoint = assets["root"] / f"interrupted-{tag}" / "model" / "checkpoint-2"
    names = {p.name for p in checkpoint.iterdir()}
    assert ("pytorch_lora_weights.safetensors" if lora else "unet") in names
    assert any(n.startswith("optimizer") for n in names)  # accelerate's FSDP optimizer state (a folder if sharded)
    assert not any(n.startswith("pytorch_model_fsdp") for n in names)  # its copy of the weights was dropped
    resumed = run(assets, f"resumed-{tag}", FSDP2, lora, "--resume_from_checkpoint", str(checkpoint), launch=launch)
    assert resumed["global_step"] == STEPS
    assert resumed["losses"][-1] == pytest.approx(straight["losses"][-1], rel=1e-5)
    a = _weights(assets["root"] / f"straight-{tag}" / "model", lora)
    b = _weights(assets["root"] / f"resumed-{tag}" / "model", lora)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-7, msg=key)


@pytest.mark.slow
def test_sdxl_example_under_fsdp2_trains_like_one_process(sdxl_assets):
    """The train command on SDXL under FSDP2, full tuning: both text encoders stay whole, policy and reference copy are
    sharded, and losses and saved weights behave as on one process."""
    single = run(sdxl_assets, "sdxl-single-full", None, False, "--beta", "500")  # beta as in the ZeRO-3 SDXL test
    report = run(sdxl_assets, "sdxl-fsdp2-full", FSDP2, False, "--beta", "500")
    assert report["distributed_type"].endswith("FSDP") and report["num_processes"] == 2
    assert set(report["frozen_partitioned"]) == {"vae", "text_encoder", "text_encoder_2"}
    assert report["policy_sharded"] == report["policy_parameters"] == report["reference_sharded"]
    assert report["reference_max_abs_change"] == 0.0
    assert report["losses"] == pytest.approx(single["losses"], rel=1e-3)
    assert report["saved_vs_trained_max_abs_diff"] < 1e-5 and report["original_vs_trained_max_abs_diff"] > 1e-3
    assert report["saved_files"] == single["saved_files"]


@pytest.mark.slow
def test_fsdp2_bf16_mixed_precision_runs_like_one_bf16_process(assets):
    """FSDP2 with accelerate's bf16 policy (bf16 compute and gradient reduce-scatter, float32 adapters): finite
    losses, the lambdas of one bf16 process, an unchanged reference. (The losses themselves drift apart: bf16
    rounding of tiny latents times beta = 5000, and autocast on one process against FSDP2's cast weights.)"""
    single = run(assets, "bf16-single", None, True, "--bf16", "true", "--use_cpu", "true")
    report = run(assets, "bf16-fsdp2", FSDP2, True, "--bf16", "true")
    assert report["distributed_type"].endswith("FSDP")
    assert all(math.isfinite(x) for x in report["losses"]) and report["losses"][0] == pytest.approx(math.log(2))
    assert report["lambdas"] == pytest.approx(single["lambdas"], rel=1e-3)
    assert report["reference_max_abs_change"] == 0.0
    assert report["original_vs_trained_max_abs_diff"] > 1e-3
    assert report["saved_files"] == single["saved_files"]


# ------------------------------------------------------------------------- resuming on another number of processes
# A checkpoint written after step 1 by P processes resumes on the other count with the same global batch (4 pairs:
# 2 processes x 2, or 1 x 4) to step 3: step 2 is inside the first epoch (the dataloader skips the step seen), step
# 3 opens the second (8 rows). Launches: the one-process runs, then two processes (writing one checkpoint, resuming
# from the other), then one process again (resuming from the two-process checkpoint).

SAVE_AT_STEP_1 = ("--max_steps", "1", "--save_strategy", "steps", "--save_steps", "1")


def _order(report: dict, steps: int) -> list[int]:
    """The row indices of the report's first ``steps`` optimizer steps, in the global order."""
    from tests.helpers.common import global_sample_order

    return global_sample_order(report["sample_batches"], steps * report["gradient_accumulation_steps"])


def _resume_on_other_counts(assets: dict, config: str, tag: str) -> dict[str, dict]:
    """``config`` on 1 and 2 processes (DDP: one plain process and ``multi_gpu.yaml``), each interrupted after step 1
    and resumed on the other count; with the plain one-process uninterrupted run (``straight``)."""
    ddp = config == "multi_gpu.yaml"
    one_config = None if ddp else config
    names = {k: f"{tag}-{k}" for k in ("interrupted-1", "interrupted-2", "1to2", "2to1")}
    ckpt = lambda k: str(assets["root"] / names[k] / "model" / "checkpoint-1")  # noqa: E731
    first = [(assets, names["interrupted-1"], Run("", one_config, True, SAVE_AT_STEP_1))]
    if not (assets["root"] / "resume-straight" / "result.json").exists():
        _launch([(assets, "resume-straight", Run("", None, True))], processes=1)
    _launch(first, processes=1)
    _launch(
        [
            (assets, names["interrupted-2"], Run("", config, True, SAVE_AT_STEP_1)),
            (assets, names["1to2"], Run("", config, True, ("--resume_from_checkpoint", ckpt("interrupted-1")))),
        ],
        processes=2,
    )
    resume = ("--resume_from_checkpoint", ckpt("interrupted-2"))
    _launch([(assets, names["2to1"], Run("", one_config, True, resume))], processes=1)
    reports = {"straight": json.loads((assets["root"] / "resume-straight" / "result.json").read_text())}
    reports["straight"]["model_dir"] = str(assets["root"] / "resume-straight" / "model")
    for key, name in names.items():
        reports[key] = json.loads((assets["root"] / name / "result.json").read_text())
        reports[key]["model_dir"] = str(assets["root"] / name / "model")
    return reports


@pytest.mark.slow
@pytest.mark.parametrize("config", ["multi_gpu.yaml", "deepspeed_zero2.yaml"], ids=["ddp", "zero2"])
def test_a_checkpoint_resumes_on_another_number_of_processes(assets, config):
    """2 -> 1 and 1 -> 2 processes: the resumed runs read the rows of the uninterrupted run in its order (rows 4-7
    at step 2, the second epoch's first 4 at step 3), log its losses and end with its weights."""
    reports = _resume_on_other_counts(assets, config, f"rw-{config.removesuffix('.yaml')}")
    straight = reports["straight"]
    assert straight["global_step"] == STEPS and sorted(_order(straight, 2)) == list(range(8))
    for direction, interrupted in (("2to1", "interrupted-2"), ("1to2", "interrupted-1")):
        before, resumed = reports[interrupted], reports[direction]
        assert resumed["num_processes"] == (1 if direction == "2to1" else 2), direction
        assert resumed["global_step"] == STEPS, direction
        # The samples: step 1 before the interruption, steps 2-3 after it, as in the uninterrupted run.
        assert _order(before, 1) + _order(resumed, STEPS - 1) == _order(straight, STEPS), direction
        # the resumed log history holds step 1's loss (restored from the checkpoint's trainer state), then its own
        assert resumed["losses"] == pytest.approx(straight["losses"], rel=1e-3), direction
        # Weights within 0.2 x the learning rate (1e-3): AdamW turns float summation noise in near-zero gradients
        # into updates of up to lr (measured: DDP 8e-5 for 2 -> 1, 4e-6 for 1 -> 2; ZeRO-2 9e-5, 6e-5); a missed step
        # moves them by ~1e-3 (the interrupted run after step 1 is 2e-3 from the end).
        a = _weights(Path(straight["model_dir"]), lora=True)
        b = _weights(Path(resumed["model_dir"]), lora=True)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=2e-4, msg=f"{direction}: {key}")
