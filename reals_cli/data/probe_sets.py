"""Labelled images for the downstream probes, read in the layouts real datasets ship in.

Every dataset yields (image float32 3 x S x S in [0, 1], target), S being the VAE's image
size; image and target go through the same ADM centre crop (`data.adm_center_crop`), the
target with NEAREST so that labels and depths are never blended:
- segmentation: int64 S x S class indices, 255 = ignore;
- depth: float32 S x S metres, 0 = no measurement (0, negative, NaN and inf in the
  source all become 0, which the metrics and losses skip, as NYU evaluation does).

Layouts (`--format`, detected when `auto`); the splits are "train" and "test":
  seg    voc    ROOT/JPEGImages/<id>.jpg, ROOT/SegmentationClass/<id>.png (palette or
                index PNG), ROOT/ImageSets/Segmentation/{train,val}.txt; "test" reads val.txt
         ade    ADEChallengeData2016: ROOT/images/{training,validation}/<id>.jpg and
                ROOT/annotations/.../<id>.png; 0 ("other") is ignored, label k is class k-1
         masks  a class-folder dataset with <stem>.mask.png beside each image (as
                `reals data fashion-mnist` writes): classes background (0) and object (1),
                or those its manifest's config.mask_classes names (`reals data shapes`)
  depth  nyu    nyu_depth_v2_labeled.mat (HDF5); split by --splits splits.mat (the official
                trainNdxs/testNdxs, 1-based), else the first 80% of images train, the rest test
         png    ROOT/{train,test}/**/<stem>.{jpg,png,...} + <stem>.depth.png, 16-bit, millimetres
         motorcycle  the Middlebury Motorcycle pair from the `motorcycle` asset, cut into tiles
                (see MotorcycleDepth)
--splits is read for nyu only; given with another depth format it is refused.
A segmentation label outside the class list (other than 255) is refused, naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from ..metrics.probe_metrics import IGNORE_INDEX
from .images import DEPTH_SUFFIX, IMAGE_EXTENSIONS, SIDECAR_SUFFIXES, ImageFolder, adm_center_crop, mask_path, to_rgb

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]
ADE_NUM_CLASSES = 150
MASK_CLASSES = ["background", "object"]
NYU_RANGE = (0.001, 10.0)  # metres: DINOv2's NYU depth head
SEG_FORMATS = ("voc", "ade", "masks")
DEPTH_FORMATS = ("nyu", "png", "motorcycle")


def _open_image(path: str | os.PathLike) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        raise UserError(f"{path} not found") from None
    except Exception as e:  # PIL raises many types for damaged files
        raise UserError(f"cannot read {path} ({type(e).__name__}: {e})") from None


def read_label_png(path: str | os.PathLike) -> np.ndarray:
    """A palette (P) or single-channel PNG as its uint8 indices; a colour-coded mask is refused."""
    im = _open_image(path)
    if im.mode == "1":
        im = im.convert("L")
    if im.mode not in ("P", "L"):
        raise UserError(f"{path} is a {im.mode} image; a segmentation mask must be a palette or single-channel "
                        f"index PNG (VOC SegmentationClass style), not colour-coded")
    return np.array(im, dtype=np.uint8)  # for P images these are the palette indices, i.e. the labels


class ProbeData(torch.utils.data.Dataset):
    """One split of a labelled dataset; subclasses list `keys` and read one key at full size."""

    task: str  # "seg" or "depth"
    fmt: str
    classes: list[str] = []  # segmentation
    default_range: tuple[float, float] | None = None  # depth, metres; None: from the training targets

    def __init__(self, path: str | os.PathLike, split: str, size: int, keys: list, limit: int | None):
        if not keys:
            raise UserError(f"{path}: the '{split}' split has no images")
        if limit is not None and limit < len(keys):
            # Evenly spaced, not the first N: class-folder listings are sorted by class.
            keys = [keys[i] for i in np.unique(np.linspace(0, len(keys) - 1, limit).round().astype(int))]
        self.path, self.split, self.size, self.keys, self.limit = str(path), split, int(size), keys, limit

    def __len__(self) -> int:
        return len(self.keys)

    def _read(self, key) -> tuple[Image.Image, np.ndarray]:
        """(RGB image, target at the image's size): uint8 labels or float32 metres."""
        raise NotImplementedError

    def _files(self, key) -> list[str]:
        """The files `key` is read from (for the fingerprint)."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = self.keys[index]
        img, target = self._read(key)
        if target.shape != (img.height, img.width):
            raise UserError(f"{self._files(key)[-1]}: target is {target.shape[1]}x{target.shape[0]} but its image "
                            f"is {img.width}x{img.height}")
        if self.task == "seg":
            self._check_labels(target, key)
        else:
            target = np.where(np.isfinite(target) & (target > 0), target, 0).astype(np.float32)
        x = np.array(adm_center_crop(img, self.size), dtype=np.uint8)
        t = np.array(adm_center_crop(Image.fromarray(target), self.size, mask=True))
        image = torch.from_numpy(x).permute(2, 0, 1).float().div_(255.0)
        return image, torch.from_numpy(t.astype(np.int64) if self.task == "seg" else t)

    def _check_labels(self, target: np.ndarray, key) -> None:
        labels = np.unique(target)
        bad = labels[(labels >= len(self.classes)) & (labels != IGNORE_INDEX)]
        if bad.size:
            raise UserError(f"{self._files(key)[-1]} has label {int(bad[0])}, outside the {len(self.classes)} classes "
                            f"(0..{len(self.classes) - 1}; {IGNORE_INDEX} = ignore); "
                            f"fit the head with --classes listing every class")

    def describe(self) -> dict:
        return {"format": self.fmt, "path": self.path, "split": self.split, "images": len(self), "limit": self.limit,
                "size": self.size}

    def fingerprint(self) -> str:
        """Changes when the listing or any file read changes (by size and mtime, not contents: fast)."""
        files = dict.fromkeys(f for key in self.keys for f in self._files(key))
        stats = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
        blob = json.dumps([self.describe(), [str(k) for k in self.keys], stats])
        return hashlib.sha256(blob.encode()).hexdigest()


# -- segmentation ---------------------------------------------------------------------------------

class VOCSegmentation(ProbeData):
    task, fmt = "seg", "voc"
    SPLITS = {"train": "train", "test": "val"}

    def __init__(self, root, split, size, limit=None, classes=None):
        self.root = Path(root)
        self.classes = classes or VOC_CLASSES
        listing = self.root / "ImageSets" / "Segmentation" / f"{self.SPLITS.get(split, split)}.txt"
        if not listing.is_file():
            raise UserError(f"{listing} not found: a VOC-layout folder lists each split's image ids there")
        ids = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
        super().__init__(root, split, size, ids, limit)

    def _files(self, key):
        return [str(self.root / "JPEGImages" / f"{key}.jpg"), str(self.root / "SegmentationClass" / f"{key}.png")]

    def _read(self, key):
        image, mask = self._files(key)
        return to_rgb(_open_image(image)), read_label_png(mask)


class ADESegmentation(ProbeData):
    task, fmt = "seg", "ade"
    SPLITS = {"train": "training", "test": "validation"}

    def __init__(self, root, split, size, limit=None, classes=None):
        self.root = Path(root)
        self.classes = classes or [str(k) for k in range(1, ADE_NUM_CLASSES + 1)]
        self.sub = self.SPLITS.get(split, split)
        folder = self.root / "images" / self.sub
        if not folder.is_dir():
            raise UserError(f"{folder} not found: an ADE20K-layout folder has images/{{training,validation}}/")
        stems = sorted(p.stem for p in folder.glob("*.jpg"))
        super().__init__(root, split, size, stems, limit)

    def _files(self, key):
        return [str(self.root / "images" / self.sub / f"{key}.jpg"),
                str(self.root / "annotations" / self.sub / f"{key}.png")]

    def _read(self, key):
        image, mask = self._files(key)
        labels = read_label_png(mask)
        # ADE20K's 0 is "other" (unlabelled): ignored; classes 1..150 become 0..149.
        return to_rgb(_open_image(image)), np.where(labels == 0, IGNORE_INDEX, labels.astype(np.int16) - 1).astype(np.uint8)


def dataset_mask_classes(root) -> list[str] | None:
    """The mask class names a dataset artifact declares (`reals data shapes`: config.mask_classes), if any."""
    from ..artifacts import MANIFEST

    manifest = Path(root) / MANIFEST
    if not manifest.is_file():
        return None
    classes = json.loads(manifest.read_text()).get("config", {}).get("mask_classes")
    return list(classes) if classes else None


class MaskFolder(ProbeData):
    task, fmt = "seg", "masks"

    def __init__(self, root, split, size, limit=None, classes=None):
        self.classes = classes or dataset_mask_classes(root) or MASK_CLASSES
        folder = ImageFolder(root, size, flip=False, masks=True, split=split)  # listing and its checks only
        super().__init__(root, split, size, [p for p, _ in folder.samples], limit)

    def _files(self, key):
        return [key, mask_path(key)]

    def _read(self, key):
        return to_rgb(_open_image(key)), read_label_png(mask_path(key))


# -- depth ----------------------------------------------------------------------------------------

def read_split_indices(path: str | os.PathLike, split: str) -> np.ndarray:
    """0-based image indices of `split` from NYU's splits.mat (trainNdxs / testNdxs, 1-based)."""
    key = {"train": "trainNdxs", "test": "testNdxs"}.get(split)
    if key is None:
        raise UserError(f"NYU splits are 'train' and 'test', not {split!r}")
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--splits file not found: {path}")
    try:
        import scipy.io

        content = scipy.io.loadmat(path, variable_names=[key])
        values = content.get(key)
    except NotImplementedError:  # a MATLAB v7.3 file is HDF5
        import h5py

        with h5py.File(path, "r") as f:
            values = f[key][()] if key in f else None
    except Exception as e:
        raise UserError(f"cannot read {path} as a .mat file ({type(e).__name__}: {e})") from None
    if values is None:
        raise UserError(f"{path} has no '{key}' (NYU's splits.mat holds trainNdxs and testNdxs)")
    return np.asarray(values).astype(np.int64).ravel() - 1


class NYUDepth(ProbeData):
    """NYU Depth v2 labeled set. MATLAB writes column-major arrays, so h5py sees `images` as
    N x 3 x W x H and `depths` (metres) as N x W x H: each is transposed back to H x W."""

    task, fmt = "depth", "nyu"
    default_range = NYU_RANGE

    def __init__(self, path, split, size, limit=None, splits=None):
        import h5py

        self.file_path, self._file = Path(path), None
        try:
            with h5py.File(path, "r") as f:
                missing = [k for k in ("images", "depths") if k not in f]
                if missing:
                    raise UserError(f"{path} has no '{missing[0]}' dataset: not an nyu_depth_v2_labeled.mat file")
                n, shape_i, shape_d = len(f["images"]), f["images"].shape, f["depths"].shape
        except OSError as e:
            raise UserError(f"cannot open {path} as HDF5 (MATLAB v7.3 .mat) ({e})") from None
        if len(shape_i) != 4 or shape_i[1] != 3 or shape_d != (n, *shape_i[2:]):
            raise UserError(f"{path}: images {shape_i} and depths {shape_d} do not have NYU's layout "
                            f"(N x 3 x W x H and N x W x H as h5py reads them)")
        if splits is not None:
            indices = read_split_indices(splits, split)
            if indices.size and (indices.min() < 0 or indices.max() >= n):
                raise UserError(f"{splits} lists image {int(indices.max()) + 1} for '{split}', but {path} holds {n}")
        elif split in ("train", "test"):
            cut = round(0.8 * n)
            indices = np.arange(cut) if split == "train" else np.arange(cut, n)
        else:
            raise UserError(f"NYU splits are 'train' and 'test', not {split!r}")
        self.splits = None if splits is None else str(splits)
        super().__init__(path, split, size, indices.tolist(), limit)

    def describe(self):
        return {**super().describe(), "splits": self.splits or "first 80% train, last 20% test"}

    def _files(self, key):
        return [str(self.file_path)] + ([self.splits] if self.splits else [])

    def _read(self, key):
        import h5py

        if self._file is None:
            self._file = h5py.File(self.file_path, "r")
        image = np.ascontiguousarray(self._file["images"][key].transpose(2, 1, 0))  # 3 x W x H -> H x W x 3
        depth = np.ascontiguousarray(self._file["depths"][key].T, dtype=np.float32)  # W x H -> H x W
        return Image.fromarray(image, "RGB"), depth


class DepthPNGFolder(ProbeData):
    task, fmt = "depth", "png"

    def __init__(self, root, split, size, limit=None, depth_scale=1000.0):
        self.folder, self.depth_scale = Path(root) / split, float(depth_scale)
        if not self.folder.is_dir():
            raise UserError(f"{self.folder} not found: a depth folder holds {split}/<stem>.jpg + <stem>{DEPTH_SUFFIX}")
        # Sub-folders too: a class-folder dataset (`reals data shapes`) keeps its depths beside its images.
        images = sorted(str(p) for p in self.folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                        and not p.name.lower().endswith(SIDECAR_SUFFIXES) and not p.name.startswith("."))
        missing = [p for p in images if not os.path.isfile(self._depth_file(p))]
        if missing:
            raise UserError(f"{len(missing)} images in {self.folder} have no depth PNG (e.g. {self._depth_file(missing[0])})")
        super().__init__(root, split, size, images, limit)

    @staticmethod
    def _depth_file(image: str) -> str:
        return os.path.splitext(image)[0] + DEPTH_SUFFIX

    def describe(self):
        return {**super().describe(), "depth_scale": self.depth_scale}

    def _files(self, key):
        return [key, self._depth_file(key)]

    def _read(self, key):
        depth = _open_image(self._depth_file(key))
        if depth.mode not in ("I;16", "I;16B", "I"):
            raise UserError(f"{self._depth_file(key)} is a {depth.mode} image; depth PNGs must be 16-bit "
                            f"(units of 1/{self.depth_scale:g} m, 0 = no measurement)")
        return to_rgb(_open_image(key)), np.array(depth).astype(np.float32) / self.depth_scale


class MotorcycleDepth(ProbeData):
    """Middlebury 2014 Motorcycle (741 x 500, scikit-image's quarter-size copy) as depth tiles.

    Depth in metres = baseline * focal / (disparity + doffs), with the calibration valid for
    this down-sampled copy (scikit-image's `stereo_motorcycle` docstring); a non-finite or
    non-positive disparity is "no measurement". 96 x 96 px tiles every 32 px: training tiles
    lie wholly left of column 494 (two thirds of the width), test tiles wholly right of it,
    so the splits share no pixel; tiles with under half their pixels measured are dropped.
    """

    task, fmt = "depth", "motorcycle"
    FOCAL_PX, BASELINE_M, DOFFS_PX = 994.978, 0.193001, 31.086
    TILE, STRIDE, SPLIT_COLUMN = 96, 32, 494

    def __init__(self, folder, split, size, limit=None):
        self.folder = Path(folder)
        if split not in ("train", "test"):
            raise UserError(f"the motorcycle demo's splits are 'train' and 'test', not {split!r}")
        left, disp_file = self._files(None)
        with np.load(disp_file) as npz:
            disp = npz["arr_0"].astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            depth = self.BASELINE_M * self.FOCAL_PX / (disp + self.DOFFS_PX)
        self.depth = np.where(np.isfinite(disp) & (disp > 0), depth, 0).astype(np.float32)
        self.image = to_rgb(_open_image(left))
        h, w = self.depth.shape
        lo, hi = (0, self.SPLIT_COLUMN) if split == "train" else (self.SPLIT_COLUMN, w)
        keys = [(x, y) for y in range(0, h - self.TILE + 1, self.STRIDE) for x in range(lo, hi - self.TILE + 1, self.STRIDE)
                if (self.depth[y:y + self.TILE, x:x + self.TILE] > 0).mean() >= 0.5]
        super().__init__(folder, split, size, keys, limit)

    def _files(self, key):
        return [str(self.folder / "motorcycle_left.png"), str(self.folder / "motorcycle_disp.npz")]

    def _read(self, key):
        x, y = key
        return self.image.crop((x, y, x + self.TILE, y + self.TILE)), self.depth[y:y + self.TILE, x:x + self.TILE]


# -- choosing the reader --------------------------------------------------------------------------

def detect_format(task: str, path: str) -> str:
    p = Path(path)
    if task == "depth":
        if path == "motorcycle":
            return "motorcycle"
        if p.is_file() and p.suffix.lower() in (".mat", ".h5", ".hdf5"):
            return "nyu"
        if p.is_dir():
            return "png"
        raise UserError(f"{path} is neither an NYU .mat file nor a folder (or 'motorcycle' for the demo)")
    if not p.is_dir():
        raise UserError(f"segmentation data must be a folder; {path} is not one")
    if (p / "ImageSets" / "Segmentation").is_dir():
        return "voc"
    if (p / "images").is_dir() and (p / "annotations").is_dir():
        return "ade"
    return "masks"


def open_probe_data(task: str, path: str | os.PathLike, split: str, size: int, fmt: str = "auto",
                    limit: int | None = None, classes: list[str] | None = None, splits: str | None = None,
                    depth_scale: float = 1000.0) -> ProbeData:
    """The `split` of the dataset at `path`, read by its format's reader, at `size` px."""
    path = str(path)
    fmt = detect_format(task, path) if fmt == "auto" else fmt
    if task == "seg":
        readers = {"voc": VOCSegmentation, "ade": ADESegmentation, "masks": MaskFolder}
        if fmt not in readers:
            raise UserError(f"unknown segmentation format {fmt!r}; choose one of {', '.join(SEG_FORMATS)}")
        return readers[fmt](path, split, size, limit, classes)
    if splits is not None and fmt in DEPTH_FORMATS and fmt != "nyu":  # only NYU's .mat needs a split list
        raise UserError(f"--splits applies only to NYU .mat data; {fmt} data has its own train and test splits: "
                        f"drop --splits")
    if fmt == "nyu":
        return NYUDepth(path, split, size, limit, splits)
    if fmt == "png":
        return DepthPNGFolder(path, split, size, limit, depth_scale)
    if fmt == "motorcycle":
        from ..assets import asset_path

        return MotorcycleDepth(asset_path("motorcycle") if path == "motorcycle" else path, split, size, limit)
    raise UserError(f"unknown depth format {fmt!r}; choose one of {', '.join(DEPTH_FORMATS)}")
