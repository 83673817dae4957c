"""`reals import-dit`: a thin wrapper over `reals_cli.pipeline.model_artifact.import_released`."""

from __future__ import annotations

import click


@click.command("import-dit", short_help="Make a model artifact of a released DiT or SiT checkpoint.")
@click.argument("weights", type=click.Path(dir_okay=False))
@click.option("--model", required=True, help="Its architecture: DiT-XL/2 for DiT-XL-2-256x256.pt (DDPM), "
              "SiT-XL/2 for SiT-XL-2-256x256.pt (transport).")
@click.option("--vae", required=True, help="The VAE it was trained on: a diffusers folder (sd-vae-ft-ema, sd-vae-ft-mse) "
              "or a `reals train-vae` artifact.")
@click.option("--out", required=True, help="The new model folder.")
@click.option("--image-size", type=click.IntRange(min=1), help="Its image resolution.  [default: the --latents store's, else 256]")
@click.option("--num-classes", default=None, type=click.IntRange(min=1),
              help="Its classes (default: the --latents store's, whose class names it takes; else 1000).")
@click.option("--path", type=click.Choice(["linear", "gvp"]),
              help="SiT: its interpolant.  [default: what its train.py args say, else linear]")
@click.option("--prediction", type=click.Choice(["velocity", "noise", "score"]),
              help="SiT: what it predicts.  [default: what its train.py args say, else velocity]")
@click.option("--latents", default=None, help="Normalise by the per-channel statistics of this latent store (made by "
              "`reals encode` with --vae), as ReaLS' releases were trained, instead of by the VAE's scaling factor; "
              "needed for a `reals train-vae` VAE. The model takes the store's class names.")
def import_dit_command(weights, **flags):
    """Turn the released checkpoint WEIGHTS into a model folder that `reals sample` reads.

    The file (a release, or a checkpoint of DiT's or SiT's train.py, whose EMA is taken) is
    loaded with weights_only (no code runs) and must fit --model exactly. The folder records
    the objective, the VAE (by absolute path) and its latent scaling (x scaling_factor, as
    the official models were trained, or the --latents statistics), e.g.

    \b
      reals import-dit DiT-XL-2-256x256.pt --model DiT-XL/2 --vae sd-vae-ft-ema --out runs/dit-xl2
      reals sample --ckpt runs/dit-xl2 --cfg 1.5 --cfg-channels 3 -n 50000 --out samples/dit-xl2
    """
    from ..pipeline.model_artifact import import_released

    import_released(weights, **flags)
