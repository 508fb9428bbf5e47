"""A safeguard's optimizer step reads no more tensor values back to the host than Diffusion-DPO's.

On an accelerator each read (``.item()``, ``.tolist()``, ``bool()``, ``float()``, ``.cpu()`` of a tensor) makes the
host wait for the device, so ``lambda`` stays a device tensor and the update space's search runs a schedule fixed
before it starts. On the CPU the reads are counted as calls (:mod:`tests.helpers.host_reads`: a torch-function mode),
from ``on_step_begin`` to ``on_step_end`` of one steady-state optimizer step of each safeguard (the micro-batch's
``training_step`` with the safeguard's hook, clipping, the optimizer step), in one run of the tiny SD pipeline with
LoRA whose safeguard changes every step. Each safeguard's first step is left out: it takes, once per run, the
decisions every process must share (whether the one pass splits the branches).
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from tests.helpers.host_reads import SPACES, HostReadCounter, safeguard_host_reads
from trl_diffusion_sdpo.safeguards import crossing


def test_no_safeguard_reads_more_values_back_per_step_than_diffusion_dpo(make_trainer):
    reads = safeguard_host_reads(make_trainer)
    assert set(reads) == set(SPACES)
    for name in SPACES:
        assert len(reads[name]) <= len(reads["none"]), (name, Counter(reads[name]))


def test_a_host_read_between_the_search_passes_is_counted(make_trainer, monkeypatch):
    """Planted: the search reads each pass's values on the host (as a search that chose its next points there
    would): the update space's step then reads more than Diffusion-DPO's."""
    search = crossing.last_crossing

    def reading(evaluate, *args, **kwargs):
        def evaluate_and_read(points: torch.Tensor) -> torch.Tensor:
            values = evaluate(points)
            values.tolist()
            return values

        return search(evaluate_and_read, *args, **kwargs)

    monkeypatch.setattr("trl_diffusion_sdpo.safeguards.update_space.last_crossing", reading)
    reads = safeguard_host_reads(make_trainer, ["none", "update"])
    assert len(reads["update"]) > len(reads["none"]), reads


@pytest.mark.parametrize("space", ["parameter", "parameter-two-passes"])
def test_a_host_read_inside_the_passes_trainers_backward_carries_is_counted(make_trainer, monkeypatch, space):
    """Planted: the exact rule's passes read a gradient's norm on the host between the branches (inside Trainer's
    backward, where autograd turns torch-function modes off): the step then reads more than Diffusion-DPO's."""
    from trl_diffusion_sdpo.safeguards import parameter

    cotangents = parameter.loss_cotangents

    def reading(*args, **kwargs):
        cot_winner, cot_loser = cotangents(*args, **kwargs)
        cot_winner.norm().item()
        return cot_winner, cot_loser

    monkeypatch.setattr(parameter, "loss_cotangents", reading)
    reads = safeguard_host_reads(make_trainer, ["none", space])
    assert len(reads[space]) > len(reads["none"]), reads


@pytest.mark.parametrize(
    ("read", "name"),
    [
        (lambda t: t.item(), "item"),
        (lambda t: t.tolist(), "tolist"),
        (lambda t: bool(t), "bool"),
        (lambda t: float(t), "float"),
        (lambda t: int(t), "int"),
        (lambda t: [0, 1][t], "index"),
        (lambda t: t.cpu(), "cpu"),
        (lambda t: t.numpy(), "numpy"),
    ],
)
def test_the_counter_sees_each_kind_of_read(read, name):
    value = torch.tensor(1)
    with HostReadCounter() as counter:
        value + 1  # an operation that reads nothing
        read(value)
    assert [r.split(" at ")[0] for r in counter.reads] == [name]
    assert counter.reads[0].endswith(f"{__file__}:{read.__code__.co_firstlineno}")
