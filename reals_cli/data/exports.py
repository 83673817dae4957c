"""Datasets written as class-folder artifacts that `ImageFolder` reads.

`export_fashion_mnist` turns the four Fashion-MNIST idx files into that layout
(`train/` and `test/` splits, RGB PNGs, a foreground mask per image), so the rest of
the pipeline runs offline on real images; `export_photo_tiles` cuts scikit-image's
photographs into tiles at the depth probe's geometry.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import struct
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from ..errors import UserError
from .images import IMAGE_EXTENSIONS, MASK_SUFFIX, describe_error, pool_context, to_rgb

_EXPORT_CHUNK = 500  # images per worker task

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
        raise UserError(f"{path} is not a readable gzip file ({describe_error(e)}); download it again") from None


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
    from ..artifacts import (
        MANIFEST,
        atomic_write_json,
        describe_input,
        made_by,
        read_manifest,
        sha256_file,
        write_manifest,
    )

    started = time.perf_counter()
    if size < 1:
        raise UserError(f"--size must be positive, got {size}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be positive, got {limit}")
    if source is None:
        from ..assets import asset_path

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
            pool = pool_context().Pool(workers)
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
        from ..console import progress as make_progress

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
    from ..artifacts import atomic_write_json, describe_input, write_manifest
    from ..assets import asset_path
    from .probe_sets import MotorcycleDepth

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
