"""The counters of :mod:`trl_diffusion_sdpo.testing.operations`, which walk the profiler's own tree of nested calls,
give what a walk up torch's event list (``profile.events()``, each event's ``cpu_parent``) gives: on a small step
with a forward, a backward, an optimizer step, host reads outside and inside it, and a read nested in another."""

from __future__ import annotations

import collections

import torch

from trl_diffusion_sdpo.testing.operations import HOST_READ_OPERATIONS, count_operations, host_reads

BACKWARD = "autograd::engine::evaluate_function"


def _operations_from_the_event_list(profile) -> dict[str, collections.Counter]:
    counts = {"all": collections.Counter(), "outside_backward": collections.Counter()}
    for event in profile.events():
        parent = event.cpu_parent
        if not event.name.startswith("aten::") or (parent is not None and parent.name.startswith("aten::")):
            continue
        ancestors = []
        while parent is not None:
            ancestors.append(parent.name)
            parent = parent.cpu_parent
        counts["all"][event.name] += 1
        if not any(name.startswith(BACKWARD) for name in ancestors):
            counts["outside_backward"][event.name] += 1
    return counts


def _reads_from_the_event_list(profile) -> int:
    count = 0
    for event in profile.events():
        if event.name not in HOST_READ_OPERATIONS:
            continue
        parent, ancestors = event.cpu_parent, []
        while parent is not None:
            ancestors.append(parent.name)
            parent = parent.cpu_parent
        under_optimizer = any(name.startswith("Optimizer.step") for name in ancestors)
        count += not under_optimizer and not any(name in HOST_READ_OPERATIONS for name in ancestors)
    return count


def _profiled_step() -> torch.profiler.profile:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GELU(), torch.nn.Flatten(), torch.nn.Linear(144, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(2, 3, 8, 8)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        loss = model(x).pow(2).mean()
        loss.backward()
        optimizer.step()
        with torch.profiler.record_function("Optimizer.step#Planted.step"):
            float(loss.detach())  # a read inside an optimizer step: left out
        loss.item()  # a read
        x[x > 0].sum()  # boolean-mask indexing: nonzero, a read
        torch.masked_select(x, x > 1)  # masked_select, whose nonzero inside it is the same read
    return profile


def test_the_tree_walks_count_what_the_event_list_gives():
    profile = _profiled_step()
    counts = count_operations(profile)
    assert counts == _operations_from_the_event_list(profile)
    assert sum(counts["outside_backward"].values()) < sum(counts["all"].values())  # the backward was counted apart
    # the convolution once, where Python called it, not again for what runs inside it
    assert counts["all"]["aten::conv2d"] == 1 and counts["all"]["aten::convolution"] == 0
    reads = host_reads(profile)
    assert reads == _reads_from_the_event_list(profile)
    assert reads == 3  # .item(), the mask's nonzero, masked_select (its own nonzero not again); none inside the step
