"""Small one-pass problems and their explicit per-pair gradients."""

from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace

import torch
from peft import LoraConfig
from PIL import Image

from trl_diffusion_sdpo.engines import PlainEngine
from trl_diffusion_sdpo.families import NoisedPair, family_for_pipeline
from trl_diffusion_sdpo.objectives import build_objective
from trl_diffusion_sdpo.safeguards.parameter import ParameterSpaceBackward
from trl_diffusion_sdpo.step.predictions import denoising_errors, predict_pairs
from trl_diffusion_sdpo.step.stages import NoisedMicroBatch
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
    build_tiny_sdxl_pipeline,
    build_tiny_wan_pipeline,
    build_tiny_z_image_pipeline,
)

# family -> (builder, prompt tokens, latent shape without the batch, LoRA targets)
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")

FAMILIES = {
    "sd": (build_tiny_sd_pipeline, 16, None, ATTENTION),
    "sdxl": (build_tiny_sdxl_pipeline, 16, None, ATTENTION),
    "sd3": (build_tiny_sd3_pipeline, 16, None, ATTENTION),
    "flux": (build_tiny_flux_pipeline, 16, None, (*ATTENTION, "add_q_proj", "to_add_out")),
    "flux-kontext": (build_tiny_flux_kontext_pipeline, 16, None, (*ATTENTION, "add_q_proj", "to_add_out")),
    "flux2": (build_tiny_flux2_pipeline, 48, None, (*ATTENTION, "to_qkv_mlp_proj")),
    "flux2-klein": (build_tiny_flux2_klein_pipeline, 48, None, (*ATTENTION, "to_qkv_mlp_proj")),
    "qwen-image": (build_tiny_qwen_image_pipeline, 24, None, (*ATTENTION, "add_k_proj", "to_add_out")),
    # editing: the source latents after the target's in the sequence (one source; two for Plus), the prompt read with
    # the source images
    "qwen-image-edit": (build_tiny_qwen_image_edit_pipeline, 24, None, (*ATTENTION, "add_k_proj", "to_add_out")),
    "qwen-image-edit-plus": (
        build_tiny_qwen_image_edit_plus_pipeline,
        48,
        None,
        (*ATTENTION, "add_k_proj", "to_add_out"),
    ),
    "z-image": (build_tiny_z_image_pipeline, 32, None, ATTENTION),
    "wan": (build_tiny_wan_pipeline, 16, (16, 2, 2, 2), ATTENTION),
    "hunyuan-video-1.5": (
        build_tiny_hunyuan_video15_pipeline,
        24,
        (4, 2, 2, 2),
        (*ATTENTION, "add_v_proj", "to_add_out"),
    ),
    "qwen-image-2.1": (build_tiny_qwen_image21_pipeline, 32, (8, 4, 4), ATTENTION),
}

PAIRS = 2


@dataclasses.dataclass
class Problem:
    policy: torch.nn.Module
    batch: NoisedMicroBatch
    reference: torch.nn.Module
    family: object
    objective: object

    def predict(self, separate_branches: bool):
        return predict_pairs(
            self.policy,
            lambda sample, t, **c: self.family.call_denoiser(self.reference, sample, t, c),
            self.family,
            self.batch.noised,
            self.batch.prompt_embeds,
            self.batch.time_ids,
            separate_branches,
        )

    def loss(self, predictions) -> torch.Tensor:
        return self.objective(predictions, denoising_errors(predictions)).loss

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad]


def _double(value):
    if isinstance(value, torch.Tensor):
        return value.double() if value.is_floating_point() else value
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(
            value, **{f.name: _double(getattr(value, f.name)) for f in dataclasses.fields(value)}
        )
    return value


def make_problem(name: str, lora: bool, tmp_path, seed: int = 0, pairs: int = PAIRS, sources: int = 0) -> Problem:
    """A float64 denoiser of ``name`` moved off its reference, and a random noised pair batch with its prompts (and,
    with ``sources``, that many random source latents per pair, the images' size)."""
    build, tokens, shape, targets = FAMILIES[name]
    pipe = build(seed=seed, tokenizer_dir=str(tmp_path / f"tok-{name}-{seed}"), max_length=tokens)
    family = family_for_pipeline(pipe, max_sequence_length=tokens)
    denoiser = family.denoiser
    denoiser.requires_grad_(False)
    reference = copy.deepcopy(denoiser).double()
    gen = torch.Generator().manual_seed(seed + 1)
    if lora:
        denoiser.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=list(targets)))
    else:
        denoiser.requires_grad_(True)
    denoiser.double()
    with torch.no_grad():  # off the reference, so that the branches get different weights (u != 0)
        for p in denoiser.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    shape = shape or family.latent_shape(32)
    rows = 2 * pairs
    prompts = [f"a red square number {i}" for i in range(pairs)]
    if family.edits and not family.sources_optional:  # a family that needs a source: one, or two where it takes more
        sources = sources or min(family.max_sources or 2, 2)
    tokenize = family.prompt_tokenizer()
    images = [[Image.new("RGB", (32, 32), (40 * i, 200 - 40 * k, 90)) for k in range(sources)] for i in range(pairs)]
    with torch.no_grad():
        tokens = tokenize(prompts, images) if getattr(tokenize, "reads_sources", False) else tokenize(prompts)
        embeds = _double(family.encode_prompts(tokens))
    # a pair's images close to each other, as preference pairs are: their gradients correlate and the margin binds
    winners = torch.randn((pairs, *shape), generator=gen, dtype=torch.float64)
    latents = torch.cat([winners, winners + 0.5 * torch.randn(winners.shape, generator=gen, dtype=torch.float64)])
    noise = torch.randn((pairs, *shape), generator=gen, dtype=torch.float64).repeat(2, *([1] * len(shape)))
    levels = torch.rand(pairs, generator=gen, dtype=torch.float64).repeat(2)
    view = levels.view(-1, *([1] * len(shape)))
    noised = NoisedPair(
        latents=latents,
        noise=noise,
        noisy=(1 - view) * latents + view * noise,
        timesteps=levels * 999,
        target=noise - latents,
    )
    if sources:  # drawn last: the batches without sources stay as they were
        embeds.source_latents = torch.randn((pairs, sources, *shape), generator=gen, dtype=torch.float64)
    time_ids = None
    if family.needs_time_ids:
        time_ids = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]], dtype=torch.float64).repeat(rows, 1)
    return Problem(
        denoiser,
        NoisedMicroBatch(noised, embeds, time_ids),
        reference,
        family,
        build_objective("dpo", beta=50.0),
    )


def run_stage(problem: Problem, accumulated=None, **stage_options):
    """``(lambda, [.grad])`` of one micro-batch through the backward stage, from ``accumulated`` gradients."""
    stage = ParameterSpaceBackward(PlainEngine(SimpleNamespace(num_processes=1)), 0.5, 1.0, False, **stage_options)
    params = problem.trainable()
    for i, p in enumerate(params):
        p.grad = None if accumulated is None else accumulated[i].clone()
    _, lam, _ = stage(
        problem.policy,
        problem.predict,
        problem.loss,
        torch.tensor(0.5, dtype=torch.float64),
        pairs=problem.batch.num_pairs,
    )
    return stage, lam, [None if p.grad is None else p.grad.clone() for p in params]


def assert_equal_gradients(one: list[torch.Tensor | None], two: list[torch.Tensor | None], rel: float = 1e-6) -> None:
    """Equal within ``rel`` of the largest entry; a weight no gradient reached keeps ``.grad = None`` in both (an
    optimizer skips it: a zero gradient instead would still decay it)."""
    assert [g is None for g in one] == [g is None for g in two]
    scale = max(float(g.abs().max()) for g in two if g is not None)
    assert scale > 0
    for a, b in zip(one, two):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=rel, atol=rel * scale)


def explicit_per_pair(problem: Problem):
    """Each pair's ``g_w,i`` and ``h_l,i`` by ``torch.autograd.grad`` of the loss through that pair's predictions
    alone (the others detached), one pass per image."""
    params = problem.trainable()
    pairs = problem.batch.num_pairs
    winners, losers = [], []
    for i in range(pairs):
        for which, store in (("policy_winner", winners), ("policy_loser", losers)):
            predictions = problem.predict(False)
            value = getattr(predictions, which)
            mask = torch.zeros(pairs, dtype=torch.bool)
            mask[i] = True
            view = mask.view(-1, *([1] * (value.dim() - 1)))
            kept = torch.where(view, value, value.detach())
            other = "policy_loser" if which == "policy_winner" else "policy_winner"
            branches = dataclasses.replace(predictions, **{which: kept, other: getattr(predictions, other).detach()})
            store.append(torch.autograd.grad(problem.loss(branches), params, materialize_grads=True))
    return params, winners, losers


def float64_pair_lambdas(winners, losers, mu: float, max_lambda: float = 1.0) -> list[float]:
    out = []
    for g_w, h_l in zip(winners, losers):
        sq = sum(float((w * w).sum()) for w in g_w)
        dot = -sum(float((w * h).sum()) for w, h in zip(g_w, h_l))  # <g_w, g_l>, g_l = -h_l
        out.append(max_lambda if dot <= 0 else min(max(0.0, (1 - mu) * sq / dot), max_lambda))
    return out
