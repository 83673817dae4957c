"""DiT's objective: a 1000-step DDPM with learned variances (ADM / improved DDPM).

Conventions of the official DiT checkpoints, which decide whether they sample:
- step index t in 0..T-1, t = T-1 is nearly pure noise; the network receives the
  index of the ORIGINAL 1000-step schedule even when sampling a respaced one;
- output channels [:C] are eps, [C:] a value v in [-1, 1] that interpolates the
  log variance between the posterior variance (v = -1) and beta_t (v = +1);
- loss = MSE(eps) + VLB term in bits, the VLB seeing the mean detached so that it
  only trains the variance. A C-channel output means fixed variance beta_t.

Schedules are float64 tensors (as ADM's numpy arrays); coefficients are cast to the
input's dtype when applied. Training uses the full schedule, so there the sampled
index is also what the network receives:

    t = diffusion.sample_time(B, device); x_t = diffusion.q_sample(x0, t, noise)
    terms = diffusion.loss(model(x_t, t, y), x0, x_t, t, noise)  # per-sample "loss", "mse", "vb"

`p_sample` and `ddim_sample` are the single steps; the loops below only chain them.
Every model_fn is model_fn(x_t, t_original) -> output, so guidance wraps outside.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..errors import UserError

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseFn = Callable[[torch.Tensor], torch.Tensor]  # x -> fresh N(0, I) noise shaped like x


def linear_betas(num_steps: int = 1000) -> torch.Tensor:
    """Ho et al.'s 1e-4..0.02, scaled by 1000 / num_steps so any length has the same total noise."""
    scale = 1000 / num_steps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=torch.float64)


def space_timesteps(num_steps: int, section_counts: str | int | list[int]) -> list[int]:
    """Which original steps a respaced sampler keeps (ADM's rule).

    "250" (or 250) takes 250 evenly spaced steps including 0 and num_steps-1;
    "10,15,20" splits the schedule in three equal sections with that many steps each;
    "ddim50" takes the integer stride that yields exactly 50 steps (DDIM's choice).
    """
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    elif isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            wanted = int(section_counts[4:])
            for stride in range(1, num_steps):
                if len(range(0, num_steps, stride)) == wanted:
                    return list(range(0, num_steps, stride))
            raise UserError(f"no integer stride gives exactly {wanted} of {num_steps} steps")
        section_counts = [int(c) for c in section_counts.split(",")]
    size, extra = divmod(num_steps, len(section_counts))
    steps, start = [], 0
    for i, count in enumerate(section_counts):
        length = size + (i < extra)
        if not 1 <= count <= length:
            raise UserError(f"cannot take {count} steps from a section of {length}")
        stride = (length - 1) / (count - 1) if count > 1 else 1
        # Summed, not multiplied: ADM's float sum rounds x.5 points down (21 steps keep 499, not
        # 500), and a respaced model must see exactly DiT's timesteps.
        position = 0.0
        for _ in range(count):
            steps.append(start + round(position))
            position += stride
        start += length
    return sorted(set(steps))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """ADM's tanh approximation of the standard normal CDF (within 2e-4 of it)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(x) of N(mean, e^(2 log_scale)) integrated over x's bin of width 2/255: ADM's
    decoder for data in [-1, 1], the outermost bins extending to infinity. As DiT trains it:
    the tanh CDF, and every probability clamped at 1e-12, which bounds the term at 27.6 nats
    for latents far outside [-1, 1]."""
    inv_scale = torch.exp(-log_scale)
    cdf_upper = approx_standard_normal_cdf((x - mean + 1 / 255) * inv_scale)
    cdf_lower = approx_standard_normal_cdf((x - mean - 1 / 255) * inv_scale)
    probability = torch.where(x < -0.999, cdf_upper, torch.where(x > 0.999, 1.0 - cdf_lower, cdf_upper - cdf_lower))
    return torch.log(probability.clamp(min=1e-12))


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


def _randn_like(x: torch.Tensor, generator: torch.Generator | None, noise_fn: NoiseFn | None) -> torch.Tensor:
    # noise_fn lets a caller give every sample its own stream (batch-size independent results).
    if noise_fn is not None:
        return noise_fn(x)
    return torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)


class Diffusion:
    """A DDPM over a beta schedule; `timestep_map[i]` is the original index of step i."""

    def __init__(self, betas: torch.Tensor, timestep_map: torch.Tensor | None = None):
        betas = betas.to(torch.float64)
        self._tables: dict = {}  # (table, device) -> the table there; see _at
        self.betas = betas
        self.log_betas = torch.log(betas)
        self.num_steps = len(betas)
        self.timestep_map = torch.arange(self.num_steps) if timestep_map is None else timestep_map
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0; its log is clipped to the t = 1 value.
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * (1.0 - betas).sqrt() / (1.0 - self.alphas_cumprod)
        # Fixed ("large") variance for C-channel models: beta_t, with t = 0 as the posterior's.
        self.fixed_log_variance = torch.log(torch.cat([self.posterior_variance[1:2], betas[1:]]))

    @classmethod
    def linear(cls, num_steps: int = 1000) -> "Diffusion":
        return cls(linear_betas(num_steps))

    def respace(self, section_counts: str | int | list[int]) -> "Diffusion":
        """The same process on a subset of steps: betas re-derived so that alphas_cumprod
        at the kept steps is unchanged; the model still receives the original indices."""
        kept = torch.tensor(space_timesteps(self.num_steps, section_counts))
        abar = self.alphas_cumprod[kept]
        betas = 1.0 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
        return Diffusion(betas, self.timestep_map[kept])

    def _at(self, arr: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """arr[t] shaped to broadcast against x (B x ...), in x's dtype. Each table is copied to
        t's device once: a copy per call would make the host wait for the GPU every step."""
        key = (id(arr), t.device)
        if key not in self._tables:
            self._tables[key] = arr.to(t.device)
        return self._tables[key][t].to(x.dtype).view(-1, *[1] * (x.ndim - 1))

    def sample_time(self, batch: int, device: torch.device | str, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randint(0, self.num_steps, (batch,), device=device, generator=generator)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        abar = self._at(self.alphas_cumprod, t, x0)
        return abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x0)."""
        mean = self._at(self.posterior_mean_coef1, t, x_t) * x0 + self._at(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, self._at(self.posterior_variance, t, x_t), self._at(self.posterior_log_variance_clipped, t, x_t)

    def predict_x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        abar = self._at(self.alphas_cumprod, t, x_t)
        return (x_t - (1.0 - abar).sqrt() * eps) / abar.sqrt()

    def predict_eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        abar = self._at(self.alphas_cumprod, t, x_t)
        return (x_t - abar.sqrt() * x0) / (1.0 - abar).sqrt()

    def p_mean_variance(self, model_out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False) -> dict:
        """p(x_{t-1} | x_t) from the model output: mean, log_variance, pred_x0, eps.

        clip_denoised clamps pred_x0 to [-1, 1], meant for pixels; DiT samples latents without it.
        """
        C = x_t.shape[1]
        if model_out.shape[1] == 2 * C:
            eps, v = model_out.split(C, dim=1)
            frac = (v + 1) / 2
            min_log = self._at(self.posterior_log_variance_clipped, t, x_t)
            max_log = self._at(self.log_betas, t, x_t)
            log_variance = frac * max_log + (1 - frac) * min_log
        elif model_out.shape[1] == C:
            eps, log_variance = model_out, self._at(self.fixed_log_variance, t, x_t).expand_as(x_t)
        else:
            raise ValueError(f"model output has {model_out.shape[1]} channels, expected {C} or {2 * C}")
        pred_x0 = self.predict_x0_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1, 1)
            eps = self.predict_eps_from_x0(x_t, t, pred_x0)
        mean, _, _ = self.q_posterior(pred_x0, x_t, t)
        return {"mean": mean, "log_variance": log_variance, "pred_x0": pred_x0, "eps": eps}

    def vb_terms(self, model_out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Per-sample VLB term in bits/dim: KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for t > 0,
        the decoder's negative log-likelihood of x0 at t = 0."""
        true_mean, _, true_log_var = self.q_posterior(x0, x_t, t)
        p = self.p_mean_variance(model_out, x_t, t)
        kl = _mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"]))
        nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"]))
        return torch.where(t == 0, nll, kl) / math.log(2.0)

    def loss(self, model_out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> dict:
        """Per-sample training terms: mse (eps) and, for learned variances, vb; loss = their sum."""
        C = x0.shape[1]
        eps = model_out[:, :C]
        terms = {"mse": _mean_flat((noise - eps) ** 2)}
        if model_out.shape[1] == 2 * C:
            # The VLB trains only the variance: it sees the eps prediction as a constant.
            frozen = torch.cat([eps.detach(), model_out[:, C:]], dim=1)
            terms["vb"] = self.vb_terms(frozen, x0, x_t, t)
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms

    def _model_t(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0],), int(self.timestep_map[i]), device=x.device, dtype=torch.long)

    def p_sample(self, model_fn: ModelFn, x: torch.Tensor, i: int, clip_denoised: bool = False,
                 generator: torch.Generator | None = None, noise_fn: NoiseFn | None = None) -> dict:
        """One ancestral step from schedule step i to i-1 (no noise is added at i = 0)."""
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        p = self.p_mean_variance(model_fn(x, self._model_t(i, x)), x, t, clip_denoised)
        if i == 0:
            return {"sample": p["mean"], "pred_x0": p["pred_x0"]}
        noise = _randn_like(x, generator, noise_fn)
        return {"sample": p["mean"] + torch.exp(0.5 * p["log_variance"]) * noise, "pred_x0": p["pred_x0"]}

    def ddim_sample(self, model_fn: ModelFn, x: torch.Tensor, i: int, eta: float = 0.0, clip_denoised: bool = False,
                    generator: torch.Generator | None = None, noise_fn: NoiseFn | None = None) -> dict:
        """One DDIM step (Song et al. eq. 12) from step i to i-1; eta = 0 is deterministic."""
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        p = self.p_mean_variance(model_fn(x, self._model_t(i, x)), x, t, clip_denoised)
        abar = self._at(self.alphas_cumprod, t, x)
        abar_prev = self._at(self.alphas_cumprod_prev, t, x)
        sigma = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
        sample = abar_prev.sqrt() * p["pred_x0"] + (1 - abar_prev - sigma**2).sqrt() * p["eps"]
        if i > 0 and eta > 0:
            sample = sample + sigma * _randn_like(x, generator, noise_fn)
        return {"sample": sample, "pred_x0": p["pred_x0"]}


def _sample_loop(step, model_fn, shape, steps, noise, device, num_train_steps, generator, noise_fn, **step_kwargs):
    diffusion = Diffusion.linear(num_train_steps).respace(steps)
    x = torch.randn(shape, device=device, generator=generator) if noise is None else noise
    for i in reversed(range(diffusion.num_steps)):
        x = step(diffusion, model_fn, x, i, generator=generator, noise_fn=noise_fn, **step_kwargs)["sample"]
    return x


@torch.no_grad()
def ddpm_sample_loop(model_fn: ModelFn, shape, steps: str | int = 250, *, noise: torch.Tensor | None = None,
                     device: torch.device | str = "cpu", num_train_steps: int = 1000, clip_denoised: bool = False,
                     generator: torch.Generator | None = None, noise_fn: NoiseFn | None = None) -> torch.Tensor:
    """Ancestral sampling over `steps` respaced steps (DiT samples with 250)."""
    return _sample_loop(Diffusion.p_sample, model_fn, shape, steps, noise, device, num_train_steps, generator,
                        noise_fn, clip_denoised=clip_denoised)


@torch.no_grad()
def ddim_sample_loop(model_fn: ModelFn, shape, steps: str | int = 50, *, eta: float = 0.0,
                     noise: torch.Tensor | None = None, device: torch.device | str = "cpu", num_train_steps: int = 1000,
                     clip_denoised: bool = False, generator: torch.Generator | None = None,
                     noise_fn: NoiseFn | None = None) -> torch.Tensor:
    """DDIM sampling over `steps` respaced steps ("ddim50" for DDIM's own stride)."""
    return _sample_loop(Diffusion.ddim_sample, model_fn, shape, steps, noise, device, num_train_steps, generator,
                        noise_fn, eta=eta, clip_denoised=clip_denoised)
