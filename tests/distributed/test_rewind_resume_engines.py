"""A rewinding run resumed from a checkpoint under DeepSpeed ZeRO-1/2/3 and FSDP2 rewinds as the uninterrupted run
does (tests/probe_engines_worker.py, ``resume-*`` jobs), on the same number of processes and, where the engine's
checkpoint allows it, on another.

One launch of two CPU processes (gloo) per engine runs 4 steps with the probe every step and ``on_pathology="rewind"``
(healthy at step 1, unhealthy at 2 and 3, a patience of 2: the alarm fires at step 3, back to step 1's weights and
optimizer state, and step 4 trains with the safeguard on), writing a checkpoint at step 2 that holds the rewind's
snapshot (step 1's); the same launch then resumes that checkpoint as a run killed after its save would. A second
launch resumes it on one process: ZeRO-1/2 through DeepSpeed's universal checkpoint, the snapshot's partitions
included; ZeRO-3 and FSDP2 refuse, naming the reason."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.probe_engines import ENGINES, run_worker

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


@pytest.mark.slow  # by default: test_probe.py::test_a_run_resumed_from_a_checkpoint_rewinds_as_the_uninterrupted_one
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
    # Step 4 on one process sums its gradients in another order: its weights are those of the uninterrupted run
    # within 0.2 x the learning rate (1e-3); a step from the wrong weights or moments moves them by about lr.
    expected = load_file(Path(tmp_path) / "resume-straight-weights.safetensors")
    got = load_file(Path(tmp_path) / "resume-other-weights.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=2e-4, msg=key)
