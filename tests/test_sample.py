"""reals sample: samplers against closed forms, guidance, determinism, resume after SIGKILL, outputs, bad input.

The closed forms use Gaussian data N(M, S^2) per dimension, whose optimal velocity
and eps are known exactly (see tests/test_transport.py for their derivation).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from reals_cli.artifacts import read_manifest, save_weights, write_manifest
from reals_cli.cli import main
from reals_cli.data.latent_store import open_store
from reals_cli.errors import UserError
from reals_cli.models.alignment import AlignConfig, AlignmentNet
from reals_cli.models.dit import DiT, build_dit
from reals_cli.models.reals_vae import load_reals_vae, save_reals_vae
from reals_cli.models.vae import AutoencoderKL, vae_config
from reals_cli.objectives.diffusion import Diffusion, space_timesteps
from reals_cli.objectives.samplers import SamplerSpec, dopri5, guided, noise_level, resolve_sampler, run_sampler
from reals_cli.objectives.transport import Transport
from reals_cli.pipeline.model_artifact import EMA_FILE, MODEL_FILE, TrainDiTConfig, build_objective, load_model
from reals_cli.pipeline.sample import SampleConfig, SampleNoise, generate, in_fixed_batches, sample

F64 = torch.float64
M, S = 0.7, 0.4  # data distribution N(M, S^2)
MEAN, STD = [1.0, -1.0, 0.5, 0.0], [2.0, 0.5, 1.0, 3.0]  # the checkpoints' latent normalisation


# -- exact models for Gaussian data --------------------------------------------------------------

def sit_velocity(x, t, y=None):
    """E[x1 - x0 | x_t] on the linear path: p_t = N(t M, sigma_t^2), sigma_t^2 = t^2 S^2 + (1 - t)^2."""
    t = t.to(x.dtype).view(-1, *[1] * (x.ndim - 1))
    return M + (t * S**2 - (1 - t)) / (t**2 * S**2 + (1 - t) ** 2) * (x - t * M)


def sit_flow(noise):
    """The exact probability-flow map noise (t = 0) -> data (t = 1): x_t = t M + sigma_t z, so M + S z."""
    return M + S * noise


ABAR = Diffusion.linear().alphas_cumprod


def dit_eps(x, t, y=None):
    """E[eps | x_t] for x_t = sqrt(a) x0 + sqrt(1 - a) eps, t the original step index."""
    a = ABAR[t].to(x.dtype).view(-1, *[1] * (x.ndim - 1))
    return (1 - a).sqrt() * (x - a.sqrt() * M) / (a * S**2 + 1 - a)


def _noise(n, dim=1, seed=0):
    return torch.randn(n, dim, dtype=F64, generator=torch.Generator().manual_seed(seed))


def _solve(objective, spec, net, z, noise_fn=None):
    """run_sampler with every sample in class 0 (the exact models ignore the class)."""
    return run_sampler(objective, spec, net, z, torch.zeros(len(z), dtype=torch.long), noise_fn)


def _stream(seed=1):
    g = torch.Generator().manual_seed(seed)
    return lambda x: torch.randn(x.shape, generator=g, dtype=x.dtype)


# -- samplers, each on its own -------------------------------------------------------------------

@pytest.mark.parametrize("method, order", [("euler", 1), ("heun", 2)])
def test_fixed_step_ode_converges_at_its_order(method, order):
    tr, z = Transport(), _noise(64)
    errors = [(_solve(tr, SamplerSpec("ode", n + 1, method), sit_velocity, z) - sit_flow(z)).abs().max().item()
              for n in (16, 32, 64)]
    rates = [math.log2(a / b) for a, b in zip(errors[:-1], errors[1:])]
    assert all(abs(r - order) < 0.15 for r in rates), (errors, rates)


def test_dopri5_meets_its_tolerance_and_each_sample_is_independent():
    tr, z = Transport(), _noise(32)
    calls = []

    def f(x, t, rows):
        calls.append(len(rows))
        return sit_velocity(x, t)

    errors = []
    for tol in (1e-5, 1e-8):
        x = _solve(tr, SamplerSpec("ode", 0, "dopri5", rtol=tol, atol=tol), sit_velocity, z)
        errors.append((x - sit_flow(z)).abs().max().item())
        # The tolerance bounds each step's local error; the global error stays within a small multiple
        # (scipy's RK45, the same method, gives 2e-3 at 1e-4 on this problem).
        assert errors[-1] < 30 * tol, errors
    assert errors[1] < errors[0] / 300
    x = dopri5(f, z, 0.0, 1.0, rtol=1e-5, atol=1e-5)
    assert sum(calls) / len(z) < 80  # adaptive: far fewer evaluations than a fixed grid of this accuracy
    alone = torch.cat([dopri5(sit_velocity, z[i:i + 1], 0.0, 1.0, 1e-5, 1e-5) for i in range(4)])
    assert torch.equal(alone, x[:4])  # a sample's steps do not depend on its batch


def test_euler_maruyama_reaches_the_data_distribution_and_ends_with_the_mean():
    tr = Transport()
    x = _solve(tr, resolve_sampler("sit"), sit_velocity, _noise(20_000), _stream())
    assert x.mean().item() == pytest.approx(M, abs=0.01)
    assert x.std().item() == pytest.approx(S, rel=0.03)
    # SiT's schedule: num_steps model calls, the last (to t = 1) the drift alone, without noise.
    draws = []

    def counting(x):
        draws.append(1)
        return torch.zeros_like(x)

    _solve(tr, SamplerSpec("sde", 10), sit_velocity, _noise(4), counting)
    assert len(draws) == 9


def _law(objective, spec, net) -> tuple[float, float]:
    """The exact mean and std of a stochastic sampler's output for N(0, 1) start and step noise.

    With the exact model of Gaussian data each step is affine in x and in its noise, so the
    output is c + A x0 + sum_k B_k z_k: one row per term, fed a 1 where its term is, gives
    them all, and the law is N(c, A^2 + sum_k B_k^2). No Monte Carlo error, so the order shows.
    """
    rows = spec.steps + 2  # c, A, and a B_k for each of at most `steps` draws
    x0 = torch.zeros(rows, 1, dtype=F64)
    x0[1] = 1
    draws = []

    def unit_noise(x):
        z = torch.zeros_like(x)
        z[2 + len(draws)] = 1
        draws.append(1)
        return z

    out = _solve(objective, spec, net, x0, unit_noise)[:, 0]
    c, a, b = out[0], out[1] - out[0], out[2:] - out[0]
    return c.item(), (a**2 + (b**2).sum()).sqrt().item()


def test_euler_maruyama_converges_at_weak_order_one():
    """Against the limit of SiT's scheme (4096 steps). The SDE keeps the marginals: at
    t1 = 1 - 0.04 its law is p_t1 = N(t1 M, t1^2 S^2 + (1 - t1)^2). SiT's last step, the drift
    alone over that fixed 0.04, is an affine map of it, whose bias (std 0.3937 for 0.4) no
    step count changes."""
    tr, t1 = Transport(), 1 - SamplerSpec.last_step_size
    ends, tb = torch.tensor([[0.0], [1.0]], dtype=F64), torch.full((2,), t1, dtype=F64)
    last = (ends + (1 - t1) * tr.sde_drift(sit_velocity(ends, tb), ends, tb, "sigma", 1.0))[:, 0]
    slope, intercept = (last[1] - last[0]).item(), last[0].item()
    exact = slope * t1 * M + intercept, abs(slope) * math.sqrt(t1**2 * S**2 + (1 - t1) ** 2)
    limit = _law(tr, SamplerSpec("sde", 4096), sit_velocity)
    assert limit == pytest.approx(exact, abs=1e-4) and exact[1] == pytest.approx(0.3937, abs=1e-4)
    errors = [abs(_law(tr, SamplerSpec("sde", n), sit_velocity)[1] - limit[1]) for n in (64, 128, 256)]
    rates = [math.log2(a / b) for a, b in zip(errors[:-1], errors[1:])]
    assert all(abs(r - 1) < 0.15 for r in rates), (errors, rates)


def test_ddpm_converges_to_the_data_distribution_at_order_one():
    errors = [abs(_law(Diffusion.linear(), SamplerSpec("ddpm", n), dit_eps)[1] - S) for n in (100, 200, 400)]
    rates = [math.log2(a / b) for a, b in zip(errors[:-1], errors[1:])]
    assert all(abs(r - 1) < 0.15 for r in rates) and errors[-1] < 0.003, (errors, rates)


def test_ddpm_reaches_the_data_distribution():
    x = _solve(Diffusion.linear(), resolve_sampler("dit"), dit_eps, _noise(20_000), _stream())
    assert x.mean().item() == pytest.approx(M, abs=0.01)
    assert x.std().item() == pytest.approx(S, rel=0.03)


def test_ddim_converges_to_the_probability_flow_map():
    # The PF ODE of Gaussian data maps x_T at abar_T affinely: x0 = M + S (x_T - sqrt(a) M) / sqrt(a S^2 + 1 - a).
    z, a = _noise(16), ABAR[999].item()
    exact = M + S * (z - math.sqrt(a) * M) / math.sqrt(a * S**2 + 1 - a)
    errors = [(_solve(Diffusion.linear(), SamplerSpec("ddim", n), dit_eps, z) - exact).abs().max().item()
              for n in (25, 100, 400)]
    rates = [math.log(a / b, 4) for a, b in zip(errors[:-1], errors[1:])]
    assert all(abs(r - 1) < 0.15 for r in rates) and errors[-1] < 0.01, errors  # DDIM is a first-order PF-ODE solver


# -- guidance ------------------------------------------------------------------------------------

class CountingNet:
    """A fake conditional model with 2C outputs: eps-like half depends on y, variance half too."""

    def __init__(self, null=3):
        self.null, self.calls, self.guided_rows = null, 0, 0

    def __call__(self, x, t, y):
        self.calls += 1
        self.guided_rows += int((y == self.null).sum())
        scale = (y.to(x.dtype) + 1).view(-1, 1, 1, 1)
        return torch.cat([x * scale, -x * scale], dim=1)


def test_guidance_mixes_all_channels_in_one_forward_and_keeps_the_conditional_variance():
    net, x = CountingNet(), torch.randn(2, 4, 2, 2, dtype=F64)
    y, t = torch.tensor([0, 2]), torch.tensor([0.3, 0.9], dtype=F64)
    out = guided(net, 4.0, (0, 1), lambda t: t, 3, 4)(x, t, y)
    # The whole interval never reads t (on a GPU a read waits for it), and guides every row the same.
    assert torch.equal(out, guided(net, 4.0, (0, 1), lambda t: 1 / 0, 3, 4)(x, t, y))
    assert torch.equal(out, guided(net, 4.0, (0, 1.0 - 1e-9), lambda t: t, 3, 4)(x, t, y))
    net.calls = 0
    out = guided(net, 4.0, (0, 1), lambda t: t, 3, 4)(x, t, y)
    cond, uncond = net(x, t, y), net(x, t, torch.full_like(y, 3))
    torch.testing.assert_close(out[:, :4], uncond[:, :4] + 4 * (cond[:, :4] - uncond[:, :4]))  # all 4 channels
    torch.testing.assert_close(out[:, 4:], cond[:, 4:])
    assert net.calls == 3  # the guided call was one forward (then our two references)


def test_cfg_one_is_exactly_the_unguided_sampler():
    tr, z = Transport(), torch.randn(3, 4, 2, 2)
    y = torch.tensor([0, 1, 2])
    net = CountingNet()
    fn = guided(net, 1.0, (0, 1), noise_level(tr), 3, 4)
    a = run_sampler(tr, SamplerSpec("sde", 6), fn, z, y, SampleNoise(0, range(3), (4, 2, 2), "cpu"))
    b = run_sampler(tr, SamplerSpec("sde", 6), net, z, y, SampleNoise(0, range(3), (4, 2, 2), "cpu"))
    assert torch.equal(a, b) and net.guided_rows == 0


def test_the_guidance_interval_is_honoured_in_both_time_conventions():
    z, y = torch.randn(2, 4, 2, 2), torch.tensor([0, 1])
    # SiT, Euler on t = 0, 0.1, ..., 1: calls at t = 0..0.9, tau = 1 - t; [0, 0.55] guides t = 0.5..0.9.
    net = CountingNet()
    fn = guided(net, 2.0, (0.0, 0.55), noise_level(Transport()), 3, 4)
    run_sampler(Transport(), SamplerSpec("ode", 11, "euler"), fn, z, y)
    assert (net.calls, net.guided_rows) == (10, 5 * 2)
    # DiT, 10 DDPM steps: tau = original step / 999.
    net, diffusion = CountingNet(), Diffusion.linear()
    fn = guided(net, 2.0, (0.2, 0.6), noise_level(diffusion), 3, 4)
    run_sampler(diffusion, SamplerSpec("ddpm", 10), lambda x, t, y: fn(x, t, y)[:, :4], z, y, _stream())
    expected = sum(0.2 <= k / 999 <= 0.6 for k in space_timesteps(1000, 10))
    assert expected == 4 and net.guided_rows == expected * 2


# -- the command -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> Path:
    """A tiny VAE (16 px <-> 4x8x8) and a random SiT and DiT (DiT-S/4: 2x2 tokens) trained on its latents."""
    root = tmp_path_factory.mktemp("sample")
    torch.manual_seed(0)
    save_reals_vae(root / "vae", AutoencoderKL(vae_config("tiny")), AlignmentNet(AlignConfig(4, 8, 6, 4, hidden=8)),
                   {"image_size": 16}, {}, {})
    torch.manual_seed(1)
    save_reals_vae(root / "other_vae", AutoencoderKL(vae_config("tiny")), AlignmentNet(AlignConfig(4, 8, 6, 4, hidden=8)),
                   {"image_size": 16}, {}, {})
    vae_id = load_reals_vae(root / "vae").id
    for objective in ("sit", "dit"):
        for name, vae_path in ((objective, root / "vae"), (f"{objective}_novae", root / "missing")):
            _make_ckpt(root / name, objective, vae_id, vae_path)
    return root


def _make_ckpt(out: Path, objective: str, vae_id: str, vae_path: Path) -> None:
    torch.manual_seed(2)
    model = build_dit("DiT-S/4", 8, 4, 3)
    with torch.no_grad():  # adaLN-Zero starts with output 0: random weights make time, class and input matter
        for p in model.parameters():
            p.normal_(0, 0.02)
    out.mkdir()
    save_weights(out / MODEL_FILE, model.state_dict())
    save_weights(out / EMA_FILE, {k: 0.9 * v for k, v in model.state_dict().items()})
    config = dataclasses.asdict(TrainDiTConfig(latents="lat.zarr", out=str(out), model="DiT-S/4", objective=objective)) | {
        "latent_shape": [4, 8, 8], "num_classes": 3, "classes": ["a", "b", "c"], "latent_mean": MEAN,
        "latent_std": STD, "vae_id": vae_id, "vae_path": str(vae_path)}
    write_manifest(out, "dit", 1, config, {}, {}, files=[MODEL_FILE, EMA_FILE])


def _run(ckpts, out, **kw) -> dict:
    flags = dict(num_samples=5, block_size=2, batch_size=2, steps=5, cfg=3.0, cfg_interval=(0.0, 0.7), device="cpu")
    return sample(SampleConfig(ckpt=str(ckpts / kw.pop("objective", "sit")), out=str(out), **{**flags, **kw}))


def _outputs(out: Path):
    with np.load(out / "samples.npz") as f:
        images, labels = f["arr_0"], f["arr_1"]
    store = open_store(out / "latents.zarr")
    return images, labels, store.read(np.arange(store.rows))[:, 0, 0]


def test_outputs_formats_and_normalisation(ckpts, tmp_path):
    out = tmp_path / "o"
    _run(ckpts, out, sampler="ode", ode_method="heun", png=True, classes=["2", "a"])
    images, labels, z = _outputs(out)
    assert images.shape == (5, 16, 16, 3) and images.dtype == np.uint8
    assert labels.tolist() == [2, 0, 2, 0, 2]
    store = open_store(out / "latents.zarr")
    assert store.complete and store.vae_id == read_manifest(ckpts / "sit")["config"]["vae_id"]
    # The stored latents are raw: the sampler's normalised output times std plus mean (recomputed here).
    manifest = read_manifest(ckpts / "sit")
    model, objective = load_model(ckpts / "sit", manifest), build_objective(manifest["config"])
    net = guided(model, 3.0, (0.0, 0.7), noise_level(objective), 3, 4)
    y = torch.tensor(labels)
    with torch.inference_mode():
        x = run_sampler(objective, SamplerSpec("ode", 5, "heun"), net, SampleNoise(0, range(5), (4, 8, 8), "cpu")(), y)
    expected = x * torch.tensor(STD).view(-1, 1, 1) + torch.tensor(MEAN).view(-1, 1, 1)
    np.testing.assert_allclose(z, expected.numpy(), atol=1e-5)
    # ...and decode to the images.
    vae = load_reals_vae(ckpts / "vae").vae
    with torch.inference_mode():
        decoded = ((vae.decode(torch.from_numpy(z)).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert np.abs(decoded.numpy().astype(int) - images).max() <= 1
    assert np.array_equal(np.asarray(Image.open(out / "images" / "000003.png")), images[3])
    grid = np.asarray(Image.open(out / "grid.png"))  # one row per class, by class id: [1, 3, blank], [0, 2, 4]
    assert grid.shape == (2 * 16, 3 * 16, 3)
    assert np.array_equal(grid[:16, :32], np.concatenate([images[1], images[3]], 1)) and not grid[:16, 32:].any()
    assert np.array_equal(grid[16:], np.concatenate([images[0], images[2], images[4]], 1))
    m = read_manifest(out, "samples", 1)
    assert m["config"]["sampler"] == "ode" and m["config"]["ode_method"] == "heun" and m["config"]["cfg"] == 3.0
    assert m["config"]["cfg_interval"] == [0.0, 0.7] and m["config"]["weights"] == "ema" and m["config"]["classes"] == [2, 0]
    assert m["inputs"]["ckpt"]["id"] == manifest["id"] and not (out / "parts").exists()
    same = ["-n", "5", "--block-size", "2", "--steps", "5", "--cfg", "3", "--cfg-interval", "0,0.7", "--sampler", "ode",
            "--ode-method", "heun", "--png", "--classes", "2,a", "--batch-size", "2"]
    again = CliRunner().invoke(main, ["sample", "--ckpt", str(ckpts / "sit"), "--out", str(out), "--device", "cpu", *same])
    assert again.exit_code == 0 and "already complete" in again.output, again.output
    other = CliRunner().invoke(main, ["sample", "--ckpt", str(ckpts / "sit"), "--out", str(out), "-n", "5", "--device", "cpu"])
    assert other.exit_code == 2 and "holds samples made with other settings" in other.output
    compiled = CliRunner().invoke(main, ["sample", "--ckpt", str(ckpts / "sit"), "--out", str(out), "--device", "cpu",
                                         *same, "--compile"])
    assert compiled.exit_code == 2 and "holds samples made with other settings" in compiled.output


@pytest.mark.parametrize("flags, nfe", [
    # SiT's grid: --steps 3 is 3 points, 2 steps; guided, two rows a step; Heun, two calls a step
    (dict(ode_method="euler", steps=3, cfg=3.0, cfg_interval=(0.0, 1.0)), 4.0),
    (dict(ode_method="euler", steps=3, cfg=1.0, cfg_interval=(0.0, 1.0)), 2.0),
    (dict(ode_method="heun", steps=3, cfg=1.0, cfg_interval=(0.0, 1.0)), 4.0),
    (dict(cfg=1.0, cfg_interval=(0.0, 1.0)), None),  # dopri5: counted from its calls below
])
def test_manifest_records_network_evaluations_per_sample(ckpts, tmp_path, flags, nfe):
    result = _run(ckpts, tmp_path / "o", sampler="ode", **{"steps": None, **flags})
    if nfe is None:  # as many rows as dopri5 asks the network for, with one call per stage
        manifest = read_manifest(ckpts / "sit")
        rows = []
        generate(load_model(ckpts / "sit", manifest), manifest["config"], load_reals_vae(ckpts / "vae").vae,
                 torch.from_numpy(_outputs(tmp_path / "o")[1]), range(5), 0, SamplerSpec("ode", 0, "dopri5"),
                 evaluations=rows)
        nfe = sum(rows) / 5
        assert nfe > 12  # more than two dopri5 steps of six stages
    assert result["manifest"]["metrics"]["network_evaluations_per_sample"] == nfe


def test_png_on_a_finished_folder_writes_the_missing_ones(ckpts, tmp_path):
    """PNGs are a copy of samples.npz: asked for after the run, they are written from it, and
    the manifest (its id) does not change."""
    out = tmp_path / "o"
    _run(ckpts, out, sampler="ode", ode_method="euler", steps=3)
    before = read_manifest(out, "samples", 1)
    assert not (out / "images").exists()
    args = ["sample", "--ckpt", str(ckpts / "sit"), "--out", str(out), "--device", "cpu", "-n", "5", "--block-size", "2",
            "--sampler", "ode", "--ode-method", "euler", "--steps", "3", "--cfg", "3", "--cfg-interval", "0,0.7",
            "--batch-size", "2", "--png"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert f"wrote 5 missing PNGs into {out / 'images'}" in " ".join(first.output.split())
    images, _, _ = _outputs(out)
    for i in range(5):
        assert np.array_equal(np.asarray(Image.open(out / "images" / f"{i:06d}.png")), images[i])
    (out / "images" / "000002.png").unlink()  # as after a kill
    again = CliRunner().invoke(main, args)
    assert f"wrote 1 missing PNG into {out / 'images'}" in " ".join(again.output.split())
    assert np.array_equal(np.asarray(Image.open(out / "images" / "000002.png")), images[2])
    assert read_manifest(out, "samples", 1) == before


def test_cfg_channels_guides_only_the_first_channels(ckpts, tmp_path):
    """DiT's and SiT's scripts guide 3 of 4 channels; --cfg-channels 3 does that, 4 is "all"."""
    _run(ckpts, tmp_path / "all", num_samples=2)
    _run(ckpts, tmp_path / "four", num_samples=2, cfg_channels=4)
    _run(ckpts, tmp_path / "three", num_samples=2, cfg_channels=3)
    assert read_manifest(tmp_path / "four")["id"] == read_manifest(tmp_path / "all")["id"]
    assert read_manifest(tmp_path / "three")["config"]["cfg_channels"] == 3
    # Recomputed: guidance on channels 0-2, the conditional prediction on channel 3.
    manifest = read_manifest(ckpts / "sit")
    model, objective = load_model(ckpts / "sit", manifest), build_objective(manifest["config"])
    labels, noise = torch.tensor([0, 1]), SampleNoise(0, range(2), (4, 8, 8), "cpu")
    with torch.inference_mode():
        x = run_sampler(objective, SamplerSpec("sde", 5), guided(model, 3.0, (0.0, 0.7), noise_level(objective), 3, 3),
                        noise(), labels, noise)
    expected = x * torch.tensor(STD).view(-1, 1, 1) + torch.tensor(MEAN).view(-1, 1, 1)
    np.testing.assert_allclose(_outputs(tmp_path / "three")[2], expected.numpy(), atol=1e-5)
    assert not np.allclose(_outputs(tmp_path / "three")[2], _outputs(tmp_path / "all")[2], atol=1e-3)


def test_ode_settings_alone_pick_the_ode_sampler_and_must_be_finite():
    assert resolve_sampler("sit", rtol=1e-4) == SamplerSpec("ode", 250, "dopri5", 1e-4, 1e-6)
    assert resolve_sampler("sit", ode_method="heun", steps=20) == SamplerSpec("ode", 20, "heun")
    with pytest.raises(UserError, match=r"^--rtol and --atol must be positive and finite, got inf and 1e-06$"):
        resolve_sampler("sit", rtol=math.inf)


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_one_ddpm_step_is_refused_before_sampling(name):
    # One respaced step keeps only t = 0: no posterior to step from (it used to fail with an IndexError).
    assert resolve_sampler("dit", name, 2).steps == 2
    with pytest.raises(UserError, match=rf"^--steps for {name} must be between 2 and 1000, got 1$"):
        resolve_sampler("dit", name, 1)


def test_sample_noise_is_each_index_s_own_stream_in_order():
    """Prefetching the next draw on a thread must not reorder or share any stream."""
    def stream(seed, i):
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, i]).generate_state(1, np.uint64)[0]))
        return [torch.randn(2, 3, generator=g) for _ in range(3)]

    a, b = SampleNoise(7, [4, 11], (2, 3), "cpu"), SampleNoise(7, [5], (2, 3), "cpu")
    draws_a, draws_b = [a()], [b()]
    draws_a.append(a(torch.zeros(2, 2, 3, dtype=torch.float64)))  # interleaved with b, cast like `like`
    draws_b += [b(), b()]
    draws_a.append(a())
    for k in range(3):
        assert torch.equal(draws_a[k][0], stream(7, 4)[k]) and torch.equal(draws_a[k][1].float(), stream(7, 11)[k])
        assert torch.equal(draws_b[k][0], stream(7, 5)[k])
    assert draws_a[1].dtype == torch.float64


def test_in_fixed_batches_runs_every_pass_at_one_shape():
    shapes = []

    def fn(x, y):
        shapes.append(tuple(x.shape))
        return x * 2 + y[:, None]

    x, y = torch.randn(10, 3), torch.randn(10)
    out = in_fixed_batches(fn, 4)(x, y)
    assert shapes == [(4, 3)] * 3 and torch.equal(out, x * 2 + y[:, None])


@pytest.mark.parametrize("objective,sampler", [("sit", None), ("sit", "ode"), ("dit", None)])
@pytest.mark.parametrize("forward_batch", [None, 4])
def test_batch_size_and_ranks_do_not_change_the_samples(ckpts, tmp_path, monkeypatch, objective, sampler, forward_batch):
    """Ranks never change a sample, bit for bit. Nor, with --forward-batch, does the batch size; without it,
    a pass runs a batch's own rows, whose count changes the rounding and nothing else."""
    # ode is dopri5: each row takes its own steps, and the rows still integrating shrink.
    kw = dict(objective=objective, sampler=sampler, forward_batch=forward_batch) | ({"steps": None} if sampler == "ode" else {})
    _run(ckpts, tmp_path / "one", **kw)
    ref_images, ref_labels, ref_z = _outputs(tmp_path / "one")
    for batch in (1, 3):
        _run(ckpts, tmp_path / f"batch{batch}", batch_size=batch, block_size=3, **kw)
        images, labels, z = _outputs(tmp_path / f"batch{batch}")
        assert np.array_equal(labels, ref_labels)
        if forward_batch:
            assert np.array_equal(z, ref_z) and np.array_equal(images, ref_images)
        else:
            assert np.abs(z - ref_z).max() <= 1e-6 * np.abs(ref_z).max()  # float32 rounding
            assert np.abs(images.astype(int) - ref_images).max() <= 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (1, 0):  # rank 0 assembles once every block is there
        monkeypatch.setenv("RANK", str(rank))
        if rank == 0 and not forward_batch:  # so the batch size is part of the protocol of a run to finish
            with pytest.raises(UserError, match=r"holds samples made with other settings: batch_size 2 \(now 3\)"):
                _run(ckpts, tmp_path / "two", batch_size=3, **kw)
        result = _run(ckpts, tmp_path / "two", **kw)
        assert result["generated"] == (2 if rank == 1 else 3)  # blocks 1 and 0, 2 (of 2, 2, 1 samples)
    images, labels, z = _outputs(tmp_path / "two")
    assert np.array_equal(images, ref_images) and np.array_equal(z, ref_z) and np.array_equal(labels, ref_labels)
    # Counted per block, so over every rank's samples, not only those of rank 0 which assembles.
    nfe = [read_manifest(tmp_path / run)["metrics"]["network_evaluations_per_sample"] for run in ("one", "two")]
    assert nfe[0] is not None and nfe[0] == nfe[1]


@pytest.mark.parametrize("cfg, interval", [(1.0, (0.0, 1.0)), (3.0, (0.0, 1.0)), (3.0, (0.0, 0.7))])
@pytest.mark.parametrize("batch_size", [64, 2])
def test_the_network_and_the_decoder_see_no_padded_row(ckpts, tmp_path, monkeypatch, cfg, interval, batch_size):
    """By default every pass runs the rows the sampler asks for: the batch's samples, twice on a guided
    step; a batch size below the old fixed forward batch is not padded up to it. The manifest's count
    is those rows."""
    seen, decoded = [], []
    forward, decode = DiT.forward, AutoencoderKL.decode
    monkeypatch.setattr(DiT, "forward", lambda self, x, *a, **k: seen.append(len(x)) or forward(self, x, *a, **k))
    monkeypatch.setattr(AutoencoderKL, "decode", lambda self, z, *a, **k: decoded.append(len(z)) or decode(self, z, *a, **k))
    # Euler on SiT's grid: --steps 3 is 2 steps at t = 0 and 0.5 (tau = 1 and 0.5), one call each.
    result = _run(ckpts, tmp_path / "o", sampler="ode", ode_method="euler", steps=3, cfg=cfg, cfg_interval=interval,
                  batch_size=batch_size, block_size=256)
    batches = [5] if batch_size == 64 else [2, 2, 1]
    guided_at = [cfg != 1 and interval[0] <= tau <= interval[1] for tau in (1.0, 0.5)]
    assert seen == [b * (2 if g else 1) for b in batches for g in guided_at]
    assert decoded == batches
    assert result["manifest"]["metrics"]["network_evaluations_per_sample"] == sum(seen) / 5
    assert "batch_size" in result["manifest"]["config"] and result["manifest"]["config"]["forward_batch"] is None


@pytest.mark.slow
def test_compiled_blocks_sample_as_eager(ckpts, tmp_path):
    _run(ckpts, tmp_path / "eager", num_samples=2)
    _run(ckpts, tmp_path / "compiled", num_samples=2, compile=True)
    config = read_manifest(tmp_path / "compiled")["config"]
    assert config["compile"] is True and config["forward_batch"] == 4  # one graph: a full batch's rows, 2 x 2 guided
    np.testing.assert_allclose(_outputs(tmp_path / "compiled")[2], _outputs(tmp_path / "eager")[2], atol=1e-4, rtol=1e-4)


def test_no_ema_switches_weights(ckpts, tmp_path):
    _run(ckpts, tmp_path / "ema", num_samples=2)
    _run(ckpts, tmp_path / "raw", num_samples=2, ema=False)
    assert read_manifest(tmp_path / "raw")["config"]["weights"] == "model"
    assert not np.array_equal(_outputs(tmp_path / "ema")[2], _outputs(tmp_path / "raw")[2])


def _cli(ckpt, out, *extra):
    return ["sample", "--ckpt", str(ckpt), "--out", str(out), "-n", "12", "--block-size", "2", "--batch-size", "2",
            "--steps", "8", "--cfg", "2", "--device", "cpu", *extra]


def test_resume_after_sigkill_equals_uninterrupted(ckpts, tmp_path):
    straight = tmp_path / "straight"
    assert CliRunner().invoke(main, _cli(ckpts / "sit", straight)).exit_code == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "reals_cli", *_cli(ckpts / "sit", killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if (killed / "parts").is_dir() and len(list((killed / "parts").glob("block_*.npz"))) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "manifest.json").exists(), "finished before the kill"
    result = CliRunner().invoke(main, _cli(ckpts / "sit", killed))
    assert result.exit_code == 0, result.output
    assert "resuming" in result.output
    a, b = _outputs(straight), _outputs(killed)
    assert all(np.array_equal(u, v) for u, v in zip(a, b)) and len(b[0]) == 12
    nfe = [read_manifest(run)["metrics"]["network_evaluations_per_sample"] for run in (straight, killed)]
    assert nfe == [16.0, 16.0]  # 8 SDE steps, all guided: two rows each, the blocks made before the kill counted too


def test_folders_made_before_png_and_attention_changed_are_accepted(ckpts, tmp_path):
    """Sample folders from before PNGs left the protocol (a `png` key), before the attention
    kernel entered it (no `attention` key) and from when every pass had 128 rows: a finished one
    takes --png, an unfinished one resumes; one with blocks made in 128-row passes only with them."""
    args = _cli(ckpts / "sit", tmp_path / "old")
    assert CliRunner().invoke(main, args).exit_code == 0
    manifest = json.loads((tmp_path / "old" / "manifest.json").read_text())
    config = manifest["config"]
    del config["attention"]
    config.update(png=False, png_dir=None, forward_batch=128)  # the old default's fixed passes
    (tmp_path / "old" / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(main, [*args, "--png"])
    assert result.exit_code == 0 and "wrote 12 missing PNGs" in " ".join(result.output.split()), result.output

    # An unfinished run of the old code: its parts folder with its protocol, no block done yet.
    unfinished = tmp_path / "unfinished"
    after_protocol = {"image_size", "latent_shape", "latent_mean", "latent_std", "batch_size", "device", "latents_id", "png_dir"}
    (unfinished / "parts").mkdir(parents=True)
    (unfinished / "parts" / "protocol.json").write_text(json.dumps({k: v for k, v in config.items() if k not in after_protocol}))
    (unfinished / "parts" / "block_000000.npz").touch()  # a block made: the protocol holds
    result = CliRunner().invoke(main, _cli(ckpts / "sit", unfinished))
    assert result.exit_code == 2 and "forward_batch 128 (now None)" in result.output, result.output
    (unfinished / "parts" / "block_000000.npz").unlink()
    result = CliRunner().invoke(main, _cli(ckpts / "sit", unfinished))
    assert result.exit_code == 0, result.output
    assert all(np.array_equal(u, v) for u, v in zip(_outputs(tmp_path / "old"), _outputs(unfinished)))


@pytest.mark.parametrize("extra, message", [
    (["-n", "0"], "-n/--num-samples must be at least 1, got 0"),
    (["--cfg-interval", "0.2,1.5"], "--cfg-interval must be LOW,HIGH with 0 <= LOW <= HIGH <= 1"),
    (["--cfg-interval", "0.8,0.2"], "--cfg-interval must be LOW,HIGH with 0 <= LOW <= HIGH <= 1"),
    (["--cfg-interval", "0.5"], "--cfg-interval must be LOW,HIGH (two numbers in [0, 1]), got '0.5'"),
    (["--classes", "1,3"], "class 3 is beyond this model's 3 classes (0 to 2)"),
    (["--classes", "zebra"], "unknown class name 'zebra'"),
    (["--sampler", "ddpm"], "--sampler ddpm does not fit a sit checkpoint; use ode or sde"),
    (["--forward-batch", "0"], "--batch-size, --forward-batch and --block-size must be at least 1"),
    (["--cfg", "2", "--cfg-channels", "5"], "--cfg-channels 5 is more than the model's 4 latent channels"),
    (["--sampler", "sde", "--ode-method", "heun"], "--ode-method set the ode sampler, and this run samples with sde"),
    (["--sampler", "sde", "--rtol", "1e-4", "--atol", "1e-5"],
     "--rtol, --atol set the ode sampler, and this run samples with sde"),
    (["--rtol", "1e-3"], "dopri5 picks its own steps"),  # --rtol implies ode (dopri5), which takes no --steps
    (["--ode-method", "euler", "--ckpt-dit"], "--ode-method: a dit checkpoint has no ode sampler (it samples with ddpm or ddim)"),
    (["--ode-method", "dopri5"], "dopri5 picks its own steps from --rtol and --atol; drop --steps, or pass "
                                 "--ode-method euler or heun for a fixed step count"),
    (["--ode-method", "euler", "--atol", "1e-3"], "--rtol and --atol control dopri5's steps; --ode-method euler takes --steps"),
    (["--ckpt-file"], "--ckpt takes a model folder and"),
    (["--ckpt-in-folder"], "--ckpt takes the model folder, not a file in it: pass"),
    (["--ckpt-unfinished"], "is a train-dit run that has not finished, and --ckpt takes a model folder: a kept step's "
                            "folder (step-0000002) or the run's folder once it has finished"),
    (["--out-other"], "holds notes.txt, which reals sample did not write; pass a new or empty --out"),
    (["--out-model"], "holds a 'dit' artifact, not reals sample's; pass a new --out"),
    (["--cfg", "1", "--cfg-channels", "3"], "--cfg-channels and --cfg-interval shape the guidance, and --cfg 1 is none"),
    (["--ckpt-store"], "is a latent store; --ckpt takes a model folder, made by `reals train-dit"),
    (["--ckpt-novae"], "names VAE"),
    (["--other-vae"], "was trained on latents of VAE"),
])
def test_bad_input_is_one_line(ckpts, tmp_path, extra, message):
    ckpt = ckpts / "sit"
    if extra == ["--ckpt-novae"]:
        ckpt, extra = ckpts / "sit_novae", []
    if "--ckpt-dit" in extra:
        ckpt, extra = ckpts / "dit", [e for e in extra if e != "--ckpt-dit"]
    out = tmp_path / "o"
    if extra == ["--ckpt-file"]:
        (tmp_path / "DiT-XL-2-256x256.pt").touch()
        ckpt, extra = tmp_path / "DiT-XL-2-256x256.pt", []
    if extra == ["--ckpt-in-folder"]:
        ckpt, extra = ckpts / "sit" / "ema.safetensors", []
    if extra == ["--ckpt-unfinished"]:
        (tmp_path / "run" / "step-0000002").mkdir(parents=True)
        shutil.copy(ckpts / "sit" / "manifest.json", tmp_path / "run" / "step-0000002")
        (tmp_path / "run" / "checkpoint.safetensors").touch()
        ckpt, extra = tmp_path / "run", []
    if extra == ["--out-other"]:
        out.mkdir()
        (out / "notes.txt").touch()
        extra = []
    if extra == ["--out-model"]:
        out, extra = ckpts / "dit", []
    if extra == ["--ckpt-store"]:
        (tmp_path / "lat.zarr").mkdir()
        (tmp_path / "lat.zarr" / "zarr.json").write_text("{}")
        ckpt, extra = tmp_path / "lat.zarr", []
    if extra == ["--other-vae"]:
        extra = ["--vae", str(ckpts / "other_vae")]
    result = CliRunner().invoke(main, ["sample", "--ckpt", str(ckpt), "--out", str(out), "--device", "cpu",
                                       "--steps", "2", "-n", "2", *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    if "--vae" in extra:  # both ids named
        ids = read_manifest(ckpts / "sit")["config"]["vae_id"], load_reals_vae(ckpts / "other_vae").id
        assert all(i in result.output for i in ids)
    if ckpt.name == "sit_novae":
        assert "pass --vae PATH" in result.output


def test_a_run_that_failed_before_its_first_block_does_not_hold_the_folder(ckpts, tmp_path, monkeypatch):
    from reals_cli.pipeline import sample as sample_module

    def out_of_memory(*args, **kwargs):  # fails after the folder is claimed, before any block is written
        raise UserError("CUDA out of memory")

    out = tmp_path / "o"
    with monkeypatch.context() as m:
        m.setattr(sample_module, "_generate", out_of_memory)
        with pytest.raises(UserError, match="out of memory"):
            sample(SampleConfig(ckpt=str(ckpts / "sit"), out=str(out), num_samples=2, steps=3, device="cpu"))
    assert (out / "parts" / "protocol.json").is_file()  # written, but no block made under it
    _run(ckpts, out)  # another checkpoint and other settings: nothing to keep, so it runs
    assert read_manifest(out, "samples", 1)["config"]["steps"] == 5


def test_attention_kernel_is_chosen_and_recorded(ckpts, tmp_path):
    """--attn picks the kernel (math: the explicit float32 reference), the manifest records what
    ran, and a kernel this machine lacks is a one-line error before any output."""
    runs = {}
    for attn in ("auto", "math"):
        result = _run(ckpts, tmp_path / attn, sampler="ode", ode_method="euler", attn=attn)
        assert result["manifest"]["config"]["attention"] == ("sdpa" if attn == "auto" else "math")
        runs[attn] = _outputs(tmp_path / attn)[2]
    np.testing.assert_allclose(runs["auto"], runs["math"], atol=1e-4)
    args = ["sample", "--ckpt", str(ckpts / "sit"), "--device", "cpu", "-n", "5", "--block-size", "2", "--steps", "5",
            "--cfg", "3", "--cfg-interval", "0,0.7", "--batch-size", "2", "--sampler", "ode", "--ode-method", "euler"]
    other = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "math"), "--attn", "sdpa"])
    assert other.exit_code == 2 and "holds samples made with other settings" in other.output
    # --attn auto (the default) on a finished folder takes the kernel it was made with: elsewhere
    # auto may resolve to another, and nothing is generated.
    again = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "math")])
    assert again.exit_code == 0 and "already complete" in again.output, again.output
    missing = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "x"), "--attn", "xformers"])
    assert missing.exit_code == 2 and not (tmp_path / "x").exists()
    assert missing.output == ("error: xformers attention is not usable on cpu (it needs CUDA and `pip install "
                              "reals-cli[cuda]`); use --attn sdpa or --attn auto\n")
