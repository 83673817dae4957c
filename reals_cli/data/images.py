"""Images in, tensors out: the ADM center crop and the class-folder dataset.

`ImageFolder` reads the ImageNet-train layout (one sub-folder per class) and is what
every training and encoding command reads. Real folders hold bad files (truncated
downloads, 1x1 placeholders, odd colour modes): listing never opens a file, a file
that fails to load is skipped at load time and counted, and `verify()` scans them all.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from ..errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MASK_SUFFIX = ".mask.png"
DEPTH_SUFFIX = ".depth.png"
SIDECAR_SUFFIXES = (MASK_SUFFIX, DEPTH_SUFFIX)  # per-image targets beside an image: not images themselves
_POOL_MIN = 256  # verify(): fewer files than this are checked in-process
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


def describe_error(e: BaseException) -> str:
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
        return describe_error(e)


def pool_context():
    # fork starts workers in milliseconds and they only run PIL/numpy; elsewhere the default.
    if sys.platform.startswith("linux") and "fork" in mp.get_all_start_methods():
        return mp.get_context("fork")
    return mp.get_context()


# -- the class-folder dataset -------------------------------------------------------------------

class ImageFolder(torch.utils.data.Dataset):
    """A class-folder image dataset (the ImageNet train layout), ADM-cropped to `size`.

    root/<class>/**/<image>.{jpg,jpeg,png,webp,bmp} (extensions case-insensitive); class
    names sorted give label indices; hidden files and folders and `*.mask.png` and `*.depth.png` files are
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
                    if fname.startswith(".") or not low.endswith(IMAGE_EXTENSIONS) or low.endswith(SIDECAR_SUFFIXES):
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
            from ..console import warn

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
                self._skip(path, describe_error(e))
                continue
            return (x, m, label) if self.masks else (x, label)
        raise UserError(f"none of the {n} images in {self.folder} can be read (e.g. {self._samples[index][0]}: "
                        f"{self.bad.get(self._samples[index][0], '?')})")

    def report_skipped(self) -> int:
        """Warn with the number of files skipped so far (if any); return it."""
        if self.skipped:
            from ..console import warn

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
            with pool_context().Pool(workers) as pool:
                for i, reason in enumerate(pool.imap(_check_one, jobs, chunksize=64)):
                    results[i] = reason
                    advance(1)

        if progress:
            from ..console import progress as make_progress

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
