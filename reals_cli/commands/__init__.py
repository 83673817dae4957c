"""Thin click wrappers, one module per subcommand; `COMMANDS` is what `reals` lists."""

from .assets import assets
from .data import data

COMMANDS = [assets, data]
