"""DDPM maths checked against closed forms computed independently in float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from reals_cli.objectives.diffusion import (

    Diffusion, ddim_sample_loop, ddpm_sample_loop, discretized_gaussian_log_likelihood, linear_betas, normal_kl,

    space_timesteps,

)

F64 = torch.float64


def reference_schedule(n=1000):
    betas = np.linspace(1e-4, 0.02, n)
    return betas, np.cumprod(1 - betas)


def test_linear_betas_are_dits():
    betas = linear_betas(1000)
    assert betas.dtype == F64 and len(betas) == 1000
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    np.testing.assert_allclose(Diffusion.linear().alphas_cumprod.numpy(), reference_schedule()[1], rtol=1e-12)
    assert linear_betas(250)[-1] == pytest.approx(0.08)  # DiT's 1000/T scaling


def test_q_sample_moments():
    d = Diffusion.linear()
    _, abar = reference_schedule()
    t = torch.tensor([0, 10, 500, 999])
    x0 = torch.randn(4, 3, 2, 2, dtype=F64)
    # q_sample is affine in the noise: mean at noise 0, standard deviation as its slope.
    mean = d.q_sample(x0, t, torch.zeros_like(x0))
    torch.testing.assert_close(mean, torch.from_numpy(np.sqrt(abar[t])).view(-1, 1, 1, 1) * x0)
    slope = d.q_sample(x0, t, torch.ones_like(x0)) - mean
    torch.testing.assert_close(slope, torch.from_numpy(np.sqrt(1 - abar[t])).view(-1, 1, 1, 1).expand_as(x0))
    # And empirically, for one scalar x0.
    gen = torch.Generator().manual_seed(0)
    x0 = torch.full((200_000, 1), 1.5, dtype=F64)
    xt = d.q_sample(x0, torch.full((200_000,), 300), torch.randn(x0.shape, dtype=F64, generator=gen))
    assert xt.mean().item() == pytest.approx(1.5 * math.sqrt(abar[300]), abs=0.01)
    assert xt.var().item() == pytest.approx(1 - abar[300], rel=0.01)


def test_posterior_matches_gaussian_product():
    d = Diffusion.linear()
    betas, abar = reference_schedule()
    t = np.array([1, 2, 100, 999])
    x0, xt = torch.randn(4, 5, dtype=F64), torch.randn(4, 5, dtype=F64)
    mean, var, log_var = d.q_posterior(x0, xt, torch.from_numpy(t))
    # q(x_{t-1}|x0) = N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1}) times the likelihood
    # q(x_t|x_{t-1}) = N(sqrt(1-beta_t) x_{t-1}, beta_t), renormalised.
    a_prev, b = abar[t - 1][:, None], betas[t][:, None]
    precision = 1 / (1 - a_prev) + (1 - b) / b
    ref_var = 1 / precision
    ref_mean = ref_var * (np.sqrt(a_prev) * x0.numpy() / (1 - a_prev) + np.sqrt(1 - b) * xt.numpy() / b)
    np.testing.assert_allclose(mean.numpy(), ref_mean, rtol=1e-10)
    np.testing.assert_allclose(var.numpy()[:, 0], ref_var[:, 0], rtol=1e-10)
    np.testing.assert_allclose(log_var.numpy()[:, 0], np.log(ref_var[:, 0]), rtol=1e-10)
    # At t = 0 the posterior is x0 itself; its log variance is clipped to the t = 1 value.
    mean0, var0, log_var0 = d.q_posterior(x0, xt, torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(mean0, x0)
    assert torch.all(var0 == 0) and torch.allclose(log_var0, torch.tensor(np.log(ref_var[0, 0]), dtype=F64))


def test_normal_kl_closed_form():
    m1, s1, m2, s2 = 0.3, 0.7, -0.4, 1.9
    expected = math.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5
    got = normal_kl(torch.tensor(m1, dtype=F64), torch.tensor(2 * math.log(s1), dtype=F64),
                    torch.tensor(m2, dtype=F64), torch.tensor(2 * math.log(s2), dtype=F64))
    assert got.item() == pytest.approx(expected, rel=1e-12)


def adm_log_likelihood(x, mean, std):
    """ADM's discretized decoder in numpy float64, from its published formula."""
    def cdf(z):
        return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))

    upper, lower = cdf((x - mean + 1 / 255) / std), cdf((x - mean - 1 / 255) / std)
    p = np.where(x < -0.999, upper, np.where(x > 0.999, 1 - lower, upper - lower))
    return np.log(np.maximum(p, 1e-12))


def test_discretized_log_likelihood_is_adms_and_near_the_exact_one():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.3, 1.0, 0.999 - 1e-6, 2.5, -3.0, 0.1], dtype=F64)
    mean = torch.tensor([-0.9, -0.45, 0.1, 0.3, 0.8, 0.2, -2.5, 3.0, 0.9], dtype=F64)
    scale = torch.tensor([0.1, 0.05, 0.3, 0.01, 0.2, 0.5, 0.1, 0.2, 0.01], dtype=F64)
    got = discretized_gaussian_log_likelihood(x, mean, scale.log()).numpy()
    xn, mn, sn = x.numpy(), mean.numpy(), scale.numpy()
    np.testing.assert_allclose(got, adm_log_likelihood(xn, mn, sn), rtol=1e-12)
    # Latents far out of [-1, 1] or bins far from the mean hit DiT's floor, not -inf or -5000.
    assert np.all(got[6:] == math.log(1e-12))
    # Where the bins are likely, the tanh CDF is close to the exact one (scipy).
    xn, mn, sn = xn[:6], mn[:6], sn[:6]
    upper, lower = norm.cdf(xn + 1 / 255, mn, sn), norm.cdf(xn - 1 / 255, mn, sn)
    exact = np.where(xn < -0.999, np.log(upper), np.where(xn > 0.999, np.log1p(-lower), np.log(upper - lower)))
    np.testing.assert_allclose(got[:6], exact, rtol=2e-3)


def test_vb_term_closed_forms_and_frozen_mean():
    d = Diffusion.linear()
    betas, abar = reference_schedule()
    x0, noise = torch.randn(3, 2, 4, 4, dtype=F64), torch.randn(3, 2, 4, 4, dtype=F64)
    t = torch.tensor([1, 400, 999])
    xt = d.q_sample(x0, t, noise)
    # The exact eps gives the true posterior mean; v = -1 the posterior variance: KL = 0.
    exact = torch.cat([noise, -torch.ones_like(noise)], dim=1)
    torch.testing.assert_close(d.vb_terms(exact, x0, xt, t), torch.zeros(3, dtype=F64), atol=1e-9, rtol=0)
    # v = +1 gives variance beta_t: KL of two zero-mean Gaussians with those variances, in bits.
    large = torch.cat([noise, torch.ones_like(noise)], dim=1)
    tn = t.numpy()
    post = betas[tn] * (1 - abar[tn - 1]) / (1 - abar[tn])
    expected = 0.5 * (-1 + np.log(betas[tn] / post) + post / betas[tn]) / math.log(2)
    np.testing.assert_allclose(d.vb_terms(large, x0, xt, t).numpy(), expected, rtol=1e-9, atol=1e-12)
    # In the loss, the VLB trains the variance only; the MSE trains eps only.
    out = torch.cat([noise + 0.1, torch.zeros_like(noise)], dim=1).requires_grad_()
    terms = d.loss(out, x0, xt, t, noise)
    (g_vb,) = torch.autograd.grad(terms["vb"].sum(), out, retain_graph=True)
    (g_mse,) = torch.autograd.grad(terms["mse"].sum(), out)
    assert torch.all(g_vb[:, :2] == 0) and g_vb[:, 2:].abs().sum() > 0
    assert torch.all(g_mse[:, 2:] == 0) and g_mse[:, :2].abs().sum() > 0
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    # At t = 0 the term is the decoder NLL of x0, in bits per dimension.
    t0 = torch.zeros(3, dtype=torch.long)
    x0_01 = x0.clamp(-0.99, 0.99)
    nll = d.vb_terms(exact, x0_01, d.q_sample(x0_01, t0, noise), t0)
    x, mean = x0_01.numpy(), x0_01.numpy()  # exact eps reproduces x0; at t = 0 the posterior mean is x0
    std = math.sqrt(betas[1] * (1 - abar[0]) / (1 - abar[1]))
    lp = adm_log_likelihood(x, mean, std)
    np.testing.assert_allclose(nll.numpy(), -lp.mean(axis=(1, 2, 3)) / math.log(2), rtol=1e-6)


def test_space_timesteps():
    steps = space_timesteps(1000, "250")
    assert len(steps) == 250 and steps[0] == 0 and steps[-1] == 999 and steps == sorted(steps)
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(300, "10,15,20")[:2] == [0, 11] and len(space_timesteps(300, "10,15,20")) == 45
    assert space_timesteps(1000, 1000) == list(range(1000))
    # ADM's respace.py (DiT's diffusion/) keeps these; x.5 points round as its float sum does.
    assert space_timesteps(1000, "21")[9:12] == [450, 499, 549]
    assert space_timesteps(1000, 23) == [0, 45, 91, 136, 182, 227, 272, 318, 363, 409, 454, 499, 545, 590, 636,
                                         681, 727, 772, 817, 863, 908, 954, 999]
    assert space_timesteps(1000, "7,9") == [0, 83, 166, 250, 333, 416, 499, 500, 562, 625, 687, 750, 812, 874, 937,
                                            999]


def test_respaced_schedule_keeps_alphas_cumprod_and_original_indices():
    base = Diffusion.linear()
    for spacing in ("250", "ddim25", "10,20"):
        sp = base.respace(spacing)
        kept = torch.tensor(space_timesteps(1000, spacing))
        assert torch.equal(sp.timestep_map, kept)
        torch.testing.assert_close(sp.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12, atol=0)
    seen = []
    ddpm_sample_loop(lambda x, t: seen.append(t.clone()) or torch.zeros(x.shape[0], 8, 2, 2), (2, 4, 2, 2), "ddim25")
    assert [int(t[0]) for t in seen] == list(range(960, -1, -40)) and seen[0].dtype == torch.long


def _gaussian_eps_model(s):
    """The exact E[eps | x_t] for data N(0, s^2), indexed by the ORIGINAL step."""
    abar = torch.from_numpy(reference_schedule()[1])

    def model_fn(x, t):
        a = abar[t].to(x.dtype).view(-1, 1)
        return (1 - a).sqrt() * x / (a * s**2 + 1 - a)

    return model_fn


@pytest.mark.parametrize("steps", ["ddim50", "250"])
def test_ddim_is_the_closed_form_linear_map_for_gaussian_data(steps):
    # With the exact eps for N(0, s^2) data, a DDIM step from abar a to a' scales x by
    # (sqrt(a a') s^2 + sqrt((1-a)(1-a'))) / (a s^2 + 1 - a); the loop is their product.
    s, abar = 0.5, reference_schedule()[1]
    kept = space_timesteps(1000, steps)
    a_seq = [abar[k] for k in reversed(kept)] + [1.0]
    factor = np.prod([(math.sqrt(a * b) * s**2 + math.sqrt((1 - a) * (1 - b))) / (a * s**2 + 1 - a)
                      for a, b in zip(a_seq[:-1], a_seq[1:])])
    noise = torch.randn(8, 1, dtype=F64)
    x = ddim_sample_loop(_gaussian_eps_model(s), (8, 1), steps, noise=noise)
    torch.testing.assert_close(x, factor * noise, rtol=1e-10, atol=0)
    assert factor == pytest.approx(s, rel=0.06)  # and DDIM lands near the data's scale


def test_ddpm_variance_follows_the_gaussian_recursion():
    # Ancestral steps with the exact eps (fixed variance beta_i) are x' = c x + sqrt(beta_i) z,
    # so Var' = c^2 Var + beta_i; the last step adds no noise.
    s, abar = 0.5, reference_schedule()[1]
    a_seq = [abar[k] for k in reversed(space_timesteps(1000, "50"))] + [1.0]
    var = 1.0
    for a, b in zip(a_seq[:-1], a_seq[1:]):
        beta = 1 - a / b
        x0_coef = math.sqrt(a) * s**2 / (a * s**2 + 1 - a)  # E[x0 | x_t] = x0_coef x_t
        c = beta * math.sqrt(b) / (1 - a) * x0_coef + (1 - b) * math.sqrt(1 - beta) / (1 - a)
        var = c**2 * var + (beta if b < 1 else 0.0)
    x = ddpm_sample_loop(_gaussian_eps_model(s), (10_000, 1), "50", generator=torch.Generator().manual_seed(0))
    assert x.var().item() == pytest.approx(var, rel=0.06)
    assert abs(x.mean().item()) < 0.03
