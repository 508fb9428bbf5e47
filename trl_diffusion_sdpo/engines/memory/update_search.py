"""What the update space's search holds beyond the one pass's rows (``safeguards/update_space.py``,
``safeguards/update_runs.py``): the estimate's ``safeguard`` term for ``safeguard_space: update``.

The search reads the trained weights in runs of consecutive weights (at most :data:`DEVICE_CHUNK` elements on an
accelerator, a larger tensor a run of its own) and keeps, in float32 (the wider of the rows' dtype and float32):

* across steps, in its workspace (``UpdateWorkspace``): a pass's temporaries, ``3 x lambdas x piece`` elements with
  ``piece = min(largest run, DEVICE_WORK / lambdas)`` (the grid pass's :data:`GRID_POINTS` lambdas, or a refinement's
  :data:`REFINEMENT_POINTS`, whichever takes more: the eager passes', kept in the plan where a compiled kernel would
  evaluate a run without them, as its fallback needs them); the largest run's two Adam moments (SGD: its momentum),
  copied in by one foreach call each; its weights where a weight decay reads them (AdamW's decoupled term, Adam's or
  SGD's L2); and, for a run of several weights, each element's two Adam scales (``eps / kappa`` and the step's
  factor times ``g_w``), kept for the last run and formed beside it for the next (through an int64 index of its
  elements);
* during the search only, each run's ``[g_w; h_l]`` as one float32 ``[2, n]`` tensor where the gradients are not
  already float32 rows of one buffer: a copy of the one pass's bf16 rows under bf16 autocast, a stacked copy of the
  per-branch passes' two flat buffers, on FSDP2's per-branch shards also the loser's ``.grad - g_w``, and under
  DeepSpeed ZeRO the winner's and loser's gradients cut into the optimizer's float32 partitions and stacked again.

The constants are the search's own (``tests/memory/test_update_search.py`` ties them to ``safeguards/`` and checks
these bytes against the buffers a real search holds).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "DEVICE_CHUNK",
    "DEVICE_WORK",
    "GRID_POINTS",
    "REFINEMENT_POINTS",
    "UpdateSearchBytes",
    "update_search_bytes",
]

#: elements per run of consecutive weights on an accelerator (``update_space.DEVICE_CHUNK``)
DEVICE_CHUNK = 1 << 23
#: elements a pass's temporaries span per row on an accelerator (``update_space.DEVICE_WORK``)
DEVICE_WORK = 3 * DEVICE_CHUNK
#: the lambdas of the grid pass and of each refinement pass (``crossing.GRID_POINTS``, ``SUBDIVISIONS - 1``)
GRID_POINTS = 9
REFINEMENT_POINTS = 7
_FLOAT32 = 4


@dataclass(frozen=True)
class UpdateSearchBytes:
    """The search's bytes per process: ``kept`` from the first step on (its workspace, held through the forward and
    backward too), ``during`` only while it runs, after the backward (the float32 copies of the branches' gradients
    and the next run's scales)."""

    kept: int
    during: int


def update_search_bytes(
    trained: int,
    largest_tensor: int,
    *,
    engine: str,
    num_processes: int,
    rows_bytes: int,
    per_branch: bool,
    adam: bool = True,
    weight_decay: bool = False,
    chunk: int = DEVICE_CHUNK,
    work: int = DEVICE_WORK,
) -> UpdateSearchBytes:
    """What the update space's search over ``trained`` weights (``largest_tensor`` the largest trained tensor's
    elements) holds per process under ``engine`` on ``num_processes``: ``rows_bytes`` is the bytes per element of the
    one pass's rows (2 under bf16/fp16 autocast: copied to float32), ``per_branch`` the per-branch passes' store
    instead (two flat float32 buffers, stacked per run); ``adam`` AdamW or Adam (else SGD); ``weight_decay`` whether
    the run decays its weights. ``chunk`` and ``work``: the search's run and workspace sizes (an accelerator's)."""
    n = max(1, num_processes)
    zero = engine.startswith("zero")
    if zero:  # the optimizer's flat float32 partitions are its weights: one run each
        local = -(-trained // n)
        largest = local
    else:
        local = -(-trained // n) if engine == "fsdp2" else trained
        shard = -(-largest_tensor // n) if engine == "fsdp2" else largest_tensor
        largest = max(min(chunk, local), shard)
    if zero:  # g_w and h_l cut into the partitions' layout (float32), then stacked per run
        copies = 2 * 2 * _FLOAT32 * local
    elif per_branch:  # the two flat buffers stacked per run; on shards the loser's .grad - g_w first
        copies = 2 * _FLOAT32 * local + (_FLOAT32 * local if engine == "fsdp2" else 0)
    else:  # the one pass's rows: viewed where float32, copied from a narrower dtype
        copies = 2 * _FLOAT32 * local if rows_bytes != _FLOAT32 else 0
    moments = (2 if adam else 1) * _FLOAT32 * largest
    decay = _FLOAT32 * largest if weight_decay else 0
    if not adam:  # SGD: four sums read once, no pass per lambda
        return UpdateSearchBytes(moments + decay, copies)
    temporaries = 3 * _FLOAT32 * max(count * min(largest, work // count) for count in (GRID_POINTS, REFINEMENT_POINTS))
    # a run of several weights (never a ZeRO partition) expands its per-weight scales over its elements: the last
    # run's kept, the next one's formed beside them through an int64 index of its elements
    several = 0 if zero else min(chunk, local)
    scales = 2 * _FLOAT32 * several
    return UpdateSearchBytes(temporaries + moments + decay + scales, copies + scales + 8 * several)
