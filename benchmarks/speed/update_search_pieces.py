"""The update space's eager search on a CPU by the size of a pass's pieces: the whole rule (``OptimizerUpdate`` and
the fixed schedule of 30 ``lambda``) on a UNet with SD1.5's block structure at small widths (3.2M weights in 684
tensors, full tuning; ``benchmarks/speed/host_time_lockstep.py``'s ``SD15_STRUCTURE``), AdamW after one real step,
``g_w`` and ``h_l`` as the one pass's flat buffer with the margin binding; main-thread CPU time, one thread, the median
of 5 after 2 warm-ups, per ``CPU_WORK`` (a pass's temporaries ``3 x work`` elements; a piece ``work / lambdas``).

    python benchmarks/speed/update_search_pieces.py \\
        --json benchmarks/results/update-space/cpu-update-search-pieces-sd15-structure.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

WORKS = {"whole 1M-element runs (the package's CPU_WORK)": 9 << 20, "32K-element pieces of 9 lambda": 9 << 15}


def measure(works: dict[str, int] = WORKS, repeats: int = 5, warmups: int = 2) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    from benchmarks.speed.host_time_lockstep import SD15_STRUCTURE
    from trl_diffusion_sdpo.safeguards import update_space
    from trl_diffusion_sdpo.safeguards.update_runs import UpdateWorkspace
    from trl_diffusion_sdpo.safeguards.update_space import OptimizerUpdate, update_space_lambda

    torch.set_num_threads(1)
    torch.manual_seed(0)
    params = list(UNet2DConditionModel(**SD15_STRUCTURE).parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    sizes = [p.numel() for p in params]
    flat = torch.randn(2, sum(sizes)) * 1e-3
    flat[1] -= 1.5 * flat[0]  # the loser partly opposed to the winner: the margin binds
    g_w = [v.view(p.shape) for v, p in zip(flat[0].split(sizes), params)]
    h_l = [v.view(p.shape) for v, p in zip(flat[1].split(sizes), params)]
    default = update_space.CPU_WORK
    rows = {}
    try:
        for label, work in works.items():
            update_space.CPU_WORK = work
            workspace = UpdateWorkspace()

            def step(workspace: UpdateWorkspace = workspace) -> tuple[float, float]:
                start = time.thread_time()
                update = OptimizerUpdate(optimizer, params, g_w, h_l, 1.0, kernel="pieces", workspace=workspace)
                lam, _ = update_space_lambda(update, 0.5)
                return time.thread_time() - start, lam.item()

            for _ in range(warmups):
                step()
            timed = [step() for _ in range(repeats)]
            rows[label] = {
                "cpu_work": work,
                "median_ms": round(statistics.median(t for t, _ in timed) * 1e3, 1),
                "ms": [round(t * 1e3, 1) for t, _ in timed],
                "lambda": timed[0][1],
            }
            print(label, rows[label], flush=True)
    finally:
        update_space.CPU_WORK = default
    return {
        "what": __doc__.split("\n\n")[0].replace("\n", " "),
        "weights": sum(sizes),
        "tensors": len(params),
        "rows": rows,
        "load": f"load average {os.getloadavg()[0]:.1f} at the end (2 CPU cores shared with other work: not idle)",
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None)
    opts = parser.parse_args(argv)
    result = measure()
    if opts.json:
        Path(opts.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
