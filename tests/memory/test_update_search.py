"""The update space's search holds what ``estimate-memory`` plans for it: the bytes a real search allocates on the
CPU (torch's profiler) against :func:`update_search_bytes` for the same weights, and the estimate's ``safeguard`` term
for ``safeguard_space: update`` holds the search's workspace and copies at the moment they are held."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from trl_diffusion_sdpo.engines.memory import RunShape, estimate_memory
from trl_diffusion_sdpo.engines.memory import estimate as estimate_module
from trl_diffusion_sdpo.engines.memory import update_search as model
from trl_diffusion_sdpo.engines.memory.measure import step_peak_bytes
from trl_diffusion_sdpo.engines.memory.stored import stored_model_sizes
from trl_diffusion_sdpo.safeguards import crossing, update_space
from trl_diffusion_sdpo.safeguards.update_runs import UpdateWorkspace

ROOT = Path(__file__).resolve().parents[2]
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
# weights of the search's test: one larger than a run (a run of its own), the others cut into runs of several
SIZES = (40_000, 9_000, 7_000, 5_000, 3_000, 2_000, 64, 1_000)
CHUNK, WORK = 1 << 14, 9 * (1 << 11)


def test_the_plans_constants_are_the_searchs() -> None:
    assert model.DEVICE_CHUNK == update_space.DEVICE_CHUNK
    assert model.DEVICE_WORK == update_space.DEVICE_WORK
    assert model.GRID_POINTS == crossing.GRID_POINTS
    assert model.REFINEMENT_POINTS == crossing.SUBDIVISIONS - 1
    assert crossing.schedule() == [model.GRID_POINTS] + [model.REFINEMENT_POINTS] * crossing.REFINEMENTS


def _search_peaks(rows_dtype: torch.dtype, weight_decay: float) -> tuple[int, int]:
    """The bytes allocated at most while a search runs on weights of :data:`SIZES` whose branch gradients are the rows
    of one ``[2, n]`` buffer of ``rows_dtype`` (as the one pass's single piece), AdamW with state: its first step
    (the workspace made then) and its second (the workspace kept)."""
    torch.manual_seed(0)
    parameters = [torch.nn.Parameter(torch.randn(n)) for n in SIZES]
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=weight_decay)
    for p in parameters:
        p.grad = torch.randn_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    rows = torch.randn(2, sum(SIZES)).to(rows_dtype)
    winner, loser = (list(torch.split(row, SIZES)) for row in rows)
    workspace = UpdateWorkspace()

    def search() -> None:
        update = update_space.OptimizerUpdate(optimizer, parameters, winner, loser, 1.0, workspace=workspace)
        update_space.update_space_lambda(update, 0.5, 1.0)

    return step_peak_bytes(search), step_peak_bytes(search)


@pytest.mark.parametrize(
    ("rows_dtype", "weight_decay"), [(torch.bfloat16, 0.01), (torch.bfloat16, 0.0), (torch.float32, 0.01)]
)
def test_a_real_search_allocates_what_the_plan_counts(monkeypatch, rows_dtype: torch.dtype, weight_decay: float):
    """bf16 rows are copied to float32 for the search, float32 rows read where they lie; the workspace (temporaries,
    the largest run's moments and weights, the scales) is made at the first step and kept: the first step allocates
    the plan's ``kept + during``, the second its ``during``, within the search's few small tensors (lambdas, sums)."""
    monkeypatch.setattr(update_space, "CPU_CHUNK", CHUNK)  # runs and pieces at a test's size
    monkeypatch.setattr(update_space, "CPU_WORK", WORK)
    first, second = _search_peaks(rows_dtype, weight_decay)
    planned = model.update_search_bytes(
        sum(SIZES),
        max(SIZES),
        engine="ddp",
        num_processes=1,
        rows_bytes=rows_dtype.itemsize,
        per_branch=False,
        weight_decay=weight_decay != 0,
        chunk=CHUNK,
        work=WORK,
    )
    # the search's small tensors (lambdas, sums, scalars), whatever the weights' size: about 50 KB here, less than the
    # smallest term planned (the largest run's weights for a decay, 160 KB)
    slack = 48 * 1024
    assert abs(first - (planned.kept + planned.during)) <= 0.02 * first + slack, (first, planned)
    assert abs(second - planned.during) <= 0.02 * second + 2 * slack, (second, planned)


def test_the_estimate_holds_the_searchs_bytes_where_they_are_held() -> None:
    """SDXL full tuning, 2 pairs at 1024 px, checkpointed, cached latents, bf16, AdamW: the update space's step holds,
    after the backward, the other terms with the one pass's bf16 rows in place of the gradients, the search's copies
    and its workspace; at the activations' peak, the workspace beside them. The estimate is not below either, and it
    exceeds the parameter space's by the workspace at the least."""
    sizes = stored_model_sizes(SDXL)
    shape = RunShape(
        pairs=2, resolution=1024, dtype_bytes=2, optim="adamw_torch_fused", activation_checkpointing=True,
        latent_cache=True, safeguard="one_pass",
    )  # fmt: skip
    parameter = estimate_memory(sizes, shape)
    update = estimate_memory(sizes, replace(shape, update_space=True))
    terms = update.components
    trained = update.parameters["trained"]
    search = model.update_search_bytes(
        trained, sizes.counts.largest_tensor(), engine="ddp", num_processes=1, rows_bytes=2, per_branch=False
    )
    held = ("weights", "optimizer", "reference", "mixed_precision_cast", "frozen_parts")
    after_backward = sum(terms[name] for name in held) + 2 * 2 * trained + search.kept + search.during
    at_activations = sum(terms[name] for name in (*held, "activations")) + search.kept
    assert update.total_bytes >= after_backward
    assert update.total_bytes >= at_activations
    assert update.total_bytes - parameter.total_bytes >= search.kept
    for name in held + ("gradients", "activations"):
        assert terms[name] == parameter.components[name], name


def test_the_memory_page_states_the_searchs_bytes_as_planned() -> None:
    """docs/memory.md's safeguard row (and the estimate's docstring) quote the workspace of SD1.5's and SDXL's UNets
    (their largest tensors are alike), with and without a weight decay, and SDXL's float32 copy of the rows."""
    gib = 2**30
    kept = {}
    for name in (SD15, SDXL):
        counts = stored_model_sizes(name).counts
        for decay in (False, True):
            found = model.update_search_bytes(
                counts.parameters(), counts.largest_tensor(), engine="ddp", num_processes=1, rows_bytes=2,
                per_branch=False, weight_decay=decay,
            )  # fmt: skip
            kept.setdefault(decay, set()).add(f"{found.kept / gib:.2f} GiB")
    assert len(kept[False]) == len(kept[True]) == 1
    copy = 2 * 4 * stored_model_sizes(SDXL).counts.parameters() / gib
    row = next(
        line for line in (ROOT / "docs" / "memory.md").read_text().splitlines() if line.startswith("| safeguard")
    )
    without_decay = kept[False].pop()
    assert f"{without_decay} for SD1.5's or SDXL's UNet, {kept[True].pop()} with a decay" in row
    assert f"{without_decay} for SD1.5's or SDXL's UNet" in " ".join(estimate_module.__doc__.split())
    assert f"{copy:.1f} GiB for SDXL's UNet" in row
