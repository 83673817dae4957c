"""`reals train-vae`: a thin wrapper over `reals_cli.pipeline.train_vae.train_vae`."""

from __future__ import annotations

import click

from ..pipeline.train_vae import PRESETS, resolve_config, train_vae
from .options import FINITE, device_option, precision_option, preset_option, resume_options, seed_option


@click.command("train-vae", short_help="Train the representation-aligned VAE (ReaLS).")
@preset_option("--preset", type=click.Choice(list(PRESETS)), help="A named recipe (demo: Fashion-MNIST, VGG16 teacher, CPU).")
@preset_option("--data", help="Image folder, one sub-folder per class (a train/ + test/ pair is split).")
@click.option("--extra-data", multiple=True, help="More image folders mixed into training (repeatable); validation uses --data.")
@preset_option("--out", help="Output folder: the VAE artifact, checkpoints, logs and image grids.")
@preset_option("--vae", help="Architecture preset: sd-f8c4 (SD's KL-f8, the paper's), demo, tiny.  [default: sd-f8c4]")
@preset_option("--latent-channels", type=int, help="Latent channels, in place of the --vae preset's 4: what each "
               "latent position can carry, for reconstruction and alignment both.  [default: the preset's]")
@preset_option("--init", help="A diffusers AutoencoderKL folder to fine-tune from (e.g. sd-vae-ft-ema).")
@preset_option("--image-size", type=int, help="Training resolution (ADM center crop), at least 16.  [default: 256]")
@preset_option("--teacher", help="dinov2-s|b|l|g or vgg16.  [default: dinov2-b]")
@preset_option("--teacher-weights", help="Local teacher weights file (offline use).")
@preset_option("--teacher-resolution", type=int, help="Resize for the teacher (DINOv2 default 224: 16x16 tokens).")
@preset_option("--align-hidden", type=int, help="Hidden width of the alignment MLPs.  [default: 1024]")
@preset_option("--steps", type=int, help="Training steps.  [default: 100000]")
@preset_option("--batch-size", type=int, help="Images per step per process.  [default: 8]")
@preset_option("--lr", type=FINITE, help="AdamW learning rate, VAE + alignment.  [default: 1e-4]")
@preset_option("--disc-lr", type=FINITE, help="AdamW learning rate, discriminator.  [default: 1e-4]")
@preset_option("--rec-loss", type=click.Choice(["l1", "mse"]), help="Pixel reconstruction loss.  [default: l1]")
@preset_option("--lpips-weight", type=FINITE, help="LPIPS weight.  [default: 1.0]")
@preset_option("--kl", type=FINITE, help="KL weight, LDM's scale.  [default: 1e-6]")
@preset_option("--disc-weight", type=FINITE, help="Adversarial weight (times the adaptive weight).  [default: 0.5]")
@preset_option("--disc-start", type=int, help="Step at which the discriminator switches on.  [default: 50001]")
@preset_option("--disc-layers", type=int, help="PatchGAN depth, each layer halving the image.  [default: 3, fewer below 32 px]")
@preset_option("--align-weight", type=FINITE, help="Alignment weight; 0 trains the baseline VAE.  [default: 1.0]")
@preset_option("--align-balance", type=click.Choice(["fixed", "adaptive"]), help="fixed: --align-weight as given; "
               "adaptive: --align-weight times the gradient-norm ratio of reconstruction to alignment at the "
               "encoder's last layer (VA-VAE's balance).  [default: fixed]")
@preset_option("--align-patch-weight", type=FINITE, help="Weight of the patch alignment term.  [default: 1.0]")
@preset_option("--align-global-weight", type=FINITE, help="Weight of the global alignment term.  [default: 1.0]")
@preset_option("--align-cos", type=FINITE, help="Cosine-embedding share of each alignment term.  [default: 0.9]")
@preset_option("--align-l1", type=FINITE, help="Smooth-L1 share of each alignment term.  [default: 0.1]")
@preset_option("--ema-decay", type=FINITE, help="EMA decay of the saved weights, in [0, 1].  [default: 0.999]")
@preset_option("--grad-clip", type=FINITE, help="Gradient norm clip, 0 for none.  [default: 1.0]")
@preset_option("--workers", type=int, help="DataLoader worker processes.  [default: 2]")
@preset_option("--val-count", type=int, help="Held-out images for validation, 0 for none.  [default: 64]")
@preset_option("--val-every", type=int, help="Steps between validations of the EMA weights, appended to val.jsonl "
               "(PSNR, LPIPS, alignment cosines: the curves that show when training has flattened); 0: the final "
               "validation only.  [default: 0]")
@preset_option("--log-every", type=int, help="Steps between log.jsonl lines.  [default: 10]")
@preset_option("--ckpt-every", type=int, help="Steps between checkpoints.  [default: 500]")
@preset_option("--image-every", type=int, help="Steps between reconstruction grids.  [default: 500]")
@click.option("--gradient-checkpointing", is_flag=True, default=None, help="Trade compute for memory.")
@preset_option("--teacher-cache-gb", type=FINITE, help="Keep the teacher's features of every training image and its "
               "mirror in RAM, up to this many GB (refused if they need more); 0: recompute them every step.  [default: 0]")
@resume_options("Continue the unfinished run in --out exactly where it stopped.")
@device_option
@seed_option
@precision_option
def train_vae_command(preset, resume, extra_data, **flags):
    """Train a representation-aligned KL VAE (ReaLS) and save it with its alignment network."""
    train_vae(resolve_config(preset, extra_data=list(extra_data) or None, **flags), resume=resume)
