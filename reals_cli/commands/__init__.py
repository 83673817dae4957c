"""Thin click wrappers, one module per subcommand; `COMMANDS` is what `reals` lists."""

from .analyze import analyze_command
from .assets import assets
from .classifier import classifier
from .data import data
from .encode import encode_command
from .eval_fid import eval_fid_command
from .import_dit import import_dit_command
from .probe import probe_depth, probe_seg
from .report import report_command
from .reproduction import reproduction
from .sample import sample_command
from .train_dit import train_dit_command
from .train_vae import train_vae_command

# In pipeline order, as `reals --help` lists them.
COMMANDS = [assets, data, train_vae_command, encode_command, train_dit_command, import_dit_command, sample_command, eval_fid_command,
            classifier, analyze_command,
            probe_seg, probe_depth, report_command, reproduction]
