"""Shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def assets_home(tmp_path_factory) -> Path:
    """A REALS_HOME with every offline asset fetched and verified, set for the whole session.

    `$REALS_TEST_HOME` (the Makefile points it at the persistent cache) avoids downloading
    again on every run; otherwise the assets go to a fresh temporary folder.
    Tests must not modify files in it: copy what they want to damage.
    """
    from reals_cli.assets import fetch

    home = Path(os.environ.get("REALS_TEST_HOME") or tmp_path_factory.mktemp("reals_home"))
    previous = os.environ.get("REALS_HOME")
    os.environ["REALS_HOME"] = str(home)  # monkeypatch is function-scoped; restored below
    try:
        fetch(log=lambda *_: None)
        yield home
    finally:
        if previous is None:
            os.environ.pop("REALS_HOME", None)
        else:
            os.environ["REALS_HOME"] = previous


# One torch thread per process: tests run small ops, where two threads contending with
# each other (and with subprocesses the tests start) cost far more than they gain.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def kill_after_checkpoint():
    """Start `cmd` as a real process and SIGKILL it once `ckpt` holds step >= min_step."""
    import signal
    import subprocess
    import time

    from reals_cli.artifacts import load_state

    def run(cmd: list[str], ckpt: Path, min_step: int, timeout: float = 240) -> int:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if ckpt.is_file() and load_state(ckpt)["step"] >= min_step:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return load_state(ckpt)["step"]

    return run


@pytest.fixture
def interrupt_after_log():
    """Start the training command `cmd` as a real process; once `out`/log.jsonl has `lines` lines,
    send it `sig` (to its whole process group when `group`, as a terminal's Ctrl-C reaches the
    DataLoader workers too). Checks that it saved the step it stopped at, exited with `status`
    and said how to go on; returns that step."""
    import signal
    import subprocess
    import time

    from reals_cli.artifacts import load_state

    def run(cmd: list[str], out: Path, lines: int, sig=signal.SIGINT, group: bool = False, status: int | None = None) -> int:
        status = 128 + sig if status is None else status  # as a shell reports the signal: 130, 143
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=group)
        log, deadline = out / "log.jsonl", time.monotonic() + 180
        while time.monotonic() < deadline and not (log.is_file() and len(log.read_text().splitlines()) >= lines):
            time.sleep(0.05)
        os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == status, err
        ckpt = out / "checkpoint.safetensors"
        stopped = load_state(ckpt)["step"]
        assert stopped >= lines and not (out / "manifest.json").exists()
        said = f"interrupted: stopped at step {stopped}; {ckpt} holds it: continue with the same command and --resume"
        assert said in err.splitlines(), err
        return stopped

    return run


@pytest.fixture
def train_on_two_ranks():
    """Run `reals <args>` under torchrun as 2 CPU processes (gloo); check that the run's
    checkpoint holds `steps` and one RNG state per rank, and return it."""
    import subprocess
    import sys

    from reals_cli.artifacts import load_state

    def run(args: list[str], checkpoint: Path, steps: int) -> dict:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "reals_cli", *args]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
        state = load_state(checkpoint)
        assert state["step"] == steps and len(state["rng"]) == 2
        return state

    return run


@pytest.fixture
def unwritable(tmp_path) -> Path:
    """A folder in which no new file can be made, for this process too: read-only by its mode, and
    for root (whom modes do not stop) immutable (`chattr +i`). Skips where neither holds."""
    import subprocess

    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = os.geteuid() == 0 and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    try:
        (folder / "probe").touch()
    except OSError:
        pass
    else:
        pytest.skip("no way to make a folder read-only here")
    try:
        yield folder
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)
