"""The update-space safeguard's ``lambda`` search before and after brackets replaced the grid, side by side.

Not part of the test suite. CPU, one thread. The synthetic problem: 12.38M float32 weights (four 1280x1280, six
320x320x9, 300 of 1000 elements), a fused ``torch.optim.AdamW`` (lr 1e-4) after steps of random gradients,
``g_w ~ 1e-3 N(0, 1)`` and ``h_l = -conflict g_w + 1e-3 N(0, 1)`` as the rows of one flat ``[2, total]``
buffer (as the one pass hands them), clipping at 1.0. Three cases:

* ``shortcut``: conflict 0.5, ``mu = 0.5``, one step of N(0, 1) gradients before: ``D(max_lambda)`` meets the
  target, so there is no search;
* ``binding``: conflict 3.0, ``mu = 0.5``, the same state: ``h_l`` strongly opposes ``g_w``, ``D(max_lambda)``
  misses the target and the search runs (a state of one step of much larger gradients: ``D`` far from linear);
* ``binding_warm``: the same gradients after 20 steps of gradients of their own scale (``1e-3 N(0, 1)``).

Three implementations, interleaved repeat by repeat (median and minimum over ``--repeats`` of the process CPU time
of each call, which counts our work on a shared machine, and the wall time):

* ``before``: ``trl_diffusion_sdpo/step/update_space.py`` at ``--before`` (the commit before the change; read with
  ``git show`` and imported from a temporary file): its ``OptimizerUpdate`` and its 9-point grid and 8 bisections;
* ``after``: the working tree's module;
* ``grid_search_on_new_passes``: the old search (kept below as :func:`_grid_bisection_search`) on the new
  ``OptimizerUpdate``: the search's share of the gain apart from the passes'.

Per case: ``OptimizerUpdate.__init__``, the search, their sum, the passes and the ``lambda``s per pass, and the
``lambda`` returned, with checks of the new one (``D(lambda) >= target``, ``D(hi) < target`` with ``hi`` one
resolution above, agreement with the old within the resolution). Also one evaluation pass of ``k`` lambdas before
and after.

    python benchmarks/speed/update_search.py --json benchmarks/results/update-space/cpu-update-search-12m.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the package and benchmarks.harness

import torch  # noqa: E402

from benchmarks.harness import machine_description  # noqa: E402
from trl_diffusion_sdpo.safeguards import update_space as after  # noqa: E402

MODULE = "trl_diffusion_sdpo/step/update_space.py"
BEFORE = "0d0a5c5"  # the last commit with the grid-and-bisection search
SIZES = [1280 * 1280] * 4 + [320 * 320 * 9] * 6 + [1000] * 300
CASES = {  # conflict, mu, AdamW steps before, their gradients' scale
    "shortcut": (0.5, 0.5, 1, 1.0),
    "binding": (3.0, 0.5, 1, 1.0),
    "binding_warm": (3.0, 0.5, 20, 1e-3),
}


def _grid_bisection_search(update, mu: float, max_lambda: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The search before the change, for reference: 9 grid points (``D(0)``, ``D(max)`` first, the shortcut), then 8
    bisections from the largest satisfying grid point (17 evaluations in 10 passes when the margin binds)."""
    device = update.device
    grid = torch.linspace(0.0, max_lambda, 9, device=device, dtype=update.sum_dtype)
    first, last_point = update.winner_decreases(grid[[0, -1]]).unbind()
    target = mu * first.clamp(min=0)
    if bool(last_point >= target):
        return grid[-1].detach().float(), torch.zeros((), device=device)
    inner = update.winner_decreases(grid[1:-1])
    decrease = torch.cat([first.reshape(1), inner, last_point.reshape(1)])
    last = torch.where(decrease >= target, torch.arange(9, device=device), -1).max()
    lo, hi = grid[last.clamp(min=0)], grid[(last + 1).clamp(max=8)]
    for _ in range(8):
        mid = (lo + hi) / 2
        ok = update.winner_decreases(mid.reshape(1))[0] >= target
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    infeasible = last < 0
    return torch.where(infeasible, grid[decrease.argmax()], lo).detach().float(), infeasible.float()


def load_before(ref: str):
    """The module as it was at ``ref`` (it imports nothing of the package, so it loads from a file of its own)."""
    source = subprocess.run(["git", "show", f"{ref}:{MODULE}"], cwd=ROOT, check=True, capture_output=True, text=True)
    path = Path(tempfile.mkdtemp()) / "update_space_before.py"
    path.write_text(source.stdout)
    spec = importlib.util.spec_from_file_location("update_space_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def problem(conflict: float, warm_steps: int, history_scale: float = 1.0, seed: int = 0):
    """Weights, a fused AdamW after ``warm_steps`` steps of gradients ``history_scale N(0, 1)``, and ``(g_w, h_l)``
    as rows of one flat buffer."""
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(n) * 0.02) for n in SIZES]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    for _ in range(warm_steps):
        for p in params:
            p.grad = torch.randn_like(p) * history_scale
        optimizer.step()
    flat = torch.empty(2, sum(SIZES))
    winner, loser = list(flat[0].split(SIZES)), list(flat[1].split(SIZES))
    for w, h in zip(winner, loser):
        w.copy_(torch.randn_like(w) * 1e-3)
        h.copy_(-conflict * w + torch.randn_like(w) * 1e-3)
    return optimizer, params, winner, loser


def counted(update) -> list[int]:
    """Lambdas per evaluation pass of ``update`` from now on."""
    passes: list[int] = []
    evaluate = update.decreases

    def wrapper(points: list[float]) -> list[float]:
        passes.append(len(points))
        return evaluate(points)

    update.decreases = wrapper
    return passes


def clock(fn: Callable[..., Any], *args: Any) -> tuple[Any, float, float]:
    """``fn(*args)``, its process CPU time and its wall time."""
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn(*args)
    return out, time.process_time() - cpu, time.perf_counter() - wall


def summary(values: list[float]) -> dict[str, float]:
    return {"median_ms": 1e3 * statistics.median(values), "min_ms": 1e3 * min(values)}


def run_case(before, conflict: float, mu: float, warm_steps: int, history_scale: float, args) -> dict[str, Any]:
    optimizer, params, winner, loser = problem(conflict, warm_steps, history_scale)
    variants = {
        "before": (before.OptimizerUpdate, before.update_space_lambda),
        "after": (after.OptimizerUpdate, after.update_space_lambda),
        "grid_search_on_new_passes": (after.OptimizerUpdate, _grid_bisection_search),
    }
    times = {name: {"init_cpu": [], "search_cpu": [], "total_cpu": [], "search_wall": []} for name in variants}
    out: dict[str, Any] = {}
    for repeat in range(args.repeats + 1):  # the first repeat warms up and is not counted
        order = list(variants) if repeat % 2 else list(reversed(variants))
        for name in order:
            build, search = variants[name]
            update, init_cpu, _ = clock(build, optimizer, params, winner, loser, 1.0)
            passes = counted(update)
            (lam, infeasible), search_cpu, search_wall = clock(search, update, mu)
            if repeat == 0:
                out[name] = {"lambda": lam.item(), "infeasible": infeasible.item(), "lambdas_per_pass": passes}
                continue
            for key, value in (("init_cpu", init_cpu), ("search_cpu", search_cpu), ("search_wall", search_wall)):
                times[name][key].append(value)
            times[name]["total_cpu"].append(init_cpu + search_cpu)
    for name in variants:
        out[name]["passes"] = len(out[name]["lambdas_per_pass"])
        out[name]["lambdas"] = sum(out[name]["lambdas_per_pass"])
        out[name].update({key: summary(values) for key, values in times[name].items()})
    # the new lambda against the specification, with the new module's D
    update = after.OptimizerUpdate(optimizer, params, winner, loser, 1.0)
    lam, resolution = out["after"]["lambda"], after.RESOLUTION
    d0, d_lam, d_above = update.winner_decreases(torch.tensor([0.0, lam, lam + resolution], dtype=torch.float64))
    target = mu * max(float(d0), 0.0)
    out["checks"] = {
        "target": target,
        "d_at_lambda": float(d_lam),
        "d_one_resolution_above": float(d_above),
        "meets_target": bool(d_lam >= target),
        "misses_one_resolution_above": bool(d_above < target) or lam == 1.0,
        "abs_difference_to_before": abs(lam - out["before"]["lambda"]),
        "within_resolution_of_before": abs(lam - out["before"]["lambda"]) <= resolution,
    }
    for key in ("search_cpu", "total_cpu"):
        out[f"speedup_{key}"] = out["before"][key]["median_ms"] / out["after"][key]["median_ms"]
    return out


def run_passes(before, args) -> dict[str, Any]:
    """One evaluation pass of ``k`` lambdas, before and after, interleaved."""
    conflict, _, warm_steps, history_scale = CASES["binding"]
    optimizer, params, winner, loser = problem(conflict, warm_steps, history_scale)
    updates = {
        "before": before.OptimizerUpdate(optimizer, params, winner, loser, 1.0),
        "after": after.OptimizerUpdate(optimizer, params, winner, loser, 1.0),
    }
    rows: dict[str, Any] = {}
    for k in args.pass_lambdas:
        lams = torch.linspace(0, 1, k, dtype=torch.float64)
        cpu: dict[str, list[float]] = {name: [] for name in updates}
        for repeat in range(args.repeats + 1):
            for name, update in updates.items() if repeat % 2 else reversed(updates.items()):
                _, seconds, _ = clock(update.winner_decreases, lams)
                if repeat:
                    cpu[name].append(seconds)
        rows[f"lambdas={k}"] = {name: summary(values) for name, values in cpu.items()}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default=BEFORE, help="the git revision of the search before the change")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--pass-lambdas", type=int, nargs="*", default=[1, 2, 3, 7])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    before = load_before(args.before)
    report: dict[str, Any] = {
        "machine": {**machine_description("cpu", 1), "load_average_at_start": list(os.getloadavg())},
        "settings": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "weights": sum(SIZES),
            "max_grad_norm": 1.0,
            "resolution": after.RESOLUTION,
            "cases": {
                name: {"conflict": c, "mu": mu, "warm_steps": steps, "history_scale": scale}
                for name, (c, mu, steps, scale) in CASES.items()
            },
        },
        "cases": {},
    }
    for name, case in CASES.items():
        report["cases"][name] = row = run_case(before, *case, args)
        old, new = row["before"], row["after"]
        print(
            f"{name}: search {old['search_cpu']['median_ms']:.1f} -> {new['search_cpu']['median_ms']:.1f} ms CPU "
            f"({old['passes']} passes / {old['lambdas']} lambdas -> {new['passes']} / {new['lambdas']}), init "
            f"{old['init_cpu']['median_ms']:.1f} -> {new['init_cpu']['median_ms']:.1f} ms; old search on new passes "
            f"{row['grid_search_on_new_passes']['search_cpu']['median_ms']:.1f} ms; checks {row['checks']}",
            flush=True,
        )
    report["passes"] = run_passes(before, args)
    print(json.dumps(report["passes"], indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
