"""Does the winner's term rise after one small step? Diffusion-DPO vs the output-space and parameter-space safeguards.

For each of many random batches, from the reference and from a policy drifted by some Diffusion-DPO steps, this
takes one small plain-SGD step along each rule's gradient ``g = g_w + lambda * h_l`` (``lambda = 1``: Diffusion-DPO;
the authors' output-space ``lambda``; the exact parameter-space ``lambda``) and measures the change of the quantity
the exact rule guarantees: the loss's winner term ``W(theta) = sum_i a_i e_w,i(theta)`` with its coefficients
``a_i = dL/de_w,i`` held at the starting point (at the reference, where ``u = 0``, ``W`` is a positive multiple of
the batch's mean winner error). Everything runs in float64.

The tolerance is second order and measured, not assumed. With ``eta`` the step and ``g`` its direction,
``W(theta - eta g) - W(theta) = -eta <g_w, g> + (eta^2 / 2) g^T H g + O(eta^3)``. The second central difference
``C = W(theta + eta g) - 2 W(theta) + W(theta - eta g)`` equals ``eta^2 g^T H g + O(eta^4)`` and the odd part
``R3 = (W(theta - eta g) - W(theta + eta g)) / 2 + eta <g_w, g>`` is the third-order remainder. Since the exact rule
makes ``-eta <g_w, g> <= -eta mu |g_w|^2 <= 0``, its change must satisfy
``dW <= tol = max(C / 2, 0) + 2 |R3| + rounding``, where rounding covers float64 evaluation of ``W`` and the float32
``lambda`` (a few ulps of it shift the first-order term; at ``mu = 0`` the first-order margin is otherwise zero).
A rise beyond ``tol`` under ``"parameter"`` would be a bug; the same count under ``"output"`` and Diffusion-DPO says
how often those rules let the winner's term rise.

One AdamW step (first step, from fresh moments: a sign-like update) is reported too; the bound does not cover it.

``Setting(adamw=True)`` (``--adamw``) measures every rule under a real ``torch.optim.AdamW`` step instead (``*@adamw``
rows): moments warmed by ``adamw_warm`` Diffusion-DPO gradients at the starting point (learning rate 0 while warming,
so the weights stay), weight decay 0.01, gradients clipped at norm 1 as the trainer does, then one step of ``adamw_lr``
with each rule's gradient; ``update@adamw`` is ``safeguard_space="update"``
(:mod:`trl_diffusion_sdpo.safeguards.update_space`), which chooses ``lambda`` on this very update. The tolerance is
measured the same way along the update ``Delta``: ``C = W(theta + Delta) - 2 W(theta) + W(theta - Delta)``,
``R3 = (W(theta + Delta) - W(theta - Delta)) / 2 - <g_w, Delta>``, plus float32 rounding of the rule's own
evaluation (``64 eps32 sum |g_w * Delta|``).

``model`` (``--model``) names a tiny flow-matching transformer to run the same check on (``sd3``, ``flux``,
``flux-kontext``, ``qwen-image``, ``qwen-image-edit``, ``qwen-image-edit-plus``, ``qwen-image-2.1``, ``z-image``,
``wan``, ``flux2``, ``flux2-klein``, ``hunyuan-video-1.5``): SD3's MMDiT, FLUX's double/single-stream blocks with
packed latents and the guidance embedding, FLUX.1 Kontext's and Qwen-Image-Edit's (and Plus) with a random source
image's latents beside the target's, Qwen-Image's MMDiT with 3-axis RoPE, Qwen-Image 2.1's single-stream block-causal
transformer on unpatched latents, Z-Image's single-stream blocks with reversed time and negated output, Wan's 3D
transformer on video latents ``[16, 2, 4, 4]``, FLUX.2's transformer on 2x2-patchified latents with 4-axis RoPE and,
for [dev], the guidance embedding, HunyuanVideo 1.5's 3D transformer on video latents ``[4, 2, 4, 4]`` with Qwen2.5-VL
and ByT5 rows and the zero image conditioning. Each is called through the model family as the trainer calls it: pairs
are noised as ``x_s = (1 - s) z + s eps`` with ``s = sigmoid(N(0, 1))`` shared by the pair, the target is the velocity
``eps - z`` of each image, and the command line's ``--beta`` defaults to 100 (flow_grpo's Flow-DPO) there.

The command line that writes the result files: ``benchmarks/studies/safeguard_exactness.py``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.func import functional_call

from trl_diffusion_sdpo.families import family_for_pipeline
from trl_diffusion_sdpo.safeguards.output import winner_preserving_lambda
from trl_diffusion_sdpo.safeguards.parameter import parameter_space_lambda
from trl_diffusion_sdpo.safeguards.update_space import OptimizerUpdate, update_space_lambda
from trl_diffusion_sdpo.testing import (
    build_tiny_flux2_klein_pipeline,
    build_tiny_flux2_pipeline,
    build_tiny_flux_kontext_pipeline,
    build_tiny_flux_pipeline,
    build_tiny_hunyuan_video15_pipeline,
    build_tiny_qwen_image21_pipeline,
    build_tiny_qwen_image_edit_pipeline,
    build_tiny_qwen_image_edit_plus_pipeline,
    build_tiny_qwen_image_pipeline,
    build_tiny_sd3_pipeline,
    build_tiny_sd_pipeline,
    build_tiny_wan_pipeline,
    build_tiny_z_image_pipeline,
)

RULES = ("dpo", "output", "parameter", "pair", "parameter_adamw", "dpo_adamw")
ADAMW_RULES = ("dpo@adamw", "output@adamw", "parameter@adamw", "pair@adamw", "update@adamw")


@dataclass
class Setting:
    batches: int = 100
    pairs: int = 4
    beta: float = 5000.0
    mu: float = 0.5
    step_norm: float = 1e-3  # parameter-space length of the SGD step
    adamw_lr: float = 1e-6
    drift_steps: int = 20
    drift_lr: float = 1e-4
    seed: int = 0
    adamw: bool = False  # measure under a warmed real AdamW step (ADAMW_RULES) instead of RULES
    adamw_warm: int = 5
    max_grad_norm: float = 1.0


@dataclass
class Counts:
    rose: int = 0  # dW > tolerance
    rose_at_all: int = 0  # dW > 0
    total: int = 0
    lambdas: list[float] = field(default_factory=list)
    worst_excess: float = -math.inf  # max over batches of (dW - tol) / |first-order decrease scale|
    changes: list[float] = field(default_factory=list)  # dW per batch: what the step did to the winner term


def _unet(pipeline_dir: str | None) -> torch.nn.Module:
    if pipeline_dir is None:
        pipe = build_tiny_sd_pipeline(seed=0)
        return pipe.unet
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet")


MODELS = (
    "unet", "sd3", "flux", "flux-kontext", "qwen-image", "qwen-image-edit", "qwen-image-edit-plus", "z-image", "wan",
    "flux2", "flux2-klein", "hunyuan-video-1.5", "qwen-image-2.1",
)  # fmt: skip
_FLOW_BUILDERS = {
    "sd3": build_tiny_sd3_pipeline,
    "flux": build_tiny_flux_pipeline,
    "flux-kontext": build_tiny_flux_kontext_pipeline,
    "qwen-image-edit": build_tiny_qwen_image_edit_pipeline,
    "qwen-image-edit-plus": build_tiny_qwen_image_edit_plus_pipeline,
    "qwen-image": build_tiny_qwen_image_pipeline,
    "z-image": build_tiny_z_image_pipeline,
    "wan": build_tiny_wan_pipeline,
    "flux2": build_tiny_flux2_pipeline,
    "flux2-klein": build_tiny_flux2_klein_pipeline,
    "hunyuan-video-1.5": build_tiny_hunyuan_video15_pipeline,
    "qwen-image-2.1": build_tiny_qwen_image21_pipeline,
}


def _flow_family(model: str):
    """A tiny flow pipeline's family (its transformer is the network under test)."""
    return family_for_pipeline(_FLOW_BUILDERS[model](seed=0))


class Problem:
    """A float64 denoiser (a UNet, or a flow transformer called through its family) as a function of its parameters,
    with random batches of noised pairs."""

    def __init__(self, unet: torch.nn.Module, setting: Setting, family=None) -> None:
        self.unet = unet.double().eval()
        self.setting = setting
        self.family = family  # None: the UNet and DDPM noising; a flow family: rectified-flow noising
        self.cond_rows = 8  # text tokens of the random conditioning
        self.names = [n for n, _ in unet.named_parameters()]
        self.reference = {n: p.detach().clone() for n, p in unet.named_parameters()}
        cfg = unet.config
        if family is None:
            self.latent_shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
            self.cross_dim = cfg.cross_attention_dim
        else:
            if family.video:  # [C, F', h, w] video latents, no pooled projection
                self.latent_shape = (family.latent_channels, 2, 4, 4)
                self.cross_dim, self.pooled_dim = cfg.get("text_dim"), None  # Wan: UMT5 conditioning
                if self.cross_dim is None:  # HunyuanVideo 1.5: 8 Qwen2.5-VL rows, then 8 ByT5 rows, in one tensor
                    family.pipeline.tokenizer_2_max_length = 8  # not the pipeline's 256: 8 text rows, as the others
                    self.cross_dim = max(cfg.text_embed_dim, cfg.text_embed_2_dim)
                    self.cond_rows = 16
            else:
                self.latent_shape = (family.latent_shape(64)[0], 8, 8)
                # the text width (Z-Image: cap_feat_dim, Qwen-Image 2.1: context_in_dim); a pooled projection only
                # where the transformer takes one
                self.cross_dim = cfg.get("joint_attention_dim") or cfg.get("cap_feat_dim") or cfg.get("context_in_dim")
                self.pooled_dim = cfg.get("pooled_projection_dim")
        self.alphas = torch.linspace(0.9999, 0.005, 1000, dtype=torch.float64)  # a smooth abar schedule

    def batch(self, gen: torch.Generator) -> dict[str, torch.Tensor]:
        n = self.setting.pairs
        shape = (n, *self.latent_shape)
        t = torch.randint(0, 1000, (n,), generator=gen)
        per_sample = (-1, *([1] * len(self.latent_shape)))
        abar = self.alphas[t].view(per_sample)
        z_w = torch.randn(shape, generator=gen, dtype=torch.float64)
        # Similar images, as a pair's are, with a loser that is sometimes the harder one to denoise: the case where
        # Diffusion-DPO's loser term raises the winner's error.
        scale = 0.7 + 0.9 * torch.rand(n, generator=gen, dtype=torch.float64).view(per_sample)
        z_l = scale * (z_w + 0.3 * torch.randn(shape, generator=gen, dtype=torch.float64))
        noise = torch.randn(shape, generator=gen, dtype=torch.float64)  # shared by the pair
        cond = torch.randn((n, self.cond_rows, self.cross_dim), generator=gen, dtype=torch.float64)
        if self.family is None:
            x_w = abar.sqrt() * z_w + (1 - abar).sqrt() * noise
            x_l = abar.sqrt() * z_l + (1 - abar).sqrt() * noise
            return {"x_w": x_w, "x_l": x_l, "t": t, "target_w": noise, "target_l": noise, "cond": cond}
        # rectified flow: one logit-normal level per pair, velocity targets
        s = torch.sigmoid(torch.randn((n,), generator=gen, dtype=torch.float64))
        s_b = s.view(per_sample)
        pooled = None
        if self.pooled_dim is not None:
            pooled = torch.randn((n, self.pooled_dim), generator=gen, dtype=torch.float64)
        # An editing family's source latents, one per pair (drawn last: the other families' batches are unchanged).
        sources = torch.randn((n, 1, *shape[1:]), generator=gen, dtype=torch.float64) if self.family.edits else None
        return {
            "x_w": (1 - s_b) * z_w + s_b * noise,
            "x_l": (1 - s_b) * z_l + s_b * noise,
            "t": 1000 * s,
            "target_w": noise - z_w,
            "target_l": noise - z_l,
            "cond": cond,
            "pooled": pooled,
            "sources": sources,
        }

    def predict(self, params: dict[str, torch.Tensor], x: torch.Tensor, batch) -> torch.Tensor:
        if self.family is None:
            return functional_call(self.unet, params, (x, batch["t"]), {"encoder_hidden_states": batch["cond"]})[0]
        from trl_diffusion_sdpo.families import PromptEmbeddings

        embeds = PromptEmbeddings(batch["cond"], batch["pooled"], batch["sources"])
        conditioning = self.family.denoiser_conditioning(embeds, None)

        def network(*args, **kwargs):
            return functional_call(self.unet, params, args, kwargs)

        return self.family.call_denoiser(network, x, batch["t"], conditioning)

    def errors(self, pred: torch.Tensor, batch, branch: str = "w") -> torch.Tensor:
        return (pred - batch[f"target_{branch}"]).pow(2).flatten(1).mean(1)

    def dpo_loss(self, e_w, e_l, r_w, r_l) -> torch.Tensor:
        u = -0.5 * self.setting.beta * ((e_w - e_l) - (r_w - r_l))
        return -F.logsigmoid(u).mean()


def _flat(tensors, like=None) -> torch.Tensor:
    """The tensors flattened into one vector; a ``None`` gradient (an unused parameter) is zeros like ``like``'s."""
    like = like or tensors
    return torch.cat([(torch.zeros_like(p) if t is None else t).reshape(-1) for t, p in zip(tensors, like)])


def _drifted(problem: Problem, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Policy weights after ``drift_steps`` Diffusion-DPO Adam steps from the reference."""
    params = {n: p.clone().requires_grad_(True) for n, p in problem.reference.items()}
    optimizer = torch.optim.Adam(params.values(), lr=problem.setting.drift_lr)
    for _ in range(problem.setting.drift_steps):
        batch = problem.batch(gen)
        with torch.no_grad():
            r_w = problem.errors(problem.predict(problem.reference, batch["x_w"], batch), batch)
            r_l = problem.errors(problem.predict(problem.reference, batch["x_l"], batch), batch, "l")
        e_w = problem.errors(problem.predict(params, batch["x_w"], batch), batch)
        e_l = problem.errors(problem.predict(params, batch["x_l"], batch), batch, "l")
        optimizer.zero_grad()
        problem.dpo_loss(e_w, e_l, r_w, r_l).backward()
        optimizer.step()
    return {n: p.detach() for n, p in params.items()}


def _branch_gradients(problem: Problem, theta: dict[str, torch.Tensor], batch):
    """``(g_w, h_l, pred_w, pred_l, a_w)`` of Diffusion-DPO at ``theta``, flat."""
    names = problem.names
    with torch.no_grad():
        r_w = problem.errors(problem.predict(problem.reference, batch["x_w"], batch), batch)
        r_l = problem.errors(problem.predict(problem.reference, batch["x_l"], batch), batch, "l")
    leaf = {n: theta[n].clone().requires_grad_(True) for n in names}
    pred_w = problem.predict(leaf, batch["x_w"], batch)
    pred_l = problem.predict(leaf, batch["x_l"], batch)
    e_w, e_l = problem.errors(pred_w, batch), problem.errors(pred_l, batch, "l")
    e_w_leaf, e_l_leaf = e_w.detach().requires_grad_(True), e_l.detach().requires_grad_(True)
    a_w, a_l = torch.autograd.grad(problem.dpo_loss(e_w_leaf, e_l_leaf, r_w, r_l), (e_w_leaf, e_l_leaf))
    # allow_unused: the last double-stream block's text branch (Qwen-Image) never reaches the output
    params = [leaf[n] for n in names]
    g_w = _flat(torch.autograd.grad((a_w * e_w).sum(), params, retain_graph=True, allow_unused=True), params)
    h_l = _flat(torch.autograd.grad((a_l * e_l).sum(), params, allow_unused=True), params)
    return g_w, h_l, pred_w.detach(), pred_l.detach(), a_w


def _pair_gradient(problem: Problem, theta: dict[str, torch.Tensor], batch) -> tuple[torch.Tensor, list[float]]:
    """The per-pair scope's gradient ``sum_i (g_w,i + lambda_i h_l,i)``, flat, and its ``lambda_i``: each pair's
    branch gradients by autograd of that pair's terms alone (``safeguard_scope="pair"``)."""
    names = problem.names
    with torch.no_grad():
        r_w = problem.errors(problem.predict(problem.reference, batch["x_w"], batch), batch)
        r_l = problem.errors(problem.predict(problem.reference, batch["x_l"], batch), batch, "l")
    leaf = {n: theta[n].clone().requires_grad_(True) for n in names}
    params = [leaf[n] for n in names]
    e_w = problem.errors(problem.predict(leaf, batch["x_w"], batch), batch)
    e_l = problem.errors(problem.predict(leaf, batch["x_l"], batch), batch, "l")
    e_w_leaf, e_l_leaf = e_w.detach().requires_grad_(True), e_l.detach().requires_grad_(True)
    a_w, a_l = torch.autograd.grad(problem.dpo_loss(e_w_leaf, e_l_leaf, r_w, r_l), (e_w_leaf, e_l_leaf))
    total, lambdas = None, []
    for i in range(e_w.shape[0]):
        g_w = _flat(torch.autograd.grad(a_w[i] * e_w[i], params, retain_graph=True, allow_unused=True), params)
        h_l = _flat(torch.autograd.grad(a_l[i] * e_l[i], params, retain_graph=True, allow_unused=True), params)
        lam = parameter_space_lambda(g_w.dot(g_w), g_w.dot(h_l), problem.setting.mu).double()
        lambdas.append(float(lam))
        term = g_w + lam * h_l
        total = term if total is None else total + term
    return total, lambdas


def warmed_adamw(problem: Problem, theta: dict[str, torch.Tensor], gen: torch.Generator):
    """A real AdamW over the flat weights, its moments warmed by ``adamw_warm`` Diffusion-DPO gradients at
    ``theta`` (learning rate 0 while warming: the weights do not move), then set to ``adamw_lr``."""
    flat = torch.nn.Parameter(_flat([theta[n] for n in problem.names]).clone())
    optimizer = torch.optim.AdamW([flat], lr=0.0, weight_decay=0.01)
    for _ in range(problem.setting.adamw_warm):
        g_w, h_l, *_ = _branch_gradients(problem, theta, problem.batch(gen))
        flat.grad = g_w + h_l
        torch.nn.utils.clip_grad_norm_([flat], problem.setting.max_grad_norm)
        optimizer.step()
    optimizer.param_groups[0]["lr"] = problem.setting.adamw_lr
    return flat, optimizer


def _adamw_delta(flat: torch.nn.Parameter, optimizer, gradient: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """The change of the weights under one real step of a copy of ``optimizer`` with ``gradient`` (clipped)."""
    import copy

    opt = copy.deepcopy(optimizer)
    param = opt.param_groups[0]["params"][0]
    param.grad = gradient.clone()
    torch.nn.utils.clip_grad_norm_([param], max_grad_norm)
    before = param.detach().clone()
    opt.step()
    return param.detach() - before


def measure_batch_adamw(problem: Problem, theta: dict[str, torch.Tensor], batch, adamw) -> dict:
    """Per rule of :data:`ADAMW_RULES`: (dW, tolerance, lambda) under one real AdamW step."""
    flat, optimizer = adamw
    setting = problem.setting
    g_w, h_l, pred_w, pred_l, a_w = _branch_gradients(problem, theta, batch)
    shapes = [theta[n].shape for n in problem.names]
    theta_flat = flat.detach()

    def winner_term(vector: torch.Tensor) -> float:
        params, offset = {}, 0
        for n, shape in zip(problem.names, shapes):
            size = math.prod(shape)
            params[n] = vector[offset : offset + size].view(shape)
            offset += size
        with torch.no_grad():
            e = problem.errors(problem.predict(params, batch["x_w"], batch), batch)
        return float((a_w * e).sum())

    w0 = winner_term(theta_flat)
    update = OptimizerUpdate(optimizer, [flat], [g_w], [h_l], setting.max_grad_norm)
    lambdas = {
        "dpo@adamw": torch.tensor(1.0, dtype=torch.float64),
        "output@adamw": winner_preserving_lambda(
            pred_w - batch["target_w"], pred_l - batch["target_l"], setting.mu
        ).double(),
        "parameter@adamw": parameter_space_lambda(g_w.dot(g_w), g_w.dot(h_l), setting.mu).double(),
        "update@adamw": update_space_lambda(update, setting.mu)[0].double(),
    }
    pair_gradient, pair_lambdas = _pair_gradient(problem, theta, batch)
    gradients = {rule: g_w + lam * h_l for rule, lam in lambdas.items()}
    gradients["pair@adamw"] = pair_gradient
    lambdas["pair@adamw"] = torch.tensor(sum(pair_lambdas) / len(pair_lambdas), dtype=torch.float64)
    results = {}
    for rule, lam in lambdas.items():
        delta = _adamw_delta(flat, optimizer, gradients[rule], setting.max_grad_norm)
        plus, minus = winner_term(theta_flat + delta), winner_term(theta_flat - delta)
        d_w = plus - w0
        second = plus - 2 * w0 + minus
        third = (plus - minus) / 2 - float(g_w.dot(delta))
        rounding = 64 * torch.finfo(torch.float64).eps * (abs(w0) + abs(minus) + abs(plus))
        rule_rounding = 64 * torch.finfo(torch.float32).eps * float((g_w * delta).abs().sum())
        results[rule] = (d_w, max(second / 2, 0.0) + 2 * abs(third) + rounding + rule_rounding, float(lam))
    return results


def measure_batch(
    problem: Problem, theta: dict[str, torch.Tensor], batch, rules: tuple[str, ...] = RULES
) -> dict[str, tuple[float, float, float]]:
    """Per rule of ``rules`` (of :data:`RULES`): (dW, tolerance, lambda)."""
    names = problem.names
    setting = problem.setting
    g_w, h_l, pred_w, pred_l, a_w = _branch_gradients(problem, theta, batch)
    shapes = [theta[n].shape for n in names]
    theta_flat = _flat([theta[n] for n in names])

    def unflat(vector: torch.Tensor) -> dict[str, torch.Tensor]:
        out, offset = {}, 0
        for n, s in zip(names, shapes):
            size = math.prod(s)
            out[n] = vector[offset : offset + size].view(s)
            offset += size
        return out

    def winner_term(vector: torch.Tensor) -> float:
        with torch.no_grad():
            e = problem.errors(problem.predict(unflat(vector), batch["x_w"], batch), batch)
        return float((a_w * e).sum())

    w0 = winner_term(theta_flat)
    lam_param = parameter_space_lambda(g_w.dot(g_w), g_w.dot(h_l), setting.mu).double()
    chosen = {"dpo": torch.tensor(1.0, dtype=torch.float64), "parameter": lam_param}
    if "output" in rules:
        pred_w, pred_l = (pred_w - batch["target_w"]).detach(), (pred_l - batch["target_l"]).detach()
        chosen["output"] = winner_preserving_lambda(pred_w, pred_l, setting.mu).double()
    if "pair" in rules:  # its own per-pair backward passes, made only when asked
        pair_gradient, pair_lambdas = _pair_gradient(problem, theta, batch)
        chosen["pair"] = torch.tensor(sum(pair_lambdas) / len(pair_lambdas), dtype=torch.float64)
    results = {}
    for rule in ("dpo", "output", "parameter", "pair"):
        if rule not in rules:
            continue
        lam = chosen[rule]
        g = pair_gradient if rule == "pair" else g_w + lam * h_l  # pair: lambda is the mean of the pairs' (logged)
        eta = setting.step_norm / float(g.norm())
        minus, plus = winner_term(theta_flat - eta * g), winner_term(theta_flat + eta * g)
        d_w = minus - w0
        second = plus - 2 * w0 + minus
        third = (minus - plus) / 2 + eta * float(g_w.dot(g))
        rounding = 64 * torch.finfo(torch.float64).eps * (abs(w0) + abs(minus) + abs(plus))
        # lambda is a float32 number (as the trainer computes it): a few ulps of it move the first-order term by
        # eta * lambda * |<g_w, h_l>| * 2^-23 each; at mu = 0 the first-order margin is exactly zero otherwise.
        lambda_rounding = 8 * eta * float(lam) * abs(float(g_w.dot(h_l))) * torch.finfo(torch.float32).eps
        results[rule] = (d_w, max(second / 2, 0.0) + 2 * abs(third) + rounding + lambda_rounding, float(lam))
    for rule, lam in (("parameter_adamw", lam_param), ("dpo_adamw", torch.tensor(1.0, dtype=torch.float64))):
        if rule not in rules:
            continue
        g = g_w + lam * h_l
        update = setting.adamw_lr * g / (g.abs() + 1e-8)  # AdamW's first step: m_hat = g, v_hat = g^2
        update = update + setting.adamw_lr * 0.01 * theta_flat  # decoupled weight decay 0.01
        results[rule] = (winner_term(theta_flat - update) - w0, 0.0, float(lam))
    return results


def run(
    setting: Setting,
    pipeline_dir: str | None = None,
    progress: bool = True,
    starts: tuple[str, ...] = ("reference", "drifted"),
    model: str = "unet",
    rules: tuple[str, ...] = RULES,
) -> dict:
    """The check's report over ``setting.batches`` batches from each of ``starts``, for ``rules`` (of :data:`RULES`;
    under ``setting.adamw`` every rule of :data:`ADAMW_RULES`): the batches drawn do not depend on the rules."""
    if unknown := sorted(set(rules) - set(RULES)):
        raise ValueError(f"unknown rules {unknown}: choose among {RULES}")
    torch.manual_seed(setting.seed)
    if model == "unet":
        problem = Problem(_unet(pipeline_dir), setting)
    else:
        family = _flow_family(model)
        problem = Problem(family.denoiser, setting, family)
    gen = torch.Generator().manual_seed(setting.seed)
    drifted = _drifted(problem, gen)  # drawn first either way: the batches do not depend on ``starts``
    starts = {name: {"reference": problem.reference, "drifted": drifted}[name] for name in starts}
    described = {
        "unet": pipeline_dir or "tiny random UNet",
        "sd3": "tiny random SD3 transformer (MMDiT)",
        "flux": "tiny random FLUX.1-dev transformer (guidance embedding)",
        "wan": "tiny random Wan 2.1 3D transformer (video latents [16, 2, 4, 4])",
        "flux-kontext": "tiny random FLUX.1 Kontext transformer (a source image's latents packed beside the target's)",
        "qwen-image-edit": "tiny random Qwen-Image-Edit transformer (a random source's latents after the target's)",
        "qwen-image-edit-plus": "tiny random Qwen-Image-Edit-Plus transformer (a random source's latents after the "
        "target's)",
        "qwen-image": "tiny random Qwen-Image transformer (MMDiT, packed latents, 3-axis RoPE)",
        "z-image": "tiny random Z-Image transformer (single-stream S3-DiT, reversed time, negated output)",
        "flux2": "tiny random FLUX.2 [dev] transformer (patchified latents, 4-axis RoPE, guidance embedding)",
        "flux2-klein": "tiny random FLUX.2 [klein] transformer (patchified latents, 4-axis RoPE, no guidance)",
        "hunyuan-video-1.5": "tiny random HunyuanVideo 1.5 3D transformer (video latents [4, 2, 4, 4], Qwen and ByT5 "
        "rows)",
        "qwen-image-2.1": "tiny random Qwen-Image 2.1 transformer (single-stream block-causal, unpatched latents)",
    }[model]
    report: dict = {"setting": setting.__dict__, "model": described, "starts": {}}
    began = time.perf_counter()
    for start, theta in starts.items():
        counts = {rule: Counts() for rule in (ADAMW_RULES if setting.adamw else rules)}
        adamw = warmed_adamw(problem, theta, gen) if setting.adamw else None
        iterator = range(setting.batches)
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, desc=f"batches from the {start}")
        for _ in iterator:
            batch = problem.batch(gen)
            measured = (
                measure_batch_adamw(problem, theta, batch, adamw)
                if adamw
                else measure_batch(problem, theta, batch, rules)
            )
            for rule, (d_w, tol, lam) in measured.items():
                c = counts[rule]
                c.total += 1
                c.rose += int(d_w > tol)
                c.rose_at_all += int(d_w > 0)
                c.lambdas.append(lam)
                c.worst_excess = max(c.worst_excess, d_w - tol)
                c.changes.append(d_w)
        report["starts"][start] = {
            rule: {
                "rose_beyond_tolerance": c.rose,
                "rose_at_all": c.rose_at_all,
                "batches": c.total,
                "lambda_mean": sum(c.lambdas) / len(c.lambdas),
                "lambda_min": min(c.lambdas),
                "lambda_max": max(c.lambdas),
                "lambdas": c.lambdas,
                "worst_dW_minus_tolerance": c.worst_excess,
                "dW_mean": sum(c.changes) / max(len(c.changes), 1),
                "dW_max": max(c.changes, default=0.0),
                "dWs": c.changes,
            }
            for rule, c in counts.items()
        }
    report["seconds"] = time.perf_counter() - began
    return report
