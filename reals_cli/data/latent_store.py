"""Latent datasets on disk: the one module that reads and writes them.

A latent store is a Zarr v3 group (or, for a path ending in `.h5`, an HDF5 file with
the same layout; a path with a URL scheme goes through fsspec, so `s3://` works
where s3fs is installed):

  posterior  (N, V, 2, C, H, W) float16 (or float32): [mean, std] of q(z|x) for each
             image, V = 2 views (image, horizontally flipped image) with --flip, else 1.
             One image per chunk, so a random minibatch reads only its own images;
             `block_size` images per shard, so a store holds N / block_size files.
  labels     (N,) int64: class index, -1 for an image that could not be read.
  blocks     (N / block_size, 3 + 2C) float64, one chunk per block: [done, images,
             skipped, sum_c, sum of squares_c]. A block is the unit of work and of
             resume: its posterior shard and labels are written first, its record
             last (every Zarr write is atomic), so `done` means the block is whole.
             Ranks write disjoint blocks; the per-block sums give the statistics.

Every chunk carries a crc32c (Zarr's codec; in a shard, each image's chunk and the
index), so damaged bytes are an error, never latents.

The group attributes are the store's manifest: kind, format version, id, config,
inputs (image folder, VAE id), and, once every block is done, `complete`, the
image count, the skipped count, the per-channel latent mean/std used to
normalise latents for diffusion (the same numbers at training and sampling time)
and, for a local store, the number and size of its chunk files, which every
opening of the finished store checks. Each of the attribute writes (at creation,
at the end) is one atomic rewrite of the group's `zarr.json`, so a kill anywhere
leaves a store that the same `reals encode` command finishes.

`LatentDataset` reads random minibatches of a finished local store straight from
its shard files (`_ShardReader`), about ten times faster than through Zarr.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..artifacts import LOCK, provenance
from ..errors import UserError

KIND, FORMAT_VERSION = "latents", 1
POSTERIOR, LABELS, BLOCKS = "posterior", "labels", "blocks"
DONE, IMAGES, SKIPPED, SUMS = 0, 1, 2, 3  # columns of a block record; SUMS: C sums, then C sums of squares
STATS_NOTE = ("per-channel mean/std of posterior samples z ~ N(mean, std^2) over every image and view, "
              "computed exactly from the stored mean and std (E(z^2) = mean^2 + std^2), float64 sums")


def is_url(path: str | os.PathLike) -> bool:
    return "://" in str(path)


def is_h5(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith((".h5", ".hdf5"))


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _local_zarr(path: str) -> bool:
    return not is_url(path) and not is_h5(path)


# What a local Zarr store of ours holds besides the lock: a creation cut off by a kill left some
# of these (Zarr writes `NAME.<uuid>.partial`, then renames it) and nothing else.
_OURS = {"zarr.json", POSTERIOR, LABELS, BLOCKS}


def _only_ours(path: str) -> bool:
    return all(p.name in _OURS or p.name == LOCK or p.name.endswith(".partial") for p in Path(path).iterdir())


def _chunk_files(path: str) -> dict[str, list[int]]:
    """{array: [chunk files, their bytes]} of a local Zarr store: what a finished store records, so
    that a file lost, truncated or added since is found before its latents are read."""
    found = {}
    for name in (POSTERIOR, LABELS, BLOCKS):
        files = [Path(d) / f for d, _, fs in os.walk(Path(path) / name / "c") for f in fs]
        found[name] = [len(files), sum(f.stat().st_size for f in files)]
    return found


# -- the two file formats, behind one small interface --------------------------------------------

class _ZarrIO:
    def __init__(self, path: str, mode: str):
        import zarr

        if mode == "w" and _local_zarr(path) and Path(path).is_dir():
            # Zarr's own "w" empties the folder, the lock file of the run that holds it too.
            for p in Path(path).iterdir():
                if p.name in _OURS or p.name.endswith(".partial"):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
            mode = "a"
        self.group = zarr.open_group(path, mode=mode)
        self._arrays: dict[str, Any] = {}  # opening an array reads its metadata: once per process

    @property
    def zarr_format(self) -> int:
        return self.group.metadata.zarr_format

    def names(self) -> set[str]:
        import warnings

        with warnings.catch_warnings():  # about our lock file and Zarr's own temp files, which are no arrays
            warnings.filterwarnings("ignore", "Object at .* is not recognized as a component of a Zarr hierarchy")
            return set(self.group.keys())

    def attrs(self) -> dict:
        return self.group.attrs.asdict()

    def update_attrs(self, attrs: dict) -> None:
        # One write of zarr.json: `attrs.update` would rewrite it once per key, and a kill in
        # between would leave a half-described store.
        self.group.update_attributes(attrs)

    def create(self, name: str, shape: tuple, dtype: str, chunks: tuple, shards: tuple | None = None) -> None:
        from zarr.codecs import Crc32cCodec

        # Uncompressed: latents barely compress, and decompression would slow random reads.
        self.group.create_array(name, shape=shape, dtype=dtype, chunks=chunks, shards=shards,
                                compressors=[Crc32cCodec()], fill_value=0)

    def _array(self, name: str):
        if name not in self._arrays:
            self._arrays[name] = self.group[name]
        return self._arrays[name]

    def read(self, name: str, rows: slice | np.ndarray) -> np.ndarray:
        arr = self._array(name)
        return arr[rows] if isinstance(rows, slice) else arr.get_orthogonal_selection((rows,))

    def write(self, name: str, start: int, data: np.ndarray) -> None:
        self._array(name)[start:start + len(data)] = data

    def close(self) -> None:
        """Nothing to release: Zarr holds no open files between requests."""


class _H5IO:
    zarr_format = None

    def __init__(self, path: str, mode: str):
        import h5py

        try:
            self.file = h5py.File(path, {"r": "r", "r+": "r+", "w": "w"}[mode])
        except OSError as e:
            raise UserError(f"cannot open {path} as HDF5 ({e}); a run killed while writing it can damage an "
                            f"HDF5 file (Zarr stores survive that): delete it and encode again") from None

    def names(self) -> set[str]:
        return set(self.file.keys())

    def attrs(self) -> dict:
        # HDF5 attributes hold no nested values: each one is stored as JSON text.
        return {k: json.loads(v) for k, v in self.file.attrs.items()}

    def update_attrs(self, attrs: dict) -> None:
        for k, v in attrs.items():
            self.file.attrs[k] = json.dumps(v)
        self.file.flush()

    def create(self, name: str, shape: tuple, dtype: str, chunks: tuple, shards: tuple | None = None) -> None:
        # No shards in HDF5: its chunk B-tree keeps one file however many chunks there are.
        self.file.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks, fillvalue=0)

    def read(self, name: str, rows: slice | np.ndarray) -> np.ndarray:
        return self.file[name][rows]

    def write(self, name: str, start: int, data: np.ndarray) -> None:
        self.file[name][start:start + len(data)] = data
        self.file.flush()

    def close(self) -> None:
        self.file.close()  # HDF5 will not open a file again in one process while a handle is open


def _open_io(path: str, mode: str):
    return (_H5IO if is_h5(path) else _ZarrIO)(path, mode)


def _inspect(path: str) -> tuple[str, dict]:
    """(state, attributes); state: 'missing', 'store' (a latent store, finished or not),
    'unfinished' (its creation was cut off) or 'other'. Opens and closes the file."""
    if is_url(path):
        import fsspec

        fs, p = fsspec.core.url_to_fs(path)
        exists = fs.exists(p) and (not fs.isdir(p) or bool(fs.ls(p)))
    else:
        local = Path(path)
        # The lock alone: the folder `reals encode` holds while it creates the store.
        exists = local.exists() and (not local.is_dir() or any(p.name != LOCK for p in local.iterdir()))
    if not exists:
        return "missing", {}
    try:
        io = _open_io(path, "r")
        try:
            attrs, names, version = io.attrs(), io.names(), io.zarr_format
        finally:
            io.close()
    except Exception as e:  # zarr and h5py raise many types for "not one of mine"
        if "unable to lock file" in str(e):  # h5py: a store is open for writing elsewhere
            raise UserError(f"{path} is open in another process (HDF5 locks it while writing); wait for that "
                            f"process to end, then run again") from None
        # A kill before the group's zarr.json was written.
        return ("unfinished" if _local_zarr(path) and local.is_dir() and _only_ours(path) else "other"), {}
    if attrs.get("kind") == KIND:
        if version == 2:  # not written by reals: its arrays have none of the layout or checksums assumed
            raise UserError(f"{path} is a Zarr v2 store; reals reads the Zarr v3 stores `reals encode` writes: "
                            f"encode the images again")
        return "store", attrs
    # The attributes are written last, in one write: none, and nothing but ours, is a creation cut off.
    ours = _only_ours(path) if _local_zarr(path) else names <= {POSTERIOR, LABELS, BLOCKS}
    return ("unfinished" if not attrs and ours else "other"), {}


def probe(path: str | os.PathLike) -> str:
    return _inspect(str(path))[0]


class _ShardReader:
    """Random rows of a finished local Zarr store, read straight from its shard files.

    Zarr's reader spends about a millisecond of Python per chunk, and a random
    minibatch touches one chunk per image; reading the sharding format directly
    (Zarr v3 sharding spec: inner chunks stored as raw little-endian bytes, each
    followed by its crc32c, then an index of (offset, nbytes) uint64 pairs and the
    index's crc32c at the shard's end) takes one pread per image, tens of times faster.
    Both checksums are verified, as Zarr would. Only the exact layouts that `create_store`
    writes (and wrote before chunks had a checksum) are read this way; `None` from `open`
    means "use Zarr". `damaged(what)` makes the error of a shard that fails a check.
    """

    EMPTY = 2**64 - 1  # index entry of an inner chunk never written (all fill value 0)

    def __init__(self, folder: Path, shard: int, item: tuple[int, ...], dtype: np.dtype, crc: bool, damaged):
        self.folder, self.shard, self.item, self.dtype, self.crc = folder, shard, item, dtype, crc
        self.damaged = damaged
        self.rank = 1 + len(item)
        self.nbytes = int(np.prod(item)) * dtype.itemsize + 4 * crc  # of one stored inner chunk
        self._index: dict[int, np.ndarray | None] = {}  # a finished store's shards never change

    @classmethod
    def open(cls, path: str, damaged) -> "_ShardReader | None":
        if not _local_zarr(path):
            return None
        meta = json.loads((Path(path) / POSTERIOR / "zarr.json").read_text())
        item = meta["shape"][1:]
        little = {"name": "bytes", "configuration": {"endian": "little"}}
        crc32c = {"name": "crc32c"}
        key = meta["chunk_key_encoding"]
        if key != {"name": "default", "configuration": {"separator": "/"}}:
            return None
        for inner in ([little, crc32c], [little]):  # stores made before chunks had a checksum: the index's alone
            if meta["codecs"] == [{"name": "sharding_indexed", "configuration": {
                    "chunk_shape": [1, *item], "codecs": inner, "index_codecs": [little, crc32c],
                    "index_location": "end"}}]:
                shard = meta["chunk_grid"]["configuration"]["chunk_shape"][0]
                return cls(Path(path) / POSTERIOR / "c", shard, tuple(item), np.dtype(meta["data_type"]).newbyteorder("<"),
                           len(inner) == 2, damaged)
        return None

    def _table(self, fd: int, file: Path) -> np.ndarray:
        import google_crc32c

        size, length = os.fstat(fd).st_size, 16 * self.shard
        if size < length + 4:
            raise self.damaged(f"{file} is truncated ({size} bytes)")
        raw = os.pread(fd, length + 4, size - length - 4)
        if google_crc32c.value(raw[:length]) != int.from_bytes(raw[length:], "little"):
            raise self.damaged(f"the index of {file} fails its checksum")
        table = np.frombuffer(raw[:length], "<u8").reshape(self.shard, 2)
        used = table[:, 0] != self.EMPTY
        if (table[used, 1] != self.nbytes).any() or (table[used, 0] + table[used, 1] > size - length - 4).any():
            raise self.damaged(f"the index of {file} does not describe its chunks")
        return table

    def read(self, rows: np.ndarray) -> np.ndarray:
        import google_crc32c

        out = np.zeros((len(rows), *self.item), self.dtype)
        flat = out.reshape(len(rows), -1)
        shards, inner = np.divmod(rows, self.shard)
        for s in np.unique(shards):
            file = self.folder / "/".join([str(s)] + ["0"] * (self.rank - 1))
            if not file.is_file():  # a shard of zeros (all its images unreadable) is never written
                continue
            fd = os.open(file, os.O_RDONLY)
            try:
                if s not in self._index:
                    self._index[s] = self._table(fd, file)
                for k in np.flatnonzero(shards == s):
                    offset, nbytes = self._index[s][inner[k]]
                    if offset == self.EMPTY:
                        continue
                    chunk = os.pread(fd, int(nbytes), int(offset))
                    data = chunk[:-4] if self.crc else chunk
                    if self.crc and google_crc32c.value(data) != int.from_bytes(chunk[-4:], "little"):
                        raise self.damaged(f"row {rows[k]} in {file} fails its checksum")
                    flat[k] = np.frombuffer(data, self.dtype)
            finally:
                os.close(fd)
        return out


# -- the store ------------------------------------------------------------------------------------

class LatentStore:
    """An open latent store: attributes, labels, rows of posteriors, and the normalisation."""

    def __init__(self, path: str | os.PathLike, writable: bool = False):
        self.path = str(path)
        self._mode = "r+" if writable else "r"
        self._pid, self._handle = None, None
        state, self.attrs = _inspect(self.path)  # the file itself is opened at the first read or write
        if state == "missing":
            raise UserError(f"latent store not found: {self.path}")
        if state != "store":
            raise UserError(f"{self.path} is not a latent store (made by `reals encode`)")
        if self.attrs.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{self.path} has latent store format version {self.attrs.get('format_version')}, "
                            f"this reals reads version {FORMAT_VERSION}; encode the images again")
        self._labels: np.ndarray | None = None
        self._check_files()
        self._fast: _ShardReader | bool | None = None  # None: not looked at yet; False: Zarr reads
        self._stats_on: dict = {}  # (device, dtype) -> (mean, std): one copy to a GPU, not one per batch

    @property
    def _io(self):
        # Opened once per process: DataLoader workers must not share the parent's file handles.
        if self._pid != os.getpid():
            self._handle, self._pid = _open_io(self.path, self._mode), os.getpid()
        return self._handle

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handle": None, "_pid": None, "_stats_on": {}, "_fast": None}

    def damaged(self, what: str) -> UserError:
        """The error for a store whose files are not what encoding left: what is wrong, and the remedy."""
        again = f"run `{self.attrs['command']}` again" if self.attrs.get("command") else "encode the images again"
        return UserError(f"{self.path} is a damaged latent store: {what}; delete it and {again}")

    def _check_files(self) -> None:
        """(Local Zarr) its three arrays, and once finished its chunk files as many and as large as it recorded."""
        if _local_zarr(self.path):
            missing = [n for n in (POSTERIOR, LABELS, BLOCKS) if not (Path(self.path) / n / "zarr.json").is_file()]
            if missing:
                raise self.damaged(f"it has no {' or '.join(missing)} array")
            recorded = self.attrs.get("chunk_files") if self.complete else None
            found = _chunk_files(self.path) if recorded else {}
            for name in recorded or {}:  # stores finished before the record: their checksums alone
                if found[name] != recorded[name]:
                    (n, size), (n0, size0) = found[name], recorded[name]
                    raise self.damaged(f"its {name} array has {n} chunk files of {size} bytes, not the {n0} of "
                                       f"{size0} bytes it was finished with (a file lost, cut short or added)")

    def _read(self, name: str, rows: slice | np.ndarray) -> np.ndarray:
        try:
            return self._io.read(name, rows)
        except UserError:
            raise
        except Exception as e:  # zarr and h5py raise many types for bytes that do not decode
            reason = (str(e).strip().splitlines() or [""])[0]
            raise self.damaged(f"its {name} array does not read back ({type(e).__name__}: {reason})") from None

    # -- what readers use ------------------------------------------------------------------------
    @property
    def vae_id(self) -> str:
        return self.attrs["vae_id"]

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete"))

    @property
    def rows(self) -> int:
        """Images listed in the folder, readable or not (the arrays' first dimension)."""
        return int(self.attrs["rows"])

    @property
    def count(self) -> int:
        """Latents in the store: every readable image of the finished blocks."""
        if self.complete:
            return int(self.attrs["count"])
        return int(self.records()[:, IMAGES].sum())

    @property
    def skipped(self) -> int:
        """Images that could not be read (no latent, label -1), over the finished blocks."""
        if self.complete:
            return int(self.attrs["skipped"])
        return int(self.records()[:, SKIPPED].sum())

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.attrs["latent_shape"])

    @property
    def views(self) -> int:
        return int(self.attrs["views"])

    @property
    def classes(self) -> list[str]:
        return list(self.attrs["classes"])

    @property
    def labels(self) -> np.ndarray:
        """(rows,) int64; -1 marks an image that could not be read."""
        if self._labels is None:
            self._labels = self._read(LABELS, slice(None))
        return self._labels

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Posteriors (len(rows), V, 2, C, H, W) of sorted, distinct row indices."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and not 0 <= rows.min() <= rows.max() < self.rows:
            raise IndexError(f"rows out of range for {self.rows} rows")
        if self.complete and self._fast is None:
            self._fast = _ShardReader.open(self.path, self.damaged) or False
        return self._fast.read(rows) if self._fast else self._read(POSTERIOR, rows)

    def statistics(self) -> tuple[list[float], list[float]]:
        """The per-channel latent mean and std over the store: what `normalize` divides by."""
        if not self.complete:
            raise UserError(f"{self.path} is an unfinished latent store: it has no latent statistics yet; "
                            f"run the same `reals encode` command again to finish it")
        return [float(v) for v in self.attrs["latent_mean"]], [float(v) for v in self.attrs["latent_std"]]

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (like.device, like.dtype)
        if key not in self._stats_on:
            mean, std = (torch.tensor(v, dtype=torch.float32)[:, None, None] for v in self.statistics())
            self._stats_on[key] = mean.to(like), std.to(like)
        return self._stats_on[key]

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """(z - mean_c) / std_c over the channel dimension of (..., C, H, W) latents."""
        mean, std = self._stats(z)
        return (z - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(x)
        return x * std + mean

    # -- what the writer uses --------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return int(self.attrs["config"]["block_size"])

    @property
    def num_blocks(self) -> int:
        return -(-self.rows // self.block_size)

    def records(self) -> np.ndarray:
        return self._read(BLOCKS, slice(None))

    def done_blocks(self) -> np.ndarray:
        return self.records()[:, DONE] == 1

    def write_block(self, block: int, posterior: np.ndarray, labels: np.ndarray) -> None:
        """Write one whole block (posterior rows and labels), then its record: the block is done."""
        ok = labels >= 0
        post = posterior[ok].astype(np.float64)  # the stored (rounded) values: what readers will see
        mean, std = post[:, :, 0], post[:, :, 1]
        sums = mean.sum(axis=(0, 1, 3, 4))
        squares = (mean**2 + std**2).sum(axis=(0, 1, 3, 4))
        record = np.concatenate([[1.0, ok.sum(), (~ok).sum()], sums, squares])[None]
        start = block * self.block_size
        try:
            self._write_chunks(start, posterior, labels, block, record)
        except OSError as e:
            raise UserError(f"cannot write to {self.path}: {e.strerror or e}; the finished blocks are kept: "
                            f"make room and run the same command again to finish the store") from None

    def _write_chunks(self, start: int, posterior: np.ndarray, labels: np.ndarray, block: int, record: np.ndarray) -> None:
        self._io.write(POSTERIOR, start, posterior)
        self._io.write(LABELS, start, labels.astype(np.int64))
        self._io.write(BLOCKS, block, record)  # last: marks the block done

    def discard_partial_writes(self) -> None:
        """Remove the temporary files of writes a killed run left behind (local Zarr stores)."""
        if _local_zarr(self.path):
            for tmp in Path(self.path).rglob("*.partial"):
                tmp.unlink(missing_ok=True)

    def finalize(self) -> None:
        """Mark the store complete, with counts and per-channel statistics from the block records."""
        total = self.records().sum(axis=0)
        c, h, w = self.latent_shape
        n = total[IMAGES] * self.views * h * w  # values per channel
        mean = total[SUMS:SUMS + c] / n
        std = np.sqrt(np.maximum(total[SUMS + c:SUMS + 2 * c] / n - mean**2, 0.0))
        self.attrs.update(complete=True, count=int(total[IMAGES]), skipped=int(total[SKIPPED]),
                          latent_mean=mean.tolist(), latent_std=std.tolist(), stats=STATS_NOTE, finished=_now(),
                          **provenance(), **({"chunk_files": _chunk_files(self.path)} if _local_zarr(self.path) else {}))
        self._io.update_attrs(self.attrs)


def create_store(path: str | os.PathLike, *, rows: int, latent_shape: tuple[int, int, int], views: int,
                 dtype: str, block_size: int, attrs: dict) -> LatentStore:
    """Create an empty store for `rows` images; `attrs` (the manifest) is written last."""
    path = str(path)
    if is_h5(path) and is_url(path):
        raise UserError(f"{path}: .h5 output must be a local file; use a Zarr store (any other name) for URLs")
    if not is_url(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)  # h5py makes no folders
    io = _open_io(path, "w")
    c, h, w = latent_shape
    item = (views, 2, c, h, w)
    io.create(POSTERIOR, (rows, *item), dtype, chunks=(1, *item), shards=(block_size, *item))
    io.create(LABELS, (rows,), "int64", chunks=(min(block_size, rows),))
    io.create(BLOCKS, (-(-rows // block_size), SUMS + 2 * c), "float64", chunks=(1, SUMS + 2 * c))
    io.update_attrs({**attrs, "kind": KIND, "format_version": FORMAT_VERSION, "rows": rows,
                     "latent_shape": list(latent_shape), "views": views, "complete": False, "created": _now()})
    io.close()
    return LatentStore(path, writable=True)


def open_store(path: str | os.PathLike) -> LatentStore:
    """Open a latent store for reading (finished or not; `.complete` says which)."""
    return LatentStore(path)


# -- training data --------------------------------------------------------------------------------

def draw_latents(posterior: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Raw latent samples from stored posteriors (n x V x 2 x C x H x W): a random view
    (image or its flip) per row and a fresh z = mean + std * eps; not normalised."""
    device = posterior.device
    view = torch.randint(posterior.shape[1], (len(posterior),), generator=generator, device=device)
    mean, std = posterior[torch.arange(len(posterior), device=device), view].unbind(1)
    return mean + std * torch.randn(mean.shape, generator=generator, device=device)


class LatentDataset(torch.utils.data.Dataset):
    """(normalised latent sample, label) per readable image of a complete store.

    Every access draws a fresh z = mean + std * eps and picks the view (image or its
    horizontal flip) at random, both from torch's RNG (DataLoader seeds it per worker
    and epoch), so no flip or sample is frozen per image. `__getitems__` reads a
    whole minibatch in one request, which a DataLoader uses when it batches.

    raw=True yields the stored posterior (V x 2 x C x H x W, float32) instead, for a
    caller that draws with `draw_latents` and its own generator (exact resume).
    """

    def __init__(self, path: str | os.PathLike, vae_id: str | None = None, raw: bool = False):
        self.store = open_store(path)
        self.raw = raw
        if not self.store.complete:
            done = int(self.store.done_blocks().sum())
            raise UserError(f"{path} is an unfinished latent store ({done} of {self.store.num_blocks} blocks "
                            f"encoded); run the same `reals encode` command again to finish it")
        if vae_id is not None and vae_id != self.store.vae_id:
            raise UserError(f"{path} holds latents of VAE {self.store.vae_id}, not of VAE {vae_id}; "
                            f"use the VAE that made the store, or encode the images again with this one")
        self.rows = np.flatnonzero(self.store.labels >= 0)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        rows = self.rows[np.asarray(indices, dtype=np.int64)]
        unique, inverse = np.unique(rows, return_inverse=True)  # the reader wants sorted, distinct rows
        post = torch.from_numpy(self.store.read(unique)[inverse].astype(np.float32))
        items = post if self.raw else self.store.normalize(draw_latents(post))
        return list(zip(items, self.store.labels[rows].tolist()))
