"""SiT interpolant maths checked against closed forms for Gaussian data N(m, s^2)."""

from __future__ import annotations

import math

import pytest
import torch

from reals_cli.errors import UserError
from reals_cli.objectives.transport import Transport, ode_sample, sde_sample

F64 = torch.float64
M, S = 0.7, 0.4  # the data distribution N(M, S^2), per dimension




def exact(transport: Transport, x: torch.Tensor, t: torch.Tensor):
    """Velocity, noise and score of p_t for data N(M, S^2), written from the path alone:
    x_t = a x1 + b x0 is N(a M, a^2 S^2 + b^2), and E[x1 | x_t], E[x0 | x_t] are the
    Gaussian regressions on x_t."""
    tt = t.view(-1, 1)
    if transport.path == "linear":
        a, da, b, db = tt, 1.0, 1 - tt, -1.0
    else:
        a, da = torch.sin(math.pi * tt / 2), math.pi / 2 * torch.cos(math.pi * tt / 2)
        b, db = torch.cos(math.pi * tt / 2), -math.pi / 2 * torch.sin(math.pi * tt / 2)
    var = a**2 * S**2 + b**2
    centred = x - a * M
    e_x1 = M + a * S**2 / var * centred
    e_x0 = b / var * centred
    return da * e_x1 + db * e_x0, e_x0, -centred / var


def _points(n=64, lo=0.05, hi=0.95):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, dtype=F64, generator=gen), torch.linspace(lo, hi, n, dtype=F64)


@pytest.mark.parametrize("path", ["linear", "gvp"])
def test_velocity_is_the_time_derivative_of_x_t(path):
    tr = Transport(path=path)
    x1, x0 = torch.randn(5, 2, 3, dtype=F64), torch.randn(5, 2, 3, dtype=F64)
    t, h = torch.tensor([0.01, 0.2, 0.5, 0.8, 0.99], dtype=F64), 1e-6
    fd = (tr.q_sample(x1, t + h, x0) - tr.q_sample(x1, t - h, x0)) / (2 * h)
    torch.testing.assert_close(tr.velocity_target(x1, t, x0), fd, rtol=1e-7, atol=1e-8)
    ends = tr.q_sample(x1, torch.tensor([0.0, 1.0], dtype=F64).repeat_interleave(torch.tensor([2, 3])), x0)
    torch.testing.assert_close(ends, torch.cat([x0[:2], x1[2:]]))  # t = 0 noise, t = 1 data


@pytest.mark.parametrize("path", ["linear", "gvp"])
def test_conversions_between_predictions_are_exact(path):
    tr = Transport(path=path)
    x, t = _points()
    v, eps, score = exact(tr, x, t)
    torch.testing.assert_close(tr.score_from_velocity(v, x, t), score)
    torch.testing.assert_close(tr.noise_from_velocity(v, x, t), eps)
    torch.testing.assert_close(tr.score_from_noise(eps, x, t), score)
    torch.testing.assert_close(tr.velocity_from_score(score, x, t), v)
    for prediction, out in (("velocity", v), ("noise", eps), ("score", score)):
        tp = Transport(path=path, prediction=prediction)
        torch.testing.assert_close(tp.velocity(out, x, t), v)
        torch.testing.assert_close(tp.score(out, x, t), score)


def test_exact_velocity_solves_the_continuity_equation():
    # An independent check of `exact` itself: d/dt p_t + d/dx (p_t v) = 0 for the 1-D Gaussian marginal.
    tr = Transport()
    x, t, h = torch.linspace(-2, 3, 41, dtype=F64).view(-1, 1), torch.full((41,), 0.6, dtype=F64), 1e-5

    def density(x, t):
        var = t**2 * S**2 + (1 - t) ** 2
        return torch.exp(-((x.squeeze(1) - t * M) ** 2) / (2 * var)) / torch.sqrt(2 * math.pi * var)

    dp_dt = (density(x, t + h) - density(x, t - h)) / (2 * h)
    flux = lambda x: density(x, t) * exact(tr, x, t)[0].squeeze(1)  # noqa: E731
    dflux_dx = (flux(x + h) - flux(x - h)) / (2 * h)
    torch.testing.assert_close(dp_dt, -dflux_dx, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("prediction", ["velocity", "noise", "score"])
@pytest.mark.parametrize("weight", [None, "velocity", "likelihood"])
def test_loss_is_zero_at_the_pairwise_target(prediction, weight):
    tr = Transport(path="gvp", prediction=prediction, loss_weight=weight)
    x1, x0 = torch.randn(4, 2, 3, 3, dtype=F64), torch.randn(4, 2, 3, 3, dtype=F64)
    t = tr.sample_time(4, "cpu").to(F64)
    xt = tr.q_sample(x1, t, x0)
    sigma = torch.cos(math.pi * t / 2).view(-1, 1, 1, 1)
    target = {"velocity": tr.velocity_target(x1, t, x0), "noise": x0, "score": -x0 / sigma}[prediction]
    # SiT's network has 2C outputs (learned sigma); only the first C are read.
    out = torch.cat([target, torch.randn_like(target)], dim=1)
    torch.testing.assert_close(tr.loss(out, x1, xt, t, x0)["loss"], torch.zeros(4, dtype=F64))
    assert torch.all(tr.loss(out + 0.1, x1, xt, t, x0)["loss"] > 0)


def test_time_intervals_and_distributions_match_sit():
    assert Transport().interval(train=True) == (0.0, 1.0)  # velocity: no clamp
    assert Transport(prediction="noise").interval(train=True) == (1e-3, 1 - 1e-3)
    assert Transport().interval(sde=True, last_step_size=0.04) == (0.0, 0.96)
    assert Transport(sample_eps=1e-3).interval(sde=True, diffusion_form="SBDM", last_step_size=0.04) == (1e-3, 0.96)
    with pytest.raises(UserError):
        Transport().interval(sde=True, diffusion_form="SBDM")
    gen = torch.Generator().manual_seed(0)
    t = Transport(prediction="score").sample_time(50_000, "cpu", gen)
    assert t.min() >= 1e-3 and t.max() <= 1 - 1e-3 and t.mean().item() == pytest.approx(0.5, abs=0.01)
    t = Transport(time_distribution="lognormal").sample_time(50_000, "cpu", gen)
    logit = torch.log(t / (1 - t))  # logit-normal: the logit is N(0, 1)
    assert logit.mean().item() == pytest.approx(0.0, abs=0.02) and logit.std().item() == pytest.approx(1.0, abs=0.02)


def test_diffusion_coefficients():
    t = torch.tensor([0.1, 0.5, 0.9], dtype=F64)
    x = torch.zeros(3, 1, dtype=F64)
    lin, gvp = Transport(), Transport(path="gvp")
    torch.testing.assert_close(lin.diffusion(t, x, "SBDM").squeeze(1), (1 - t) / t)  # (1/t)(1-t)^2 + (1-t)
    torch.testing.assert_close(lin.diffusion(t, x, "sigma", 2.0).squeeze(1), 2 * (1 - t))
    torch.testing.assert_close(gvp.diffusion(t, x, "sigma").squeeze(1), torch.cos(math.pi * t / 2))
    # GVP's SBDM: (pi/2)(cot(pi t/2) cos^2 + sin cos) = (pi/2) cot(pi t/2).
    torch.testing.assert_close(gvp.diffusion(t, x, "SBDM").squeeze(1), math.pi / 2 / torch.tan(math.pi * t / 2))
    torch.testing.assert_close(lin.diffusion(t, x, "constant", 0.3).squeeze(1), torch.full_like(t, 0.3))


def _exact_model(tr):
    def model_fn(x, t):
        v, eps, score = exact(tr, x, t)
        return {"velocity": v, "noise": eps, "score": score}[tr.prediction]

    return model_fn


@pytest.mark.parametrize("path, prediction", [("linear", "velocity"), ("gvp", "noise")])
def test_ode_samplers_transport_noise_to_the_data(path, prediction):
    tr = Transport(path=path, prediction=prediction)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(4000, 3, dtype=F64, generator=gen)
    x = ode_sample(tr, _exact_model(tr), noise, num_steps=30, method="heun")
    # The probability-flow map of one Gaussian to another is affine: x = M + S * noise.
    torch.testing.assert_close(x, M + S * noise, atol=1e-2, rtol=0)  # t in [eps, 1 - eps] for noise
    x = ode_sample(tr, _exact_model(tr), noise, num_steps=100, method="euler")
    torch.testing.assert_close(x, M + S * noise, atol=3e-2, rtol=0)


@pytest.mark.parametrize("form", ["sigma", "SBDM"])
def test_euler_maruyama_reaches_the_data_distribution(form):
    tr = Transport(sample_eps=1e-3 if form == "SBDM" else None)
    gen = torch.Generator().manual_seed(0)
    x = sde_sample(tr, _exact_model(tr), torch.randn(20_000, 1, dtype=F64, generator=gen), num_steps=100,
                   diffusion_form=form, generator=gen)
    assert x.mean().item() == pytest.approx(M, abs=0.01)
    assert x.std().item() == pytest.approx(S, rel=0.03)


def test_sits_own_spellings_are_accepted():
    """SiT's create_transport takes path_type "Linear" / "GVP" and its sample.py the ODE method
    "heun2": configs written for SiT pass as they are."""
    from reals_cli.objectives.samplers import resolve_sampler

    assert Transport("Linear").path == "linear" and Transport(path="GVP").path == "gvp"
    assert resolve_sampler("sit", "ode", 10, ode_method="heun2") == resolve_sampler("sit", "ode", 10, ode_method="heun")
    assert resolve_sampler("sit", "ode", 10, ode_method="Euler").ode_method == "euler"
    with pytest.raises(UserError, match="unknown path 'vp'"):
        Transport("VP")
