"""SiT's objective (Ma et al. 2024): stochastic interpolants between noise and data.

SiT's time runs from noise to data: x_t = alpha_t x1 + sigma_t x0 with x0 ~ N(0, I)
noise and x1 the data, so t = 0 is noise and t = 1 is data.
- Linear path: alpha_t = t, sigma_t = 1 - t.
- GVP path:    alpha_t = sin(pi t / 2), sigma_t = cos(pi t / 2).
The network predicts the velocity E[dx_t/dt | x_t], the noise E[x0 | x_t], or the
score grad log p_t(x_t); on these Gaussian paths each is an affine function of any
other given x_t (`velocity`/`score` below convert). SiT's network is built with
learned sigma; only its first C output channels are read.

Training follows the same three calls as the DDPM objective:

    t = transport.sample_time(B, device); x_t = transport.q_sample(x1, t, noise)
    terms = transport.loss(model(x_t, t, y), x1, x_t, t, noise)  # per-sample "loss"

Sampling integrates dx = v dt (ODE) or dx = [v + w_t s] dt + sqrt(2 w_t) dW (SDE,
with w_t the diffusion coefficient) from t0 up to t1; every model_fn is
model_fn(x_t, t) -> output, so guidance wraps outside. The default w_t is "sigma"
(w_t = sigma_t), the default of SiT's sample.py, which made its reported SDE
numbers; SiT's Sampler API defaults to "SBDM", which is infinite at t = 0 and so
needs sample_eps > 0 (SiT's velocity default of 0 would give NaN; we refuse it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import UserError

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
PATHS = ("linear", "gvp")
PREDICTIONS = ("velocity", "noise", "score")
LOSS_WEIGHTS = (None, "velocity", "likelihood")
TIME_DISTRIBUTIONS = ("uniform", "lognormal")
DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing")


def _check(value, choices, what: str) -> None:
    if value not in choices:
        raise UserError(f"unknown {what} {value!r}; choose one of {', '.join(map(str, choices))}")


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


@dataclass
class Transport:
    """Path, prediction and time sampling of one SiT objective.

    train_eps / sample_eps keep t away from the singular ends: SiT's defaults are 0
    for velocity prediction (stable on [0, 1]) and 1e-3 for noise and score.
    loss_weight (noise and score only) is SiT's: None, "velocity" or "likelihood".
    time_distribution "lognormal" draws t = sigmoid(N(0, 1)) inside [t0, t1].
    """

    path: str = "linear"
    prediction: str = "velocity"
    loss_weight: str | None = None
    time_distribution: str = "uniform"
    train_eps: float | None = None
    sample_eps: float | None = None

    def __post_init__(self):
        # SiT spells its paths "Linear" and "GVP" (create_transport's path_type): accept them as written.
        self.path = self.path.lower() if isinstance(self.path, str) else self.path
        _check(self.path, PATHS, "path")
        _check(self.prediction, PREDICTIONS, "prediction")
        _check(self.loss_weight, LOSS_WEIGHTS, "loss weight")
        _check(self.time_distribution, TIME_DISTRIBUTIONS, "time distribution")
        default_eps = 0.0 if self.prediction == "velocity" else 1e-3
        self.train_eps = default_eps if self.train_eps is None else self.train_eps
        self.sample_eps = default_eps if self.sample_eps is None else self.sample_eps

    # -- the path ---------------------------------------------------------------
    def coefficients(self, t: torch.Tensor, x: torch.Tensor):
        """alpha_t, d alpha_t/dt, sigma_t, d sigma_t/dt, shaped to broadcast against x."""
        t = t.to(x.dtype).view(-1, *[1] * (x.ndim - 1))
        if self.path == "linear":
            return t, torch.ones_like(t), 1 - t, -torch.ones_like(t)
        a = t * math.pi / 2
        return a.sin(), math.pi / 2 * a.cos(), a.cos(), -math.pi / 2 * a.sin()

    def _alpha_ratio(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # d alpha / alpha written out, so that it is exact (and inf, not nan) at t = 0.
        t = t.to(x.dtype).view(-1, *[1] * (x.ndim - 1))
        return 1 / t if self.path == "linear" else math.pi / (2 * torch.tan(t * math.pi / 2))

    def drift_var(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """g_t = (alpha'/alpha) sigma^2 - sigma sigma': the score's weight in the velocity,
        v = (alpha'/alpha) x + g_t score (SiT's `compute_drift` second value; the SBDM w_t)."""
        _, _, sigma, d_sigma = self.coefficients(t, x)
        return self._alpha_ratio(t, x) * sigma**2 - sigma * d_sigma

    def q_sample(self, x1: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        alpha, _, sigma, _ = self.coefficients(t, x1)
        return alpha * x1 + sigma * x0

    def velocity_target(self, x1: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """d x_t / dt along the pair (x0, x1), the velocity network's regression target."""
        _, d_alpha, _, d_sigma = self.coefficients(t, x1)
        return d_alpha * x1 + d_sigma * x0

    # -- conversions between predictions (exact for the marginal of any data) ---
    def score_from_velocity(self, v: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, d_alpha, sigma, d_sigma = self.coefficients(t, x)
        r = alpha / d_alpha  # multiplied through by alpha/alpha' so that t = 0 is finite
        return (r * v - x) / (sigma**2 - r * d_sigma * sigma)

    def noise_from_velocity(self, v: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -self.coefficients(t, x)[2] * self.score_from_velocity(v, x, t)

    def score_from_noise(self, eps: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -eps / self.coefficients(t, x)[2]

    def velocity_from_score(self, score: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self._alpha_ratio(t, x) * x + self.drift_var(t, x) * score

    def score(self, model_out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """grad log p_t(x) from whatever the network predicts."""
        out = model_out[:, : x.shape[1]]
        if self.prediction == "velocity":
            return self.score_from_velocity(out, x, t)
        return self.score_from_noise(out, x, t) if self.prediction == "noise" else out

    def velocity(self, model_out: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The probability-flow ODE drift dx/dt from whatever the network predicts."""
        out = model_out[:, : x.shape[1]]
        return out if self.prediction == "velocity" else self.velocity_from_score(self.score(out, x, t), x, t)

    # -- training ---------------------------------------------------------------
    def interval(self, *, train: bool = False, sde: bool = False, diffusion_form: str = "sigma",
                 last_step_size: float = 0.0) -> tuple[float, float]:
        """[t0, t1] for training or sampling, as SiT's `check_interval` (Linear/GVP)."""
        eps = self.train_eps if train else self.sample_eps
        t0, t1 = 0.0, 1.0
        if self.prediction != "velocity" or sde:
            t0 = eps if (sde and diffusion_form == "SBDM") or self.prediction != "velocity" else 0.0
            t1 = 1 - eps if (not sde or last_step_size == 0) else 1 - last_step_size
        if sde and diffusion_form == "SBDM" and t0 == 0:
            raise UserError("the SBDM diffusion coefficient is infinite at t = 0; set a sample eps > 0")
        return t0, t1

    def sample_time(self, batch: int, device: torch.device | str, generator: torch.Generator | None = None) -> torch.Tensor:
        t0, t1 = self.interval(train=True)
        if self.time_distribution == "uniform":
            u = torch.rand(batch, device=device, generator=generator)
        else:
            u = torch.sigmoid(torch.randn(batch, device=device, generator=generator))
        return t0 + (t1 - t0) * u

    def loss(self, model_out: torch.Tensor, x1: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> dict:
        """Per-sample training loss; x1 the data, x0 the noise that made x_t."""
        out = model_out[:, : x1.shape[1]]
        if self.prediction == "velocity":
            return {"loss": _mean_flat((out - self.velocity_target(x1, t, x0)) ** 2)}
        sigma = self.coefficients(t, x1)[2]
        weight = {
            None: torch.ones_like(sigma),
            "velocity": (self.drift_var(t, x1) / sigma) ** 2,
            "likelihood": self.drift_var(t, x1) / sigma**2,
        }[self.loss_weight]
        # Score target is -x0 / sigma; multiplying by sigma keeps the residual bounded.
        residual = out - x0 if self.prediction == "noise" else out * sigma + x0
        return {"loss": _mean_flat(weight * residual**2)}

    # -- the SDE ------------------------------------------------------------------
    def diffusion(self, t: torch.Tensor, x: torch.Tensor, form: str = "sigma", norm: float = 1.0) -> torch.Tensor:
        """w_t of the sampling SDE dx = [v + w_t score] dt + sqrt(2 w_t) dW (SiT's forms)."""
        _check(form, DIFFUSION_FORMS, "diffusion form")
        tt = t.to(x.dtype).view(-1, *[1] * (x.ndim - 1))
        if form == "constant":
            return torch.full_like(tt, norm)
        if form == "SBDM":
            return norm * self.drift_var(t, x)
        if form == "sigma":
            return norm * self.coefficients(t, x)[2]
        if form == "linear":
            return norm * (1 - tt)
        if form == "decreasing":
            return 0.25 * (norm * torch.cos(math.pi * tt) + 1) ** 2
        return norm * torch.sin(math.pi * tt) ** 2

    def sde_drift(self, model_out: torch.Tensor, x: torch.Tensor, t: torch.Tensor, form: str = "sigma",
                  norm: float = 1.0) -> torch.Tensor:
        return self.velocity(model_out, x, t) + self.diffusion(t, x, form, norm) * self.score(model_out, x, t)


def _batch_t(t: float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)


@torch.no_grad()
def ode_sample(transport: Transport, model_fn: ModelFn, x: torch.Tensor, num_steps: int = 50,
               method: str = "heun") -> torch.Tensor:
    """Fixed-step Euler or Heun from noise x at t0 to data at t1, over SiT's grid of
    num_steps points (num_steps - 1 steps; Heun costs two model calls a step)."""
    _check(method, ("euler", "heun"), "ODE method")
    t0, t1 = transport.interval()
    grid = torch.linspace(t0, t1, num_steps, dtype=torch.float64).tolist()

    def f(x, t):
        tb = _batch_t(t, x)
        return transport.velocity(model_fn(x, tb), x, tb)

    for a, b in zip(grid[:-1], grid[1:]):
        k1 = f(x, a)
        x = x + (b - a) * k1 if method == "euler" else x + (b - a) / 2 * (k1 + f(x + (b - a) * k1, b))
    return x


@torch.no_grad()
def sde_sample(transport: Transport, model_fn: ModelFn, x: torch.Tensor, num_steps: int = 250,
               diffusion_form: str = "sigma", diffusion_norm: float = 1.0, last_step_size: float = 0.04,
               generator: torch.Generator | None = None,
               noise_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Euler-Maruyama as SiT: num_steps - 1 noisy steps on linspace(t0, 1 - last_step_size,
    num_steps), then one step of the drift alone ("Mean") to t = 1; num_steps model calls.
    noise_fn(x), if given, draws each step's noise instead of the generator (per-sample streams)."""
    t0, t1 = transport.interval(sde=True, diffusion_form=diffusion_form, last_step_size=last_step_size)
    grid = torch.linspace(t0, t1, num_steps, dtype=torch.float64).tolist()
    dt = grid[1] - grid[0]
    for t in grid[:-1]:
        tb = _batch_t(t, x)
        drift = transport.sde_drift(model_fn(x, tb), x, tb, diffusion_form, diffusion_norm)
        w = transport.diffusion(tb, x, diffusion_form, diffusion_norm)
        noise = (noise_fn(x) if noise_fn is not None
                 else torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator))
        x = x + drift * dt + torch.sqrt(2 * w * dt) * noise
    if last_step_size > 0:
        tb = _batch_t(t1, x)
        x = x + transport.sde_drift(model_fn(x, tb), x, tb, diffusion_form, diffusion_norm) * last_step_size
    return x
