"""Images in, tensors out: the ADM center crop, a class-folder dataset, and a Fashion-MNIST export.

`ImageFolder` reads the ImageNet-train layout (one sub-folder per class) and is what
every training and encoding command reads. Real folders hold bad files (truncated
downloads, 1x1 placeholders, odd colour modes): listing never opens a file, a file
that fails to load is skipped at load time and counted, and `verify()` scans them all.

`export_fashion_mnist` turns the four Fashion-MNIST idx files into that layout
(`train/` and `test/` splits, RGB PNGs, a foreground mask per image), so the rest of
the pipeline runs offline on real images.
"""

from __future__ import annotations

import gzip
import io
import json
import multiprocessing as mp
import os
import struct
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from .errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MASK_SUFFIX = ".mask.png"
_POOL_MIN = 256  # verify(): fewer files than this are checked in-process
_EXPORT_CHUNK = 500  # export: images per worker task
# Images whose short side is below this are placeholders (1x1 tracking pixels and the
# like): unusable for training, so they are skipped and counted like unreadable files.
MIN_SIDE = 8


# -- the ADM center crop ------------------------------------------------------------------------

def adm_center_crop(img: Image.Image, size: int, *, mask: bool = False) -> Image.Image:
    """ADM's `center_crop_arr` (openai/guided-diffusion), on PIL images.

    While the short side is at least 2*size, halve both sides (integer division) with
    BOX; then BICUBIC-resize so that the short side is `size` (long side rounded); then
    crop the centre size x size. With `mask=True` both resizes use NEAREST (labels must
    not be blended), with the same geometry, so a mask stays aligned with its image.
    """
    if size < 1:
        raise ValueError(f"crop size must be positive, got {size}")
    down = Image.NEAREST if mask else Image.BOX
    up = Image.NEAREST if mask else Image.BICUBIC
    while min(*img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=down)
    scale = size / min(*img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=up)
    left = (img.width - size) // 2
    top = (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


# -- decoding -----------------------------------------------------------------------------------

def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB.

    Transparency (RGBA, LA, PA, palette or L/RGB with a transparent colour) is
    composited on BLACK. 16-bit and 32-bit integer grayscale (I;16*, I) is scaled
    from 0..65535 to 0..255; float (F) is taken as 0..1 when its maximum is <= 1,
    else as 0..255. CMYK, YCbCr, palette, 1-bit and L go through PIL's convert.
    """
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img).astype(np.float64)
        if mode.startswith("I;16") or mode == "I":
            arr = arr / 257.0
        elif arr.size and arr.max() <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return img.convert("RGB")


def _describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _decode(path: str, draft_size: int | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Open and fully decode one image as RGB, with its size on disk; ValueError for placeholders."""
    with Image.open(path) as im:
        full_size = im.size
        if min(full_size) < MIN_SIDE:
            raise ValueError(f"image is {full_size[0]}x{full_size[1]}, smaller than {MIN_SIDE} px")
        if draft_size is not None and im.format == "JPEG":
            # verify() only: libjpeg still reads every coefficient, so truncation shows.
            im.draft("RGB", (draft_size, draft_size))
        im.load()
        return to_rgb(im), full_size


def _decode_mask(path: str, size: tuple[int, int]) -> Image.Image:
    with Image.open(path) as m:
        m.load()
        if m.size != size:
            raise ValueError(f"mask is {m.size[0]}x{m.size[1]} but its image is {size[0]}x{size[1]}")
        if m.mode == "1":
            return m.convert("L")
        if m.mode not in ("L", "P"):
            raise ValueError(f"mask has mode {m.mode}; expected a single-channel (L or P) PNG")
        return m.copy()


def mask_path(image_path: str | os.PathLike) -> str:
    """`<stem>.mask.png` beside the image."""
    p = str(image_path)
    return os.path.splitext(p)[0] + MASK_SUFFIX


def _check_one(job: tuple[str, bool]) -> str | None:
    """verify()'s worker: None if the file loads, else the reason it does not."""
    path, with_mask = job
    try:
        _, full_size = _decode(path, draft_size=256)
        if with_mask:
            _decode_mask(mask_path(path), full_size)
        return None
    except MemoryError:
        raise
    except Exception as e:  # PIL raises many types for bad files; all mean "unreadable"
        return _describe(e)


def _pool_context():
    # fork starts workers in milliseconds and they only run PIL/numpy; elsewhere the default.
    if sys.platform.startswith("linux") and "fork" in mp.get_all_start_methods():
        return mp.get_context("fork")
    return mp.get_context()


# -- the class-folder dataset -------------------------------------------------------------------

class ImageFolder(torch.utils.data.Dataset):
    """A class-folder image dataset (the ImageNet train layout), ADM-cropped to `size`.

    root/<class>/**/<image>.{jpg,jpeg,png,webp,bmp} (extensions case-insensitive); class
    names sorted give label indices; hidden files and folders and `*.mask.png` files are
    not images of the dataset. If root holds both `train/` and `test/`, `split` picks one
    (default `train`); otherwise `split`, when given, must name a sub-folder of root.

    Item: (image float32 3 x size x size in [0, 1], label) or, with masks=True,
    (image, mask uint8 size x size, label), the mask being `<stem>.mask.png` beside the
    image, cropped with the same geometry (NEAREST) and flipped with it.

    flip=True flips horizontally with p=0.5, drawn from `generator` or torch's global RNG
    (which DataLoader seeds per worker; a generator passed here is copied into every
    worker, so leave it None with num_workers > 0).

    Bad files (unreadable, truncated, smaller than 8 px, or with a missing/mismatched
    mask) are skipped at load time: the next readable index is returned instead, the
    path goes into `.skipped`, the first skip prints a warning, `report_skipped()`
    warns with the count. With DataLoader workers each worker keeps its own `.skipped`;
    use `verify()` for an exact count.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        size: int,
        flip: bool = True,
        masks: bool = False,
        split: str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise UserError(f"dataset folder not found: {root}" if not root.exists() else f"{root} is not a folder")
        if size < 1:
            raise UserError(f"image size must be positive, got {size}")
        # Split folders (train/ with test/ or val/, or train/ alone), or else the classes themselves.
        subfolders = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
        has_splits = "train" in subfolders and subfolders <= {"train", "test", "val"}
        if split is not None:
            if not (root / split).is_dir():
                found = ", ".join(sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")))
                raise UserError(f"{root} has no '{split}' split folder (sub-folders: {found or 'none'})")
            folder = root / split
        elif has_splits:
            split = "train"
            folder = root / "train"
        else:
            folder = root
        self.root = root
        self.folder = folder
        self.split = split
        self.size = int(size)
        self.flip = flip
        self.masks = masks
        self.generator = generator
        self.skipped: set[str] = set()
        self.bad: dict[str, str] = {}  # path -> reason, from verify() and from failed loads
        self._warned = False
        self._classes, self._samples = self._scan(folder)

    # listing: names only, no file is opened --------------------------------------------------
    def _scan(self, folder: Path) -> tuple[list[str], list[tuple[str, int]]]:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
        classes = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
        samples: list[tuple[str, int]] = []
        missing_masks: list[str] = []
        for label, name in enumerate(classes):
            for dirpath, dirnames, filenames in os.walk(folder / name, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                names = set(filenames)
                for fname in sorted(filenames):
                    low = fname.lower()
                    if fname.startswith(".") or not low.endswith(IMAGE_EXTENSIONS) or low.endswith(MASK_SUFFIX):
                        continue
                    path = os.path.join(dirpath, fname)
                    if self.masks and os.path.basename(mask_path(fname)) not in names:
                        missing_masks.append(path)
                        continue
                    samples.append((path, label))
        expected = (
            "expected one sub-folder per class (ImageNet train layout) holding "
            ".jpg/.jpeg/.png/.webp/.bmp images"
        )
        if not samples and not missing_masks:
            loose = [e.name for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)]
            if loose:
                detail = f"it holds {len(loose)} images directly; move them into a sub-folder, e.g. {folder / 'all'}"
            elif classes:
                detail = f"its {len(classes)} class folders hold no images"
            else:
                detail = "it has no sub-folders"
            raise UserError(f"no images found in {folder}: {expected} ({detail})")
        if missing_masks:
            raise UserError(
                f"{len(missing_masks)} images in {folder} have no mask beside them "
                f"(e.g. {mask_path(missing_masks[0])}); masks are <stem>{MASK_SUFFIX} files next to each image"
            )
        return classes, samples

    @property
    def classes(self) -> list[str]:
        return self._classes

    @property
    def samples(self) -> list[tuple[str, int]]:
        return self._samples

    def __len__(self) -> int:
        return len(self._samples)

    # loading --------------------------------------------------------------------------------
    def _load(self, path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        img, _ = _decode(path)
        mask = _decode_mask(mask_path(path), img.size) if self.masks else None
        img = adm_center_crop(img, self.size)
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
        m = None
        if mask is not None:
            m = torch.from_numpy(np.array(adm_center_crop(mask, self.size, mask=True), dtype=np.uint8))
        if self.flip and torch.rand((), generator=self.generator).item() < 0.5:
            x = x.flip(2)
            if m is not None:
                m = m.flip(1)
        return x.contiguous(), (m.contiguous() if m is not None else None)

    def _skip(self, path: str, reason: str) -> None:
        self.bad[path] = reason
        self.skipped.add(path)
        if not self._warned:
            self._warned = True
            from .console import warn

            warn(f"skipping unreadable image {path} ({reason}); further bad files are skipped and counted")

    def __getitem__(self, index: int):
        index = int(index)
        n = len(self._samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        for k in range(n):
            path, label = self._samples[(index + k) % n]
            if path in self.bad:
                self.skipped.add(path)
                continue
            try:
                x, m = self._load(path)
            except MemoryError:
                raise
            except Exception as e:  # any decode failure of this one file: skip it
                self._skip(path, _describe(e))
                continue
            return (x, m, label) if self.masks else (x, label)
        raise UserError(f"none of the {n} images in {self.folder} can be read (e.g. {self._samples[index][0]}: "
                        f"{self.bad.get(self._samples[index][0], '?')})")

    def report_skipped(self) -> int:
        """Warn with the number of files skipped so far (if any); return it."""
        if self.skipped:
            from .console import warn

            example = sorted(self.skipped)[0]
            warn(f"skipped {len(self.skipped)} unreadable images in {self.folder} "
                 f"(e.g. {example}: {self.bad.get(example, '?')}); run `reals data check` to list them")
        return len(self.skipped)

    def verify(self, workers: int | None = None, progress: bool = True) -> list[str]:
        """Open and decode every file (and its mask); return the paths of the bad ones.

        Reasons land in `.bad` (path -> reason), and later loads skip those files at once.
        """
        jobs = [(path, self.masks) for path, _ in self._samples]
        workers = max(1, min(workers or os.cpu_count() or 1, 32))
        results: list[str | None] = [None] * len(jobs)

        def run(advance: Callable[[int], None]) -> None:
            if workers == 1 or len(jobs) < _POOL_MIN:
                for i, job in enumerate(jobs):
                    results[i] = _check_one(job)
                    advance(1)
                return
            with _pool_context().Pool(workers) as pool:
                for i, reason in enumerate(pool.imap(_check_one, jobs, chunksize=64)):
                    results[i] = reason
                    advance(1)

        if progress:
            from .console import progress as make_progress

            with make_progress() as bar:
                task = bar.add_task(f"checking {self.folder.name}", total=len(jobs))
                run(lambda k: bar.advance(task, k))
        else:
            run(lambda k: None)
        bad = []
        for (path, _), reason in zip(self._samples, results):
            if reason is not None:
                self.bad[path] = reason
                bad.append(path)
        return bad


# -- Fashion-MNIST export -----------------------------------------------------------------------

FASHION_MNIST_NAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_FORMAT = 1
_STATE = ".reals-export.json"  # the export's config, written before any image (guards resumes)


def class_folder(index: int, name: str) -> str:
    """`0-t-shirt-top`: index first (sorting keeps label order), lowercase, hyphens."""
    slug = "".join(c if c.isalnum() else "-" for c in name.lower())
    slug = "-".join(part for part in slug.split("-") if part)
    return f"{index}-{slug}"


FASHION_MNIST_CLASSES = [class_folder(i, n) for i, n in enumerate(FASHION_MNIST_NAMES)]


def _read_gz(path: Path) -> bytes:
    if not path.is_file():
        raise UserError(
            f"{path.parent} has no {path.name} (expected the four Fashion-MNIST idx files: "
            + ", ".join(f for pair in FASHION_MNIST_FILES.values() for f in pair) + ")"
        )
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise UserError(f"{path} is not a readable gzip file ({_describe(e)}); download it again") from None


def read_idx_images(path: Path) -> np.ndarray:
    """An idx3 file (magic 2051, big-endian N, rows, cols, then N*rows*cols bytes) as N x rows x cols uint8."""
    data = _read_gz(path)
    if len(data) < 16:
        raise UserError(f"{path} is too short for an idx image file ({len(data)} bytes)")
    magic, n, rows, cols = struct.unpack(">iiii", data[:16])
    if magic != 2051:
        raise UserError(f"{path} is not an idx image file: magic number {magic}, expected 2051")
    if n < 0 or rows < 1 or cols < 1 or len(data) != 16 + n * rows * cols:
        raise UserError(f"{path} is damaged: its header says {n} images of {rows}x{cols} "
                        f"({16 + n * rows * cols} bytes), the file has {len(data)} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, rows, cols)


def read_idx_labels(path: Path, num_classes: int = 10) -> np.ndarray:
    """An idx1 file (magic 2049, big-endian N, then N bytes) as N uint8 labels."""
    data = _read_gz(path)
    if len(data) < 8:
        raise UserError(f"{path} is too short for an idx label file ({len(data)} bytes)")
    magic, n = struct.unpack(">ii", data[:8])
    if magic != 2049:
        raise UserError(f"{path} is not an idx label file: magic number {magic}, expected 2049")
    if n < 0 or len(data) != 8 + n:
        raise UserError(f"{path} is damaged: its header says {n} labels, the file has {len(data) - 8}")
    labels = np.frombuffer(data, dtype=np.uint8, offset=8)
    if labels.size and labels.max() >= num_classes:
        raise UserError(f"{path} holds label {int(labels.max())}; Fashion-MNIST labels are 0..{num_classes - 1}")
    return labels


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _write_new(path: str, data: bytes) -> None:
    """Write beside, then rename: a file under its final name is always complete."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _export_chunk(job: tuple[str, int, np.ndarray, np.ndarray, np.ndarray]) -> tuple[int, int]:
    """Write image + mask for each (index, label, pixels) whose files are missing; (written, kept)."""
    split_dir, size, indices, labels, pixels = job
    written = kept = 0
    for index, label, px in zip(indices, labels, pixels):
        base = os.path.join(split_dir, FASHION_MNIST_CLASSES[int(label)], f"{int(index):05d}")
        img_path, msk_path = base + ".png", base + MASK_SUFFIX
        todo = False
        if not os.path.exists(img_path):
            img = Image.fromarray(px, "L")
            if img.size != (size, size):
                img = img.resize((size, size), resample=Image.BICUBIC)
            _write_new(img_path, _png_bytes(img.convert("RGB")))
            todo = True
        if not os.path.exists(msk_path):
            m = Image.fromarray((px > 0).astype(np.uint8), "L")
            if m.size != (size, size):
                m = m.resize((size, size), resample=Image.NEAREST)
            _write_new(msk_path, _png_bytes(m))
            todo = True
        if todo:
            written += 1
        else:
            kept += 1
    return written, kept


def export_fashion_mnist(
    out: str | os.PathLike,
    size: int = 64,
    source: str | os.PathLike | None = None,
    limit: int | None = None,
    progress: bool = True,
    workers: int | None = None,
) -> dict[str, Any]:
    """Write Fashion-MNIST as a class-folder dataset artifact (kind `dataset`).

    out/{train,test}/<k-class-name>/<index:05d>.png: the 28x28 image BICUBIC-resized to
    size x size, saved as RGB (three equal channels); <index:05d>.mask.png beside it: the
    foreground (pixel > 0 at 28x28) as uint8 0/1, NEAREST-resized. `index` is the
    position in the split's idx file. All ten class folders exist in both splits so
    label indices agree. Plus out/classes.json and, last, out/manifest.json.

    Resumable: files already there are kept (each was written under a temporary name
    and renamed, so it is complete). A finished export with the same settings is not
    redone. `limit` keeps the first N images of each split.
    """
    from .artifacts import (MANIFEST, atomic_write_json, describe_input, made_by, read_manifest, sha256_file,
                            write_manifest)

    started = time.perf_counter()
    if size < 1:
        raise UserError(f"--size must be positive, got {size}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be positive, got {limit}")
    if source is None:
        from .assets import asset_path

        source = asset_path("fashion-mnist")
    source = Path(source)
    if not source.is_dir():
        raise UserError(f"Fashion-MNIST source folder not found: {source}")
    for pair in FASHION_MNIST_FILES.values():
        for name in pair:
            if not (source / name).is_file():
                _read_gz(source / name)  # raises the "has no ..." error
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; choose another output folder")

    config = {
        "dataset": "fashion-mnist",
        "size": int(size),
        "limit": limit,
        "resample": "bicubic",
        "mask": "pixel > 0 at 28x28, nearest-resized, uint8 0/1",
        "image_mode": "RGB",
        "classes": FASHION_MNIST_CLASSES,
        "source_sha256": {
            name: sha256_file(source / name) for pair in FASHION_MNIST_FILES.values() for name in pair
        },
    }

    if (out / MANIFEST).is_file():
        old = read_manifest(out)
        other = old.get("config") if isinstance(old.get("config"), dict) else {}
        if old.get("kind") != "dataset" or other.get("dataset") != "fashion-mnist":
            raise UserError(f"{out} holds a '{old.get('kind')}' artifact{made_by(old)}, not a Fashion-MNIST export; "
                            f"choose another folder")
        if other == config:
            metrics = old.get("metrics", {})
            return {
                "out": str(out), "already": True, "size": size, "limit": limit,
                "train": metrics.get("train", 0), "test": metrics.get("test", 0),
                "classes": FASHION_MNIST_CLASSES, "written": 0,
                "kept": metrics.get("train", 0) + metrics.get("test", 0),
                "seconds": time.perf_counter() - started, "workers": 0,
            }
        raise UserError(
            f"{out} already holds a finished export made with other settings "
            f"(size {other.get('size')}, limit {other.get('limit')}); choose another folder or delete it"
        )
    state_path = out / _STATE
    resuming = state_path.is_file()
    if resuming:
        try:
            state = json.loads(state_path.read_text())
        except (OSError, json.JSONDecodeError):
            state = None
        if state != config:
            other = state if isinstance(state, dict) else {}
            raise UserError(
                f"{out} holds an unfinished export made with other settings (size {other.get('size')}, "
                f"limit {other.get('limit')}); re-run with those settings to finish it, or delete the folder"
            )
    elif out.is_dir() and any(out.iterdir()):
        raise UserError(f"{out} is not empty and is not a Fashion-MNIST export; choose an empty or new folder")

    splits = {}
    for split, (img_name, lbl_name) in FASHION_MNIST_FILES.items():
        images = read_idx_images(source / img_name)
        labels = read_idx_labels(source / lbl_name)
        if len(images) != len(labels):
            raise UserError(f"{source / img_name} holds {len(images)} images but {source / lbl_name} "
                            f"holds {len(labels)} labels; download them again")
        n = len(images) if limit is None else min(limit, len(images))
        splits[split] = (images[:n], labels[:n])

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(state_path, config)
    for split in splits:
        for folder in FASHION_MNIST_CLASSES:
            (out / split / folder).mkdir(parents=True, exist_ok=True)
            if resuming:  # temporary files of a killed run
                with os.scandir(out / split / folder) as it:
                    for entry in it:
                        if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                            os.unlink(entry.path)

    chunk = _EXPORT_CHUNK
    jobs = []
    for split, (images, labels) in splits.items():
        for start in range(0, len(images), chunk):
            stop = min(start + chunk, len(images))
            jobs.append((split, str(out / split), int(size), np.arange(start, stop),
                         labels[start:stop], images[start:stop]))
    total = sum(len(j[3]) for j in jobs)
    workers = max(1, min(workers or os.cpu_count() or 1, 32))
    if total <= 2 * chunk:
        workers = 1
    written = kept = 0

    def run(advance: Callable[[str, int], None]) -> None:
        nonlocal written, kept
        payload = [j[1:] for j in jobs]
        if workers == 1:
            results = map(_export_chunk, payload)
            pool = None
        else:
            pool = _pool_context().Pool(workers)
            results = pool.imap(_export_chunk, payload)
        try:
            for job, (w, k) in zip(jobs, results):
                written += w
                kept += k
                advance(job[0], w + k)
        except BaseException:
            if pool is not None:
                pool.terminate()
            raise
        if pool is not None:
            pool.close()
            pool.join()

    if progress:
        from .console import progress as make_progress

        with make_progress() as bar:
            tasks = {s: bar.add_task(f"fashion-mnist {s}", total=len(splits[s][0])) for s in splits}
            run(lambda s, k: bar.advance(tasks[s], k))
    else:
        run(lambda s, k: None)

    classes_doc = [{"label": i, "folder": f, "name": n}
                   for i, (f, n) in enumerate(zip(FASHION_MNIST_CLASSES, FASHION_MNIST_NAMES))]
    atomic_write_json(out / "classes.json", classes_doc)
    counts = {s: int(len(splits[s][0])) for s in splits}
    per_class = {s: np.bincount(splits[s][1], minlength=10).astype(int).tolist() for s in splits}
    seconds = time.perf_counter() - started
    write_manifest(
        out, kind="dataset", format_version=FASHION_MNIST_FORMAT, config=config,
        inputs={"source": describe_input(source)},
        metrics={**counts, "per_class": per_class, "seconds": round(seconds, 2)},
        files=["classes.json"],
    )  # the last write: a folder with a manifest is a finished export
    return {
        "out": str(out), "already": False, "size": size, "limit": limit, **counts,
        "classes": FASHION_MNIST_CLASSES, "written": written, "kept": kept,
        "seconds": time.perf_counter() - started, "workers": workers,
    }


# -- photo tiles ----------------------------------------------------------------------------------

def export_photo_tiles(out: str | os.PathLike, size: int = 32, per_photo: int = 300,
                       source: str | os.PathLike | None = None) -> dict[str, Any]:
    """Tiles of scikit-image's photographs as a class-folder dataset artifact (one folder per photo).

    The tiles have the depth demo's geometry (96 px every 32 px, resized to `size`), so a VAE
    trained on them with `train-vae --extra-data` has seen natural images at the scale the
    depth probe reads. The motorcycle's left view contributes only its training columns: the
    depth test tiles stay unseen. At most `per_photo` tiles, evenly spaced, per photo.
    """
    from .artifacts import atomic_write_json, describe_input, write_manifest
    from .assets import asset_path
    from .probe_data import MotorcycleDepth

    started = time.perf_counter()
    if size < 1 or per_photo < 1:
        raise UserError(f"--size and --per-photo must be positive, got {size} and {per_photo}")
    out, source = Path(out), Path(source) if source else asset_path("photos")
    tile, stride = MotorcycleDepth.TILE, MotorcycleDepth.STRIDE
    photos = {p: None for p in sorted(source.glob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS}
    motorcycle = asset_path("motorcycle") / "motorcycle_left.png"
    photos[motorcycle] = MotorcycleDepth.SPLIT_COLUMN
    if len(photos) == 1:
        raise UserError(f"no photographs in {source}; run `reals assets fetch`")
    counts = {}
    for path, right_edge in photos.items():
        img = to_rgb(Image.open(path))
        w, h = img.size
        w = min(w, right_edge or w)
        corners = [(x, y) for y in range(0, h - tile + 1, stride) for x in range(0, w - tile + 1, stride)]
        keep = np.unique(np.linspace(0, len(corners) - 1, min(per_photo, len(corners))).round().astype(int))
        folder = out / "train" / path.stem
        folder.mkdir(parents=True, exist_ok=True)
        for x, y in (corners[i] for i in keep):
            target = folder / f"{x:04d}_{y:04d}.png"
            if not target.exists():
                crop = img.crop((x, y, x + tile, y + tile)).resize((size, size), Image.BICUBIC)
                _write_new(str(target), _png_bytes(crop))
        counts[path.stem] = len(keep)
    atomic_write_json(out / "classes.json", [{"label": i, "folder": k, "name": k} for i, k in enumerate(sorted(counts))])
    write_manifest(out, kind="dataset", format_version=1,
                   config={"source": "photos", "size": size, "per_photo": per_photo, "tile": tile, "stride": stride},
                   inputs={"photos": describe_input(source), "motorcycle": describe_input(motorcycle)},
                   metrics={"train": sum(counts.values()), "per_photo": counts,
                            "seconds": round(time.perf_counter() - started, 2)},
                   files=["classes.json"])
    return {"out": str(out), "train": sum(counts.values()), "per_photo": counts}
