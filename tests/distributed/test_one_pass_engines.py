"""The exact safeguard in one pass under DeepSpeed ZeRO-1/2/3 and FSDP2 on two CPU processes (gloo), against one
process with the same global batch: the parameter space (global scope), the per-pair scope and the update space, SD,
SDXL and a flow-matching transformer (FLUX.2 [klein]), LoRA and full.

ZeRO-1/2 keep the weights whole: each process splits its own micro-batch's gradient by branch (or by image) inside
one backward, as under DDP, and hands the combination to the engine as the gradient of a surrogate linear in the
weights, so the engine reduces, clips and steps it as a plain backward's; the update space first averages both
branches over processes, then reads AdamW's moments on each process's flat float32 partition (DeepSpeed's
``_hp_mapping`` links each weight's piece to it) and adds every sum up over processes. FSDP2 and ZeRO-3 gather each
block's weights for its backward: the taps' per-branch (per-image) gradients are reduce-scattered into each
process's shards (FSDP2's rows, ZeRO-3's flat partitions), where the inner products are summed over processes.
The update space under FSDP2 works on each process's shards of the averaged ``g_w`` and ``h_l``, of the weights and
of the optimizer's state: ``OptimizerUpdate`` adds up every sum it forms over the processes (the clip coefficient's,
AdamW's weight decay, SGD's four, ``D(lambda)`` at each evaluation), so every process searches the same ``D``; it is
tested with AdamW in one pass and with SGD in per-branch passes (:data:`SGD_SETTINGS`). Launched as
``test_distributed.py`` launches its trainings: the one-process references in the pytest process, the two-process
trainings in one launch. Every case here is a slow test: the default suite's case, the update space on ZeRO-2 with
LoRA (:data:`DEFAULT_SUITE`), is trained in test_distributed.py's launch and checked there by the same assertions
(``test_the_update_space_in_one_pass_under_zero2_trains_like_one_process``); here it keeps a launch of its own, so
that the one test runs alone in a few minutes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from datasets import Dataset

from tests.helpers.common import pickapic_rows
from tests.helpers.distributed import (
    _REPORTS,
    STEPS,
    Run,
    _launch,
    _weights,
    assert_one_pass_like_one_process,
    tiny_assets,
)
from tests.helpers.flow_distributed import FAMILIES, FLOW_ARGS, family_assets
from trl_diffusion_sdpo.safeguards.crossing import RESOLUTION

pytest.importorskip("deepspeed")

PARAMETER = ("--safeguard_space", "parameter")  # the global scope (test_distributed's script arguments)
PAIR = ("--safeguard_space", "parameter", "--safeguard_scope", "pair")
UPDATE = ("--safeguard_space", "update")  # AdamW with weight decay 0.01 and clipping at 1.0
# SGD with momentum, in per-branch passes (the one pass is covered with AdamW): both stores on shards stay covered
SGD_TWO = ("--optim", "sgd", "--learning_rate", "1e-2", "--optim_args", "momentum=0.9", "--safeguard_passes", "two")
BETA_500 = ("--beta", "500")
ZERO1, ZERO2, ZERO3 = "deepspeed_zero1.yaml", "deepspeed_zero2.yaml", "deepspeed_zero3.yaml"
FSDP2 = "fsdp2.yaml"
FLOW = "flux2-klein"  # FLUX.2 [klein]: the flow family of these tests

# name -> (assets, settings, LoRA); each runs on one process and under the engines listed in ENGINES
SETTINGS: dict[str, tuple[str, tuple[str, ...], bool]] = {
    "parameter-lora": ("sd15", PARAMETER, True),
    "pair-lora": ("sd15", PAIR, True),
    "update-lora": ("sd15", UPDATE, True),
    "parameter-full": ("sd15", PARAMETER, False),
    "pair-full": ("sd15", PAIR, False),
    "update-full": ("sd15", UPDATE, False),
    # SDXL at beta 500, as test_distributed.py's SDXL tests: at 5000 float noise in the errors moves the loss past 1e-3
    **{
        f"sdxl-{space}-{tuning}": ("sdxl", (*arguments, *BETA_500), tuning == "lora")
        for space, arguments in (("parameter", PARAMETER), ("pair", PAIR), ("update", UPDATE))
        for tuning in ("lora", "full")
    },
    "update-sgd-lora": ("sd15", (*UPDATE, *SGD_TWO), True),
    "update-sgd-full": ("sd15", (*UPDATE, *SGD_TWO), False),
    # two micro-batches per step: the window's earlier sum kept beside the engine's partitions (ZeRO-3) or in .grad
    "parameter-lora-accumulated": ("sd15", (*PARAMETER, "--gradient_accumulation_steps", "2"), True),
    # a flow-matching transformer (examples/train_flow.py), each space and scope, LoRA and full; the update space at
    # mu 0.9, where its lambda binds on every step (at 0.5 the LoRA run's stays at 1)
    **{
        f"{FLOW}-{space}-{tuning}": (FLOW, (*FLOW_ARGS, *FAMILIES[FLOW].extra, *arguments), tuning == "lora")
        for space, arguments in (
            ("parameter", PARAMETER),
            ("pair", PAIR),
            ("update", (*UPDATE, "--safeguard_mu", "0.9")),
        )
        for tuning in ("lora", "full")
    },
}
# the default suite's training (engine, setting): the update space on ZeRO-2's optimizer partitions, trained and
# checked in test_distributed.py's default launch (the same training: its assets, script arguments and worker); here a
# launch group of its own (-m slow), the rest another. The parameter space's one pass under ZeRO-2 (with accumulation)
# and FSDP2 (on a random stream) is in test_distributed.py's default trainings too.
DEFAULT_SUITE = {("deepspeed_zero2.yaml", "update-lora")}
SGD_SETTINGS = ("update-sgd-lora", "update-sgd-full")  # FSDP2 only: test_fsdp2_update_space_under_sgd_...
ONE_PASS_SETTINGS = tuple(name for name in SETTINGS if name not in SGD_SETTINGS)
ENGINES = {  # ZeRO-3 last in each launch (see test_distributed.RUNS)
    ZERO2: ONE_PASS_SETTINGS,
    ZERO1: ("parameter-lora", "update-full"),
    FSDP2: (*ONE_PASS_SETTINGS, *SGD_SETTINGS),
    ZERO3: ONE_PASS_SETTINGS,
}


def _assets(root: Path, kind: str) -> dict[str, Path]:
    """``kind``'s tiny pipeline saved as a user's folders: ``test_distributed.py``'s widened SD and its SDXL, or the
    flow family's (``test_flow_distributed.py``'s), all on the same dataset."""
    if kind in FAMILIES:
        return family_assets(root, kind)
    return tiny_assets(root / kind, kind, data=root / "data")


def _cases(slow: bool) -> list[tuple[str, str]]:
    """``(engine, setting)`` pairs of the default suite (``slow=False``) or of the slow tests: one launch group."""
    return [
        (engine, name)
        for engine, names in ENGINES.items()
        for name in names
        if ((engine, name) not in DEFAULT_SUITE) == slow
    ]


def _one_pass_cases(slow: bool) -> list[tuple[str, str]]:
    return [(engine, name) for engine, name in _cases(slow) if name not in SGD_SETTINGS]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("zero-one-pass")
    Dataset.from_list(pickapic_rows(8)).save_to_disk(str(root / "data"))
    return root


_LAUNCHED: dict[tuple[str, bool], str] = {}  # group -> "" once launched, or why its launch failed


def _report(root: Path, engine: str | None, name: str, slow: bool) -> dict:
    """The report of ``name`` under ``engine`` (``None``: one process). The first request of a group (the default
    suite's trainings, or the slow ones) launches all of it not yet reported: on one process, then on two. A failed
    launch fails the group's other tests with its reason."""
    kind, settings, lora = SETTINGS[name]
    spec = Run(kind, engine, lora, settings)
    assets = _assets(root, kind)
    group = (str(root), slow)
    if spec.key(assets) not in _REPORTS and group not in _LAUNCHED:
        _LAUNCHED[group] = ""
        cases = _cases(slow)
        singles = [_job(root, None, n) for n in sorted({n for _, n in cases})]
        for jobs in (singles, [_job(root, e, n) for e, n in cases]):
            jobs = [job for job in jobs if job[2].key(job[0]) not in _REPORTS]
            if jobs:
                try:
                    _launch(jobs)
                except AssertionError as error:
                    _LAUNCHED[group] = str(error)
                    raise
    if spec.key(assets) not in _REPORTS and _LAUNCHED[group]:
        pytest.fail(_LAUNCHED[group])
    return _REPORTS[spec.key(assets)]


def _job(root: Path, engine: str | None, name: str) -> tuple[dict, str, Run]:
    kind, settings, lora = SETTINGS[name]
    prefix = "single" if engine is None else engine.removesuffix(".yaml")
    return _assets(root, kind), f"{prefix}-{name}", Run(kind, engine, lora, settings)


def _check(root: Path, engine: str, name: str) -> None:
    """The one pass under ``engine`` against one process (tolerances: ``assert_one_pass_like_one_process``)."""
    kind, _, lora = SETTINGS[name]
    slow = (engine, name) not in DEFAULT_SUITE
    single, report = _report(root, None, name, slow), _report(root, engine, name, slow)
    pipeline = _assets(root, kind)["pipeline"]
    assert_one_pass_like_one_process(single, report, engine, name, lora, pipeline, family=kind)


# by default: test_distributed.py::test_the_update_space_in_one_pass_under_zero2_trains_like_one_process
@pytest.mark.slow  # by default: the same training and assertions in test_distributed.py (above)
@pytest.mark.parametrize(
    "engine,name",
    _one_pass_cases(slow=False),
    ids=[f"{e.removesuffix('.yaml')}-{n}" for e, n in _one_pass_cases(slow=False)],
)
def test_one_pass_under_sharding_engines_trains_like_one_process(root, engine, name):
    _check(root, engine, name)


@pytest.mark.slow
@pytest.mark.parametrize(
    "engine,name",
    _one_pass_cases(slow=True),
    ids=[f"{e.removesuffix('.yaml')}-{n}" for e, n in _one_pass_cases(slow=True)],
)
def test_one_pass_under_sharding_engines_trains_like_one_process_slow(root, engine, name):
    _check(root, engine, name)


@pytest.mark.parametrize(
    "name", [n if (FSDP2, n) in DEFAULT_SUITE else pytest.param(n, marks=pytest.mark.slow) for n in SGD_SETTINGS]
)
def test_fsdp2_update_space_under_sgd_in_per_branch_passes_trains_one_processs_weights(root, name):
    """SGD with momentum on FSDP2's shards, in per-branch passes (each branch's backward reduce-scatters it): its
    ``D(lambda)`` is formed from four sums, each added up over processes, so every process searches the same ``D``.
    SGD's update is linear in the gradient, so rounding stays rounding: the weights agree element-wise to 1.5e-7
    measured (float32 weights of size ~1; tolerance 1e-6), where a lambda wrong by d on one process's shards would
    move them by lr * d * |h_l|; D is smooth in lambda (the clip coefficient its only nonlinearity), but the search
    answers on a grid of max_lambda * RESOLUTION (2.4e-4), so rounding that moves D across a grid point moves lambda by
    one step (measured: one step at one of three steps): tolerance one step; losses to 5.8e-4 (1e-3)."""
    slow = (FSDP2, name) not in DEFAULT_SUITE
    single, report = _report(root, None, name, slow), _report(root, FSDP2, name, slow)
    assert report["distributed_type"].endswith("FSDP") and report["num_processes"] == 2
    assert report["two_pass_reason"] == "safeguard_passes='two'"
    assert report["global_step"] == STEPS == len(single["lambdas"]) == len(report["lambdas"])
    assert report["policy_sharded"] == report["policy_parameters"]  # every trained weight is a shard
    # every process entered the same collectives: the same search (its passes, each one all-reduce) on each
    assert report["collectives_match"], report["first_collective_mismatch"]
    assert any(lam < 1.0 for lam in single["lambdas"])  # the margin binds: a wrong D would move lambda
    assert report["saved_vs_trained_max_abs_diff"] < 1e-5
    assert report["lambdas"] == pytest.approx(single["lambdas"], abs=RESOLUTION + 1e-6)  # max_lambda 1, the default
    assert report["losses"] == pytest.approx(single["losses"], rel=1e-3)
    lora = name.endswith("lora")
    expected, trained = _weights(Path(single["model_dir"]), lora), _weights(Path(report["model_dir"]), lora)
    assert trained.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(trained[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
