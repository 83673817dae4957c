"""Options shared by several subcommands, defined once."""

from __future__ import annotations

import click

device_option = click.option(
    "--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
    help="Where to run: auto takes CUDA when torch sees a GPU.",
)
seed_option = click.option("--seed", default=0, show_default=True, type=int, help="Random seed.")
precision_option = click.option(
    "--precision", default="bf16", show_default=True, type=click.Choice(["fp32", "bf16", "fp16"]),
    help="Autocast precision on CUDA (CPU always runs fp32).",
)


def preset_option(*names, **kw):
    """An option without a click default: unset flags fall back to a preset, then to the
    library config's own defaults (which the help text states)."""
    return click.option(*names, default=None, **kw)
