"""Small update-space problems with counted passes."""

from __future__ import annotations

import torch

from trl_diffusion_sdpo.safeguards.update_space import OptimizerUpdate


def _counted(update: OptimizerUpdate) -> list[int]:
    """The number of lambdas of each evaluation pass of ``update`` from now on."""
    passes: list[int] = []
    evaluate = update.decreases

    def counted(points: list[float]) -> list[float]:
        passes.append(len(points))
        return evaluate(points)

    update.decreases = counted
    return passes


def _grouped_problem(kind: str, seed: int, conflict: float):
    """Weights of many sizes in two optimizer groups (another learning rate and weight decay), one weight a step
    behind the others (another bias correction), warmed state; ``g_w``, ``h_l`` in float64 as views of one flat
    buffer ``[2, total]``, as the one pass hands them over."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(40, 30), (7,), (3, 2, 2), (300,), (5,), (1,), (64, 9)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in shapes]
    groups = [{"params": params[::2]}, {"params": params[1::2], "lr": 3e-3, "weight_decay": 0.0}]
    if kind.startswith("sgd"):
        optimizer = torch.optim.SGD(groups, lr=0.05, momentum=0.9, nesterov=kind == "sgd-nesterov", weight_decay=0.01)
    else:
        cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
        optimizer = cls(groups, lr=1e-2, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05)
    for step in range(3):
        for i, p in enumerate(params):
            p.grad = None if (i == 3 and step == 0) else 0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype)
        optimizer.step()
    sizes = [p.numel() for p in params]
    flat = torch.empty(2, sum(sizes), dtype=torch.float64)
    g_w = [v.view(s) for v, s in zip(flat[0].split(sizes), shapes)]
    h_l = [v.view(s) for v, s in zip(flat[1].split(sizes), shapes)]
    for w, h in zip(g_w, h_l):
        w.copy_(0.5 * torch.randn(w.shape, generator=gen, dtype=w.dtype))
        h.copy_(-conflict * w + 0.5 * torch.randn(w.shape, generator=gen, dtype=w.dtype))
    return params, optimizer, g_w, h_l
