"""Options shared by several subcommands, defined once."""

from __future__ import annotations

import math

import click

from ..errors import UserError
from ..runtime import SEED_MAX


class FiniteFloat(click.FloatRange):
    """The type of every float flag: a number, optionally bounded, never NaN or infinity. click's
    float takes both, and a bound alone lets NaN through (every comparison with it is false)."""

    name = "float"

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(number, param, ctx)

    def _describe_range(self) -> str:
        return "" if self.min is None and self.max is None else super()._describe_range()


FINITE = FiniteFloat()

device_option = click.option(
    "--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
    help="Where to run: auto takes CUDA when torch sees a GPU.",
)
seed_option = click.option("--seed", default=0, show_default=True, type=click.IntRange(0, SEED_MAX),
                           help="Random seed.")
precision_option = click.option(
    "--precision", default="bf16", show_default=True, type=click.Choice(["fp32", "bf16", "fp16"]),
    help="Autocast precision on CUDA (CPU always runs fp32).",
)


def preset_option(*names, **kw):
    """An option without a click default: unset flags fall back to a preset, then to the
    library config's own defaults (which the help text states)."""
    return click.option(*names, default=None, **kw)


def resume_options(resume_help: str):
    """--resume (continue the run in --out; an error if there is none) and --auto-resume
    (continue it if there is one, else start): a pipeline rerun after an interruption passes
    the second, so that its recipe needs no edit. The command receives one `resume`:
    True, False or "auto"."""

    def merge(ctx: click.Context, param: click.Parameter, auto: bool):
        if auto and ctx.params.get("resume"):
            raise UserError("--resume and --auto-resume: pass one (--auto-resume also starts a run that is not there)")
        if auto:
            ctx.params["resume"] = "auto"

    def wrap(f):
        f = click.option("--auto-resume", is_flag=True, expose_value=False, callback=merge,
                         help="Continue the run in --out if it holds one (a finished run at its --steps does nothing), "
                              "else start it: for pipelines rerun after an interruption.")(f)
        return click.option("--resume", is_flag=True, is_eager=True, help=resume_help)(f)

    return wrap
