"""FID, sFID, KID, precision/recall and IS of generated images, by ADM's definitions.

All metrics come from one Inception pass per image set (reals_cli.metrics.inception):
- FID and KID on the 2048-d pool features; sFID on ADM's 2023-d mixed_6/conv vector.
- Precision/recall as ADM's improved precision/recall (Kynkaanniemi et al.) on pool
  features: each point's radius is the distance to its k-th nearest neighbour within its
  own set (k = 3); a point of one set is covered if it lies within the radius of some
  point of the other. Precision: samples covered by the reference; recall: the reverse.
- IS from the classifier's unbiased logits over contiguous splits of 5,000 (ADM's; torch-fidelity
  takes 10 splits, the same only at 50k).

Means and covariances are accumulated in float64, and the Frechet distance is computed
from symmetric eigendecompositions, so it stays real and finite on the singular
covariances of small sets (where `scipy.linalg.sqrtm` returns NaN or complex values).

Inputs: an ADM `.npz` (`arr_0` = N x H x W x 3 uint8, streamed, never loaded whole), a
folder holding `samples.npz` (`reals sample` output), a folder of images, a class-folder
tree (ADM-center-cropped), an ADM reference batch (whose stored mu/sigma are used as
they are), or a statistics file written by `save_reference_stats`. A `reals sample` folder's
samples.npz is checked against the hash in its manifest, since the result carries that
manifest's protocol.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from .. import __version__
from ..artifacts import MANIFEST, atomic_path, check_output_file, read_manifest, verify_files
from ..errors import UserError
from .inception import LOGITS_FEATURE, POOL_FEATURE, SFID_FEATURE, ExtractorChoice, choose_extractor

METRICS = ("fid", "sfid", "kid", "pr", "is")
FID_50K = 50_000
PR_K = 3
IS_SPLIT_SIZE = 5000
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
STATS_FORMAT = "reals-fid-stats"
STATS_VERSION = 1
_META = "reals_meta"  # key of the JSON metadata inside a statistics .npz
_POOL_KEY = "pool"
_STAT_KEYS = {POOL_FEATURE: ("mu", "sigma"), SFID_FEATURE: ("mu_s", "sigma_s")}  # ADM's names
_DIMS = {POOL_FEATURE: 2048, SFID_FEATURE: 7 * 17 * 17}
_WORKERS_FROM = 1000  # fewer images than this decode faster in-process than with forked workers
SAMPLES_NPZ = "samples.npz"
# An unfinished `reals sample` run: its blocks and protocol, no manifest yet (reals_cli.pipeline.sample).
_SAMPLE_RUN_PROTOCOL = Path("parts", "protocol.json")
_IMAGE_KINDS = ("samples", "dataset")  # the artifacts whose folders hold images
_TAKES = {  # what each input may be, for the messages that refuse one
    "SAMPLES": "an ADM .npz (arr_0 = N x H x W x 3 uint8), a `reals sample` folder or a folder of images",
    "--ref": "an ADM reference batch, an .npz of images, a statistics file from --save-ref-stats, a folder of images "
             "or a class-folder tree",
}


# -- metrics on features ---------------------------------------------------------------------

def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix; rounding's tiny negative eigenvalues count as 0."""
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64.

    tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2),
    a symmetric PSD matrix with the same eigenvalues as S1 S2: eigh keeps them real, clipping
    keeps them non-negative, so the result is real and finite even for singular covariances.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise ValueError("statistics contain NaN or inf")
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean
    return max(float(value), 0.0)  # below 0 only by rounding (identical sets)


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T).clamp_min_(0)


def _knn_radii(x: torch.Tensor, k: int, block: int) -> torch.Tensor:
    # (k+1)-th smallest squared distance in each row: the point itself is the first, at 0 (as in ADM).
    return torch.cat([_sq_dists(x[i:i + block], x).kthvalue(k + 1, dim=1).values for i in range(0, len(x), block)])


def _covered(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, block: int) -> torch.Tensor:
    return torch.cat([(_sq_dists(points[i:i + block], centres) <= radii[None, :]).any(1)
                      for i in range(0, len(points), block)])


def precision_recall(real_feats, fake_feats, k: int = PR_K, device: str | torch.device = "cpu",
                     block: int = 1024) -> tuple[float, float]:
    """ADM's improved precision and recall with k-NN radii (float64, `block` rows of distances at a time)."""
    real = torch.as_tensor(np.asarray(real_feats), dtype=torch.float64, device=device)
    fake = torch.as_tensor(np.asarray(fake_feats), dtype=torch.float64, device=device)
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"expected two N x D feature sets, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} points in each set "
                         f"(got {len(real)} and {len(fake)})")
    precision = _covered(fake, real, _knn_radii(real, k, block), block).double().mean().item()
    recall = _covered(real, fake, _knn_radii(fake, k, block), block).double().mean().item()
    return precision, recall


def kernel_inception_distance(real_feats, fake_feats, subsets: int = KID_SUBSETS,
                              subset_size: int = KID_SUBSET_SIZE, seed: int = 0) -> tuple[float, float]:
    """KID: unbiased MMD^2 with the kernel (x.y / d + 1)^3, mean and std over random subsets."""
    real, fake = np.asarray(real_feats, np.float64), np.asarray(fake_feats, np.float64)
    m = min(subset_size, len(real), len(fake))
    if m < 2:
        raise ValueError("KID needs at least 2 points in each set")
    d = real.shape[1]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        x = real[rng.choice(len(real), m, replace=False)]
        y = fake[rng.choice(len(fake), m, replace=False)]
        kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values.append(within - 2 * kxy.mean())
    return float(np.mean(values)), float(np.std(values))


def inception_score(logits, split_size: int = IS_SPLIT_SIZE) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) per contiguous split of split_size rows, the last one
    shorter (ADM's evaluator); mean and std over splits."""
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    scores = []
    for part in np.split(log_p, range(split_size, len(log_p), split_size)):
        p = np.exp(part)
        kl = (p * (part - np.log(p.mean(0, keepdims=True)))).sum(1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


# -- inputs -------------------------------------------------------------------------------------

def _manifest_protocol(folder: Path, verify: tuple[str, ...] = ()) -> dict | None:
    """What made these images: the manifest's kind, id and full config, if the folder has one;
    the files named in `verify` are first checked against the hashes it records."""
    if not (folder / MANIFEST).is_file():
        return None
    manifest = read_manifest(folder)
    verify_files(folder, manifest, list(verify))
    return {"manifest": str(folder / MANIFEST), "kind": manifest.get("kind"), "id": manifest.get("id"),
            "config": manifest.get("config")}


def _npz_keys(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as z:
            return [n[:-4] for n in z.namelist() if n.endswith(".npy")]
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f"{path} is not a readable .npz file ({e})") from None


def _stat_pairs(path: Path, arrays: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The (mu, sigma) pairs present in `arrays`, in float64, each checked for its feature's size."""
    pairs = {}
    for feature, (mu, sigma) in _STAT_KEYS.items():
        if mu in arrays and sigma in arrays:
            d = _DIMS[feature]
            if arrays[mu].shape != (d,) or arrays[sigma].shape != (d, d):
                raise UserError(f"{path}: {mu} is {arrays[mu].shape} and {sigma} {arrays[sigma].shape}; "
                                f"expected ({d},) and ({d}, {d}) Inception statistics")
            pairs[feature] = (arrays[mu].astype(np.float64), arrays[sigma].astype(np.float64))
    return pairs


def _npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(f)


class ImageSource:
    """Images as uint8 N x 3 x H x W batches, with what a report says about them."""

    kind: str
    path: Path
    count: int
    resolution: tuple[int, int]  # H, W
    protocol: dict | None = None
    upsampled = 0  # images of the last pass that the center crop had to enlarge

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        raise NotImplementedError

    def _counting(self, loader: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[torch.Tensor]:
        """The images of (images, enlarged?) batches, counting the enlarged ones in `upsampled`."""
        self.upsampled = 0
        for images, enlarged in loader:
            self.upsampled += int(enlarged.sum())
            yield images

    def describe(self) -> dict:
        return {"kind": self.kind, "path": str(self.path), "count": self.count, "resolution": list(self.resolution)}


class NpzImages(ImageSource):
    """ADM's format: `arr_0` N x H x W x 3 uint8, read from the zip member batch by batch (any npz compression)."""

    def __init__(self, path: Path, keys: list[str], protocol: dict | None = None) -> None:
        self.path, self.protocol = path, protocol
        if "arr_0" not in keys:
            raise UserError(f"{path} has no arr_0 (it holds {', '.join(keys) or 'no arrays'}); an ADM sample batch "
                            f"is an .npz whose arr_0 is N x H x W x 3 uint8")
        with zipfile.ZipFile(path) as z, z.open("arr_0.npy") as f:
            try:
                shape, fortran, dtype = _npy_header(f)
            except ValueError as e:
                raise UserError(f"{path}: arr_0 is not a readable .npy array ({e})") from None
        if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or fortran:
            raise UserError(f"{path}: arr_0 is {dtype} {'x'.join(map(str, shape))}"
                            f"{' (Fortran order)' if fortran else ''}; ADM samples are C-ordered N x H x W x 3 uint8")
        self.count, self.resolution = int(shape[0]), (int(shape[1]), int(shape[2]))
        self.stored = self._stored_stats(keys)
        self.kind = "adm-reference-batch" if self.stored else "npz"

    def _stored_stats(self, keys: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """ADM reference batches carry mu/sigma (pool) and mu_s/sigma_s (sFID) from TF's Inception."""
        try:
            with np.load(self.path) as z:
                return _stat_pairs(self.path, {k: z[k] for k in keys if k != "arr_0"})
        except ValueError as e:
            raise UserError(f"{self.path} holds unreadable statistics ({e})") from None

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        h, w = self.resolution
        row = h * w * 3
        with zipfile.ZipFile(self.path) as z, z.open("arr_0.npy") as f:
            _npy_header(f)
            for start in range(0, self.count, batch_size):
                n = min(batch_size, self.count - start)
                data = f.read(n * row)
                if len(data) != n * row:
                    raise UserError(f"{self.path}: arr_0 ends after {start + len(data) // row} of {self.count} "
                                    f"images (truncated file)")
                yield torch.from_numpy(np.frombuffer(data, np.uint8).reshape(n, h, w, 3).copy()).permute(0, 3, 1, 2)


class _Files(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], crop: int | None) -> None:
        self.paths, self.crop = paths, crop

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, bool]:
        from ..data.images import adm_center_crop, to_rgb

        try:
            with Image.open(self.paths[i]) as im:
                im.load()  # decode before the file closes (to_rgb returns an RGB image as it is)
                img = to_rgb(im)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read image {self.paths[i]} ({e})") from None
        enlarged = self.crop is not None and min(img.size) < self.crop
        if self.crop is not None:
            img = adm_center_crop(img, self.crop)
        return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1), enlarged


class _Uint8(torch.utils.data.Dataset):
    """data.ImageFolder's float [0, 1] images back as the uint8 they were decoded from, and whether
    the file's short side is below the crop size (read from its header: ImageFolder keeps no sizes)."""

    def __init__(self, folder) -> None:
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, bool]:
        image = self.folder[i][0].mul(255).round_().to(torch.uint8)
        try:
            with Image.open(self.folder.samples[i][0]) as im:
                return image, min(im.size) < self.folder.size
        except (OSError, ValueError):  # a file ImageFolder skipped (it returned the next readable one)
            return image, False


def _loader(dataset, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    workers = 0 if len(dataset) < _WORKERS_FROM else min(8, os.cpu_count() or 1)
    yield from torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)


class FolderImages(ImageSource):
    """Image files directly in one folder (sorted); all of one size unless `crop` center-crops them ADM-style."""

    kind = "image-folder"

    def __init__(self, path: Path, files: list[str], crop: int | None) -> None:
        from ..data.images import MIN_SIDE

        self.path, self.files, self.crop, self.count = path, files, crop, len(files)
        self.protocol = _manifest_protocol(path)
        if crop is not None:
            self.resolution = (crop, crop)
            return
        sizes = {}
        for f in files:
            try:
                with Image.open(f) as im:
                    sizes.setdefault(im.size, f)
            except OSError as e:
                raise UserError(f"cannot read image {f} ({e})") from None
        if len(sizes) > 1:
            (a, fa), (b, fb) = list(sizes.items())[:2]
            raise UserError(f"images in {path} differ in size ({fa} is {a[0]}x{a[1]}, {fb} is {b[0]}x{b[1]}); "
                            f"generated samples share one size (a reference folder is center-cropped to --ref-size)")
        w, h = next(iter(sizes))
        if min(w, h) < MIN_SIDE:
            raise UserError(f"images in {path} are {w}x{h}, smaller than {MIN_SIDE} px")
        self.resolution = (h, w)

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        yield from self._counting(_loader(_Files(self.files, self.crop), batch_size))


class ClassFolderImages(ImageSource):
    """A class-folder tree (ImageNet train layout), ADM-center-cropped to `crop` (reals_cli.data.images.ImageFolder)."""

    kind = "class-folder"

    def __init__(self, path: Path, crop: int | None) -> None:
        from ..data.images import ImageFolder

        if crop is None:
            raise UserError(f"{path} is a class-folder tree; give --ref-size to center-crop it to the samples' size")
        self.folder = ImageFolder(path, size=crop, flip=False)
        self.path, self.count, self.resolution = path, len(self.folder), (crop, crop)
        self.protocol = _manifest_protocol(path)

    def describe(self) -> dict:
        return {**super().describe(), "split": self.folder.split, "crop": "adm-center-crop"}

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        yield from self._counting(_loader(_Uint8(self.folder), batch_size))
        self.folder.report_skipped()


@dataclass
class StatsFile:
    """Reference statistics saved by `save_reference_stats` (an .npz with a JSON `reals_meta`)."""

    path: Path
    meta: dict
    stats: dict[str, tuple[np.ndarray, np.ndarray]]
    pool: np.ndarray | None
    kind: str = field(default="stats", init=False)

    @property
    def count(self) -> int:
        return int(self.meta["count"])

    @property
    def resolution(self) -> tuple[int, int]:
        return tuple(self.meta["resolution"])

    def describe(self) -> dict:
        return {"kind": self.kind, "path": str(self.path), "count": self.count, "resolution": list(self.resolution),
                "source": self.meta.get("source")}

    @classmethod
    def load(cls, path: Path) -> "StatsFile":
        try:
            with np.load(path) as z:
                meta = json.loads(str(z[_META]))
                arrays = {k: z[k] for k in z.files if k != _META}
        except (ValueError, OSError, json.JSONDecodeError) as e:
            raise UserError(f"{path} is not a readable reference statistics file ({e})") from None
        if meta.get("format") != STATS_FORMAT or meta.get("version") != STATS_VERSION:
            raise UserError(f"{path} is a statistics file of format {meta.get('format')} v{meta.get('version')}; "
                            f"this reals reads {STATS_FORMAT} v{STATS_VERSION}: save it again with --save-ref-stats")
        return cls(path, meta, _stat_pairs(path, arrays), arrays.get(_POOL_KEY))


def _sample_run(folder: Path) -> NpzImages | None:
    """`reals sample` output: its samples.npz, hash-checked against its manifest (whose protocol the
    result carries); None for a folder without samples.npz. An unfinished run is refused."""
    if (folder / _SAMPLE_RUN_PROTOCOL).is_file() and not (folder / MANIFEST).is_file():
        raise UserError(f"{folder} is an unfinished `reals sample` run (no {MANIFEST} yet); run the same "
                        f"`reals sample` command again to finish it")
    npz = folder / SAMPLES_NPZ
    if not npz.is_file():
        return None
    return NpzImages(npz, _npz_keys(npz), _manifest_protocol(folder, verify=(SAMPLES_NPZ,)))


def open_input(path: str | os.PathLike, crop: int | None = None, classes: bool = True) -> ImageSource | StatsFile:
    """Recognise an input by its form (see the module docstring); `crop` applies to folders only.

    `classes=False` opens SAMPLES: it refuses class-folder trees (generated samples are a flat
    folder or an npz), and its messages name SAMPLES rather than --ref.
    """
    from ..data.images import IMAGE_EXTENSIONS, SIDECAR_SUFFIXES

    role = "--ref" if classes else "SAMPLES"
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if path.is_file():
        if path.suffix.lower() != ".npz":
            raise UserError(f"{path} is not an .npz file; expected an ADM .npz (arr_0 = N x H x W x 3 uint8), "
                            f"a statistics file from --save-ref-stats, or a folder of images")
        keys = _npz_keys(path)
        if _META in keys:
            return StatsFile.load(path)
        if path.name == SAMPLES_NPZ:
            return _sample_run(path.parent)
        return NpzImages(path, keys)
    if (path / MANIFEST).is_file():
        kind = read_manifest(path).get("kind")
        if kind not in _IMAGE_KINDS:  # its files (a VAE's reconstruction preview, say) are not a set of images
            raise UserError(f"{path} is a '{kind}' artifact, not images; {role} takes {_TAKES[role]}")
    run = _sample_run(path)
    if run is not None:
        return run
    files = sorted(str(p) for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.name.lower().endswith(IMAGE_EXTENSIONS) and not p.name.lower().endswith(SIDECAR_SUFFIXES))
    if files:
        return FolderImages(path, files, crop)
    if not classes:
        raise UserError(f"no image files directly in {path}; SAMPLES takes {_TAKES['SAMPLES']}")
    return ClassFolderImages(path, crop)


# -- feature statistics ---------------------------------------------------------------------------

class _Moments:
    """Mean and covariance from float64 running sums.

    The sums are taken about a shift (the first batch's mean), so that the covariance does
    not lose digits to cancellation when the mean is large next to the spread.
    """

    def __init__(self) -> None:
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.double()
        if self.n == 0:
            self.shift = x.mean(0)
            self.sum = torch.zeros_like(self.shift)
            self.outer = x.new_zeros(x.shape[1], x.shape[1])
        d = x - self.shift
        self.sum += d.sum(0)
        self.outer += d.T @ d
        self.n += len(x)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        s, outer, shift = (t.cpu().numpy() for t in (self.sum, self.outer, self.shift))
        sigma = (outer - np.outer(s, s) / self.n) / (self.n - 1)
        return shift + s / self.n, (sigma + sigma.T) / 2


@dataclass
class _Features:
    stats: dict[str, tuple[np.ndarray, np.ndarray]]  # feature -> (mu, sigma)
    kept: dict[str, np.ndarray]  # feature -> N x D float32, for metrics that need every point


def _extract(source: ImageSource, extractor, stats: set[str], keep: set[str], device: torch.device,
             batch_size: int, bar, label: str) -> _Features:
    """One pass over `source`: (mu, sigma) of the `stats` features, every vector of the `keep` features."""
    if not stats | keep:
        return _Features({}, {})
    moments = {f: _Moments() for f in stats}
    kept: dict[str, list[torch.Tensor]] = {f: [] for f in keep}
    task = bar.add_task(f"Inception: {label}", total=source.count) if bar is not None else None
    with torch.inference_mode():
        for batch in source.batches(batch_size):
            out = dict(zip(extractor.features_list, extractor(batch.to(device))))
            for f, m in moments.items():
                m.add(out[f])
            for f in keep:
                kept[f].append(out[f].float().cpu())
            if bar is not None:
                bar.advance(task, len(batch))
    return _Features({f: m.result() for f, m in moments.items()},
                     {f: torch.cat(v).numpy() for f, v in kept.items()})


def save_reference_stats(path: str | os.PathLike, features: _Features, choice: ExtractorChoice,
                         source: ImageSource) -> None:
    """mu/sigma (pool), mu_s/sigma_s (sFID), pool features if kept, and what made them, atomically."""
    meta = {"format": STATS_FORMAT, "version": STATS_VERSION,
            "extractor": {"name": choice.name, "weights_sha256": choice.weights_sha256},
            "resolution": list(source.resolution), "count": source.count, "source": source.describe(),
            "reals_version": __version__}
    arrays = {_META: np.array(json.dumps(meta))}
    for feature, (mu, sigma) in _STAT_KEYS.items():
        arrays[mu], arrays[sigma] = features.stats[feature]
    if POOL_FEATURE in features.kept:
        arrays[_POOL_KEY] = features.kept[POOL_FEATURE]
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
        np.savez(f, **arrays)


# -- the whole evaluation ------------------------------------------------------------------------

def _check_stats_out(path: str | os.PathLike) -> None:
    check_output_file(path, "--save-ref-stats", "ref-stats.npz")
    if Path(path).suffix.lower() != ".npz":  # --ref recognises a file by this suffix
        raise UserError(f"--save-ref-stats {path} does not end in .npz, which --ref needs to read it back; "
                        f"pass {path}.npz")


def _upsampling_warnings(ref_src: ImageSource | StatsFile) -> list[str]:
    """A reference smaller than the samples, enlarged by the center crop in the pass just made."""
    if not isinstance(ref_src, ImageSource) or not ref_src.upsampled:
        return []
    h, w = ref_src.resolution
    return [f"{ref_src.upsampled} of {ref_src.count} reference images in {ref_src.path} are smaller than the "
            f"samples' {h}x{w} and were upsampled to it: FID then also measures the upsampling; use reference "
            f"images at least as large as the samples"]


def _check_stats_file(ref: StatsFile, choice: ExtractorChoice) -> None:
    made = ref.meta.get("extractor", {})
    if (made.get("name"), made.get("weights_sha256")) != (choice.name, choice.weights_sha256):
        raise UserError(f"{ref.path} holds statistics from extractor {made.get('name')} (weights sha256 "
                        f"{str(made.get('weights_sha256'))[:12]}), but this run uses {choice.name} (weights sha256 "
                        f"{choice.weights_sha256[:12]}); recompute the reference statistics with this extractor")


def _fid_label(n: int) -> str:
    return "FID-50K" if n == FID_50K else f"FID-{n} (not FID-50K)"


def compute_metrics(
    samples: str | os.PathLike,
    ref: str | os.PathLike,
    metrics: tuple[str, ...] | list[str] = METRICS,
    batch_size: int = 50,
    device: str = "auto",
    extractor: str = "auto",
    inception_weights: str | os.PathLike | None = None,
    ref_size: int | None = None,
    save_ref_stats: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """Evaluate `samples` against `ref`; every value, setting and source in one JSON-ready dict.

    Metrics that cannot be computed (IS without a classifier, P/R with too few images, KID
    against statistics without pool features) are None, with the reason in `unavailable`.
    """
    from ..console import progress as make_progress
    from ..runtime import resolve_device

    started = time.perf_counter()
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise UserError(f"unknown metrics {unknown or '(none given)'}; choose from {', '.join(METRICS)}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {batch_size}")
    if ref_size is not None and ref_size < 1:
        raise UserError(f"--ref-size must be positive, got {ref_size}")
    if save_ref_stats is not None:
        _check_stats_out(save_ref_stats)
    wanted = set(metrics)
    dev = resolve_device(device)

    sample_src = open_input(samples, classes=False)
    if isinstance(sample_src, StatsFile):
        raise UserError(f"{samples} holds statistics, not images; SAMPLES must be images (npz or a folder)")
    if sample_src.count < 2:
        raise UserError(f"{sample_src.path} holds {sample_src.count} image(s); the metrics need at least 2")
    h, w = sample_src.resolution
    crop = ref_size if ref_size is not None else (h if h == w else None)
    ref_src = open_input(ref, crop)
    if ref_size is not None and not isinstance(ref_src, (FolderImages, ClassFolderImages)):
        raise UserError(f"--ref-size center-crops image folders; the reference {ref} is a {ref_src.kind} file")
    if ref_src.resolution != sample_src.resolution:
        rh, rw = ref_src.resolution
        raise UserError(f"the reference {ref} is at {rh}x{rw} but the samples are {h}x{w}; FIDs at different "
                        f"resolutions are not comparable: use a reference at {h}x{w}")
    if ref_src.count < 2:
        raise UserError(f"the reference {ref} holds {ref_src.count} image(s); the metrics need at least 2")
    has_stored = isinstance(ref_src, StatsFile) or getattr(ref_src, "stored", None)
    if save_ref_stats is not None and has_stored:
        raise UserError(f"{ref} already holds reference statistics; --save-ref-stats caches statistics "
                        f"computed from reference images")

    choice = choose_extractor(extractor, inception_weights)
    if isinstance(ref_src, StatsFile):
        _check_stats_file(ref_src, choice)

    unavailable: dict[str, str] = {}
    if "is" in wanted and not choice.has_classifier:
        unavailable["is"] = ("the offline FID Inception (TorchScript) has no classifier layer; Inception Score needs "
                             "torch-fidelity's Inception weights (--extractor torch-fidelity or --inception-weights)")
    if "pr" in wanted and min(sample_src.count, ref_src.count) <= PR_K:
        unavailable["pr"] = f"precision/recall with k={PR_K} needs more than {PR_K} images in each set"

    # What each side needs: (mu, sigma) of some features, every vector of others.
    stat_for = {"fid": POOL_FEATURE, "sfid": SFID_FEATURE}
    ref_todo: set[str] = set()
    ref_keep: set[str] = set()
    ref_pool = None
    if isinstance(ref_src, StatsFile):
        ref_stats, ref_pool = ref_src.stats, ref_src.pool
        for m in sorted(wanted - unavailable.keys()):
            if (m in stat_for and stat_for[m] not in ref_stats) or (m in ("kid", "pr") and ref_pool is None):
                unavailable[m] = f"the reference statistics file {ref} holds no features for it; save it again"
    if not wanted - unavailable.keys():
        raise UserError("none of the metrics asked for can be computed here: "
                        + "; ".join(f"{m}: {why}" for m, why in sorted(unavailable.items())))
    need_stats = {stat_for[m] for m in (wanted & stat_for.keys()) - unavailable.keys()}
    need_pool = bool(wanted & {"kid", "pr"} - unavailable.keys())
    sample_keep = ({POOL_FEATURE} if need_pool else set()) | (
        {LOGITS_FEATURE} if "is" in wanted and "is" not in unavailable else set())
    if isinstance(ref_src, ImageSource):
        ref_stats = dict(getattr(ref_src, "stored", {}))  # an ADM reference batch's: used as they are
        # A saved statistics file always holds both (mu, sigma) pairs, so that it serves every later run.
        ref_todo = {POOL_FEATURE, SFID_FEATURE} if save_ref_stats is not None else need_stats - ref_stats.keys()
        ref_keep = {POOL_FEATURE} if need_pool else set()

    # One network for both passes, with every feature either side needs (extra heads cost next to nothing).
    features = sorted(ref_todo | ref_keep | need_stats | sample_keep)
    net = choice.build(features, dev) if features else None
    bar = make_progress() if progress else None
    with bar if bar is not None else contextlib.nullcontext():
        if isinstance(ref_src, ImageSource):
            got = _extract(ref_src, net, ref_todo, ref_keep, dev, batch_size, bar, "reference")
            ref_stats = {**ref_stats, **got.stats}
            ref_pool = got.kept.get(POOL_FEATURE, ref_pool)
            if save_ref_stats is not None:
                save_reference_stats(save_ref_stats, got, choice, ref_src)
        fake = _extract(sample_src, net, need_stats, sample_keep, dev, batch_size, bar, "samples")

    n = sample_src.count
    result: dict = {m: None for m in ("fid", "sfid", "kid", "kid_std", "precision", "recall",
                                      "inception_score", "inception_score_std")}
    if "fid" in wanted and "fid" not in unavailable:
        result["fid"] = frechet_distance(*fake.stats[POOL_FEATURE], *ref_stats[POOL_FEATURE])
    if "sfid" in wanted and "sfid" not in unavailable:
        result["sfid"] = frechet_distance(*fake.stats[SFID_FEATURE], *ref_stats[SFID_FEATURE])
    if "kid" in wanted and "kid" not in unavailable:
        result["kid"], result["kid_std"] = kernel_inception_distance(ref_pool, fake.kept[POOL_FEATURE])
    if "pr" in wanted and "pr" not in unavailable:
        result["precision"], result["recall"] = precision_recall(ref_pool, fake.kept[POOL_FEATURE], device=dev)
    if "is" in wanted and "is" not in unavailable:
        result["inception_score"], result["inception_score_std"] = inception_score(fake.kept[LOGITS_FEATURE])

    warnings = ([choice.note] if choice.note else []) + _upsampling_warnings(ref_src)
    if n != FID_50K:
        warnings.append(f"{n} samples, not 50,000: this is not FID-50K and is not comparable with published "
                        f"FID-50K numbers (FID is biased upwards for fewer samples)")
    ref_info = ref_src.describe()
    if getattr(ref_src, "stored", None):
        ref_info["stored_statistics"] = sorted("/".join(_STAT_KEYS[f]) for f in ref_src.stored)
    result.update({
        "label": _fid_label(n),
        "metrics_requested": [m for m in METRICS if m in wanted],
        "unavailable": unavailable,
        "num_samples": n,
        "num_reference": ref_src.count,
        "resolution": [h, w],
        "extractor": choice.describe(),
        "samples": sample_src.describe(),
        "reference": ref_info,
        "reference_stats_saved": str(save_ref_stats) if save_ref_stats is not None else None,
        "protocol": sample_src.protocol,
        "settings": {"batch_size": batch_size, "device": str(dev), "resize": "299x299, TF1 bilinear (torch-fidelity)",
                     "pr_k": PR_K, "is_split_size": IS_SPLIT_SIZE, "kid_subsets": KID_SUBSETS,
                     "kid_subset_size": min(KID_SUBSET_SIZE, n, ref_src.count), "sfid": "mixed_6/conv[:7], 2023-d"},
        "warnings": warnings,
        "versions": {"reals": __version__, "torch": torch.__version__, "torch_fidelity": _tf_version()},
        "seconds": round(time.perf_counter() - started, 2),
    })
    return result


def _tf_version() -> str:
    import torch_fidelity

    return torch_fidelity.__version__


def compute_reference_stats(ref: str | os.PathLike, out: str | os.PathLike, ref_size: int | None = None,
                            batch_size: int = 50, device: str = "auto", extractor: str = "auto",
                            inception_weights: str | os.PathLike | None = None, progress: bool = True) -> dict:
    """Reference statistics alone (no samples): every later `eval-fid --ref OUT` then costs only its samples."""
    from ..console import progress as make_progress
    from ..runtime import resolve_device

    started = time.perf_counter()
    _check_stats_out(out)
    ref_src = open_input(ref, ref_size)
    if not isinstance(ref_src, ImageSource):
        raise UserError(f"{ref} already holds statistics; --save-ref-stats needs reference images")
    dev = resolve_device(device)
    choice = choose_extractor(extractor, inception_weights)
    net = choice.build(sorted({POOL_FEATURE, SFID_FEATURE}), dev)
    with make_progress() if progress else contextlib.nullcontext() as bar:
        got = _extract(ref_src, net, {POOL_FEATURE, SFID_FEATURE}, {POOL_FEATURE}, dev, batch_size, bar, "reference")
    save_reference_stats(out, got, choice, ref_src)
    return {"out": str(out), "count": ref_src.count, "resolution": list(ref_src.resolution),
            "extractor": choice.describe(), "warnings": _upsampling_warnings(ref_src),
            "seconds": round(time.perf_counter() - started, 2)}
