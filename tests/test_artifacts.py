"""artifacts: atomic writes, manifests that name mismatches, state round trips, safe loading."""

import json
import os
import pickle

import pytest
import torch

from reals_cli import artifacts
from reals_cli.errors import UserError


def test_atomic_path_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "w.json"
    artifacts.atomic_write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with artifacts.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.json"]  # no temp file left behind


def test_atomic_files_get_the_mode_open_gives(tmp_path):
    # mkstemp's owner-only 0600 kept collaborators on a shared cluster from reading outputs.
    (tmp_path / "plain").write_bytes(b"")
    artifacts.atomic_write_bytes(tmp_path / "atomic", b"x")
    mode = (tmp_path / "atomic").stat().st_mode & 0o777
    assert mode == (tmp_path / "plain").stat().st_mode & 0o777


def test_saved_weights_get_the_mode_open_gives_and_a_kill_leaves_temp_files_only_in_a_temp_folder(tmp_path, monkeypatch):
    import subprocess
    import sys

    (tmp_path / "plain").write_bytes(b"")
    artifacts.save_weights(tmp_path / "w.safetensors", {"a": torch.ones(3)})  # safetensors' own temp file is 0600
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
    # safetensors writes its own temp file (.tmpXXXXXX) beside the path it is given: that path is in a
    # temp folder of ours, so what a kill inside safetensors leaves is in there too.
    given = []
    real = artifacts.save_file
    monkeypatch.setattr(artifacts, "save_file", lambda tensors, path, **kw: (given.append(path), real(tensors, path, **kw)))
    artifacts.save_weights(tmp_path / "v.safetensors", {"a": torch.ones(3)})
    assert artifacts._TEMPORARY.fullmatch(os.path.basename(os.path.dirname(given[0])))
    # Killed at the last step, the rename: nothing but the temp folder, which the next holder removes.
    killed = tmp_path / "killed"
    code = ("import os, torch; from reals_cli import artifacts; os.replace = lambda *a: os._exit(9); "
            f"artifacts.save_weights({str(killed / 'w.safetensors')!r}, {{'a': torch.ones(1000)}})")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert child.returncode == 9, child.stderr
    [left] = killed.iterdir()
    assert left.is_dir() and artifacts._TEMPORARY.fullmatch(left.name) and left.name.startswith(".w.safetensors.")
    with artifacts.hold_folder(killed, "reals x"):
        assert sorted(p.name for p in killed.iterdir()) == [".lock"]


def test_holding_a_folder_removes_a_killed_runs_temp_files_and_nothing_else(tmp_path):
    run = tmp_path / "run"
    kept = ["model.safetensors", ".hidden", "notes.tmp", ".tmpshort", "parts/.block.npz.abc.tmp"]
    gone = [".model.safetensors.x1y2.tmp", ".tmpUauDID", "step-0000002/.ema.safetensors.k9.tmp/ema.safetensors",
            "images/.000007.png.tmp"]
    for name in kept + gone:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_bytes(b"x")
    with artifacts.hold_folder(run, "reals x", keep=["parts"]):  # parts: other ranks may be writing there
        left = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    assert left == sorted(kept + [".lock"])
    assert sorted(p.name for p in (run / "step-0000002").iterdir()) == []


def test_a_held_folder_is_let_go_though_a_forked_child_lives_on(tmp_path):
    import time

    with artifacts.hold_folder(tmp_path / "run", "reals x"):
        with pytest.raises(UserError, match=r"is being written by another `reals x` process; wait for it to end"):
            with artifacts.hold_folder(tmp_path / "run", "reals x"):
                pass
        child = os.fork()  # as a DataLoader worker is
        if child == 0:
            time.sleep(2)
            os._exit(0)
        time.sleep(0.2)  # the child has closed its copy of the lock file
    try:
        with artifacts.hold_folder(tmp_path / "run", "reals x"):  # the child is alive, the folder free
            pass
    finally:
        os.waitpid(child, 0)


def test_a_filesystem_without_locks_warns_and_goes_on(tmp_path, monkeypatch, capsys):
    import errno
    import fcntl

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with artifacts.hold_folder(tmp_path / "run", "reals x"):
        pass
    assert "this filesystem has no file locks (No locks available)" in capsys.readouterr().err


def test_state_round_trip_keeps_structure_and_dtypes(tmp_path):
    state = {
        "step": 7, "lr": 1e-4, "name": "x", "none": None, "flag": True,
        "model": {"w": torch.randn(3, 2), "b": torch.arange(4, dtype=torch.int64)},
        "opt": {"state": {0: {"exp_avg": torch.randn(2), "step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "rng": [torch.get_rng_state(), (1, 2, 3)],
        "half": torch.randn(2, dtype=torch.bfloat16),
    }
    artifacts.save_state(tmp_path / "c.safetensors", state)
    back = artifacts.load_state(tmp_path / "c.safetensors")
    assert back["step"] == 7 and back["lr"] == 1e-4 and back["none"] is None and back["flag"] is True
    assert torch.equal(back["model"]["w"], state["model"]["w"]) and back["model"]["b"].dtype == torch.int64
    assert torch.equal(back["opt"]["state"][0]["exp_avg"], state["opt"]["state"][0]["exp_avg"])  # int keys survive
    assert back["rng"][1] == (1, 2, 3) and torch.equal(back["rng"][0], state["rng"][0])
    assert back["half"].dtype == torch.bfloat16 and torch.equal(back["half"], state["half"])


def test_weights_with_shared_storage_round_trip_and_only_they_are_copied(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    own = torch.randn(5)
    tensors = {"base": base, "row": base[1], "transposed": base.t(), "again": base, "own": own, "empty": torch.zeros(0)}
    artifacts.save_weights(tmp_path / "w.safetensors", tensors)
    back = artifacts.load_weights(tmp_path / "w.safetensors")
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], v) for k, v in tensors.items())
    apart = artifacts._apart(tensors)
    # The first user of a storage and a tensor with its own are saved without a copy.
    assert apart["base"].data_ptr() == base.data_ptr() and apart["own"].data_ptr() == own.data_ptr()
    assert len({v.untyped_storage().data_ptr() for k, v in apart.items() if k != "empty"}) == 5


def test_manifest_checks_kind_and_version(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"abc")
    m = artifacts.write_manifest(tmp_path, "vae", 1, {"x": 1}, files=["w.bin"])
    assert artifacts.read_manifest(tmp_path, "vae", 1)["id"] == m["id"]
    with pytest.raises(UserError, match=r"is a 'vae' artifact, but a 'dit' artifact is needed here"):
        artifacts.read_manifest(tmp_path, "dit")
    with pytest.raises(UserError, match=r"has vae format version 1, this reals reads version 2"):
        artifacts.read_manifest(tmp_path, "vae", 2)
    artifacts.verify_files(tmp_path, m)
    (tmp_path / "w.bin").write_bytes(b"abd")
    with pytest.raises(UserError, match="does not match the hash in its manifest"):
        artifacts.verify_files(tmp_path, m)


def test_unfinished_artifact_is_refused(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="has no manifest.json: it is not a reals artifact, or the run that made it did not finish"):
        artifacts.read_manifest(tmp_path, "vae")


def test_identity_depends_on_config_and_files(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d, content in ((a, b"1"), (b, b"2")):
        d.mkdir()
        (d / "w").write_bytes(content)
    ida = artifacts.write_manifest(a, "vae", 1, {"x": 1}, files=["w"])["id"]
    idb = artifacts.write_manifest(b, "vae", 1, {"x": 1}, files=["w"])["id"]
    assert ida != idb
    assert artifacts.describe_input(a) == {"path": str(a), "kind": "vae", "id": ida}


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_torch_load_refuses_code(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"w": _Evil()}, f)
    with pytest.raises(UserError, match=r"cannot load .* as a plain tensor checkpoint \(UnpicklingError: Unsupported operand"):
        artifacts.torch_load(path)
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pt")
    assert torch.equal(artifacts.torch_load(tmp_path / "ok.pt")["w"], torch.ones(2))


def test_load_weights_errors(tmp_path):
    with pytest.raises(UserError, match="weights file not found"):
        artifacts.load_weights(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(UserError, match="is not a readable safetensors file"):
        artifacts.load_weights(tmp_path / "bad.safetensors")


@pytest.mark.assets
def test_manifest_records_the_command_and_a_broken_file_names_it(tmp_path, assets_home):
    from click.testing import CliRunner

    from reals_cli.cli import main

    out = tmp_path / "photos"
    assert CliRunner().invoke(main, ["data", "photos", str(out), "--per-photo", "1"]).exit_code == 0
    m = artifacts.read_manifest(out, "dataset")
    assert m["command"] == f"reals data photos {out} --per-photo 1" and 0 <= m["wall_s"] < 60
    (out / "classes.json").unlink()
    with pytest.raises(UserError) as e:
        artifacts.verify_files(out, m)
    assert str(e.value) == (f"{out}/classes.json is missing (listed in {out}/manifest.json); "
                            f"delete {out} and run `reals data photos {out} --per-photo 1` again")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_weights_with_nan_or_infinity_are_refused_where_they_load(tmp_path, bad):
    """Whatever hash vouches for the file: NaN weights sample NaN images and train NaN losses."""
    w = torch.ones(3, 2)
    w[1, 0] = bad
    artifacts.save_weights(tmp_path / "w.safetensors", {"ok": torch.ones(2), "layer.weight": w})
    with pytest.raises(UserError, match=rf"^{tmp_path / 'w.safetensors'} holds NaN or infinite values \(first in "
                                        rf"layer\.weight\), so it is no usable weights file; re-create it"):
        artifacts.load_weights(tmp_path / "w.safetensors")
    torch.save({"ema": {"blocks.0.w": w}, "steps": 3}, tmp_path / "w.pt")
    with pytest.raises(UserError, match=r"holds NaN or infinite values \(first in ema\.blocks\.0\.w\)"):
        artifacts.torch_load(tmp_path / "w.pt")
    # Integer tensors have no NaN; finite floats of every width load.
    torch.save({"n": torch.arange(3), "h": torch.ones(2, dtype=torch.float16)}, tmp_path / "fine.pt")
    assert artifacts.torch_load(tmp_path / "fine.pt")["n"].tolist() == [0, 1, 2]


class _System:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_pickled_object_is_refused_without_advising_an_unsafe_load(tmp_path):
    torch.save({"w": torch.ones(1), "hook": _System()}, tmp_path / "evil.pt")
    with pytest.raises(UserError) as refused:
        artifacts.torch_load(tmp_path / "evil.pt")
    message = str(refused.value)
    assert message == (f"{tmp_path / 'evil.pt'} is not a plain weights file: it holds an object of class posix.system, "
                       f"and rebuilding it could run code, so it is not loaded; pass a .safetensors file, or a "
                       f".pt/.pth of tensors alone (a state dict)")
    assert "weights_only" not in message and "trust" not in message
