"""`reals encode`: a thin wrapper over `reals_cli.pipeline.encode.encode`."""

from __future__ import annotations

import click

from .options import device_option, precision_option


@click.command("encode", short_help="Encode an image folder into a latent store (Zarr).")
@click.argument("images", required=False, type=click.Path(file_okay=False))
@click.argument("out", required=False)
@click.option("--vae", "vae_path", help="The VAE: a `reals train-vae` artifact or a diffusers AutoencoderKL folder.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1), help="Images per forward pass.")
@click.option("--flip", is_flag=True, help="Also store the latents of each horizontally flipped image.")
@click.option("--dtype", default="float16", show_default=True, type=click.Choice(["float16", "float32"]),
              help="Storage type of the posterior mean and std.")
@click.option("--workers", default=None, type=click.IntRange(min=0), help="Image-decoding processes [default: CPUs, at most 8].")
@click.option("--image-size", default=None, type=click.IntRange(min=1),
              help="ADM center-crop size [default: the VAE's training size; required for plain diffusers VAEs].")
@click.option("--block-size", default=256, show_default=True, type=click.IntRange(min=1),
              help="Images per shard: the unit of writing, resuming and splitting over ranks.")
@click.option("--info", "info", default=None, metavar="STORE", help="Print the summary of a latent store and exit.")
@device_option
@precision_option
def encode_command(images, out, vae_path, info, **flags):
    """Encode the class folder IMAGES with a VAE into the latent store OUT (Zarr; .h5 for HDF5).

    Re-running the same command finishes an interrupted store; under torchrun the
    ranks share the work.
    """
    from ..console import print_summary
    from ..errors import UserError
    from ..pipeline.encode import encode, print_store_info

    if info is not None:
        print_store_info(info)
        return
    if images is None or out is None or vae_path is None:
        raise UserError("usage: reals encode IMAGES OUT --vae VAE_DIR (or reals encode --info STORE)")
    result = encode(images, out, vae_path, **flags)
    if not result["complete"]:
        print_summary(f"encode -> {out}", [("encoded", result["encoded"]),
                                           ("complete", "no: the other ranks' blocks are still running")])
        return
    print_store_info(out)
    if not result["already"]:
        print_summary("throughput", [("encoded images", result["encoded"]), ("seconds", f"{result['seconds']:.1f}"),
                                     ("images/s", f"{result['images_per_s']:.1f}")])
