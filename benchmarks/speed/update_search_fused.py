"""What a fused evaluation of the update space's ``D`` would cost on a CUDA device: Adam's share of ``D`` for ``k``
lambdas as one ``torch.compile``d function per weight (reading the branch rows and the moments once for all its
lambdas, float32 partial sums over blocks of 4096 added in float64), against the package's eager pass
(``OptimizerUpdate.decreases``), on 860M float32 weights (64 tensors of 3277 x 4096) with fused AdamW state; best of
5 after 2 warm-ups, and the fused AdamW step for scale. Not part of the test suite; the package does not use it.

    python benchmarks/speed/update_search_fused.py   (on a CUDA machine; writes $OUT/fused.json or /tmp/)
"""

import json
import os
import sys
import time

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
import torch

from trl_diffusion_sdpo.safeguards.update_runs import UpdateWorkspace
from trl_diffusion_sdpo.safeguards.update_space import OptimizerUpdate

dev = torch.device("cuda")
n_t, shape = 64, (3277, 4096)
params = [torch.nn.Parameter(torch.randn(shape, device=dev)) for _ in range(n_t)]
opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
for p in params:
    p.grad = torch.randn_like(p) * 1e-3
opt.step()
flat = torch.randn(2, n_t * shape[0] * shape[1], device=dev) * 1e-3
g_w = list(flat[0].view(n_t, *shape).unbind())
h_l = list(flat[1].view(n_t, *shape).unbind())
ws = UpdateWorkspace()
update = OptimizerUpdate(opt, params, g_w, h_l, 1.0, unscale=torch.tensor(1.0, device=dev), workspace=ws)


def piece(st, rows, first, second, weights, c1: float, inv_c2: float, eps: float):
    g = st[:, 0:1] * rows[0] + st[:, 1:2] * rows[1]
    num = g + c1 * first
    den = torch.sqrt(second + g * g * inv_c2) + eps
    return (num / den * weights).view(st.shape[0], -1, 4096).sum(-1).sum(-1, dtype=torch.float64)


fused = torch.compile(piece, dynamic=False)
firsts = [opt.state[p]["exp_avg"].view(-1) for p in params]
seconds = [opt.state[p]["exp_avg_sq"].view(-1) for p in params]
rows = [flat[:, i * shape[0] * shape[1] : (i + 1) * shape[0] * shape[1]] for i in range(n_t)]


def fused_pass(k):
    st = torch.rand(k, 2, device=dev)
    return torch.stack([fused(st, r, f, s, r[0], 9.0, 1 / 999.0, 1e-8) for r, f, s in zip(rows, firsts, seconds)]).sum(
        0
    )


def eager_pass(k):
    return update.decreases(torch.linspace(0, 1, k, device=dev))


out = {}
for name, fn in (("eager", eager_pass), ("fused", fused_pass)):
    for k in (2, 9, 30):
        for _ in range(2):
            fn(k)
        torch.cuda.synchronize()
        ts = []
        for _ in range(5):
            t = time.perf_counter()
            fn(k)
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t)
        out[f"{name}_{k}_lambdas_ms"] = min(ts) * 1e3
        print(name, k, out[f"{name}_{k}_lambdas_ms"], flush=True)
for _ in range(2):
    opt.step()
torch.cuda.synchronize()
ts = []
for _ in range(5):
    t = time.perf_counter()
    opt.step()
    torch.cuda.synchronize()
    ts.append(time.perf_counter() - t)
out["adamw_step_ms"] = min(ts) * 1e3
print(json.dumps(out, indent=1))
json.dump(out, open(os.path.join(os.environ.get("OUT", "/tmp"), "fused.json"), "w"), indent=1)
