"""encode + latent store: latents equal the VAE's, resume after SIGKILL and ENOSPC, bad input, LatentDataset."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from PIL import Image

from reals_cli.cli import main
from reals_cli.data import latent_store
from reals_cli.data.images import ImageFolder
from reals_cli.data.latent_store import LatentDataset, create_store, open_store
from reals_cli.errors import UserError
from reals_cli.models.alignment import AlignConfig, AlignmentNet
from reals_cli.models.reals_vae import load_reals_vae, save_reals_vae
from reals_cli.models.vae import AutoencoderKL, save_diffusers_vae, vae_config
from reals_cli.pipeline.encode import encode

FAST = dict(batch_size=3, block_size=4, workers=0, device="cpu")


def _make_vae(out: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    save_reals_vae(out, AutoencoderKL(vae_config("tiny")), AlignmentNet(AlignConfig(4, 8, 6, 4, hidden=8)),
                   {"image_size": 16}, {}, {})
    return out


def _make_images(root: Path, per_class: int, seed: int = 0) -> Path:
    """Two classes of random RGB images of mixed sizes (the crop has work to do)."""
    rng = np.random.default_rng(seed)
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = rng.integers(16, 30, 2)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    return _make_vae(tmp_path_factory.mktemp("vae") / "vae", seed=0)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return _make_images(tmp_path_factory.mktemp("images"), per_class=9)


@pytest.fixture(scope="module")
def reference(vae_dir, images, tmp_path_factory) -> Path:
    """An uninterrupted single-process run with FAST settings, to compare other runs with."""
    out = tmp_path_factory.mktemp("reference") / "s.zarr"
    encode(images, out, vae_dir, **FAST)
    return out


def _arrays(path) -> dict[str, np.ndarray]:
    store = open_store(path)
    return {"posterior": store.read(np.arange(store.rows)), "labels": store.labels,
            "stats": np.array([store.attrs["latent_mean"], store.attrs["latent_std"]])}


def _assert_same_store(a, b) -> None:
    x, y = _arrays(a), _arrays(b)
    for k in x:
        assert np.array_equal(x[k], y[k]), k


def _error_line(result) -> str:
    """The one red line a UserError becomes (after any progress output), without a traceback."""
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: ") and result.output.count("error: ") == 1, result.output
    return last


@pytest.mark.parametrize("name", ["s.zarr", "s.h5"])
def test_latents_equal_the_vae_and_read_back(vae_dir, images, tmp_path, name, monkeypatch):
    out = tmp_path / name
    monkeypatch.chdir(vae_dir.parent)  # the VAE given relative to here: the store records where it really is
    result = encode(images, out, vae_dir.name, flip=True, **FAST)
    assert result["complete"] and result["count"] == 18 and result["skipped"] == 0

    store = open_store(out)
    assert store.complete and store.count == 18 and store.latent_shape == (4, 8, 8) and store.views == 2
    assert store.classes == ["cat", "dog"] and store.vae_id == load_reals_vae(vae_dir).id
    a = store.attrs
    assert a["kind"] == "latents" and a["format_version"] == 1 and a["image_size"] == 16
    assert a["inputs"]["vae"]["id"] == store.vae_id and a["inputs"]["images"]["path"] == str(images)
    assert a["inputs"]["vae"]["path"] == str(vae_dir) and Path(vae_dir).is_absolute()

    vae = load_reals_vae(vae_dir).vae
    folder = ImageFolder(images, 16, flip=False)
    x = torch.stack([folder[i][0] for i in range(len(folder))]) * 2 - 1
    with torch.no_grad():
        views = [vae.encode(v) for v in (x, x.flip(3))]
    expected = torch.stack([torch.stack([m, torch.exp(0.5 * lv)], 1) for m, lv in views], 1).numpy()
    post = store.read(np.arange(18))
    assert post.dtype == np.float16 and post.shape == (18, 2, 2, 4, 8, 8)
    np.testing.assert_allclose(post.astype(np.float32), expected, rtol=2e-3, atol=2e-3)
    assert store.labels.tolist() == [label for _, label in folder.samples]

    # The statistics are those of posterior samples over both views, from the stored values.
    p = post.astype(np.float64)
    mean = p[:, :, 0].mean(axis=(0, 1, 3, 4))
    var = (p[:, :, 0] ** 2 + p[:, :, 1] ** 2).mean(axis=(0, 1, 3, 4)) - mean**2
    np.testing.assert_allclose(a["latent_mean"], mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(a["latent_std"], np.sqrt(var), rtol=1e-9)
    z = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(store.denormalize(store.normalize(z)), z)

    again = CliRunner().invoke(main, ["encode", str(images), str(out), "--vae", str(vae_dir), "--flip",
                                      "--block-size", "4", "--workers", "0", "--device", "cpu"])
    assert again.exit_code == 0 and "already complete" in again.output, again.output
    info = CliRunner().invoke(main, ["encode", "--info", str(out)])
    assert info.exit_code == 0 and "latent shape" in info.output and store.vae_id in info.output


def test_h5_and_url_stores_hold_the_same_latents(vae_dir, images, reference, tmp_path):
    encode(images, tmp_path / "a.h5", vae_dir, **FAST)
    encode(images, "memory://reals-test/a.zarr", vae_dir, **FAST)  # fsspec: the path s3:// also takes
    _assert_same_store(reference, tmp_path / "a.h5")
    _assert_same_store(reference, "memory://reals-test/a.zarr")
    assert len(LatentDataset(tmp_path / "a.h5")) == 18


def test_resume_after_sigkill_equals_uninterrupted_run(vae_dir, tmp_path):
    data = _make_images(tmp_path / "many", per_class=80, seed=1)
    flags = ["--flip", "--block-size", "4", "--batch-size", "4", "--workers", "0", "--device", "cpu"]
    straight = tmp_path / "straight.zarr"
    assert CliRunner().invoke(main, ["encode", str(data), str(straight), "--vae", str(vae_dir), *flags]).exit_code == 0

    killed = tmp_path / "killed.zarr"
    cmd = [sys.executable, "-m", "reals_cli", "encode", str(data), str(killed), "--vae", str(vae_dir), *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if open_store(killed).done_blocks().sum() >= 3:
                break
        except UserError:  # not created yet
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = open_store(killed)
    finished = int(store.done_blocks().sum())
    assert not store.complete and 3 <= finished < store.num_blocks, "the run finished before it could be killed"

    resumed = CliRunner().invoke(main, ["encode", str(data), str(killed), "--vae", str(vae_dir), *flags])
    assert resumed.exit_code == 0, resumed.output
    assert f"{finished} of {store.num_blocks} blocks already complete, skipped (blocks 0-{finished - 1})" in resumed.output
    _assert_same_store(straight, killed)
    assert not list(killed.rglob("*.partial"))


def test_disk_full_is_one_line_and_the_store_resumes(vae_dir, images, reference, tmp_path, monkeypatch):
    out = tmp_path / "full.zarr"
    real, calls = latent_store.LatentStore._write_chunks, []

    def fills_up(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(self, *args)

    monkeypatch.setattr(latent_store.LatentStore, "_write_chunks", fills_up)
    args = ["encode", str(images), str(out), "--vae", str(vae_dir), "--block-size", "4", "--batch-size", "3",
            "--workers", "0", "--device", "cpu"]
    line = _error_line(CliRunner().invoke(main, args))
    assert "No space left on device" in line and "run the same command again" in line
    assert open_store(out).done_blocks().tolist() == [True, True, False, False, False]
    monkeypatch.setattr(latent_store.LatentStore, "_write_chunks", real)
    assert CliRunner().invoke(main, args).exit_code == 0
    _assert_same_store(reference, out)


def test_ranks_write_disjoint_blocks_and_the_last_one_finalises(vae_dir, images, reference, tmp_path, monkeypatch):
    out = tmp_path / "ranks.zarr"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert not encode(images, out, vae_dir, **FAST)["complete"]
    assert open_store(out).done_blocks().tolist() == [True, False, True, False, True]
    monkeypatch.setenv("RANK", "1")
    assert encode(images, out, vae_dir, **FAST)["complete"]
    _assert_same_store(reference, out)


def test_bad_outputs_and_unreadable_images(vae_dir, images, tmp_path):
    run = CliRunner().invoke
    base = ["--vae", str(vae_dir), "--workers", "0", "--device", "cpu"]
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    assert _error_line(run(main, ["encode", str(images), str(taken), *base])) == (
        f"error: {taken} exists and is not a latent store; pass a new output path, or delete it")
    assert (taken / "notes.txt").read_text() == "mine"

    out = tmp_path / "s.zarr"
    encode(images, out, vae_dir, **FAST)
    other = _make_vae(tmp_path / "other", seed=1)
    a, b = load_reals_vae(vae_dir).id, load_reals_vae(other).id
    line = _error_line(run(main, ["encode", str(images), str(out), "--vae", str(other), "--workers", "0"]))
    assert a in line and b in line
    assert "usage: reals encode IMAGES OUT --vae" in _error_line(run(main, ["encode", str(images), str(out)]))
    # Another folder of images into this store, then this folder with an image more.
    others = _make_images(tmp_path / "others", per_class=1)
    assert _error_line(run(main, ["encode", str(others), str(out), *base, "--block-size", "4"])) == (
        f"error: {out} holds the latents of {Path(images).resolve()} (18 images), not of {others}; "
        "pass a new output path for these")
    grown = shutil.copytree(images, tmp_path / "grown")
    encode(grown, tmp_path / "g.zarr", vae_dir, **FAST)
    shutil.copy(grown / "cat" / "000.png", grown / "cat" / "new.png")
    assert _error_line(run(main, ["encode", str(grown), str(tmp_path / "g.zarr"), *base, "--block-size", "4"])) == (
        f"error: the images in {grown} changed since {tmp_path / 'g.zarr'} was started (18 images then); "
        "restore them, or pass a new output path")

    bad = _make_images(tmp_path / "bad", per_class=3)
    (bad / "cat" / "001.png").write_bytes(b"not a png")
    (bad / "dog" / "zzz.jpg").write_bytes(b"\xff\xd8\xff truncated")
    out = tmp_path / "bad.zarr"
    result = run(main, ["encode", str(bad), str(out), *base])
    assert result.exit_code == 0, result.output
    store = open_store(out)
    assert store.attrs["skipped"] == 2 and store.count == 5 and store.rows == 7
    assert store.labels.tolist() == [0, -1, 0, 1, 1, 1, -1]
    assert not store.read(np.array([1, 6])).any()  # no latent of another image under a bad file's row
    assert np.array_equal(store.read(np.arange(7)), zarr.open_group(out)["posterior"][:])  # the fast path
    assert len(LatentDataset(out)) == 5


def test_an_hdf5_store_open_elsewhere_is_named_as_such(vae_dir, images, tmp_path):
    out = tmp_path / "s.h5"
    holder = subprocess.Popen([sys.executable, "-c", f"import h5py, time; f = h5py.File({str(out)!r}, 'w'); "
                               "print('open', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(UserError, match=r"^.*s\.h5 is open in another process \(HDF5 locks it while writing\); "
                                            r"wait for that process to end, then run again$"):
            encode(images, out, vae_dir, **FAST)
    finally:
        holder.kill()
        holder.wait()


def test_plain_diffusers_vae_needs_image_size(images, tmp_path):
    save_diffusers_vae(AutoencoderKL(vae_config("tiny")), tmp_path / "plain")
    with pytest.raises(UserError, match="pass --image-size"):
        encode(images, tmp_path / "s.zarr", tmp_path / "plain", **FAST)
    result = encode(images, tmp_path / "s.zarr", tmp_path / "plain", image_size=16, **FAST)
    assert result["complete"] and open_store(tmp_path / "s.zarr").vae_id == load_reals_vae(tmp_path / "plain").id


def _synthetic_store(path, done_blocks=2) -> str:
    """4 images, 2 views: view 0 has mean 1, view 1 mean 3, std 0.01 (so the view is visible in z)."""
    store = create_store(path, rows=4, latent_shape=(2, 2, 2), views=2, dtype="float32", block_size=2,
                         attrs={"vae_id": "aaaa", "classes": ["x", "y"], "config": {"block_size": 2}})
    post = np.zeros((2, 2, 2, 2, 2, 2), np.float32)
    post[:, 0, 0], post[:, 1, 0], post[:, :, 1] = 1.0, 3.0, 0.01
    for block in range(done_blocks):
        store.write_block(block, post, np.array([0, 1]))
    if done_blocks == 2:
        store.finalize()
    return str(path)


def test_latent_dataset_samples_normalises_flips_and_refuses(tmp_path):
    ds = LatentDataset(_synthetic_store(tmp_path / "s.zarr"), vae_id="aaaa")
    store = ds.store
    np.testing.assert_allclose(store.attrs["latent_mean"], [2.0, 2.0])
    np.testing.assert_allclose(store.attrs["latent_std"], [np.sqrt(1 + 1e-4)] * 2, rtol=1e-6)
    assert len(ds) == 4
    draws = [ds[0] for _ in range(40)]
    assert all(label == 0 for _, label in draws)
    z = torch.stack([d[0] for d in draws])
    assert not torch.equal(z[0], z[1])  # a fresh sample per access
    raw = store.denormalize(z).mean(dim=(1, 2, 3))
    assert ((raw - 1).abs() < 0.05).any() and ((raw - 3).abs() < 0.05).any()  # both views, same image
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True)))
    assert batch[0].shape == (4, 2, 2, 2) and sorted(batch[1].tolist()) == [0, 0, 1, 1]
    big = torch.cat([torch.utils.data.default_collate([ds[i] for i in range(4)])[0] for _ in range(200)])
    assert abs(big.mean().item()) < 0.05 and abs(big.std().item() - 1) < 0.05  # normalised

    with pytest.raises(UserError) as e:
        LatentDataset(ds.store.path, vae_id="bbbb")
    assert str(e.value) == (f"{ds.store.path} holds latents of VAE aaaa, not of VAE bbbb; use the VAE that made "
                            f"the store, or encode the images again with this one")
    half = _synthetic_store(tmp_path / "half.zarr", done_blocks=1)
    with pytest.raises(UserError) as e:
        LatentDataset(half)
    assert str(e.value) == (f"{half} is an unfinished latent store (1 of 2 blocks encoded); "
                            f"run the same `reals encode` command again to finish it")


# -- a kill anywhere, two writers, damaged stores, a changed VAE ----------------------------------

# Runs `reals ARGS` and dies (os._exit, as SIGKILL would) just before its K-th file rename: every Zarr
# write, and each of ours, is a temp file renamed over its target, so the K-th rename is a commit step.
_KILLED_AT_RENAME = """
import os, sys
real, calls = os.replace, [0]
def replace(*args, **kwargs):
    calls[0] += 1
    if calls[0] == {k}:
        os._exit(9)
    return real(*args, **kwargs)
os.replace = replace
from reals_cli.cli import main
main({args!r}, prog_name="reals")
"""

_TIMES = {"created", "finished", "wall_s"}


def _files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _assert_identical_store(reference: Path, out: Path, command: list[str]) -> None:
    """Bit for bit: every chunk and array description; the group's attributes but for the times and the command."""
    a, b = _files(reference), _files(out)
    assert a.keys() == b.keys()
    assert [name for name in a if name != "zarr.json" and a[name] != b[name]] == []
    attrs_a, attrs_b = open_store(reference).attrs, open_store(out).attrs
    assert attrs_b["command"] == " ".join(["reals", *command])
    assert {k: v for k, v in attrs_a.items() if k not in _TIMES | {"command"}} == \
           {k: v for k, v in attrs_b.items() if k not in _TIMES | {"command"}}


def test_a_kill_at_each_commit_step_then_the_same_command_gives_the_identical_store(vae_dir, tmp_path):
    data = _make_images(tmp_path / "img", per_class=3)  # 6 images: blocks of 4 and 2

    def args(out):
        return ["encode", str(data), str(out), "--vae", str(vae_dir), "--block-size", "4", "--batch-size", "4",
                "--workers", "0", "--device", "cpu"]

    straight = tmp_path / "straight.zarr"
    assert CliRunner().invoke(main, args(straight)).exit_code == 0
    k = 1
    while True:
        out = tmp_path / f"killed-{k}.zarr"
        child = subprocess.run([sys.executable, "-c", _KILLED_AT_RENAME.format(k=k, args=args(out))],
                               capture_output=True, text=True, timeout=300, check=False)
        if child.returncode == 0:  # it made fewer than k renames: it was killed at each of them
            break
        assert child.returncode == 9, child.stderr
        again = CliRunner().invoke(main, args(out))
        assert again.exit_code == 0, (k, again.output)
        _assert_identical_store(straight, out, args(out))
        assert [p.name for p in out.rglob("*") if p.name.endswith((".partial", ".tmp"))] == [], k
        k += 1
    # The group and 3 arrays, the attributes in one write, 3 files a block, and the finalisation in one.
    assert k - 1 == 4 + 1 + 2 * 3 + 1


def test_a_second_encode_into_a_store_in_use_stops_at_once(vae_dir, images, tmp_path):
    from reals_cli.artifacts import hold_folder

    out = tmp_path / "s.zarr"
    args = ["encode", str(images), str(out), "--vae", str(vae_dir), "--workers", "0", "--device", "cpu"]
    with hold_folder(out, "reals encode"):  # as the first `reals encode` holds it
        assert _error_line(CliRunner().invoke(main, args)) == (
            f"error: {out} is being written by another `reals encode` process; wait for it to end, or pass another "
            f"output path")
    assert CliRunner().invoke(main, args).exit_code == 0


def _shard(store: Path, block: int) -> Path:
    return store / "posterior" / "c" / str(block) / "0" / "0" / "0" / "0" / "0"


def _flip_bytes(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, says", [
    (lambda s: _shard(s, 1).unlink(), "its posterior array has 4 chunk files of"),
    (lambda s: _shard(s, 1).write_bytes(_shard(s, 1).read_bytes()[:-100]), "its posterior array has 5 chunk files of"),
    (lambda s: (s / "labels" / "c" / "2").write_bytes((s / "labels" / "c" / "2").read_bytes()[:9]),
     "its labels array has 3 chunk files of 81 bytes, not the 3 of 108"),
    (lambda s: shutil.rmtree(s / "labels"), "it has no labels array"),
])
def test_a_store_missing_or_cut_short_files_is_refused_by_every_reader(vae_dir, images, reference, tmp_path,
                                                                     damage, says):
    out = shutil.copytree(reference, tmp_path / "s.zarr")
    damage(out)
    command = ["encode", str(images), str(out), "--vae", str(vae_dir), "--block-size", "4", "--batch-size", "3",
               "--workers", "0", "--device", "cpu"]
    line = _error_line(CliRunner().invoke(main, command))
    assert line.startswith(f"error: {out} is a damaged latent store: {says}") and line.endswith(
        "; delete it and encode the images again"), line  # made from Python: no command recorded
    with pytest.raises(UserError, match="is a damaged latent store"):
        LatentDataset(out)
    _error_line(CliRunner().invoke(main, ["analyze", str(out), "--out", str(tmp_path / "a")]))


@pytest.mark.parametrize("where", ["data", "index"])
def test_garbage_in_a_shard_is_an_error_not_latents(reference, tmp_path, where):
    out = shutil.copytree(reference, tmp_path / "s.zarr")
    shard = _shard(out, 1)
    _flip_bytes(shard, 10 if where == "data" else shard.stat().st_size - 20)
    ds = LatentDataset(out)  # the files are all there, at their sizes
    what = "row 4 in .* fails its checksum" if where == "data" else "the index of .* fails its checksum"
    with pytest.raises(UserError, match=f"^{out} is a damaged latent store: {what}; delete it and encode"):
        ds.__getitems__(list(range(len(ds))))
    # Through Zarr (the reader of stores elsewhere) the checksum is checked as well.
    with pytest.raises(UserError, match="is a damaged latent store: its posterior array does not read back"):
        open_store(out)._read("posterior", slice(None))


def test_a_zarr_v2_store_is_one_line(vae_dir, images, tmp_path):
    out = tmp_path / "v2.zarr"
    group = zarr.open_group(out, mode="w", zarr_format=2)
    group.attrs.update({"kind": "latents", "format_version": 1, "complete": True})
    group.create_array("posterior", shape=(2, 4), dtype="float16")
    result = CliRunner().invoke(main, ["encode", str(images), str(out), "--vae", str(vae_dir)])
    assert _error_line(result) == (f"error: {out} is a Zarr v2 store; reals reads the Zarr v3 stores `reals encode` "
                                   f"writes: encode the images again")
    assert len(result.output.strip().splitlines()) == 1


def test_a_vae_whose_weights_changed_is_refused(images, tmp_path):
    from reals_cli.artifacts import load_weights, save_weights

    vae = _make_vae(tmp_path / "vae", seed=0)
    weights = vae / "diffusion_pytorch_model.safetensors"
    state = load_weights(weights)
    state["encoder.conv_in.bias"] += 1
    save_weights(weights, state, metadata={"format": "pt"})
    line = _error_line(CliRunner().invoke(main, ["encode", str(images), str(tmp_path / "s.zarr"), "--vae", str(vae),
                                                 "--workers", "0", "--device", "cpu"]))
    assert line == (f"error: {weights} does not match the hash in its manifest (corrupt or replaced); "
                    f"re-create the artifact")
    assert not (tmp_path / "s.zarr").exists()


def test_a_store_made_before_chunk_checksums_still_reads_fast_with_its_index_checked(tmp_path, monkeypatch):
    def create(self, name, shape, dtype, chunks, shards=None):  # as stores were created before
        self.group.create_array(name, shape=shape, dtype=dtype, chunks=chunks, shards=shards, compressors=None,
                                fill_value=0)

    monkeypatch.setattr(latent_store._ZarrIO, "create", create)
    path = Path(_synthetic_store(tmp_path / "old.zarr"))
    store = open_store(path)
    assert np.array_equal(store.read(np.arange(4)), zarr.open_group(path)["posterior"][:])
    assert store._fast and not store._fast.crc
    shard = path / "posterior" / "c" / "1" / "0" / "0" / "0" / "0" / "0"
    _flip_bytes(shard, shard.stat().st_size - 8)
    with pytest.raises(UserError, match=r"is a damaged latent store: the index of .* fails its checksum"):
        open_store(path).read(np.arange(4))
