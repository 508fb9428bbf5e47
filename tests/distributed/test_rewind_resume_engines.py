"""A rewinding run resumed from a checkpoint under DeepSpeed ZeRO-1/2/3 and FSDP2 rewinds as the uninterrupted run
does (tests/probe_engines_worker.py, ``resume-*`` jobs), on the same number of processes and, where the engine's
checkpoint allows it, on another.

One launch of two CPU processes (gloo) per engine runs 4 steps with the probe every step and ``on_pathology="rewind"``
(healthy at step 1, unhealthy at 2 and 3, a patience of 2: the alarm fires at step 3, back to step 1's weights and
optimizer state, and step 4 trains with the safeguard on), writing a checkpoint at step 2 that holds the rewind's
snapshot (step 1's); the same launch then resumes that checkpoint as a run killed after its save would. A second
launch resumes it on one process: ZeRO-1/2 through DeepSpeed's universal checkpoint, the snapshot's partitions
included; ZeRO-3 and FSDP2 refuse, naming the reason. Under ZeRO-1/2 the other way round too: the run on one process,
resumed on two. These launches are the slow tier; the default tier checks in this
process that a ZeRO-2 snapshot is read back through DeepSpeed's universal format where the engine reads checkpoints
so."""

from __future__ import annotations

import importlib
import socket
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from tests.helpers.probe_engines import ENGINES, run_worker
from trl_diffusion_sdpo.engines.deepspeed import DeepSpeedEngine

#: per engine, whether a checkpoint of two processes resumes on one
OTHER_COUNT = {"zero1": True, "zero2": True, "zero3": False, "fsdp2": False}


def _assert_resumed_as_uninterrupted(straight: dict, resumed: dict) -> None:
    """``resumed`` (from the checkpoint of step 2) rewinds as ``straight`` did, to the same weights, and trains on to
    them. The weights are each process's own part at the beginning of each step (whole under ZeRO-1/2)."""
    assert straight["rewinds"] == resumed["rewinds"] == [[3, 1]]
    assert straight["steps"] == resumed["steps"] == 4
    begins = straight["local_at_step_begin"]
    # The alarm at step 3 put back step 1's weights (those step 2 began with), not those training started from.
    assert begins[3] == begins[1] != begins[0]
    # The resumed run began step 3 from the checkpoint's weights, and step 4 from the snapshot's.
    assert resumed["local_at_step_begin"] == begins[2:]


# by default: test_probe.py::test_a_run_resumed_from_a_checkpoint_rewinds_as_the_uninterrupted_one, and below
# test_a_zero2_snapshot_is_read_through_the_universal_format_when_the_engine_reads_checkpoints_so
@pytest.mark.slow
@pytest.mark.parametrize("engine", sorted(OTHER_COUNT))
def test_a_resumed_run_rewinds_as_the_uninterrupted_one_under_each_sharding_engine(engine, tmp_path):
    two = run_worker(tmp_path, ENGINES[engine], ("resume-straight", "resume-same"))
    for straight, resumed in zip(two["resume-straight"], two["resume-same"], strict=True):
        _assert_resumed_as_uninterrupted(straight, resumed)
        # and step 4 trained bit for bit as the uninterrupted run's: each process's part and the gathered weights
        assert resumed["local_at_end"] == straight["local_at_end"] and resumed["gathered"] == straight["gathered"]
    one = run_worker(tmp_path, ENGINES[engine], ("resume-other",), processes=1)["resume-other"][0]
    if not OTHER_COUNT[engine]:
        name = {"zero3": "deepspeed", "fsdp2": "fsdp2"}[engine]
        assert one["refused"].startswith(f"Cannot resume under {name} on 1 process(es)")
        assert (
            "written by 2: its sharded optimizer state is not resharded to another number of processes"
            in (one["refused"])
        )
        return
    _assert_resumed_as_uninterrupted(two["resume-straight"][0], one)
    _assert_weights_close(tmp_path)


# by default: as above
@pytest.mark.slow
@pytest.mark.parametrize("engine", ["zero1", "zero2"])
def test_a_one_process_checkpoint_resumes_with_its_rewind_on_two_processes(engine, tmp_path):
    """The other way round: the run on one process, its checkpoint (and snapshot) resumed on two."""
    one = run_worker(tmp_path, ENGINES[engine], ("resume-straight",), processes=1)["resume-straight"][0]
    two = run_worker(tmp_path, ENGINES[engine], ("resume-other",))["resume-other"]
    for resumed in two:
        _assert_resumed_as_uninterrupted(one, resumed)
    _assert_weights_close(tmp_path)


def _assert_weights_close(folder: Path) -> None:
    """Step 4 on another number of processes sums its gradients in another order: its weights (``resume-other``'s)
    are those of the uninterrupted run within 0.2 x the learning rate (1e-3); a step from the wrong weights or
    moments moves them by about lr."""
    expected = load_file(folder / "resume-straight-weights.safetensors")
    got = load_file(folder / "resume-other-weights.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=2e-4, msg=key)


def test_a_zero2_snapshot_is_read_through_the_universal_format_when_the_engine_reads_checkpoints_so(
    tmp_path, monkeypatch
):
    """After a resume on another number of processes DeepSpeed's engine reads every checkpoint as universal
    (``checkpoint.load_universal``): the rewind's snapshot, written in DeepSpeed's own format, is converted for its
    load. One process (a one-process gloo group): the weights and the AdamW moments written at one step are those read
    back two steps later (the next step then trains exactly as the one after the snapshot did), and the converted
    copy is gone."""
    deepspeed = pytest.importorskip("deepspeed")
    if dist.is_initialized():
        pytest.skip("a process group is already set up in this process")
    # DeepSpeed's CPU shared-memory all-reduce op is JIT-compiled otherwise (as tests/probe_engines_worker.py)
    monkeypatch.setattr(importlib.import_module("deepspeed.comm.torch"), "build_shm_op", lambda: None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MASTER_PORT", str(port))
    deepspeed.init_distributed(dist_backend="gloo")
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 2},
            "checkpoint": {"load_universal": True},  # what resume_on_other_count sets
        }
        wrapped, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        accelerator = types.SimpleNamespace(  # the parts of accelerate's Accelerator the engine reads
            deepspeed_engine_wrapped=types.SimpleNamespace(engine=wrapped),
            is_main_process=True,
            wait_for_everyone=lambda: None,
        )
        engine = DeepSpeedEngine(accelerator, stage=2)
        inputs = [torch.randn(3, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]

        def step(x: torch.Tensor) -> list[torch.Tensor]:
            wrapped.backward(wrapped(x).square().sum())
            wrapped.step()
            return [p.detach().clone() for p in model.parameters()]

        step(inputs[0])
        folder = str(tmp_path / "rewind-healthy")
        engine.save_training_state(folder, optimizer)
        saved = [p.detach().clone() for p in model.parameters()]
        after_snapshot = step(inputs[1])
        step(inputs[2])
        engine.load_training_state(folder, optimizer)
        assert all(torch.equal(p, w) for p, w in zip(model.parameters(), saved, strict=True))
        assert wrapped.global_steps == 3  # the engine's count goes on
        assert all(torch.equal(a, b) for a, b in zip(step(inputs[1]), after_snapshot, strict=True))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["rewind-healthy"]
    finally:
        dist.destroy_process_group()
