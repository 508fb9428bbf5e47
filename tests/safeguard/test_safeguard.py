"""The Diffusion-SDPO safeguard against an independent float64 computation of the rule in the method reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trl_diffusion_sdpo import winner_preserving_lambda
from trl_diffusion_sdpo.safeguards.output import lambda_from_sums, safeguard_sums
from trl_diffusion_sdpo.step.predictions import scale_gradient


def reference_lambda(r_w: torch.Tensor, r_l: torch.Tensor, mu: float, max_lambda: float = 1.0) -> float:
    """The authors' rule as their code computes it, in float64 numpy: the gradients of the per-branch MEAN errors
    with respect to the predictions, ``g = 2 r / N``, and 1e-9 added to their dot product."""
    n = r_w.numel()
    g_w = 2.0 * r_w.detach().to(torch.float64).numpy() / n
    g_l = 2.0 * r_l.detach().to(torch.float64).numpy() / n
    num = float(np.sum(g_w * g_w))
    den = float(np.sum(g_l * g_w))
    if den <= 0:
        return max_lambda
    return float(np.clip((1.0 - mu) * num / (den + 1e-9), 0.0, max_lambda))


def residuals(seed: int, correlation: float, shape=(2, 4, 8, 8), dtype=torch.float32):
    """Winner and loser residuals whose cross term has the sign of ``correlation``."""
    gen = torch.Generator().manual_seed(seed)
    r_w = torch.randn(shape, generator=gen)
    r_l = correlation * r_w + 0.5 * torch.randn(shape, generator=gen)
    return r_w.to(dtype), r_l.to(dtype)


@pytest.mark.parametrize("mu", [0.0, 0.2, 0.6, 0.9])
@pytest.mark.parametrize("correlation", [0.5, 1.0, 3.0, 20.0])
def test_lambda_matches_float64_formula(mu, correlation):
    r_w, r_l = residuals(seed=int(100 * mu + correlation), correlation=correlation)
    expected = reference_lambda(r_w, r_l, mu)
    got = winner_preserving_lambda(r_w, r_l, mu)
    assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_lambda_is_strictly_inside_the_bounds_when_the_constraint_binds():
    # (1 - mu) * num / den with den ~ 3 num: lambda ~ (1 - 0.5) / 3, neither clamp active.
    r_w, r_l = residuals(seed=1, correlation=3.0)
    lam = winner_preserving_lambda(r_w, r_l, mu=0.5).item()
    assert 0.05 < lam < 0.5
    assert lam == pytest.approx(reference_lambda(r_w, r_l, 0.5), rel=1e-5)


def test_lambda_is_max_lambda_when_cross_term_is_negative():
    r_w, r_l = residuals(seed=2, correlation=-1.0)
    assert float((r_w * r_l).sum()) < 0
    for max_lambda in (1.0, 0.7, 2.5):
        assert winner_preserving_lambda(r_w, r_l, mu=0.9, max_lambda=max_lambda).item() == pytest.approx(max_lambda)


def test_lambda_is_max_lambda_when_cross_term_is_exactly_zero():
    r_w = torch.zeros(2, 4, 8, 8)
    r_w[:, :, :4] = 1.0
    r_l = torch.zeros(2, 4, 8, 8)
    r_l[:, :, 4:] = 1.0  # disjoint support: den == 0 exactly
    assert winner_preserving_lambda(r_w, r_l, mu=0.5, max_lambda=0.8).item() == pytest.approx(0.8)


def test_zero_residuals_give_max_lambda():
    zeros = torch.zeros(2, 4, 8, 8)
    assert winner_preserving_lambda(zeros, zeros, mu=0.9).item() == 1.0
    assert winner_preserving_lambda(zeros, zeros, mu=0.9, max_lambda=3.0).item() == 3.0


def test_lambda_is_clamped_to_max_lambda_when_the_loser_barely_correlates():
    # den is tiny and positive: the unclamped ratio is huge.
    r_w, r_l = residuals(seed=3, correlation=0.0)
    r_l = r_l - (r_l * r_w).sum() / (r_w * r_w).sum() * r_w + 1e-4 * r_w  # project out, then a sliver back
    assert float((r_l.double() * r_w.double()).sum()) > 0
    assert (1 - 0.2) * float((r_w * r_w).sum()) / float((r_l * r_w).sum()) > 10
    assert winner_preserving_lambda(r_w, r_l, mu=0.2).item() == 1.0
    assert winner_preserving_lambda(r_w, r_l, mu=0.2, max_lambda=5.0).item() == 5.0


def test_mu_one_gives_lambda_zero_when_cross_term_is_positive():
    r_w, r_l = residuals(seed=4, correlation=1.0)
    assert winner_preserving_lambda(r_w, r_l, mu=1.0).item() == 0.0


@pytest.mark.parametrize("max_lambda", [0.3, 1.0, 4.0])
@pytest.mark.parametrize("seed", range(5))
def test_lambda_always_lies_in_zero_to_max_lambda(seed, max_lambda):
    gen = torch.Generator().manual_seed(seed)
    r_w, r_l = torch.randn(2, 4, 4, 4, generator=gen), torch.randn(2, 4, 4, 4, generator=gen)
    lam = winner_preserving_lambda(r_w, r_l, mu=0.1 * seed, max_lambda=max_lambda).item()
    assert 0.0 <= lam <= float(np.float32(max_lambda))  # the bound as a float32 value
    assert lam == pytest.approx(reference_lambda(r_w, r_l, 0.1 * seed, max_lambda), rel=1e-5, abs=1e-7)


def test_fp16_residuals_whose_fp16_sums_overflow_give_the_float64_lambda():
    gen = torch.Generator().manual_seed(5)
    r_w = (80.0 + 8.0 * torch.randn(2, 4, 16, 16, generator=gen)).half()
    r_l = (2.0 * r_w.float() + 20.0 * torch.randn(2, 4, 16, 16, generator=gen)).half()
    # Each product fits in fp16, but the sums over the micro-batch do not.
    assert torch.isfinite(r_w * r_w).all() and torch.isfinite(r_l * r_w).all()
    assert torch.isinf((r_w * r_w).sum()) and torch.isinf((r_l * r_w).sum())
    expected = reference_lambda(r_w, r_l, mu=0.5)
    assert 0.15 < expected < 0.35  # a value the clamps do not produce
    got = winner_preserving_lambda(r_w, r_l, mu=0.5)
    assert torch.isfinite(got)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_bf16_residuals_give_the_float64_lambda_of_their_values():
    gen = torch.Generator().manual_seed(6)
    r_w = torch.randn(4, 4, 32, 32, generator=gen).bfloat16()
    r_l = (2.0 * r_w.float() + torch.randn(4, 4, 32, 32, generator=gen)).bfloat16()
    expected = reference_lambda(r_w, r_l, mu=0.6)
    got = winner_preserving_lambda(r_w, r_l, mu=0.6)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_lambda_is_a_detached_zero_dim_float32_tensor():
    r_w, r_l = residuals(seed=7, correlation=2.0)
    r_w.requires_grad_(True)
    r_l.requires_grad_(True)
    lam = winner_preserving_lambda(r_w * 1.0, r_l * 1.0, mu=0.9)
    assert lam.dim() == 0
    assert lam.dtype == torch.float32
    assert not lam.requires_grad and lam.grad_fn is None


def test_safeguard_sums_are_the_float64_sums_and_lambda_from_sums_agrees():
    r_w, r_l = residuals(seed=8, correlation=1.5, dtype=torch.float16)
    num, den = safeguard_sums(r_w, r_l)
    w, lo = r_w.double(), r_l.double()
    assert num.dtype == den.dtype == torch.float32
    assert num.item() == pytest.approx(float((w * w).sum()), rel=1e-6)
    assert den.item() == pytest.approx(float((lo * w).sum()), rel=1e-6)
    # Sums of several shards (as processes would all-reduce them) give the lambda of the whole micro-batch.
    num_a, den_a = safeguard_sums(r_w[:1], r_l[:1])
    num_b, den_b = safeguard_sums(r_w[1:], r_l[1:])
    assert lambda_from_sums(num_a + num_b, den_a + den_b, 0.9, num_elements=r_w.numel()).item() == pytest.approx(
        winner_preserving_lambda(r_w, r_l, 0.9).item(), rel=1e-6
    )


def test_epsilon_is_the_authors_on_an_sd15_shaped_micro_batch():
    # 8 pairs of SD1.5 latents at 512 px: eps = 1e-9 * N^2 / 4 = 4.29 in residual-sum units. Residuals of the size a
    # trained UNet leaves (~0.1) make the cross sum a few hundred, so the epsilon moves lambda by about 1%.
    gen = torch.Generator().manual_seed(11)
    r_w = 0.1 * torch.randn(8, 4, 64, 64, generator=gen)
    r_l = 0.9 * r_w + 0.05 * torch.randn(8, 4, 64, 64, generator=gen)
    expected = reference_lambda(r_w, r_l, mu=0.9)
    got = winner_preserving_lambda(r_w, r_l, mu=0.9).item()
    assert got == pytest.approx(expected, rel=1e-5)
    num, den = safeguard_sums(r_w, r_l)
    without_eps = (0.1 * num / den).item()
    assert 1.001 < without_eps / got < 1.05  # the epsilon is really there, and small


def test_mismatched_residual_shapes_raise():
    with pytest.raises(ValueError, match="same shape"):
        winner_preserving_lambda(torch.zeros(2, 4, 8, 8), torch.zeros(1, 4, 8, 8), mu=0.9)


@pytest.mark.parametrize("scale", [0.0, 0.25, torch.tensor(0.4), 3.0])
def test_scale_gradient_keeps_the_value_and_multiplies_the_gradient(scale):
    x = torch.linspace(-2, 2, 7, dtype=torch.float64, requires_grad=True)
    value = x**3
    scaled = scale_gradient(value, scale)
    assert torch.equal(scaled.detach(), value.detach())
    (grad,) = torch.autograd.grad(scaled.sum(), x)
    expected = float(scale) * 3 * x.detach() ** 2
    torch.testing.assert_close(grad, expected)
