"""On a CUDA device: the update space's rule (``OptimizerUpdate`` and ``update_space_lambda``) and the parameter
space's ``lambda`` make no host sync, agree with the CPU, and what the search's fixed schedule costs.

Not part of the test suite. For fused AdamW (step counts on the device), foreach AdamW (step counts on the CPU) and
SGD with momentum, on small weights in two optimizer groups with one weight a step behind, the margin binding
(conflict 3.0) and not (0.5): the rule runs twice (a fresh workspace, then the kept one, as the trainer keeps it)
under ``torch.cuda.set_sync_debug_mode("error")``, which raises at any synchronizing CUDA call (``.item()``, a copy
to the host, a copy from pageable host memory); its ``lambda`` beside the CPU's on the same problem. Then the cost on
860M float32 weights (64 tensors of 3277 x 4096, SD1.5's trainable count) with fused AdamW state: the whole rule
(four passes, 30 ``lambda``), one pass of 2 and of 9 ``lambda``, and the fused AdamW step, best of 5 after 2 warm-ups.

    python benchmarks/speed/update_search_sync.py   (on a CUDA machine; writes $OUT/gpu-check.json or /tmp/)
"""

import json
import os
import sys
import time
import traceback

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
import torch  # noqa: E402

from trl_diffusion_sdpo.safeguards.parameter import parameter_space_lambda  # noqa: E402
from trl_diffusion_sdpo.safeguards.update_runs import UpdateWorkspace  # noqa: E402
from trl_diffusion_sdpo.safeguards.update_space import OptimizerUpdate, update_space_lambda  # noqa: E402

out = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name()}
dev = torch.device("cuda")


def problem(kind, device, shapes, seed=0, conflict=3.0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype).to(device)) for s in shapes]
    groups = [{"params": params[::2]}, {"params": params[1::2], "lr": 3e-3, "weight_decay": 0.0}]
    if kind == "sgd":
        opt = torch.optim.SGD(groups, lr=0.05, momentum=0.9, weight_decay=0.01)
    else:
        opt = torch.optim.AdamW(
            groups,
            lr=1e-2,
            betas=(0.9, 0.99),
            eps=1e-6,
            weight_decay=0.05,
            fused=kind == "adamw-fused",
            foreach=kind == "adamw-foreach",
        )
    for step in range(3):
        for i, p in enumerate(params):
            p.grad = (
                None if (i == 3 and step == 0) else 0.3 * torch.randn(p.shape, generator=gen, dtype=dtype).to(device)
            )
        opt.step()
    sizes = [p.numel() for p in params]
    flat = torch.empty(2, sum(sizes), dtype=dtype, device=device)
    g_w = [v.view(s) for v, s in zip(flat[0].split(sizes), shapes)]
    h_l = [v.view(s) for v, s in zip(flat[1].split(sizes), shapes)]
    for w, h in zip(g_w, h_l):
        w.copy_(0.5 * torch.randn(w.shape, generator=gen, dtype=dtype).to(device))
        h.copy_(-conflict * w + 0.5 * torch.randn(w.shape, generator=gen, dtype=dtype).to(device))
    return params, opt, g_w, h_l


SMALL = [(40, 30), (7,), (3, 2, 2), (300,), (5,), (1,), (64, 9)]
checks = {}
for kind in ("adamw-fused", "adamw-foreach", "sgd"):
    row = {}
    try:
        for conflict in (0.5, 3.0):
            params, opt, g_w, h_l = problem(kind, dev, SMALL, conflict=conflict)
            unscale = torch.tensor(0.5, device=dev)
            mu = torch.tensor(0.9, device=dev)
            workspace = UpdateWorkspace()
            for _ in range(2):  # the second with the workspace kept, as the trainer keeps it
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    update = OptimizerUpdate(opt, params, g_w, h_l, 2.0, unscale=unscale, workspace=workspace)
                    lam, infeasible = update_space_lambda(update, mu)
                    lam_p = parameter_space_lambda(update.ww, update.wl, mu)
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            cpu = problem(kind.replace("-fused", "-foreach"), "cpu", SMALL, conflict=conflict)
            lam_c, inf_c = update_space_lambda(OptimizerUpdate(cpu[1], cpu[0], cpu[2], cpu[3], 2.0, unscale=0.5), 0.9)
            row[f"conflict {conflict}"] = {
                "lambda_gpu": lam.item(),
                "lambda_cpu": lam_c.item(),
                "infeasible": infeasible.item(),
                "parameter_lambda": lam_p.item(),
            }
        row["no_sync"] = True
    except Exception as e:  # noqa: BLE001
        row["error"] = "".join(traceback.format_exception(e))[-3000:]
    checks[kind] = row
out["checks"] = checks
print(json.dumps(checks, indent=1), flush=True)

# cost: the rule on ~SD1.5-sized full tuning (860M elements in 686 tensors of SD1.5's sizes is too slow to build;
# use 64 tensors of 13.4M = 860M), fused AdamW, against the fused AdamW step itself
try:
    shapes = [(3277, 4096)] * 64
    params, opt, g_w, h_l = problem("adamw-fused", dev, shapes, conflict=3.0)
    unscale, mu = torch.tensor(1.0, device=dev), torch.tensor(0.5, device=dev)

    workspace = UpdateWorkspace()

    def rule():
        update = OptimizerUpdate(opt, params, g_w, h_l, 1.0, unscale=unscale, workspace=workspace)
        return update_space_lambda(update, mu)

    def one_pass(k):
        update = OptimizerUpdate(opt, params, g_w, h_l, 1.0, unscale=unscale, workspace=workspace)
        return lambda: update.decreases(torch.linspace(0, 1, k, device=dev))

    def step():
        for p, w in zip(params, g_w):
            p.grad = w
        opt.step()

    timings = {}
    for name, fn in (
        ("rule", rule),
        ("adamw_step", step),
        ("pass_2_lambdas", one_pass(2)),
        ("pass_9_lambdas", one_pass(9)),
    ):
        for _ in range(2):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            fn()
            host = time.perf_counter() - start
            torch.cuda.synchronize()
            times.append((host, time.perf_counter() - start))
        timings[name] = {"host_ms": min(t[0] for t in times) * 1e3, "wall_ms": min(t[1] for t in times) * 1e3}
    timings["elements"] = sum(p.numel() for p in params)
    timings["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    out["cost"] = timings
except Exception as e:  # noqa: BLE001
    out["cost"] = {"error": "".join(traceback.format_exception(e))[-3000:]}
print(json.dumps(out.get("cost"), indent=1), flush=True)
with open(os.path.join(os.environ.get("OUT", "/tmp"), "gpu-check.json"), "w") as f:
    json.dump(out, f, indent=1)
