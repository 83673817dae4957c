"""The CLI frame: help, version, and the one error convention."""

import subprocess
import sys

from click.testing import CliRunner

from reals_cli import __version__
from reals_cli.cli import main


def test_help_lists_every_subcommand_with_a_summary():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    commands = result.output.split("Commands:")[1].splitlines()
    names = {line.split()[0] for line in commands if line.startswith("  ") and not line.startswith("   ")}
    assert {"assets", "data", "train-vae"} <= names
    for name, command in main.commands.items():
        assert command.get_short_help_str(), name


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_user_error_is_one_red_line_and_exit_2(tmp_path):
    # A real process: the exit status and stderr as a shell sees them.
    cmd = [sys.executable, "-m", "reals_cli", "train-vae", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o"),
           "--teacher", "vgg16"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: dataset folder not found: {tmp_path / 'nope'}"
    assert "Traceback" not in result.stderr


def test_debug_shows_the_traceback(tmp_path):
    cmd = [sys.executable, "-m", "reals_cli", "--debug", "train-vae", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "UserError: dataset folder not found" in result.stderr


def test_bad_choice_exits_2():
    result = CliRunner().invoke(main, ["train-vae", "--rec-loss", "huber"])
    assert result.exit_code == 2
