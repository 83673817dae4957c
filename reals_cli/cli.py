"""The `reals` command: a click group over the library, with one error convention.

Each subcommand lives in `reals_cli/commands/` as a thin wrapper over a library
function. A `UserError` anywhere, or a flag click refuses, prints one red line and exits
2; an interruption exits 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM), as a
shell reports a process the signal killed; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import shlex
import signal
import sys
import time
import traceback

import click

from . import __version__, artifacts
from .console import labelled
from .errors import UserError


class RealsGroup(click.Group):
    def main(self, args=None, *rest, **kwargs):
        argv = list(args) if args is not None else sys.argv[1:]
        artifacts.invocation = {"command": shlex.join(["reals", *argv]), "started": time.time()}
        try:
            return super().main(args, *rest, **kwargs)
        finally:
            artifacts.invocation = None  # a notebook's later library calls are not this command

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)  # pipeline order, not alphabetical

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (UserError, click.UsageError, KeyboardInterrupt) as e:
            debug = ctx.obj and ctx.obj.get("debug")  # set by the group's callback, inside invoke
            if isinstance(e, KeyboardInterrupt):  # Ctrl-C or SIGTERM; a training loop says what it saved
                if debug:
                    traceback.print_exc()
                labelled("interrupted:", "yellow", str(e) or "stopped by the user")
                sys.exit(128 + getattr(e, "signum", signal.SIGINT))
            if debug:
                raise
            message = str(e)
            if "\nOriginal Traceback" in message:  # raised in a DataLoader worker: torch's text ends with ours
                message = message.rstrip().splitlines()[-1].removeprefix(f"{UserError.__module__}.UserError: ")
            if isinstance(e, click.UsageError):  # a flag or value that click refuses: one line too
                message = e.format_message() + (f" (see `{e.ctx.command_path} --help`)" if e.ctx else "")
            labelled("error:", "red", message)
            sys.exit(2)


@click.group(cls=RealsGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="reals")
@click.option("--debug", is_flag=True, help="Show the full traceback on errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """ReaLS: representation-aligned latent spaces for latent diffusion models.

    Subcommands hand each other artifacts on disk (folders with a manifest.json);
    chain them in a Makefile: train-vae -> encode -> train-dit -> sample -> eval-fid.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _register() -> None:
    from .commands import COMMANDS

    for command in COMMANDS:
        main.add_command(command)


_register()
