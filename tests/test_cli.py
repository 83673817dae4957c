"""The CLI frame: help, version, and the one error convention."""

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from reals_cli import __version__
from reals_cli.cli import main
from reals_cli.errors import UserError


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


def _leaves(group, path=()):
    """(command words, command) of every command that runs, subcommands of groups included."""
    import click

    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _leaves(command, (*path, name))
        else:
            yield (*path, name), command


def _options(predicate):
    import click

    return [(words, option.opts[0]) for words, command in _leaves(main) for option in command.params
            if isinstance(option, click.Option) and predicate(option)]


def _float_options():
    import click

    return _options(lambda o: isinstance(o.type, click.types.FloatParamType))


def test_the_table_of_float_flags_is_whole():
    """The flags the issue found taking NaN are among those the refusal below runs over."""
    found = set(_float_options())
    assert {(("analyze",), "--perplexity"), (("probe-depth", "fit"), "--depth-scale"), (("probe-depth", "fit"), "--lr"),
            (("probe-seg", "fit"), "--lr"), (("sample",), "--cfg"), (("train-vae",), "--lr"),
            (("train-dit",), "--lr")} <= found
    assert len(found) >= 29


@pytest.mark.parametrize("words, flag", _float_options())
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
def test_every_float_flag_refuses_nan_and_infinity(words, flag, value):
    """One check, click's parameter type, for every float flag of every command: NaN passes any bound."""
    result = CliRunner().invoke(main, [*words, flag, value], prog_name="reals")
    assert (result.exit_code, result.output) == (
        2, f"error: Invalid value for '{flag}': '{value}' is not a finite number. (see `reals {' '.join(words)} --help`)\n")


@pytest.mark.parametrize("words", [words for words, _ in _options(lambda o: o.name == "seed")])
@pytest.mark.parametrize("seed", [str(2**70), str(2**32), "-1"])
def test_every_seed_flag_states_its_range(words, seed):
    result = CliRunner().invoke(main, [*words, "--seed", seed], prog_name="reals")
    assert (result.exit_code, result.output) == (
        2, f"error: Invalid value for '--seed': {seed} is not in the range 0<=x<=4294967295. "
           f"(see `reals {' '.join(words)} --help`)\n")


def test_the_library_refuses_non_finite_values_too(tmp_path):
    from reals_cli.pipeline.probes import DataSpec, fit_head
    from reals_cli.pipeline.training import AT_LEAST_ONE, POSITIVE, SEED, check_values

    for value in (float("nan"), float("inf")):
        with pytest.raises(UserError, match=f"^--lr must be > 0, got {value}$"):
            check_values({"lr": value}, {"lr": POSITIVE})
        with pytest.raises(UserError, match=f"^--perplexity must be at least 1, got {value}$"):
            check_values({"perplexity": value}, {"perplexity": AT_LEAST_ONE})
    with pytest.raises(UserError, match=r"^--seed must be in \[0, 4294967295\], got 4294967296$"):
        check_values({"seed": 2**32}, {"seed": SEED})
    # A library call past the CLI: refused before the VAE is opened (there is none).
    with pytest.raises(UserError, match="^--lr must be > 0, got nan$"):
        fit_head(DataSpec("seg", str(tmp_path), "auto", None), tmp_path / "no-vae", tmp_path / "o", lr=float("nan"))


def _out_cases(tmp_path):
    """Each command with inputs that need not exist: --out is refused before they are opened."""
    return {
        "train-vae": lambda out: ["train-vae", "--data", str(tmp_path / "data"), "--out", str(out)],
        "train-dit": lambda out: ["train-dit", str(tmp_path / "latents.zarr"), "--out", str(out)],
        "encode": lambda out: ["encode", str(tmp_path / "images"), str(out / "latents.zarr"), "--vae", str(tmp_path / "v")],
        "eval-fid": lambda out: ["eval-fid", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "r.npz"), "--out",
                                 str(out / "fid.json")],
        "probe-seg fit": lambda out: ["probe-seg", "fit", "--data", str(tmp_path), "--vae", str(tmp_path / "v"),
                                      "--out", str(out)],
        "probe-depth fit": lambda out: ["probe-depth", "fit", "--data", "motorcycle", "--vae", str(tmp_path / "v"),
                                        "--out", str(out)],
    }


@pytest.mark.parametrize("command", list(_out_cases(Path("."))))
def test_out_under_a_file_is_one_line_before_the_work(tmp_path, command):
    (tmp_path / "file").write_text("x")
    args = _out_cases(tmp_path)[command](tmp_path / "file" / "sub")
    result = CliRunner().invoke(main, args)
    given = args[args.index("--out") + 1] if "--out" in args else args[2]
    option = "--out" if "--out" in args else "OUT"
    assert (result.exit_code, result.output) == (
        2, f"error: {option} {given} is under {tmp_path / 'file'}, which is a file; pass a path in a folder\n")


@pytest.mark.parametrize("command", list(_out_cases(Path("."))))
def test_out_in_a_read_only_folder_is_one_line_before_the_work(tmp_path, unwritable, command):
    args = _out_cases(tmp_path)[command](unwritable / "sub")
    result = CliRunner().invoke(main, args)
    given = args[args.index("--out") + 1] if "--out" in args else args[2]
    option = "--out" if "--out" in args else "OUT"
    assert result.exit_code == 2 and len(result.output.splitlines()) == 1, result.output
    assert result.output.startswith(f"error: {option} {given} cannot be written: {unwritable} refuses new files (")
    assert result.output.endswith("); pass a folder you can write to\n")
    assert not (unwritable / "sub").exists()


def test_shell_completion_as_the_readme_says():
    """`eval "$(_REALS_COMPLETE=bash_source reals)"`: click's bash script, and completions of subcommands."""
    import os

    env = {**os.environ, "_REALS_COMPLETE": "bash_source"}
    script = subprocess.run([sys.executable, "-m", "reals_cli"], env=env, capture_output=True, text=True, timeout=120)
    assert script.returncode == 0 and "complete -o nosort -F _reals_completion reals" in script.stdout
    env = {**os.environ, "_REALS_COMPLETE": "bash_complete", "COMP_WORDS": "reals train-", "COMP_CWORD": "1"}
    words = subprocess.run([sys.executable, "-m", "reals_cli"], env=env, capture_output=True, text=True, timeout=120)
    assert {"plain,train-vae", "plain,train-dit"} <= set(words.stdout.split())
