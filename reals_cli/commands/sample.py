"""`reals sample`: a thin wrapper over `reals_cli.pipeline.sample.sample`."""

from __future__ import annotations

import click

from ..errors import UserError
from ..models.attention import BACKENDS
from ..objectives.samplers import ODE_ALIASES, ODE_METHODS
from ..pipeline.sample import SampleConfig, sample
from .options import FINITE, device_option, seed_option


def _interval(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--cfg-interval must be LOW,HIGH (two numbers in [0, 1]), got {text!r}") from None
    return low, high


@click.command("sample", short_help="Generate images and latents from a trained DiT/SiT.")
@click.option("--ckpt", required=True, help="A model folder made by `reals train-dit` or `reals import-dit`.")
@click.option("--out", required=True, help="Output folder: samples.npz, latents.zarr, grid.png, manifest.json.")
@click.option("-n", "--num-samples", default=50_000, show_default=True, type=int, help="Number of samples (FID-50K: 50000).")
@click.option("--cfg", default=1.0, show_default=True, type=FINITE,
              help="Classifier-free guidance scale on all latent channels; 1 for none.")
@click.option("--cfg-channels", type=click.IntRange(min=1),
              help="Guide only the first K latent channels: 3 reproduces the FIDs of DiT's and SiT's releases, "
                   "whose sampling scripts guide 3 of 4.  [default: all]")
@click.option("--cfg-interval", default="0,1", show_default=True,
              help="LOW,HIGH: guide only where the noise level tau is in [LOW, HIGH], with tau = 0 data and tau = 1 "
                   "pure noise (REPA's and ReaLS's convention: their [0, 0.75] leaves the noisiest quarter unguided). "
                   "SiT (t = 0 noise, t = 1 data): tau = 1 - t. DiT (step 999 = noise): tau = step / 999.")
@click.option("--classes", help="Comma-separated class ids or names; sample i gets the (i mod count)-th.  "
                                "[default: all classes, balanced]")
@click.option("--sampler", type=click.Choice(["ddpm", "ddim", "ode", "sde"]),
              help="ddpm/ddim for dit checkpoints, ode/sde for sit.  [default: ddpm for dit, sde for sit]")
@click.option("--steps", type=int,
              help="Sampling steps (ode/sde: grid points, as SiT).  [default: ddpm 250, ddim 50, ode 250, sde 250]")
@click.option("--ode-method", type=click.Choice([*ODE_METHODS, *ODE_ALIASES], case_sensitive=False),
              help="ODE integrator (implies --sampler ode); dopri5 is adaptive and takes no --steps; heun2 (SiT's name) is "
                   "heun.  [default: dopri5]")
@click.option("--rtol", type=FINITE, help="dopri5 relative tolerance.  [default: 1e-3]")
@click.option("--atol", type=FINITE, help="dopri5 absolute tolerance.  [default: 1e-6]")
@click.option("--no-ema", "ema", flag_value=False, default=True, help="Use the raw weights instead of the EMA weights.")
@click.option("--vae", help="The VAE folder, if not at the path the checkpoint records (its id must match).")
@click.option("--batch-size", default=64, show_default=True, type=int,
              help="Samples integrated together (memory). Each network and decoder pass runs just their rows (two "
                   "per guided sample), none padded; the rows' count decides the rounding, so other batch sizes "
                   "give the same samples up to rounding, and the batch size is part of the protocol.")
@click.option("--forward-batch", type=int,
              help="Run every network and decoder pass on exactly N rows, the last padded with copies: the samples "
                   "are then bit-identical whatever --batch-size (for N below the rows of a batch, several passes; "
                   "above, padded rows). Part of the protocol instead of the batch size.  [default: none; with "
                   "--compile, the rows of a full batch]")
@click.option("--block-size", default=256, show_default=True, type=int, help="Samples per resumable block.")
@click.option("--png", is_flag=True, help="Also write every image as images/NNNNNN.png (from samples.npz; on a finished --out, "
              "writes the PNGs it lacks).")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "bf16", "fp16"]),
              help="Autocast precision on CUDA (CPU always runs fp32).")
@click.option("--compile", is_flag=True, help="torch.compile each transformer block, one graph at one row count: "
              "--forward-batch, by default the rows of a full batch (so a guidance interval's unguided steps and a "
              "block's last, shorter batch are padded). Part of the protocol, since fused kernels round differently.")
@click.option("--attn", default="auto", show_default=True, type=click.Choice(BACKENDS),
              help="Attention kernel: auto is torch SDPA (on an H100, 4.7% faster than xformers; see "
                   "docs/benchmarks.md). Part of the protocol, as the kernels round differently.")
@device_option
@seed_option
def sample_command(cfg_interval: str, classes: str | None, **flags):
    """Generate images (ADM samples.npz) and latents from a trained DiT/SiT.

    Sample i depends only on (--seed, i): the same command run again after a kill
    finishes the missing blocks, and `torchrun --nproc-per-node K -m reals_cli sample ...`
    splits the blocks over K processes with the same result.
    """
    class_list = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    sample(SampleConfig(cfg_interval=_interval(cfg_interval), classes=class_list, **flags))
