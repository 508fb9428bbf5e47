"""The held-out probe and ``on_pathology="rewind"`` on two CPU processes (gloo) under every engine: DDP, DeepSpeed
ZeRO-1/2/3 and FSDP2, full tuning of the tiny SD UNet (tests/probe_engines_worker.py).

Per engine, offline and online: a quiet run (the probe every step, an alarm that never fires) trains bit for bit as
one without the probe; each process's probe reads the sums reduced over both processes' held-out pairs; a forced
alarm (every probe unhealthy) puts every process's own part of the weights back to the one it began with; and the
weights, gathered, equal the one-process rewind's. These launches are the slow tier (about 1-2 minutes each on a
loaded 2-core CPU); the default tier checks FSDP2's own part of a rewind in this process."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from tests.helpers.probe_engines import ENGINES, run_worker
from trl_diffusion_sdpo.callbacks.rewind import DiskSnapshot, EngineSnapshot, MemorySnapshot
from trl_diffusion_sdpo.engines.fsdp import FSDP2Engine

JOBS = ("plain", "quiet", "alarm")
_ONE_PROCESS: dict[str, dict] = {}


def _one_process(tmp_path_factory, mode: str) -> dict:
    """The one-process run of ``mode`` whose alarm fires at every probe: the rewind every engine's must match."""
    if mode not in _ONE_PROCESS:
        job = _job(mode, "alarm")
        _ONE_PROCESS[mode] = run_worker(tmp_path_factory.mktemp(f"one-process-{mode}"), None, (job,))[job][0]
    return _ONE_PROCESS[mode]


def _job(mode: str, job: str) -> str:
    return job if mode == "offline" else f"online-{job}"


def _assert_reduced_over_both_shares(reports: list[dict], one_process: dict) -> None:
    """Both processes read the same figures, and they are the figures over both held-out pairs: the reference's
    errors (which training does not move) equal the one-process probe's over the same two pairs."""
    first, second = reports
    assert first["readings"] == second["readings"] and len(first["readings"]) == first["steps"]
    one = one_process["readings"][0][1]
    for _, mine in first["readings"]:  # the reference is not refreshed: its errors are the same at every probe
        for name in ("probe/mse_ref_winner", "probe/mse_ref_loser"):
            assert mine[name] == pytest.approx(one[name], rel=1e-6), name


def _assert_quiet_probe_and_forced_rewind(runs: dict[str, list[dict]], one_process: dict, engine: str) -> None:
    plain, quiet, alarm = (runs[job] for job in JOBS)
    assert {r["engine"] for reports in runs.values() for r in reports} == {engine}
    # A quiet run trains bit for bit as one without the probe: each process's part and the gathered weights.
    assert quiet[0]["rewinds"] == quiet[1]["rewinds"] == []
    for rank in (0, 1):
        assert quiet[rank]["local_at_end"] == plain[rank]["local_at_end"] != plain[rank]["local_at_begin"]
        assert quiet[rank]["gathered"] == plain[rank]["gathered"] != plain[rank]["initial"]
    _assert_reduced_over_both_shares(quiet, one_process)
    # The forced alarm: every process rewinds at the same steps (offline: back to step 0 with the safeguard on, then
    # again and stop; online: once, and stop), and its own part of the weights is the one it began with (a process
    # holding another's part, or none restored, would differ).
    for rank in (0, 1):
        assert alarm[rank]["rewinds"] == one_process["rewinds"] and one_process["rewinds"][0] == [1, 0]
        assert alarm[rank]["steps"] == one_process["steps"]
        assert alarm[rank]["local_at_end"] == alarm[rank]["local_at_begin"]
        # and so at the beginning of every step: each step after a rewind trains from the step-0 part
        assert set(alarm[rank]["local_at_step_begin"]) == {alarm[rank]["local_at_begin"]}
        assert len(alarm[rank]["local_at_step_begin"]) == alarm[rank]["steps"]
        # gathered, they are the one-process rewind's weights (the step-0 weights)
        assert alarm[rank]["gathered"] == one_process["gathered"] == one_process["initial"]
    _assert_reduced_over_both_shares(alarm, one_process)
    if alarm[0]["engine_steps"] is not None:  # DeepSpeed's own step count goes on counting through a rewind
        assert alarm[0]["engine_steps"] == alarm[1]["engine_steps"] == alarm[0]["steps"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["offline", "online"])
@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_the_probe_and_the_rewind_under_each_engine(engine, mode, tmp_path_factory):
    jobs = tuple(_job(mode, job) for job in JOBS)
    reports = run_worker(tmp_path_factory.mktemp(f"{engine}-{mode}"), ENGINES[engine], jobs)
    runs = {job: reports[_job(mode, job)] for job in JOBS}
    expected = {"ddp": "ddp", "fsdp2": "fsdp2", "zero3": "deepspeed-zero3"}.get(engine, "deepspeed")
    _assert_quiet_probe_and_forced_rewind(runs, _one_process(tmp_path_factory, mode), expected)
    # ZeRO-3 and FSDP2 shard the weights themselves: each process began with a part of its own
    alarm = runs["alarm"]
    assert (alarm[0]["local_at_begin"] != alarm[1]["local_at_begin"]) == (engine in ("zero3", "fsdp2"))


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fsdp2", "zero1", "zero2", "zero3"])
def test_a_lora_rewind_restores_each_processs_adapters_under_a_sharding_engine(engine, tmp_path_factory):
    """Under DeepSpeed (ZeRO-1/2: the adapters' optimizer state partitioned; ZeRO-3: the adapters too) and FSDP2
    LoRA's snapshot is each process's part on disk, as full tuning's."""
    if "lora" not in _ONE_PROCESS:
        runs = run_worker(tmp_path_factory.mktemp("one-process-lora"), None, ("lora-alarm",))
        _ONE_PROCESS["lora"] = runs["lora-alarm"][0]
    one_process = _ONE_PROCESS["lora"]
    alarm = run_worker(tmp_path_factory.mktemp(f"{engine}-lora"), ENGINES[engine], ("lora-alarm",))["lora-alarm"]
    assert one_process["rewinds"] == [[1, 0], [2, 0]]
    for rank in (0, 1):
        assert alarm[rank]["rewinds"] == one_process["rewinds"] and alarm[rank]["steps"] == one_process["steps"]
        assert (
            set(alarm[rank]["local_at_step_begin"]) == {alarm[rank]["local_at_begin"]} == {alarm[rank]["local_at_end"]}
        )
        assert alarm[rank]["gathered"] == one_process["gathered"]
    _assert_reduced_over_both_shares(alarm, one_process)


def test_fsdp2_puts_back_its_shards_of_the_weights_and_of_the_optimizer_state(tmp_path):
    """FSDP2's part of a rewind in one process (a one-process gloo group, so each DTensor's local shard is whole): the
    weights and the AdamW state written at one step are those read back two steps later, and the next step then
    trains exactly as the one after the snapshot did."""
    if dist.is_initialized():
        pytest.skip("a process group is already set up in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        fully_shard(model[0], mesh=mesh)
        fully_shard(model, mesh=mesh)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        inputs = [torch.randn(3, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]

        def step(x: torch.Tensor) -> list[torch.Tensor]:
            model(x).square().sum().backward()
            optimizer.step()
            optimizer.zero_grad()
            return [p.full_tensor().clone() for p in model.parameters()]

        engine = FSDP2Engine(accelerator=None)
        step(inputs[0])
        engine.save_training_state(str(tmp_path), optimizer)
        saved = [p.full_tensor().clone() for p in model.parameters()]
        after_snapshot = step(inputs[1])
        step(inputs[2])
        engine.load_training_state(str(tmp_path), optimizer)
        assert all(torch.equal(p.full_tensor(), w) for p, w in zip(model.parameters(), saved, strict=True))
        assert all(isinstance(p, DTensor) for p in model.parameters())
        # The moments and the step count are back too: the same step from here gives the same weights.
        assert all(torch.equal(a, b) for a, b in zip(step(inputs[1]), after_snapshot, strict=True))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["memory", "disk", "fsdp2"])
def test_a_rewind_keeps_the_learning_rate_the_schedule_has_reached(kind, tmp_path):
    """The rewind acts after the scheduler has set the next step's learning rate (``on_step_end``): the snapshot's
    weights and momentum come back, the rate stays the schedule's, and the next step moves the weights by it (SGD
    with momentum, computed here apart). Each snapshot: LoRA's in memory, full tuning's on disk, FSDP2's through the
    engine (a one-process gloo group)."""
    if kind == "fsdp2" and dist.is_initialized():
        pytest.skip("a process group is already set up in this process")
    with contextlib.ExitStack() as stack:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        if kind == "fsdp2":
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
            stack.callback(dist.destroy_process_group)
            fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        parameters = list(model.parameters())
        optimizer = torch.optim.SGD(parameters, lr=0.1, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
        folder = str(tmp_path / "snapshot")
        snapshot = {
            "memory": lambda: MemorySnapshot(parameters),
            "disk": lambda: DiskSnapshot(parameters, folder, True, lambda: None),
            "fsdp2": lambda: EngineSnapshot(FSDP2Engine(accelerator=None), parameters, folder, True, lambda: None),
        }[kind]()
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
        whole = lambda t: (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()  # noqa: E731

        def step() -> None:
            model(x).square().sum().backward()
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()

        step()
        snapshot.take(optimizer)
        saved = [whole(p) for p in parameters]
        momentum = [whole(optimizer.state[p]["momentum_buffer"]) for p in parameters]
        step()
        step()
        rate = scheduler.get_last_lr()[0]
        snapshot.restore(optimizer)
        assert optimizer.param_groups[0]["lr"] == rate == pytest.approx(0.1 / 4)
        assert all(torch.equal(whole(p), w) for p, w in zip(parameters, saved, strict=True))
        # The next step, apart: the gradient at the snapshot's weights, the momentum and the schedule's rate.
        plain = torch.nn.Linear(4, 2)
        with torch.no_grad():
            plain.weight.copy_(saved[0])
            plain.bias.copy_(saved[1])
        plain(x).square().sum().backward()
        gradients = [plain.weight.grad, plain.bias.grad]
        expected = [w - rate * (0.9 * m + g) for w, m, g in zip(saved, momentum, gradients, strict=True)]
        step()
        for p, e in zip(parameters, expected, strict=True):
            torch.testing.assert_close(whole(p), e, rtol=1e-6, atol=1e-7)
