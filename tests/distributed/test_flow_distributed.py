"""Every flow-matching family under two processes on CPU over gloo: DDP, DeepSpeed ZeRO-2/3 and FSDP2 with the shipped
accelerate configs.

As ``tests/distributed/test_distributed.py`` does for the UNets: ``examples/train_flow.py`` runs under ``accelerate
launch`` through ``tests/distributed_worker.py`` and is compared with one process, same global batch and seed. The
transformers are widened (head dim 96; Z-Image's width 224) so that their feed-forward weights exceed ZeRO-3's
persistence threshold (1e5 elements) and really are partitioned. A family's trainings share processes (the worker's
``--jobs``): one plain process trains its one-process references, one two-process launch its engines in turn
(ZeRO-3 last). A family's two launches still take 35 to 60 s on two shared cores, so every case here is a slow test
(``-m slow``; benchmarks/results/flow-families/cpu-flow-distributed-tiny.json). Beyond the engines: the
parameter-space safeguard on Qwen-Image, Wan and FLUX.2 [klein] (and FLUX.1) and resume under ZeRO-2 and FSDP2
(:data:`EXTRA_RUNS`; benchmarks/results/flow-families/cpu-flow-distributed-tiny-safeguard-resume.json). FLUX.2 with
reference images trains on editing rows with two references each (``*-references``: the same tiny pipelines, the
data switching editing on) under DDP and FSDP2.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from datasets import Dataset

from tests.helpers.common import edit_rows, pickapic_rows
from tests.helpers.distributed import _REPORTS, STEPS, Run, _assert_resumed_like_straight, _launch, run
from tests.helpers.flow_distributed import FAMILIES, FLOW_ARGS, family_assets
from tests.helpers.video import video_rows

pytest.importorskip("deepspeed")

FSDP2 = "fsdp2.yaml"


# (family, accelerate config, ZeRO stage, LoRA): every family under every engine, LoRA and full tuning alternating
# (full tuning under each engine among the newer families too).
CASES = [
    ("flux", "multi_gpu.yaml", None, True),
    ("sd3", "multi_gpu.yaml", None, False),  # SD3's last block leaves add_q_proj unused: DDP must tolerate it
    ("sd3", "deepspeed_zero2.yaml", 2, False),
    ("flux", "deepspeed_zero2.yaml", 2, True),
    ("flux", "deepspeed_zero3.yaml", 3, False),
    ("sd3", "deepspeed_zero3.yaml", 3, True),
    ("sd3", FSDP2, None, True),
    ("flux", FSDP2, None, False),
    ("qwen-image", "multi_gpu.yaml", None, True),
    ("qwen-image", "deepspeed_zero2.yaml", 2, False),
    ("qwen-image", "deepspeed_zero3.yaml", 3, False),
    ("qwen-image", FSDP2, None, True),
    ("z-image", "multi_gpu.yaml", None, True),
    ("z-image", "deepspeed_zero2.yaml", 2, False),
    ("z-image", "deepspeed_zero3.yaml", 3, True),
    ("z-image", FSDP2, None, False),
    ("wan", "multi_gpu.yaml", None, True),
    ("wan", "deepspeed_zero2.yaml", 2, True),
    ("wan", "deepspeed_zero3.yaml", 3, False),
    ("wan", FSDP2, None, False),
    ("flux2", "multi_gpu.yaml", None, False),
    ("flux2", "deepspeed_zero2.yaml", 2, True),
    ("flux2", "deepspeed_zero3.yaml", 3, True),
    ("flux2", FSDP2, None, False),
    ("flux2-klein", "multi_gpu.yaml", None, True),
    ("flux2-klein", "deepspeed_zero2.yaml", 2, False),
    ("flux2-klein", "deepspeed_zero3.yaml", 3, False),
    ("flux2-klein", FSDP2, None, True),
    ("flux-kontext", "multi_gpu.yaml", None, True),
    ("flux-kontext", FSDP2, None, False),
    ("flux2-references", "multi_gpu.yaml", None, True),
    ("flux2-references", FSDP2, None, False),
    ("flux2-klein-references", "multi_gpu.yaml", None, False),
    ("flux2-klein-references", FSDP2, None, True),
    ("hunyuan-video-1.5", "multi_gpu.yaml", None, True),
    ("hunyuan-video-1.5", FSDP2, None, False),
    ("qwen-image-edit", "multi_gpu.yaml", None, True),
    ("qwen-image-edit", FSDP2, None, False),
    ("qwen-image-edit-plus", "multi_gpu.yaml", None, False),
    ("qwen-image-edit-plus", FSDP2, None, True),
    ("qwen-image-2.1", "multi_gpu.yaml", None, True),
    ("qwen-image-2.1", "deepspeed_zero2.yaml", 2, False),
    ("qwen-image-2.1", "deepspeed_zero3.yaml", 3, True),
    ("qwen-image-2.1", FSDP2, None, False),
]


@pytest.fixture(scope="module")
def flow_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("flow-distributed")
    Dataset.from_list(pickapic_rows(8)).save_to_disk(str(root / "data"))
    Dataset.from_list(video_rows(8)).save_to_disk(str(root / "video-data"))
    Dataset.from_list(edit_rows(8)).save_to_disk(str(root / "edit-data"))
    Dataset.from_list(edit_rows(8, sources=2)).save_to_disk(str(root / "reference-data"))
    return root


_FAILED: dict[tuple, str] = {}  # (root, family or EXTRA_RUNS group, one or two processes) -> why its launch failed


def _name(config: str | None, lora: bool) -> str:
    return f"{'single' if config is None else config.removesuffix('.yaml')}-{'lora' if lora else 'full'}"


def _order(config: str | None) -> int:
    return 1 if config is not None and "zero3" in config else 0  # ZeRO-3 last (see test_distributed.RUNS)


def flow_run(root: Path, kind: str, config: str | None, lora: bool) -> dict:
    """The report of ``kind``'s training under ``config`` (``None``: one process). The first request of a family's
    one-process (or two-process) training launches all of them: its :data:`CASES`, in one set of processes."""
    assets = family_assets(root, kind)
    extra = (*FLOW_ARGS, *FAMILIES[kind].extra)
    spec = Run(kind, config, lora, extra)
    if spec.key(assets) not in _REPORTS:
        group = [(c if config is not None else None, lo) for k, c, _, lo in CASES if k == kind]
        group = sorted(dict.fromkeys(group), key=lambda case: _order(case[0]))  # in CASES order, ZeRO-3 last
        jobs = [(assets, _name(c, lo), Run(kind, c, lo, extra)) for c, lo in group]
        _launch_group((str(root), kind, spec.group), jobs)
    return _REPORTS[spec.key(assets)]


def _launch_group(launch: tuple, jobs: list[tuple[dict, str, Run]]) -> None:
    """Launch ``jobs`` not yet reported, in one set of processes; once ``launch`` has failed, its other cases fail at
    once instead of launching again."""
    if launch in _FAILED:
        pytest.fail(_FAILED[launch])
    try:
        _launch([job for job in jobs if job[2].key(job[0]) not in _REPORTS])
    except AssertionError as error:
        _FAILED[launch] = str(error)
        raise


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind,config,stage,lora",
    CASES,
    ids=[f"{k}-{c.removesuffix('.yaml')}-{'lora' if lo else 'full'}" for k, c, _, lo in CASES],
)
def test_flow_models_train_on_two_processes_like_on_one(flow_root, kind, config, stage, lora) -> None:
    single = flow_run(flow_root, kind, None, lora)
    report = flow_run(flow_root, kind, config, lora)
    assert report["num_processes"] == 2 and report["zero_stage"] == stage
    fsdp = config == FSDP2
    assert report["distributed_type"].endswith("FSDP" if fsdp else "DEEPSPEED" if stage else "MULTI_CPU")
    assert report["global_step"] == STEPS
    losses = report["losses"]
    assert all(math.isfinite(x) for x in losses) and losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses == pytest.approx(single["losses"], rel=1e-3)
    assert report["lambdas"] == pytest.approx(single["lambdas"], rel=1e-3)
    assert not any(report["frozen_partitioned"].values())
    assert report["reference_max_abs_change"] == 0.0
    assert report["original_vs_trained_max_abs_diff"] > 1e-4
    # The trained transformer's outputs moved as one process's did: with LoRA at beta 100 the losses above stay
    # within 1e-3 of log 2 whatever the gradients, while a process training on its own half-batch alone (no
    # all-reduce) moved these outputs 6% less (FLUX.2 [klein] under DDP); summation order moves them < 1e-4 relative.
    assert report["original_vs_trained_max_abs_diff"] == pytest.approx(
        single["original_vs_trained_max_abs_diff"], rel=1e-2
    )
    assert report["saved_vs_trained_max_abs_diff"] < 1e-5
    assert report["saved_files"] == single["saved_files"]
    if stage == 3:
        # The policy really is partitioned (small tensors stay whole below the persistence threshold) ...
        assert 0 < report["policy_partitioned"] < report["policy_parameters"]
        # ... and so is a full-tuning reference copy, a DeepSpeed engine; with LoRA there is no copy at all.
        if not lora:
            assert report["reference_is_engine"] and report["reference_partitioned"] > 0
        # Without load_pipeline, transformers would have built the text encoder partitioned: the guard matters.
        assert report["naive_load_partitions_text_encoder"]
    elif fsdp:
        # Every policy weight is a shard; a full-tuning reference copy is sharded too (about half on each process).
        assert report["policy_sharded"] == report["policy_parameters"]
        if not lora:
            assert report["reference_sharded"] == report["policy_parameters"]
            assert report["reference_local_fraction"] == pytest.approx(0.5, abs=0.01)
    else:
        assert report["policy_partitioned"] == 0 and report["process_weight_spread"] < 1e-6


@pytest.mark.slow
def test_parameter_space_safeguard_under_ddp_on_a_flux_transformer(flow_root) -> None:
    assets = family_assets(flow_root, "flux")
    extra = (*FLOW_ARGS, "--safeguard_space", "parameter")
    single = run(assets, "single-parameter", None, True, *extra)
    report = run(assets, "ddp-parameter", "multi_gpu.yaml", True, *extra)
    assert report["losses"] == pytest.approx(single["losses"], rel=1e-3)
    assert report["lambdas"] == pytest.approx(single["lambdas"], rel=1e-3)
    assert report["process_weight_spread"] < 1e-6


# --------------------------------------------------------------- the parameter-space safeguard and resume, per family
# Trainings beyond CASES, by name: (launch group, family, accelerate config or None, LoRA, script arguments beyond the
# family's; a name is a folder under the family's runs). The first request of a group (its tag, then one or two
# processes) trains all of it in one set of processes, in this order: the resumed runs after the runs whose
# checkpoints they read.
PARAMETER = ("--safeguard_space", "parameter")  # with the global scope (test_distributed's script arguments)
SAVE_AT_STEP_2 = ("--save_strategy", "steps", "--save_steps", "2")  # on the way to step 3: the run is unchanged
EXTRA_RUNS: dict[str, tuple[str, str, str | None, bool, tuple[str, ...]]] = {
    "single-parameter-lora": ("parameter", "qwen-image", None, True, PARAMETER),
    "single-parameter-lora-wan": ("parameter", "wan", None, True, PARAMETER),
    "single-parameter-full": ("parameter", "flux2-klein", None, False, PARAMETER),
    "ddp-parameter-lora": ("parameter", "qwen-image", "multi_gpu.yaml", True, PARAMETER),
    "ddp-parameter-lora-wan": ("parameter", "wan", "multi_gpu.yaml", True, PARAMETER),
    "ddp-parameter-full": ("parameter", "flux2-klein", "multi_gpu.yaml", False, PARAMETER),
    "fsdp2-parameter-lora": ("parameter", "qwen-image", FSDP2, True, PARAMETER),
    "zero2-parameter-full": ("parameter", "flux2-klein", "deepspeed_zero2.yaml", False, PARAMETER),
    "zero2-straight-lora": ("resume", "qwen-image", "deepspeed_zero2.yaml", True, SAVE_AT_STEP_2),
    "zero2-resumed-lora": (
        "resume", "qwen-image", "deepspeed_zero2.yaml", True,
        ("--resume_from_checkpoint", "{root}/zero2-straight-lora/model/checkpoint-2"),
    ),
    # Qwen-Image's last block discards its text stream: its to_add_out adapters never get a gradient, nor AdamW state
    "fsdp2-straight-lora": ("resume", "qwen-image", FSDP2, True, SAVE_AT_STEP_2),
    "fsdp2-resumed-lora": (
        "resume", "qwen-image", FSDP2, True,
        ("--resume_from_checkpoint", "{root}/fsdp2-straight-lora/model/checkpoint-2"),
    ),
    "fsdp2-straight-full": ("resume", "z-image", FSDP2, False, SAVE_AT_STEP_2),
    "fsdp2-resumed-full": (
        "resume", "z-image", FSDP2, False,
        ("--resume_from_checkpoint", "{root}/fsdp2-straight-full/model/checkpoint-2"),
    ),
}  # fmt: skip


def _extra_spec(root: Path, name: str) -> tuple[dict, Run]:
    _, kind, config, lora, extra = EXTRA_RUNS[name]
    return family_assets(root, kind), Run(kind, config, lora, (*FLOW_ARGS, *FAMILIES[kind].extra, *extra))


def extra_run(root: Path, name: str) -> dict:
    """The report of :data:`EXTRA_RUNS`' ``name``; its first request launches its group."""
    assets, spec = _extra_spec(root, name)
    if spec.key(assets) not in _REPORTS:
        group = (str(root), EXTRA_RUNS[name][0], spec.group)
        jobs = [(*_extra_spec(root, other), other) for other in EXTRA_RUNS]
        jobs = [(a, other, s) for a, s, other in jobs if (str(root), EXTRA_RUNS[other][0], s.group) == group]
        _launch_group(group, jobs)
    return _REPORTS[spec.key(assets)]


@pytest.mark.slow
@pytest.mark.parametrize(
    "single,name,stage",
    [
        ("single-parameter-lora", "ddp-parameter-lora", None),
        ("single-parameter-lora-wan", "ddp-parameter-lora-wan", None),
        ("single-parameter-full", "ddp-parameter-full", None),
        ("single-parameter-lora", "fsdp2-parameter-lora", None),
        ("single-parameter-full", "zero2-parameter-full", 2),
    ],
    ids=[
        "qwen-image-ddp-lora",
        "wan-ddp-lora",
        "flux2-klein-ddp-full",
        "qwen-image-fsdp2-lora",
        "flux2-klein-zero2-full",
    ],
)
def test_parameter_space_safeguard_on_two_processes_like_one(flow_root, single, name, stage) -> None:
    """The exact rule with the global scope: lambda from the winner and loser gradients summed over processes (DDP:
    the averaged g_w against each process's h_l, all-reduced; FSDP2: inner products of the reduce-scattered shards,
    summed; ZeRO-2: the engine's reduced winner and the loser beside it) is one process's lambda of the global batch,
    and the combined step follows the same losses."""
    single, report = extra_run(flow_root, single), extra_run(flow_root, name)
    assert report["num_processes"] == 2 and report["zero_stage"] == stage and report["global_step"] == STEPS
    assert report["distributed_type"].endswith("FSDP" if "fsdp2" in name else "DEEPSPEED" if stage else "MULTI_CPU")
    assert single["losses"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert any(lam < 1.0 for lam in single["lambdas"])  # the safeguard engaged: a per-process lambda would differ
    # Summation order moves lambda by at most 1.5e-6 relative; with FSDP2's sum over shards left out (each process's
    # lambda from its own shards' sums) the logged mean was 9.7e-4 off (Qwen-Image LoRA), so 1e-3 would not do.
    assert report["lambdas"] == pytest.approx(single["lambdas"], rel=1e-4)
    assert report["losses"] == pytest.approx(single["losses"], rel=1e-3)
    assert report["original_vs_trained_max_abs_diff"] == pytest.approx(
        single["original_vs_trained_max_abs_diff"], rel=1e-2
    )
    assert report["reference_max_abs_change"] == 0.0
    assert report["saved_vs_trained_max_abs_diff"] < 1e-5
    if "fsdp2" not in name:
        assert report["process_weight_spread"] < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize(
    "straight,resumed,lora,engine_state",
    [
        ("zero2-straight-lora", "zero2-resumed-lora", True, "global_step"),  # DeepSpeed's own state
        ("fsdp2-straight-lora", "fsdp2-resumed-lora", True, "optimizer"),  # accelerate's FSDP optimizer state
        ("fsdp2-straight-full", "fsdp2-resumed-full", False, "optimizer"),
    ],
    ids=["qwen-image-zero2-lora", "qwen-image-fsdp2-lora", "z-image-fsdp2-full"],
)
def test_flow_checkpoint_resumes_under_the_same_engine_to_the_uninterrupted_run(
    flow_root, straight, resumed, lora, engine_state
) -> None:
    """The uninterrupted run saves checkpoint-2 on its way to step 3; a second run resumes from it (weights, the
    engine's optimizer state, the step) and saves what the uninterrupted run saved."""
    straight_report, resumed_report = extra_run(flow_root, straight), extra_run(flow_root, resumed)
    checkpoint = Path(straight_report["model_dir"]) / "checkpoint-2"
    if engine_state == "optimizer":  # FSDP2: the weights in diffusers' files only, not accelerate's copy too
        assert not any(p.name.startswith("pytorch_model_fsdp") for p in checkpoint.iterdir())
    _assert_resumed_like_straight(straight_report, resumed_report, checkpoint, lora, "transformer", engine_state)
    assert resumed_report["losses"] == pytest.approx(straight_report["losses"], rel=1e-5)
