"""Thin click wrappers, one module per subcommand; `COMMANDS` is what `reals` lists."""

from .assets import assets
from .data import data
from .encode import encode_command
from .eval_fid import eval_fid_command
from .train_vae import train_vae_command

COMMANDS = [assets, data, train_vae_command, encode_command, eval_fid_command]
