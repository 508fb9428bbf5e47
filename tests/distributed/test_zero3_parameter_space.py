"""The parameter-space safeguard under DeepSpeed ZeRO-3 on two CPU processes (gloo) against one process with the
same global batch.

ZeRO-3 reduce-scatters each branch's gradient into each process's float32 partitions, averaged over processes; the
inner products over the partitions, summed over processes, give the global micro-batch's lambda, and the combination
is written back into the partitions before the engine steps (``trl_diffusion_sdpo/safeguards/gradients/zero3.py``).
Launched as
``test_distributed.py`` launches its trainings: the one-process references in one launch, the ZeRO-3 trainings in
one two-process launch. The UNet is widened (128 channels) so that some of its tensors really are partitioned.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.helpers.distributed import _REPORTS, STEPS, Run, _launch, _weights, run, tiny_assets
from trl_diffusion_sdpo.engines import DeepSpeedEngine
from trl_diffusion_sdpo.safeguards.gradients.zero3 import ZeRO3BranchGradients
from trl_diffusion_sdpo.safeguards.parameter import ParameterSpaceBackward

PARAMETER = ("--safeguard_space", "parameter")  # every launch trains with safeguard_scope="global"
# ZeRO-3 in its per-branch passes (the one pass, its default, is tests/distributed/test_one_pass_engines.py's)
TWO = ("--safeguard_passes", "two")
ZERO3 = "deepspeed_zero3.yaml"
ACCUMULATE = ("--gradient_accumulation_steps", "2")

# name -> (the one-process reference, the ZeRO-3 training); the same global batch of 4 pairs per micro-batch
TRAININGS: dict[str, tuple[Run, Run]] = {
    "lora": (Run("sd15", None, True, PARAMETER), Run("sd15", ZERO3, True, (*PARAMETER, *TWO))),
    "full": (Run("sd15", None, False, PARAMETER), Run("sd15", ZERO3, False, (*PARAMETER, *TWO))),
    # 1 process x 2 pairs x 2 micro-batches against 2 processes x 1 pair x 2
    "lora-accumulated": (
        Run("sd15", None, True, (*PARAMETER, *ACCUMULATE, "--per_device_train_batch_size", "2")),
        Run("sd15", ZERO3, True, (*PARAMETER, *TWO, *ACCUMULATE, "--per_device_train_batch_size", "1")),
    ),
    # beta 500 as in test_distributed.py's SDXL tests: at 5000 float noise in the errors moves the loss past 1e-3
    "sdxl-full": (
        Run("sdxl", None, False, (*PARAMETER, "--beta", "500")),
        Run("sdxl", ZERO3, False, (*PARAMETER, *TWO, "--beta", "500")),
    ),
}


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    return tiny_assets(tmp_path_factory.mktemp("zero3-parameter"))


@pytest.fixture(scope="module")
def sdxl_assets(assets) -> dict[str, Path]:
    return tiny_assets(assets["root"] / "sdxl", "sdxl", data=assets["data"])


GUARD = "lora"  # launched alone when requested alone; the others together


def _trained(request, name: str) -> tuple[dict, dict]:
    """(the one-process report, the ZeRO-3 report) of ``name``. The first request launches its group (the default
    suite's training alone, or every slow one): the references in one launch, the ZeRO-3 trainings in one
    two-process launch."""
    names = [GUARD] if name == GUARD else [n for n in TRAININGS if n != GUARD]
    folders = {"sd15": "assets", "sdxl": "sdxl_assets"}
    assets = {kind: request.getfixturevalue(folders[kind]) for kind in {TRAININGS[n][0].assets for n in names}}
    for side, prefix in ((0, "single"), (1, "zero3")):
        jobs = [
            (assets[run.assets], f"{prefix}-{other}", run)
            for other in names
            if (run := TRAININGS[other][side]).key(assets[run.assets]) not in _REPORTS
        ]
        if jobs:
            _launch(jobs)
    single, zero3 = TRAININGS[name]
    return _REPORTS[single.key(assets[single.assets])], _REPORTS[zero3.key(assets[zero3.assets])]


def _moved(model_dir: str, lora: bool, start: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The trained weights and how far they moved: LoRA's B matrices (zero at the start), or the whole UNet's."""
    trained = _weights(Path(model_dir), lora)
    if lora:
        trained = {k: v for k, v in trained.items() if ".lora.up." in k}
        return trained, trained
    original = _weights(start, False)
    return trained, {k: v - original[k] for k, v in trained.items()}


# name -> tolerances: lambdas (absolute), losses (relative), weights (the difference's norm against how far they
# moved); see the test's docstring for the measured values
TOLERANCES = {
    "lora": (1e-4, 1e-3, 5e-3),
    "full": (5e-4, 5e-3, 2e-2),
    "lora-accumulated": (1e-4, 1e-3, 1e-2),
    "sdxl-full": (1e-4, 1e-3, 1e-2),
}


@pytest.mark.parametrize(
    "name",
    # all slow: the per-branch passes are the fallback; the default suite runs ZeRO-3's one pass
    # (tests/distributed/test_one_pass_engines.py) and this module's one-process unit test
    [pytest.param(name, marks=pytest.mark.slow) for name in (GUARD, "full", "lora-accumulated", "sdxl-full")],
)
def test_parameter_space_under_zero3_trains_like_one_process(request, name):
    """Two processes under ZeRO-3 ran the per-branch passes on each process's gradient partitions and trained as
    one process with the same global batch did (which runs the one pass): the same lambdas and losses, weights that
    follow them. The margin binds (every lambda is below 1, 0.49 to 0.69), so a lambda wrong on one process's
    partitions would show in the losses and weights.

    Tolerances, measured on two cores (lambda, loss relative, weights' difference against their move): LoRA 8.2e-6,
    9.0e-5, 1.6e-4 (1e-4, 1e-3, 5e-3); LoRA accumulated over 2 micro-batches 1.6e-6, 1.5e-4, 1.1e-3 (1e-4, 1e-3,
    1e-2); SDXL full tuning at beta 500 2.8e-6, 6.8e-6, 8.9e-4 (1e-4, 1e-3, 1e-2); SD full tuning at beta 5000
    6.0e-5, 8.5e-4, 4.3e-3 (5e-4, 5e-3, 2e-2): its losses run up to 72, where float summation order in the errors,
    times beta, moves them most. Weights are compared by norm, not element-wise: AdamW's first steps move each
    weight by about lr * sign(gradient), so rounding in a near-zero gradient entry becomes a +-lr difference (up to
    1.9e-3 = 1.9 lr measured, full tuning)."""
    single, report = _trained(request, name)
    run = TRAININGS[name][0]
    start = request.getfixturevalue("sdxl_assets" if run.assets == "sdxl" else "assets")["pipeline"]
    lambdas, losses, weights = TOLERANCES[name]
    assert report["zero_stage"] == 3 and report["num_processes"] == 2
    assert report["global_step"] == single["global_step"] == STEPS == len(report["lambdas"])
    if run.assets == "sd15":  # the widened UNet really is partitioned (SDXL's tensors all stay whole)
        assert report["policy_partitioned"] > 0
    assert report["branch_store"] == "ZeRO3BranchGradients" and report["two_pass_reason"] == "safeguard_passes='two'"
    assert single["branch_store"] == "NoneType"  # one process ran the one pass: the two paths agree
    assert report["collectives_match"], report["first_collective_mismatch"]
    assert all(lam < 1.0 for lam in single["lambdas"])  # the margin binds: a wrong lambda would show
    assert report["lambdas"] == pytest.approx(single["lambdas"], abs=lambdas)
    assert report["losses"] == pytest.approx(single["losses"], rel=losses)
    assert report["reference_max_abs_change"] == 0.0
    assert report["saved_vs_trained_max_abs_diff"] < 1e-5
    expected, moved = _moved(single["model_dir"], run.lora, start)
    trained, _ = _moved(report["model_dir"], run.lora, start)
    assert trained.keys() == expected.keys()
    difference = torch.cat([(trained[k] - expected[k]).reshape(-1) for k in expected]).norm()
    assert difference < weights * torch.cat([v.reshape(-1) for v in moved.values()]).norm()


class _OneProcessZeRO3:
    """A one-process stand-in for a ZeRO-3 engine: each weight's partition is its whole gradient, flat; a backward
    overwrites the partitions of the weights it reaches (ZeRO-3 at ``micro_step_id`` 0, where the safeguard's passes
    run) and leaves the others as they were; :meth:`step` records the partitions and, like ZeRO-3, keeps them."""

    #: an engine that did not compile its module (``DeepSpeedEngine.is_compiled``)
    is_compiled = False

    def __init__(self, parameters: list[torch.nn.Parameter]) -> None:
        self.parameters = parameters
        # what an earlier window left behind: the first window must not add it
        self.partitions = {id(p): torch.full((p.numel(),), 7.0, dtype=p.dtype) for p in parameters}
        self.boundary: bool | None = None
        self.steps: list[list[torch.Tensor]] = []
        for i, p in enumerate(parameters):
            p.ds_id = i

    def get(self, p: torch.nn.Parameter) -> torch.Tensor:
        return self.partitions[id(p)]

    def set(self, p: torch.nn.Parameter, value: torch.Tensor) -> None:
        self.partitions[id(p)].copy_(value.flatten())

    def set_gradient_accumulation_boundary(self, boundary: bool) -> None:
        self.boundary = boundary

    def backward(self, scalar: torch.Tensor, scale_wrt_gas: bool = True) -> None:
        assert not scale_wrt_gas and self.boundary is False
        for p, grad in zip(self.parameters, torch.autograd.grad(scalar, self.parameters, allow_unused=True)):
            if grad is not None:
                self.partitions[id(p)].copy_(grad.reshape(-1))

    def step(self) -> None:
        assert self.boundary is True
        self.steps.append([self.partitions[id(p)].clone() for p in self.parameters])


def test_zero3_collectives_accumulate_the_window_themselves_and_step_at_its_end(tmp_path, monkeypatch):
    """On one process, through DeepSpeed's accessors (here a stand-in's): two micro-batches of a window (scales 0.5
    and 0.25) step the engine once with 1.5 times the per-branch stage's gradient at scale 0.5, and the next window
    starts afresh, whatever the partitions held; lambda is the per-branch stage's."""
    import deepspeed.utils

    from tests.helpers.one_pass_problems import make_problem, run_stage

    problem = make_problem("sd", True, tmp_path)
    _, expected_lambda, once = run_stage(problem, passes="two")  # DDP's store, from empty gradients, scale 0.5
    params = problem.trainable()
    once = [torch.zeros(p.numel(), dtype=p.dtype) if g is None else g.reshape(-1) for p, g in zip(params, once)]
    for p in params:
        p.grad = None
    engine = _OneProcessZeRO3(params)
    monkeypatch.setattr(deepspeed.utils, "safe_get_local_grad", engine.get)
    monkeypatch.setattr(deepspeed.utils, "safe_set_local_grad", engine.set)
    accelerator = SimpleNamespace(num_processes=1, deepspeed_engine_wrapped=SimpleNamespace(engine=engine))
    stage = ParameterSpaceBackward(DeepSpeedEngine(accelerator, 3), 0.5, 1.0, True, passes="two")
    for scale, sync in ((0.5, False), (0.25, True), (0.5, True)):
        scale = torch.tensor(scale, dtype=torch.float64)
        _, lam, _ = stage(problem.policy, problem.predict, problem.loss, scale, sync_gradients=sync)
        torch.testing.assert_close(lam, expected_lambda)
    assert isinstance(stage.store, ZeRO3BranchGradients) and stage.two_pass_reason == "safeguard_passes='two'"
    assert 0.0 < float(expected_lambda) < 1.0  # the margin binds: the loser's share is scaled
    assert len(engine.steps) == 2
    for stepped, factor in zip(engine.steps, (1.5, 1.0)):
        torch.testing.assert_close(stepped, [factor * g for g in once])


def test_zero3_one_pass_adds_the_windows_earlier_micro_batches_and_starts_each_window_afresh(monkeypatch):
    """The one pass writes each micro-batch's combination into the engine's partitions
    (``DeepSpeedZeRO3Collectives.add_combined``): within an accumulation window the earlier micro-batches' sum is
    added to it, the engine steps once at the window's end with the whole sum, and the next window starts from its own
    combination, whatever the partitions held before (the stand-in's leftover 7s)."""
    import deepspeed.utils

    from trl_diffusion_sdpo.safeguards.gradients.zero3 import DeepSpeedZeRO3Collectives

    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
    engine = _OneProcessZeRO3(params)
    monkeypatch.setattr(deepspeed.utils, "safe_get_local_grad", engine.get)
    monkeypatch.setattr(deepspeed.utils, "safe_set_local_grad", engine.set)
    accelerator = SimpleNamespace(num_processes=1, deepspeed_engine_wrapped=SimpleNamespace(engine=engine))
    collectives = DeepSpeedZeRO3Collectives(DeepSpeedEngine(accelerator, 3))
    store = SimpleNamespace(parameters=params, release=lambda: None)  # the rows a real store gives back
    gen = torch.Generator().manual_seed(0)
    micro = [[torch.randn(p.numel(), generator=gen) for p in params] for _ in range(5)]
    # a window of three micro-batches, then a window of two
    for combined, sync in zip(micro, (False, False, True, False, True)):
        collectives.add_combined(store, combined, sync, reduced=True)
    assert len(engine.steps) == 2
    for stepped, window in zip(engine.steps, (micro[:3], micro[3:])):
        expected = [sum(m[i] for m in window) for i in range(len(params))]
        torch.testing.assert_close(stepped, expected)


@pytest.mark.slow
def test_zero3_one_pass_store_holds_no_memory_between_steps(assets):
    """The one pass under ZeRO-3 (its default), full tuning: each process's float32 rows of the branches' gradients
    are copied into the engine's partitions by the combination, and the store gives their memory back at once, as
    the other engines' stores give theirs back before the next forward: after the last step its pieces hold no bytes,
    and the run trains as one process does (the tolerances of the per-branch passes' full run above). Planted: the
    release after the combination removed, the pieces hold both rows after training (9.6 MB here)."""
    single = run(assets, "single-one-pass-full", None, False, *PARAMETER)
    report = run(assets, "zero3-one-pass-full", ZERO3, False, *PARAMETER)
    assert report["zero_stage"] == 3 and report["global_step"] == STEPS and report["policy_partitioned"] > 0
    assert report["two_pass_reason"] is None and report["branch_store"] == "NoneType"  # one pass, no fallback
    assert report["one_pass_pieces"] >= 1
    assert report["one_pass_held_bytes"] == 0
    lambdas, losses, weights = TOLERANCES["full"]
    assert report["lambdas"] == pytest.approx(single["lambdas"], abs=lambdas)
    assert report["losses"] == pytest.approx(single["losses"], rel=losses)
    expected, moved = _moved(single["model_dir"], False, assets["pipeline"])
    trained, _ = _moved(report["model_dir"], False, assets["pipeline"])
    difference = torch.cat([(trained[k] - expected[k]).reshape(-1) for k in expected]).norm()
    assert difference < weights * torch.cat([v.reshape(-1) for v in moved.values()]).norm()
