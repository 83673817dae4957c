"""`reals train-dit`: a thin wrapper over `reals_cli.pipeline.train_dit.train_dit`."""

from __future__ import annotations

import click

from ..models.attention import BACKENDS
from ..models.dit import DIT_MODELS
from ..pipeline.train_dit import resolve_config, train_dit
from .options import FINITE, device_option, precision_option, preset_option, resume_options, seed_option


@click.command("train-dit", short_help="Train a DiT or SiT on a latent store.")
@click.argument("latents")
@click.option("--out", required=True, help="Output folder: the model artifact, checkpoints and log.")
@preset_option("--model", type=click.Choice([*DIT_MODELS, *(n.replace("DiT", "SiT") for n in DIT_MODELS)]), metavar="NAME",
               help="DiT-{T,S,B,L,XL}/{2,4,8} or SiT-* (the same network).  [default: SiT-B/2]")
@preset_option("--objective", type=click.Choice(["dit", "sit"]), help="dit: DDPM eps + learned sigma; sit: interpolant "
               "transport.  [default: from the model name: DiT-* dit, SiT-* sit]")
@preset_option("--path", type=click.Choice(["linear", "gvp"]), help="SiT interpolant (sit only).  [default: linear]")
@preset_option("--prediction", type=click.Choice(["velocity", "noise", "score"]), help="SiT prediction (sit only).  "
               "[default: velocity]")
@preset_option("--time-distribution", type=click.Choice(["uniform", "lognormal"]), help="SiT training times (sit only).  "
               "[default: uniform]")
@preset_option("--steps", type=int, help="Training steps.  [default: 400000]")
@preset_option("--batch-size", type=int, help="Latents per step in each process: under torchrun the global batch is "
               "this x the processes (DiT's --global-batch-size 256 on 8 GPUs is --batch-size 32).  [default: 256]")
@preset_option("--lr", type=FINITE, help="AdamW learning rate.  [default: 1e-4]")
@preset_option("--weight-decay", type=FINITE, help="AdamW weight decay.  [default: 0]")
@preset_option("--ema-decay", type=FINITE, help="EMA decay (fp32 copy).  [default: 0.9999]")
@preset_option("--class-dropout", type=FINITE, help="Label dropout for classifier-free guidance.  [default: 0.1]")
@preset_option("--grad-clip", type=FINITE, help="Gradient norm clip, 0 for none (DiT and SiT clip none; 1.0 is REPA's).  "
               "[default: 1.0]")
@preset_option("--attn", type=click.Choice(BACKENDS), help="Attention backend; auto is torch SDPA (on an H100, 4% faster than xformers).  [default: auto]")
@click.option("--qk-norm", is_flag=True, default=None, help="LayerNorm on queries and keys (against late bf16 NaNs).")
@click.option("--gradient-checkpointing", is_flag=True, default=None, help="Trade compute for memory.")
@click.option("--compile", is_flag=True, default=None,
              help="torch.compile each transformer block: one block's compile time, the elementwise work fused.")
@preset_option("--repa-weight", type=FINITE, help="Weight of the REPA loss on ReaLS-aligned features; 0 for none.  [default: 0]")
@preset_option("--repa-depth", type=int, help="Block whose tokens REPA aligns (REPA: 4 for B, 8 for L/XL).  [default: 4]")
@preset_option("--repa-vae", help="The ReaLS VAE that made the latents (its alignment network gives REPA's targets).")
@preset_option("--init", help="Start from weights: an official DiT-XL-2-256x256.pt / SiT checkpoint, or a .safetensors.")
@preset_option("--workers", type=int, help="DataLoader worker processes.  [default: 4]")
@preset_option("--log-every", type=int, help="Steps between log.jsonl lines.  [default: 100]")
@preset_option("--ckpt-every", type=int, help="Steps between checkpoints.  [default: 5000]")
@preset_option("--sample-every", type=int, help="Steps between preview grids of EMA samples; 0 for none.  [default: 10000]")
@preset_option("--keep-every", type=int, help="Steps between kept model folders OUT/step-NNNNNNN, each one that "
               "`reals sample --ckpt` reads; 0 for none.  [default: 0]")
@resume_options("Continue the run in --out where it stopped (or train a finished one longer).")
@device_option
@seed_option
@precision_option
def train_dit_command(resume, **flags):
    """Train a DiT or SiT on a latent store made by `reals encode`.

    Two defaults differ from DiT's and SiT's train.py, which train in fp32 with TF32 matmuls
    and clip nothing: --precision bf16 (REPA autocasts to fp16) and --grad-clip 1.0 (REPA's).
    """
    train_dit(resolve_config(**flags), resume=resume)
