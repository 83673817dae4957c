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
    # Brackets, which rich would read as style tags, are printed as they are.
    cmd = [sys.executable, "-m", "reals_cli", "train-vae", "--data", str(tmp_path / "nope[red]"), "--out", str(tmp_path / "o"),
           "--teacher", "vgg16"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: dataset folder not found: {tmp_path / 'nope[red]'}"
    assert "Traceback" not in result.stderr


def test_debug_shows_the_traceback(tmp_path):
    cmd = [sys.executable, "-m", "reals_cli", "--debug", "train-vae", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "UserError: dataset folder not found" in result.stderr


def test_flags_click_refuses_are_one_line_and_exit_2():
    result = CliRunner().invoke(main, ["train-vae", "--rec-loss", "huber"], prog_name="reals")
    assert result.exit_code == 2
    assert result.output == ("error: Invalid value for '--rec-loss': 'huber' is not one of 'l1', 'mse'. "
                             "(see `reals train-vae --help`)\n")
    result = CliRunner().invoke(main, ["sample", "--bogus"], prog_name="reals")
    assert (result.exit_code, result.output) == (2, "error: No such option '--bogus'. Did you mean '--out'? (see `reals sample --help`)\n")
    # --debug keeps click's own usage text.
    result = CliRunner().invoke(main, ["--debug", "sample", "--bogus"], prog_name="reals")
    assert result.exit_code == 2 and result.output.startswith("Usage: reals sample")


def test_an_interruption_exits_128_plus_its_signal(monkeypatch):
    import signal

    from reals_cli.errors import Interrupted
    from reals_cli.pipeline import report

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "write_report", interrupted)
    result = CliRunner().invoke(main, ["report", "."])
    assert (result.exit_code, result.output) == (130, "interrupted: stopped by the user\n")
    result = CliRunner().invoke(main, ["--debug", "report", "."])  # the traceback, and still 130
    assert result.exit_code == 130 and "Traceback" in result.output and "in interrupted" in result.output

    def terminated(*args, **kwargs):  # a training loop stopped by SIGTERM: 143, what schedulers expect
        raise Interrupted("stopped at step 3", signal.SIGTERM)

    monkeypatch.setattr(report, "write_report", terminated)
    result = CliRunner().invoke(main, ["report", "."])
    assert (result.exit_code, result.output) == (143, "interrupted: stopped at step 3\n")


def test_progress_off_a_terminal_prints_plain_lines(monkeypatch):
    """A log file (SLURM, `2> run.log`) sees a long job's progress as it goes, not only at the end."""
    import io

    from rich.console import Console

    from reals_cli import console

    log = io.StringIO()
    monkeypatch.setattr(console, "console", Console(file=log, force_terminal=False, width=200))
    clock = iter(range(0, 1000, 10))  # each update 10 s after the last
    monkeypatch.setattr(console.time, "monotonic", lambda: next(clock))
    with console.progress() as bar:
        task = bar.add_task("sample", total=6)
        for i in range(6):
            bar.update(task, advance=1, status=f"{i} img/s")
            assert log.getvalue().count("\n") == [1, 1, 1, 2, 2, 3][i]  # the first update, then every 30 s, the end
    lines = log.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines[:3]] == ["sample: 1/6 0 img/s", "sample: 4/6 3 img/s",
                                                            "sample: 6/6 5 img/s"]
