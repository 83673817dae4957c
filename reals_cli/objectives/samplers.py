"""Sampling maths for `reals sample`: which sampler, guidance, and an adaptive ODE solver.

Every sampler here maps initial noise x (and, for the stochastic ones, a noise
function) to a normalised latent, calling `net(x, t, y) -> model output` with the
class labels y of the rows it passes and t in the model's own time (DiT: the
original step index 0..999, 999 = noise; SiT: t in [0, 1], 0 = noise, 1 = data).

Guidance interval convention: the noise level tau in [0, 1], tau = 0 data and
tau = 1 pure noise, as REPA (t = 1 noise) and ReaLS state it, so the paper's
[0, 0.75] leaves the noisiest quarter unguided. SiT: tau = 1 - t; DiT: tau = step / 999.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import UserError
from .diffusion import Diffusion, NoiseFn, ddim_sample_loop, ddpm_sample_loop
from .transport import Transport, ode_sample, sde_sample

Net = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # model(x, t, y)
SAMPLERS = {"dit": ("ddpm", "ddim"), "sit": ("ode", "sde")}
# DiT's and SiT's sample.py take 250 steps (SiT's fixed-step ODEs too); DDIM 50, as its paper's usual count.
DEFAULT_STEPS = {"ddpm": 250, "ddim": 50, "ode": 250, "sde": 250}
ODE_METHODS = ("euler", "heun", "dopri5")
# SiT's names for them, as its sample.py takes them: its fixed-step Heun is torchdiffeq's "heun2".
ODE_ALIASES = {"heun2": "heun"}


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler and its settings; `steps` is unused by dopri5, which picks its own."""

    name: str
    steps: int
    ode_method: str = "dopri5"
    rtol: float = 1e-3  # SiT's ODE defaults
    atol: float = 1e-6
    diffusion_form: str = "sigma"  # SiT's SDE defaults (sample.py); the last step to t = 1 is the mean
    last_step_size: float = 0.04

    def settings(self) -> dict:
        """The fields that matter for this sampler, for the record."""
        keep = {"ode": ("ode_method", "rtol", "atol") if self.ode_method == "dopri5" else ("ode_method", "steps"),
                "sde": ("steps", "diffusion_form", "last_step_size")}.get(self.name, ("steps",))
        return {"sampler": self.name, **{k: getattr(self, k) for k in keep}}


def resolve_sampler(objective: str, name: str | None = None, steps: int | None = None, ode_method: str | None = None,
                    rtol: float | None = None, atol: float | None = None) -> SamplerSpec:
    """The checkpoint objective's default sampler (dit: ddpm, sit: sde) unless one is named, or
    ode when only ode settings are given; checked. None means "not given": a setting that the
    sampler would ignore is refused rather than silently dropped."""
    ode_flags = [flag for flag, value in (("--ode-method", ode_method), ("--rtol", rtol), ("--atol", atol))
                 if value is not None]
    if ode_flags and objective == "dit":
        raise UserError(f"{', '.join(ode_flags)}: a dit checkpoint has no ode sampler (it samples with ddpm or ddim)")
    name = name or ("ode" if ode_flags else SAMPLERS[objective][0 if objective == "dit" else 1])
    if name not in SAMPLERS[objective]:
        raise UserError(f"--sampler {name} does not fit a {objective} checkpoint; use {' or '.join(SAMPLERS[objective])}")
    if name != "ode" and ode_flags:
        raise UserError(f"{', '.join(ode_flags)} set the ode sampler, and this run samples with {name}")
    ode_method = (ode_method or "dopri5").lower()
    ode_method = ODE_ALIASES.get(ode_method, ode_method)
    if ode_method not in ODE_METHODS:
        raise UserError(f"unknown --ode-method {ode_method!r}; choose one of {', '.join(ODE_METHODS)}")
    if name == "ode" and ode_method == "dopri5" and steps is not None:
        raise UserError("dopri5 picks its own steps from --rtol and --atol; drop --steps, or pass --ode-method "
                        "euler or heun for a fixed step count")
    if name == "ode" and ode_method != "dopri5" and (rtol, atol) != (None, None):
        raise UserError(f"--rtol and --atol control dopri5's steps; --ode-method {ode_method} takes --steps")
    steps = DEFAULT_STEPS[name] if steps is None else steps
    # Two at least: SiT's steps count grid points, and one DDPM step would read noise as t = 0.
    high = 1000 if name in ("ddpm", "ddim") else 100_000
    if not 2 <= steps <= high:
        raise UserError(f"--steps for {name} must be between 2 and {high}, got {steps}")
    rtol, atol = (SamplerSpec.rtol if rtol is None else rtol), (SamplerSpec.atol if atol is None else atol)
    if not (0 < rtol < math.inf and 0 < atol < math.inf):
        raise UserError(f"--rtol and --atol must be positive and finite, got {rtol} and {atol}")
    return SamplerSpec(name, steps, ode_method, rtol, atol)


def noise_level(objective: Diffusion | Transport) -> Callable[[torch.Tensor], torch.Tensor]:
    """tau (0 data, 1 noise; the guidance interval's time) from the model's time input."""
    if isinstance(objective, Diffusion):
        return lambda t: t.double() / (objective.num_steps - 1)
    return lambda t: 1 - t.double()


def guided(net: Net, cfg: float, interval: tuple[float, float], tau: Callable[[torch.Tensor], torch.Tensor],
           null_class: int, channels: int) -> Net:
    """net(x, t, y) with classifier-free guidance where tau(t) is in [low, high] (inclusive).

    Guided rows get uncond + cfg * (cond - uncond) on ALL `channels` prediction channels
    (DiT's release guides 3 of 4); further channels (DiT's learned variance) stay
    conditional, as DiT does. Conditional and unconditional rows share one forward pass.
    cfg = 1 never calls the unconditional model, so it is exactly the unguided sampler.
    """
    low, high = interval

    def fn(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if cfg == 1:
            return net(x, t, y)
        if low <= 0 and high >= 1:  # every row: no need to read t, which waits for the GPU
            rows = torch.arange(len(x), device=x.device)
        else:
            level = tau(t)
            rows = torch.nonzero((level >= low) & (level <= high)).flatten()
            if not len(rows):
                return net(x, t, y)
        out = net(torch.cat([x, x[rows]]), torch.cat([t, t[rows]]), torch.cat([y, torch.full_like(y[rows], null_class)]))
        out, uncond = out[: len(x)], out[len(x):, :channels]
        cond = out[rows, :channels]
        return out.index_copy(0, rows, torch.cat([uncond + cfg * (cond - uncond), out[rows, channels:]], dim=1))

    return fn


def run_sampler(objective: Diffusion | Transport, spec: SamplerSpec, net: Net, x: torch.Tensor, y: torch.Tensor,
                noise_fn: NoiseFn | None = None) -> torch.Tensor:
    """Integrate from the noise x (labels y) to a (normalised) latent with the sampler `spec`."""
    def model_fn(x, t):
        return net(x, t, y)

    if spec.name == "ddpm":
        return ddpm_sample_loop(model_fn, x.shape, spec.steps, noise=x, device=x.device,
                                num_train_steps=objective.num_steps, noise_fn=noise_fn)
    if spec.name == "ddim":
        return ddim_sample_loop(model_fn, x.shape, spec.steps, noise=x, device=x.device, num_train_steps=objective.num_steps)
    if spec.name == "sde":
        return sde_sample(objective, model_fn, x, spec.steps, spec.diffusion_form, last_step_size=spec.last_step_size,
                          noise_fn=noise_fn)
    if spec.ode_method != "dopri5":
        return ode_sample(objective, model_fn, x, spec.steps, spec.ode_method)

    def velocity(x, t, rows):  # dopri5 passes only the rows still integrating
        t = t.to(x.dtype)
        return objective.velocity(net(x, t, y[rows]), x, t)

    return dopri5(velocity, x, *objective.interval(), rtol=spec.rtol, atol=spec.atol)


# -- Dormand-Prince 5(4) ------------------------------------------------------------------------

_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),  # = the 5th-order weights: FSAL
)
_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_E = tuple(b - b4 for b, b4 in zip(_A[6] + (0.0,), _B4))  # 5th minus 4th order: the local error


def _rms(v: torch.Tensor) -> torch.Tensor:
    return v.double().flatten(1).pow(2).mean(1).sqrt()


@torch.no_grad()
def dopri5(f: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, t0: float, t1: float,
           rtol: float = 1e-3, atol: float = 1e-6, max_steps: int = 10_000) -> torch.Tensor:
    """Solve dx/dt = f(x, t, rows) from t0 to t1 > t0 with adaptive Dormand-Prince 5(4).

    Each sample has its own time and step size and is accepted or rejected on its own
    error (RMS of err / (atol + rtol |x|) <= 1, Hairer's control), so a sample's
    trajectory does not depend on which others share its batch. f gets float64 times
    (one per row) and `rows`, the batch positions of the rows it is given: samples that
    have reached t1 are not evaluated again.
    """
    shape = (-1,) + (1,) * (x.ndim - 1)
    x = x.clone()
    rows = torch.arange(len(x), device=x.device)
    t = torch.full((len(x),), float(t0), dtype=torch.float64, device=x.device)
    k1 = f(x, t, rows)
    h = _initial_step(f, x, t, k1, rows, rtol, atol).clamp(max=t1 - t0)
    active = rows
    for _ in range(max_steps):
        if not len(active):
            return x
        xa, ta = x[active], t[active]
        last = h[active] >= t1 - ta
        ha = torch.where(last, t1 - ta, h[active])
        hx = ha.to(x.dtype).view(shape)
        k = [k1[active]]
        for c, a in zip(_C[1:], _A[1:]):
            k.append(f(xa + hx * sum(w * kj for w, kj in zip(a, k) if w), ta + c * ha, active))
        x5 = xa + hx * sum(w * kj for w, kj in zip(_A[6], k) if w)
        err = _rms(hx * sum(w * kj for w, kj in zip(_E, k) if w) / (atol + rtol * torch.maximum(xa.abs(), x5.abs())))
        ok = err <= 1
        done = active[ok]
        x[done], k1[done] = x5[ok], k[6][ok]  # k[6] = f(x5, t + h): the next step's first stage
        t[done] = torch.where(last[ok], torch.full_like(ta[ok], t1), ta[ok] + ha[ok])
        # Standard controller: safety 0.9, growth within [0.2, 10], never growing after a rejection.
        factor = (0.9 * err.clamp(min=1e-10) ** -0.2).clamp(0.2, 10.0)
        h[active] = ha * torch.where(ok, factor, factor.clamp(max=1.0))
        active = active[t[active] < t1]
    raise UserError(f"dopri5 did not reach t = {t1} within {max_steps} steps; loosen --rtol/--atol "
                    f"or use --ode-method heun")


def _initial_step(f, x, t, f0, rows, rtol, atol) -> torch.Tensor:
    """Per-sample first step size (Hairer, Norsett & Wanner, Solving ODEs I, II.4)."""
    scale = atol + rtol * x.abs()
    d0, d1 = _rms(x / scale), _rms(f0 / scale)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
    f1 = f(x + h0.to(x.dtype).view((-1,) + (1,) * (x.ndim - 1)) * f0, t + h0, rows)
    d2 = _rms((f1 - f0) / scale) / h0
    big = torch.maximum(d1, d2)
    h1 = torch.where(big <= 1e-15, torch.maximum(torch.full_like(h0, 1e-6), h0 * 1e-3), (0.01 / big) ** 0.2)
    return torch.minimum(100 * h0, h1)
