"""`reals train-vae`: a thin wrapper over `reals_cli.train_vae.train_vae`."""

from __future__ import annotations

import click

from ..train_vae import PRESETS, resolve_config, train_vae
from .options import device_option, precision_option, seed_option


def _opt(*names, **kw):
    # No click defaults here: unset flags fall back to the preset, then to TrainVAEConfig's defaults.
    return click.option(*names, default=None, **kw)


@click.command("train-vae", short_help="Train the representation-aligned VAE (ReaLS).")
@_opt("--preset", type=click.Choice(list(PRESETS)), help="A named recipe (demo: Fashion-MNIST, VGG16 teacher, CPU).")
@_opt("--data", help="Image folder, one sub-folder per class (a train/ + test/ pair is split).")
@_opt("--out", help="Output folder: the VAE artifact, checkpoints, logs and image grids.")
@_opt("--vae", help="Architecture preset: sd-f8c4 (SD's KL-f8, the paper's), demo, tiny.  [default: sd-f8c4]")
@_opt("--init", help="A diffusers AutoencoderKL folder to fine-tune from (e.g. sd-vae-ft-ema).")
@_opt("--image-size", type=int, help="Training resolution (ADM center crop).  [default: 256]")
@_opt("--teacher", help="dinov2-s|b|l|g or vgg16.  [default: dinov2-b]")
@_opt("--teacher-weights", help="Local teacher weights file (offline use).")
@_opt("--teacher-resolution", type=int, help="Resize for the teacher (DINOv2 default 224: 16x16 tokens).")
@_opt("--align-hidden", type=int, help="Hidden width of the alignment MLPs.  [default: 1024]")
@_opt("--steps", type=int, help="Training steps.  [default: 100000]")
@_opt("--batch-size", type=int, help="Images per step per process.  [default: 8]")
@_opt("--lr", type=float, help="AdamW learning rate, VAE + alignment.  [default: 1e-4]")
@_opt("--disc-lr", type=float, help="AdamW learning rate, discriminator.  [default: 1e-4]")
@_opt("--rec-loss", type=click.Choice(["l1", "mse"]), help="Pixel reconstruction loss.  [default: l1]")
@_opt("--lpips-weight", type=float, help="LPIPS weight.  [default: 1.0]")
@_opt("--kl", type=float, help="KL weight, LDM's scale.  [default: 1e-6]")
@_opt("--disc-weight", type=float, help="Adversarial weight (times the adaptive weight).  [default: 0.5]")
@_opt("--disc-start", type=int, help="Step at which the discriminator switches on.  [default: 50001]")
@_opt("--disc-layers", type=int, help="PatchGAN depth.  [default: 3, fewer below 32 px]")
@_opt("--align-weight", type=float, help="Alignment weight; 0 trains the baseline VAE.  [default: 1.0]")
@_opt("--align-patch-weight", type=float, help="Weight of the patch alignment term.  [default: 1.0]")
@_opt("--align-global-weight", type=float, help="Weight of the global alignment term.  [default: 1.0]")
@_opt("--align-cos", type=float, help="Cosine-embedding share of each alignment term.  [default: 0.9]")
@_opt("--align-l1", type=float, help="Smooth-L1 share of each alignment term.  [default: 0.1]")
@_opt("--ema-decay", type=float, help="EMA decay of the saved weights.  [default: 0.999]")
@_opt("--grad-clip", type=float, help="Gradient norm clip.  [default: 1.0]")
@_opt("--workers", type=int, help="DataLoader worker processes.  [default: 2]")
@_opt("--val-count", type=int, help="Held-out images for validation.  [default: 64]")
@_opt("--log-every", type=int, help="Steps between log.jsonl lines.  [default: 10]")
@_opt("--ckpt-every", type=int, help="Steps between checkpoints.  [default: 500]")
@_opt("--image-every", type=int, help="Steps between reconstruction grids.  [default: 500]")
@click.option("--gradient-checkpointing", is_flag=True, default=None, help="Trade compute for memory.")
@click.option("--resume", is_flag=True, help="Continue the unfinished run in --out exactly where it stopped.")
@device_option
@seed_option
@precision_option
def train_vae_command(preset, resume, **flags):
    """Train a representation-aligned KL VAE (ReaLS) and save it with its alignment network."""
    train_vae(resolve_config(preset, **flags), resume=resume)
