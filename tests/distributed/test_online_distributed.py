"""Online Diffusion-SDPO on two CPU processes over gloo: DDP, DeepSpeed ZeRO-2/3 and FSDP2 with the shipped
accelerate configs, against one process with the same global batch.

The online trainer samples each micro-batch's prompts with the policy before it trains on the best-worst pairs.
Every image's noise is seeded by ``(seed, generation, global row, sample)``, so two processes with half the per-device
batch each must sample, score and pair exactly what one process does, and then train as it does. Under ZeRO-3 and
FSDP2 the policy samples through its sharded weights (every layer gathered on the fly, both processes taking part).

Trainings run through ``tests/online_worker.py --jobs`` (the ``distributed_worker.py`` machinery): the pytest process
trains the one-process references, one two-process launch of ``multi_gpu.yaml`` trains DDP, ZeRO-2, FSDP2 and ZeRO-3
in turn (the environment ``accelerate launch`` builds from each shipped yaml swapped in per training), and, in the
default tier's launch, the held-out probe's online rewind on two processes (``online_rewind_worker.py``'s run). The
tiny SD pipeline is widened (128 channels) so that ZeRO-3 really partitions some of its weights.

The slow tier trains every other family's tiny pipeline under DDP against one process (:data:`FAMILY_CASES`), a
group of families per launch.

Whether a micro-batch has pairs is decided from the process's own samples; the tie data makes one process's
micro-batches pairless while the other trains, then every process's: that optimizer step is not applied on any
engine.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file

from tests.helpers.common import cpu_launch_fields
from tests.helpers.distributed import CONFIGS, Run, _launch_environment, run_as_launched, train_here
from trl_diffusion_sdpo.demo.shapes import all_captions
from trl_diffusion_sdpo.testing import build_tiny_sd_pipeline

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "online_worker.py"
GLOBAL_BATCH = 4  # prompts per optimizer step over all processes
STEPS = 3
LEARNING_RATE = 1e-3
FSDP2 = "fsdp2.yaml"

# The fields every training shares (the offline distributed tests' settings; global safeguard scope: every process
# computes the one-process lambda of the global batch).
BASE_CONFIG: dict[str, Any] = {
    "resolution": 32,
    "max_steps": STEPS,
    "learning_rate": LEARNING_RATE,
    "scale_lr": False,
    "warmup_steps": 0,
    "logging_steps": 1,
    "report_to": "none",
    "save_strategy": "no",
    "seed": 0,
    "dataloader_num_workers": 0,
    "disable_tqdm": True,
    "safeguard_scope": "global",
    # the mu the tolerances below were measured at (the tiny SD base's family default is the authors' SD1.5 0.9)
    "safeguard_mu": 0.5,
    "num_generations": 2,
    "sample_steps": 4,
    # as in tests/safeguard/test_step_reference.py: AdamW's first updates are +-lr whatever the gradient,
    # so with epsilon 1e-8 an element whose gradient is rounding noise moves by +-lr in whichever direction the
    # rounding fell (measured: one LoRA-A element 0.74 lr apart under FSDP2 on an AVX2 CPU); 1e-4 keeps such updates
    # small while every real gradient here is far above it
    "adam_epsilon": 1e-4,
}
PARAMETER = {"safeguard_space": "parameter"}

# The tie data: one prompt per process per micro-batch, read in order. Step 1: process 1's prompt ties (its first
# micro-batch has no pair: a zero-weighted placeholder), step 2: process 0's ties (a zero-weighted replay of its step
# 1), step 3: both tie (no pair on any process: the step must not be applied).
TIE_PROMPTS = [
    "red circle on white",
    "flat red square on black",
    "flat green circle on white",
    "red triangle on black",
    "flat red circle on black",
    "flat green square on white",
]
TIES = {
    "per_device_train_batch_size": 1,
    "train_sampling_strategy": "sequential",
    "reward_margin": 1e-6,
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """A saved widened tiny SD pipeline, the demo's captions as a prompt dataset, and the tie prompts."""
    root = tmp_path_factory.mktemp("online-distributed")
    pipe = build_tiny_sd_pipeline(seed=0, unet_channels=(32, 128), tokenizer_dir=str(root / "tokenizer"))
    pipe.save_pretrained(root / "pipeline")
    Dataset.from_dict({"prompt": [c.text for c in all_captions()[:8]]}).save_to_disk(str(root / "prompts"))
    Dataset.from_dict({"prompt": TIE_PROMPTS}).save_to_disk(str(root / "ties"))
    return {"root": root, "pipeline": root / "pipeline"}


# ------------------------------------------------------------------------------------------------ running trainings


@dataclasses.dataclass(frozen=True)
class OnlineRun:
    """One training: the accelerate config (``None``: one plain process), the prompt data folder's name, the reward
    function of ``online_worker.py`` and config fields beyond :data:`BASE_CONFIG`."""

    config: str | None
    data: str = "prompts"
    reward: str = "redness"
    extra: tuple[tuple[str, Any], ...] = ()
    group: str = ""  # runs of another group are launched apart (the slow tier's)
    pipeline: str = "pipeline"  # the saved pipeline's folder (a family's: built when first needed)
    seconds: int = 60  # the most the training may take on a loaded 2-core CPU (a launch's timeout adds them up)
    edit_area_scale: float | None = None  # online_worker.py's: the Qwen-Image-Edit pipelines' source areas scaled
    rewind: bool = False  # online_rewind_worker.py's run instead (its own settings): a report per process

    @property
    def processes(self) -> int:
        return 1 if self.config is None else 2

    @property
    def launch(self) -> tuple[int, str]:
        return self.processes, self.group

    def fields(self) -> dict[str, Any]:
        return {"per_device_train_batch_size": GLOBAL_BATCH // self.processes, **BASE_CONFIG, **dict(self.extra)}


def _extra(*configs: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(item for config in configs for item in config.items())


TIE_DATA = ("ties", "redness_unless_flat")

# Every training, grouped by launch: the pytest process (the references), then one two-process launch of
# multi_gpu.yaml that trains DDP, ZeRO-2, FSDP2 and ZeRO-3 in turn (ZeRO-3, whose registration with transformers the
# worker undoes after each training, last). ZeRO-3 trains the output space only here (its parameter space, global
# scope only, is tested offline: test_zero3_parameter_space.py). The default suite trains DDP in the output space,
# FSDP2 (sampling through its shards) in the parameter space and DDP's ties; the other engines' runs are the slow
# tier's (:data:`SLOW`), launched apart.
SLOW = "slow"
RUNS: dict[str, OnlineRun] = {
    "single-output": OnlineRun(None),
    "single-parameter": OnlineRun(None, extra=_extra(PARAMETER)),
    "ddp-output": OnlineRun("multi_gpu.yaml"),
    "ddp-parameter": OnlineRun("multi_gpu.yaml", extra=_extra(PARAMETER), group=SLOW),
    "ddp-ties-output": OnlineRun("multi_gpu.yaml", *TIE_DATA, _extra(TIES), group=SLOW),
    "ddp-ties-parameter": OnlineRun("multi_gpu.yaml", *TIE_DATA, _extra(TIES, PARAMETER)),
    "zero2-output": OnlineRun("deepspeed_zero2.yaml", group=SLOW),
    "zero2-parameter": OnlineRun("deepspeed_zero2.yaml", extra=_extra(PARAMETER), group=SLOW),
    "zero2-ties-output": OnlineRun("deepspeed_zero2.yaml", *TIE_DATA, _extra(TIES), group=SLOW),
    "fsdp2-output": OnlineRun(FSDP2, group=SLOW),
    "fsdp2-parameter": OnlineRun(FSDP2, extra=_extra(PARAMETER)),
    "fsdp2-ties-parameter": OnlineRun(FSDP2, *TIE_DATA, _extra(TIES, PARAMETER), group=SLOW),
    "zero3-output": OnlineRun("deepspeed_zero3.yaml", group=SLOW),
    "zero3-ties-output": OnlineRun("deepspeed_zero3.yaml", *TIE_DATA, _extra(TIES), group=SLOW),
}


def _tiered(names: list[str]) -> list:
    """``names`` as parameters, those of the slow tier's runs marked slow."""
    return [pytest.param(n, marks=pytest.mark.slow) if RUNS[n].group == SLOW else n for n in names]


# ref_update_steps=1 (the reference is the previous step's policy): one process against ZeRO-2, ZeRO-3 and FSDP2,
# where the policy is gathered and merged into a reference sharded as the policy is (slow tier)
REFRESH = {"ref_update_steps": 1}
RUNS.update(
    {
        "single-refresh": OnlineRun(None, extra=_extra(REFRESH), group="refresh"),
        "zero2-refresh": OnlineRun("deepspeed_zero2.yaml", extra=_extra(REFRESH), group="refresh"),
        "fsdp2-refresh": OnlineRun(FSDP2, extra=_extra(REFRESH), group="refresh"),
        "zero3-refresh": OnlineRun("deepspeed_zero3.yaml", extra=_extra(REFRESH), group="refresh"),
    }
)

# Every family but SD (trained above) on two processes against one (slow tier), on its tiny pipeline
# (trl_diffusion_sdpo.testing.TINY_PIPELINES): the editing families edit each prompt's sources (one each, or two
# references), the video families sample 5-frame clips. A launch trains a group of families in turn (process start-up
# dominates a launch); the groups keep each launch to a few minutes and a family's failure to its own group.
EDIT_PROMPTS = ["make it blue", "make it red", "add a circle", "make it green"] * 2


@dataclasses.dataclass(frozen=True)
class FamilyCase:
    """A family's online training: its launch ``group``, its prompt ``data`` (``prompts``; ``even``: prompts of one
    token length; ``edits``: one source each; ``references``: two sources each), its tokenizers' ``tokens`` (the
    builder's ``max_length`` and the config's ``max_sequence_length``; ``None``: the builder's own, CLIP's) and
    config fields beyond :data:`BASE_CONFIG`."""

    group: str
    data: str = "prompts"
    tokens: int | None = None
    config: tuple[tuple[str, Any], ...] = ()
    seconds: int = 150  # a training's time limit (OnlineRun.seconds)
    edit_area_scale: float | None = None

    def fields(self) -> tuple[tuple[str, Any], ...]:
        return self.config if self.tokens is None else (("max_sequence_length", self.tokens), *self.config)


NO_DROPOUT = (("proportion_empty_prompts", 0.0),)
FAMILY_CASES = {
    "flux-kontext": FamilyCase("edit-video", "edits", 16),
    "wan": FamilyCase("edit-video", "prompts", 16, (("num_frames", 5), ("resolution", 16))),
    "stable-diffusion-xl": FamilyCase("text"),
    "stable-diffusion-3": FamilyCase("text", tokens=16),
    "flux": FamilyCase("text", tokens=16),
    "z-image": FamilyCase("text", tokens=32),
    "qwen-image": FamilyCase("qwen", tokens=24),
    # A call pads its prompts to the longest, which moves the image's RoPE frame index (docs/qwen_image21.md): one
    # process's micro-batch pads unlike each of two processes' unless the prompts are of one length (and none dropped).
    "qwen-image-2.1": FamilyCase("qwen", "even", 32, NO_DROPOUT),
    # The prompt encoding reads the sources: no prompt dropout (as the offline tests). The pipelines resize each source
    # to 1024^2 pixels, 2.5 minutes a call on this CPU: 1/256 of their areas (64^2; Plus's 384^2 condition: 32^2).
    "qwen-image-edit": FamilyCase("qwen", "edits", 32, NO_DROPOUT, edit_area_scale=1 / 256),
    "qwen-image-edit-plus": FamilyCase("qwen", "references", 64, NO_DROPOUT, edit_area_scale=1 / 256),
    # FLUX.2 takes references of 64 px and more; [dev]'s system message takes about 30 tokens of its prompt
    "flux2": FamilyCase("flux2-video", "references", 48, (("resolution", 64),)),
    "flux2-klein": FamilyCase("flux2-video", tokens=48),
    "hunyuan-video-1.5": FamilyCase("flux2-video", "prompts", 24, (("num_frames", 5), ("resolution", 32))),
}
for _family, _case in FAMILY_CASES.items():
    for _name, _config in (("single", None), ("ddp", "multi_gpu.yaml")):
        RUNS[f"{_name}-{_family}"] = OnlineRun(
            _config,
            _case.data,
            extra=_case.fields(),
            group=_case.group,
            pipeline=_family,
            seconds=_case.seconds,
            edit_area_scale=_case.edit_area_scale,
        )


# The held-out probe and on_pathology="rewind" online on two processes (online_rewind_worker.py's run, on the shipped
# demo base): a training of the default suite's two-process launch, after the others
RUNS["ddp-probe-rewind"] = OnlineRun("multi_gpu.yaml", rewind=True)


def _even_prompts() -> list[str]:
    """Eight of the demo's captions of one byte length (the tiny Qwen tokenizers' one token a byte)."""
    captions = [c.text for c in all_captions()]
    even = [text for text in captions if len(text) == 22][:8]
    assert len(even) == 8
    return even


def _family_assets(root: Path, family: str) -> None:
    """The family's tiny pipeline saved under ``root/family``, and its prompt data (once)."""
    from PIL import Image

    from trl_diffusion_sdpo import testing
    from trl_diffusion_sdpo.families import family_for_pipeline

    case = FAMILY_CASES[family]
    if not (root / family).exists():
        tokens = {} if case.tokens is None else {"max_length": case.tokens}
        pipe = testing.TINY_PIPELINES[family](seed=0, tokenizer_dir=str(root / f"{family}-tokenizer"), **tokens)
        assert family_for_pipeline(pipe).name == family
        pipe.save_pretrained(root / family)
    if (root / case.data).exists():
        return
    colours = [(200, 30, 30), (30, 30, 200), (30, 200, 30), (200, 200, 30)] * 2
    # sources of varied sizes, never smaller than 64 px (FLUX.2's least), not squares: the stage crops them
    sources = [Image.new("RGB", (72 + 4 * i, 64), c) for i, c in enumerate(colours)]
    columns = {
        "even": {"prompt": _even_prompts()},
        "edits": {"prompt": EDIT_PROMPTS, "source_image": sources},
        "references": {"prompt": EDIT_PROMPTS, "source_images": [[s, sources[-1 - i]] for i, s in enumerate(sources)]},
    }[case.data]
    Dataset.from_dict(columns).save_to_disk(str(root / case.data))


_REPORTS: dict[str, dict] = {}  # run name -> the worker's report (plus "model_dir")
_FAILED: dict[tuple[int, str], str] = {}  # launch group -> why it failed: its other tests fail at once


def _launch(assets: dict, runs: dict[str, OnlineRun]) -> None:
    """Train ``runs`` (all on one process, in this one; or all on two, started as ``accelerate launch`` of the first
    one's accelerate config starts them) in turn."""
    root = assets["root"]
    first = next(iter(runs.values()))
    jobs = []
    for name, spec in runs.items():
        if spec.rewind:
            (root / name).mkdir(exist_ok=True)
            jobs.append({"rewind_out": str(root / name)})
            continue
        if spec.pipeline != "pipeline":
            _family_assets(root, spec.pipeline)
        job = {
            "result": str(root / name / "result.json"),
            "pipeline": str(root / spec.pipeline),
            "data": str(root / spec.data),
            "output_dir": str(root / name / "model"),
            "reward": spec.reward,
            "config": {**spec.fields(), **({} if spec.config is None else cpu_launch_fields(CONFIGS / spec.config))},
        }
        if spec.edit_area_scale is not None:
            job["edit_area_scale"] = spec.edit_area_scale
        if spec.config is not None and spec.config != first.config:
            job["env"] = _launch_environment(Run("", spec.config, True), spec.processes)
        jobs.append(job)
    jobs_file = root / f"jobs-{next(iter(runs))}.json"
    jobs_file.write_text(json.dumps(jobs, indent=1))
    if first.config is None:  # the one-process references: in this process, as test_distributed.py's
        train_here(WORKER, jobs_file, ", ".join(runs))
    else:
        _launch_two_processes(runs, first.config, jobs_file)
    for name, spec in runs.items():
        if spec.rewind:
            _REPORTS[name] = {"ranks": [json.loads((root / name / f"rank-{i}.json").read_text()) for i in (0, 1)]}
            continue
        report = json.loads((root / name / "result.json").read_text())
        report["model_dir"] = str(root / name / "model")
        _REPORTS[name] = report


def _launch_two_processes(runs: dict[str, OnlineRun], config: str, jobs_file: Path) -> None:
    """The two-process trainings, started as ``accelerate launch --config_file <config>`` starts them."""
    # ~5 s an SD training on a quiet machine; a process left waiting in a collective fails the launch at the timeout
    timeout = 120 + sum(spec.seconds for spec in runs.values())
    command = [str(WORKER), "--jobs", str(jobs_file)]
    status, stdout, stderr = run_as_launched(command, config, jobs_file.with_suffix(".logs"), timeout)
    assert status == 0, f"{', '.join(runs)} failed ({status}):\n{stdout[-3000:]}\n{stderr[-8000:]}"


class Runs:
    """Reports by name; the first request of a launch group (one process, or two) trains all of it."""

    def __init__(self, assets: dict) -> None:
        self.assets = assets

    def __getitem__(self, name: str) -> dict:
        if name not in _REPORTS:
            group = RUNS[name].launch
            if group in _FAILED:
                pytest.fail(_FAILED[group])
            runs = {n: r for n, r in RUNS.items() if r.launch == group and n not in _REPORTS}
            try:
                _launch(self.assets, runs)
            except AssertionError as error:
                _FAILED[group] = str(error)
                raise
        return _REPORTS[name]


@pytest.fixture(scope="module")
def runs(assets) -> Runs:
    return Runs(assets)


# ------------------------------------------------------------------------------------------------------- helpers


def _by_global_row(report: dict) -> dict[tuple[int, int], dict[str, Any]]:
    """Every sampled prompt of the run, keyed by ``(generation, global row)``: its prompt, rewards and pair, and its
    pair's trained latents' sums, from whichever process sampled it."""
    rows: dict[tuple[int, int], dict[str, Any]] = {}
    for process, generations in enumerate(report["generations"]):
        for g in generations:
            pairs = {row: (i, j) for row, i, j in g["pairs"]}
            sums = dict(zip([row for row, _, _ in g["pairs"]], g["pair_latent_sums"]))
            for offset, (prompt, rewards) in enumerate(zip(g["prompts"], g["rewards"])):
                row = g["first_row"] + offset
                key = (g["generation"], row)
                assert key not in rows, f"process {process} sampled {key} again"
                rows[key] = {"prompt": prompt, "rewards": rewards, "pair": pairs.get(row), "latents": sums.get(row)}
    return rows


def _weights(report: dict) -> dict[str, torch.Tensor]:
    return load_file(Path(report["model_dir"]) / "pytorch_lora_weights.safetensors")


def _assert_same_samples_and_pairs(report: dict, single: dict) -> None:
    """The same prompts at the same global rows, the same rewards and pairs, the same trained latents."""
    for process, generations in enumerate(report["generations"]):
        per_device = GLOBAL_BATCH // report["num_processes"]
        assert [g["first_row"] for g in generations] == [process * per_device] * STEPS, process
    ours, theirs = _by_global_row(report), _by_global_row(single)
    assert ours.keys() == theirs.keys() == {(g, r) for g in range(STEPS) for r in range(GLOBAL_BATCH)}
    for key, row in theirs.items():
        other = ours[key]
        assert other["prompt"] == row["prompt"], key
        assert row["pair"] is not None and other["pair"] == row["pair"], key
        # One process samples 8 images per call, each of two 4: CPU kernels round differently by batch size, and
        # later generations sample weights that differ by summation order (see _assert_weights_match). One pixel's
        # 8-bit level moves a reward by 1 / (255 * 32 * 32) = 4e-6 (measured: exactly that, at most); the rewards of a
        # prompt's two samples differ by 8e-4 at least, so the pairs are the same.
        assert other["rewards"] == pytest.approx(row["rewards"], abs=1e-4, rel=0), key
        # the trained latents' sums (~300): measured 4e-5 relative at most
        assert other["latents"] == pytest.approx(row["latents"], rel=1e-3), key


def _assert_weights_match(report: dict, single: dict) -> None:
    """The saved LoRA weights agree with one process's, to float summation noise.

    peft's ``lora_B`` (saved as ``lora.up``) starts at zero and gets the large gradients: within 2e-5 = 0.02 lr
    (measured: 3e-6 at most, every engine). ``lora_A`` (``lora.down``) has no gradient at step 1 and one scaled by
    ``B ~ lr`` after it, where float noise is a large part of some elements' gradients, and AdamW, whose first updates
    are about +-lr whatever the gradient's size, would turn it into updates of up to lr each way (measured with
    epsilon 1e-8: 0.15 lr in one element of 13568 under ZeRO-2 on an AVX-512 CPU, 0.74 lr in one under FSDP2 on an
    AVX2 CPU); ``adam_epsilon=1e-4`` (:data:`BASE_CONFIG`) keeps them small (measured: 0.0032 lr at most, every
    engine, AVX2 CPU): within 0.5 lr each. Over all weights the difference's norm is within 1e-3 of the norm
    ``lora_B`` trained to (measured: 9e-5). Training on other samples or pairs, or a
    missed or extra update, moves ``lora_B`` by ~lr per element."""
    a, b = _weights(single), _weights(report)
    assert a.keys() == b.keys()
    for key in a:
        atol = 0.02 * LEARNING_RATE if ".lora.up." in key else 0.5 * LEARNING_RATE
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=atol, msg=key)
    trained = torch.cat([a[k].reshape(-1) for k in a if ".lora.up." in k]).norm()
    difference = torch.cat([(b[k] - a[k]).reshape(-1) for k in a]).norm()
    assert difference < 1e-3 * trained
    assert trained > 10 * LEARNING_RATE  # the comparison is not between two untrained adapters


def _assert_in_step(report: dict) -> None:
    """Every process entered the same collectives, and after every step where each holds the whole of the trainable
    weights (DDP, ZeRO-2; ZeRO-3 once it keeps LoRA's small tensors whole) every process held the same ones."""
    assert report["global_step"] == STEPS
    assert report["collectives_match"], report["first_collective_mismatch"]
    assert min(report["collective_counts"]) > 0
    whole = 0
    for step, snapshots in enumerate(zip(*report["snapshots"])):
        if all(s["whole"] for s in snapshots):
            whole += 1
            a, b = (torch.tensor(s["values"]) for s in snapshots)
            assert torch.equal(a, b), f"the processes' weights differ after step {step}"
    assert whole > 0 or report["distributed_type"].endswith("FSDP")  # FSDP2: every step's weights are shards


# ------------------------------------------------------------------------------------------------------ the tests

ENGINES = {"ddp": ("MULTI_CPU", None), "zero2": ("DEEPSPEED", 2), "fsdp2": ("FSDP", None), "zero3": ("DEEPSPEED", 3)}
CASES = [f"{engine}-{space}" for engine in ENGINES for space in ("output", "parameter") if engine != "zero3"]
CASES.append("zero3-output")  # the parameter space under ZeRO-3: test_zero3_parameter_space.py


@pytest.mark.parametrize("name", _tiered(CASES))
def test_two_processes_sample_pair_and_train_like_one(runs, name):
    """Two processes with half the per-device batch sample the same images (seeded by global row), score and pair
    them as one process does, and end with its LoRA weights; the losses and lambdas follow (global scope)."""
    engine, space = name.split("-")
    distributed_type, stage = ENGINES[engine]
    report, single = runs[name], runs[f"single-{space}"]
    assert report["num_processes"] == 2 and report["distributed_type"].endswith(distributed_type)
    assert report["zero_stage"] == stage
    assert report["global_step"] == single["global_step"] == STEPS
    _assert_same_samples_and_pairs(report, single)
    # as the offline tests: summation order, amplified by beta = 5000, moves the losses by up to ~2e-4 relative
    assert report["losses"] == pytest.approx(single["losses"], rel=1e-3)
    assert report["lambdas"] == pytest.approx(single["lambdas"], rel=1e-3)
    assert report["losses"][0] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at the start
    assert any(lam < 1.0 for lam in single["lambdas"])  # the safeguard engaged
    _assert_weights_match(report, single)
    _assert_in_step(report)
    assert report["saved_files"] == single["saved_files"]
    sharded = [g["sharded_weights"] for process in report["generations"] for g in process]
    gathers = [g["collectives"] for process in report["generations"] for g in process]
    if engine in ("zero3", "fsdp2"):
        # The policy sampled through its shards: on every process, whenever it sampled, some of its weights were
        # partitioned (FSDP2: all; ZeRO-3: the 11 tensors above its persistence threshold, all before the first
        # step), and every sampling call gathered them, the two processes together.
        assert min(sharded) > 0 and min(gathers) > 0
    else:
        assert max(sharded) == 0 and max(gathers) == 0  # whole weights: sampling needs no collective


TIE_CASES = ["ddp-ties-output", "ddp-ties-parameter", "zero2-ties-output", "fsdp2-ties-parameter", "zero3-ties-output"]


@pytest.mark.parametrize("name", _tiered(TIE_CASES))
def test_a_process_without_pairs_stays_in_step(runs, name):
    """Whether a micro-batch has pairs is decided from the process's own samples: process 1's first micro-batch ties
    (a zero-weighted placeholder joins process 0's step), process 0's second ties (a zero-weighted replay of its
    first), and at step 3 every prompt ties. Both processes enter the same collectives (no hang) and hold the same
    weights after every step."""
    report = runs[name]
    generations = report["generations"]
    prompts = [[g["prompts"] for g in process] for process in generations]
    assert prompts == [[[p] for p in TIE_PROMPTS[0::2]], [[p] for p in TIE_PROMPTS[1::2]]]  # read in order
    assert [[len(g["pairs"]) for g in process] for process in generations] == [[1, 0, 0], [0, 1, 0]]
    _assert_in_step(report)
    logs = [h for h in report["log_history"] if "loss" in h]
    assert [h["online/prompts_without_pair"] for h in logs] == [0.5, 0.5, 1.0]
    assert [h["online/pairs"] for h in logs] == [0.5, 0.5, 0.0]  # per micro-batch, averaged over processes
    assert all(math.isfinite(h["loss"]) for h in logs)
    for process, snapshots in enumerate(report["snapshots"]):  # each process's part (its shard under FSDP2)
        before, after_1, after_2 = (torch.tensor(s["values"]) for s in snapshots[:3])
        if before.shape == after_1.shape:  # ZeRO-3: before the first step even LoRA's tensors are partitioned
            assert not torch.equal(after_1, before), process  # step 1 trained
        assert not torch.equal(after_2, after_1), process  # step 2 trained


@pytest.mark.parametrize(
    "name",
    _tiered(["ddp-ties-output", "ddp-ties-parameter", "fsdp2-ties-parameter", "zero2-ties-output", *TIE_CASES[-1:]]),
)
def test_an_optimizer_step_without_a_pair_on_any_process_is_not_applied(runs, name):
    """Step 3 has no pair on any process (the summed count says so on both): its update is not applied, neither
    AdamW's momentum from steps 1 and 2 nor weight decay; every process's part of the weights is unchanged. DeepSpeed
    steps inside the last micro-batch's backward: the summed count is taken before it and the engine's ZeRO
    optimizer told to leave the step unapplied."""
    report = runs[name]
    assert [sum(len(g["pairs"]) for g in process[2:]) for process in report["generations"]] == [0, 0]
    for process, snapshots in enumerate(report["snapshots"]):
        key = "partition" if "partition" in snapshots[2] else "values"  # ZeRO-3: its partitions, as laid out at rest
        after_2, after_3 = (torch.tensor(s[key]) for s in snapshots[2:])
        assert torch.equal(after_3, after_2), (
            f"process {process}: step 3 moved the weights by {(after_3 - after_2).abs().max():.2e}"
        )


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["zero2", "zero3", "fsdp2"])
def test_a_reference_refreshed_every_step_trains_as_on_one_process(runs, engine):
    """ref_update_steps=1 under ZeRO-2 (whole weights), ZeRO-3 and FSDP2 (the reference sharded as the policy, each
    refresh writing the gathered policy with its adapters merged into the shards): the same losses and LoRA weights
    as one process, whose refresh merges a whole copy with peft. A reference left with stale shards predicts the
    initial model's, and the losses from step 2 on move apart."""
    report, single = runs[f"{engine}-refresh"], runs["single-refresh"]
    assert report["num_processes"] == 2 and report["global_step"] == single["global_step"] == STEPS
    _assert_same_samples_and_pairs(report, single)
    assert report["losses"] == pytest.approx(single["losses"], rel=1e-3)
    _assert_weights_match(report, single)
    _assert_in_step(report)
    # the refresh changes the run: with the initial reference the later losses differ
    fixed = runs["single-output"]
    assert abs(single["losses"][2] - fixed["losses"][2]) > 1e-3 * abs(fixed["losses"][2])


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILY_CASES))
def test_every_family_samples_pairs_and_trains_on_two_processes_like_one(runs, family):
    """Every family but SD (whose engines are tested above) under DDP with half the per-device batch: the same
    prompts, sources and pairs at the same global rows as one process (seeded by global row), rewards and losses
    within summation noise, LoRA weights within a small share of what training moved them, the processes in step.
    The tiny transformers amplify the weights' summation-order differences in later generations' samples more than
    SD's UNet (tolerances below, measured values in the assertion messages)."""
    report, single = runs[f"ddp-{family}"], runs[f"single-{family}"]
    assert report["num_processes"] == 2 and report["global_step"] == single["global_step"] == STEPS
    ours, theirs = _by_global_row(report), _by_global_row(single)
    assert ours.keys() == theirs.keys() == {(g, r) for g in range(STEPS) for r in range(GLOBAL_BATCH)}
    differences = {k: max(abs(a - b) for a, b in zip(ours[k]["rewards"], row["rewards"])) for k, row in theirs.items()}
    worst = max(differences.values())
    assert worst < 1e-2, worst  # measured: 0 to 1e-4 (rewards in [-1, 1])
    # generation 0 samples the same weights: its rewards within a few pixel levels (4e-6 each at 32 x 32)
    first = max(d for (generation, _), d in differences.items() if generation == 0)
    assert first < 1e-4, first
    for key, row in theirs.items():
        assert ours[key]["prompt"] == row["prompt"] and row["pair"] is not None, key
        # later generations may swap a pair whose rewards lie closer than the two runs' difference
        if key[0] == 0 or abs(row["rewards"][0] - row["rewards"][1]) > 2 * worst:
            assert ours[key]["pair"] == row["pair"], key
    gap = min(abs(row["rewards"][0] - row["rewards"][1]) for row in theirs.values())
    assert report["losses"] == pytest.approx(single["losses"], rel=1e-2)
    # the trainable weights after the last step (process 0's, whole under DDP) against one process's, relative to how
    # far one process's training moved them from their initial values
    start, end = (torch.tensor(single["snapshots"][0][i]["values"]) for i in (0, -1))
    other = torch.tensor(report["snapshots"][0][-1]["values"])
    moved, difference = (end - start).norm(), (other - end).norm()
    print(
        f"{family}: rewards within {worst:.2e} (generation 0: {first:.2e}; smallest gap {gap:.2e}), "
        f"weights {float(difference / moved):.2e}"
    )
    assert moved > 10 * LEARNING_RATE and difference < 2e-2 * moved, (float(difference), float(moved))
    _assert_in_step(report)


def test_an_online_run_probes_every_processs_share_of_the_same_pairs_and_rewinds_alike(runs):
    """``on_pathology="rewind"`` online on two processes (the offline run: test_rewind_processes.py, slow): every
    process probes its own share of the held-out pairs and reads the figures reduced over both, and every process
    rewinds at the same step to the same healthy weights."""
    reports = runs["ddp-probe-rewind"]["ranks"]
    # Each process holds one of the two held-out pairs, and both read the figures reduced over the two.
    assert reports[0]["share"] != reports[1]["share"]
    assert reports[0]["readings"] == reports[1]["readings"] and len(reports[0]["readings"]) == 1
    # The alarm fires at step 1 on both, back to step 0, and the online run stops with the initial weights.
    assert reports[0]["rewinds"] == reports[1]["rewinds"] == [[1, 0]]
    assert reports[0]["steps"] == reports[1]["steps"] == 1
    assert reports[0]["trained"] == reports[1]["trained"] == reports[0]["initial"] == reports[1]["initial"]
