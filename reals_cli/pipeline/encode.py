"""`reals encode`: every image's VAE posterior, computed once, into a latent store.

Diffusion training then reads latents instead of decoding and encoding images at
every step. DataLoader workers decode images while the device encodes. The work
is cut into blocks of `block_size` images (see latent_store): a block is written
whole and then marked done, so a killed run started again encodes only the blocks
that are not done, and under `torchrun` rank r takes blocks r, r + world, ...
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shlex
import time
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..artifacts import artifact_id, check_writable, hold_folder
from ..console import console, print_summary, progress, warn
from ..data.images import ImageFolder
from ..data.latent_store import LatentStore, create_store, is_h5, is_url, probe
from ..errors import UserError
from ..models.reals_vae import RealsVAE, load_reals_vae
from ..runtime import autocast, local_device, resolve_device

DTYPES = ("float16", "float32")
_WAIT_FOR_RANK0_S = 600


class _Rows(torch.utils.data.Dataset):
    """ImageFolder items with their row index; label -1 where the file could not be read.

    ImageFolder answers a bad file with the next good image: that image must not be
    stored a second time, under the bad file's row, so the row is flagged instead.
    """

    def __init__(self, folder: ImageFolder):
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, row: int) -> tuple[int, torch.Tensor, int]:
        x, label = self.folder[row]
        return row, x, (-1 if self.folder.samples[row][0] in self.folder.bad else label)


def _listing_hash(folder: ImageFolder) -> str:
    """Identifies the list of images and labels: a resumed run must see the same rows."""
    rel = [(os.path.relpath(p, folder.folder), label) for p, label in folder.samples]
    return hashlib.sha256(json.dumps([folder.classes, rel]).encode()).hexdigest()[:16]


def _ranges(blocks: np.ndarray) -> str:
    """[0 1 2 5 7 8] -> '0-2, 5, 7-8'."""
    parts, start = [], None
    for i, b in enumerate(blocks):
        if start is None:
            start = b
        if i + 1 == len(blocks) or blocks[i + 1] != b + 1:
            parts.append(f"{start}-{b}" if b != start else f"{b}")
            start = None
    return ", ".join(parts)


def _open_existing(out: str, vae_id: str, config: dict, listing: str, images: str) -> LatentStore:
    store = LatentStore(out, writable=True)
    if store.vae_id != vae_id:
        raise UserError(f"{out} holds latents of VAE {store.vae_id}, but this VAE is {vae_id}; "
                        f"pass a new output path, or the VAE that made the store")
    if store.attrs["config"] != config:
        raise UserError(f"{out} was made with other settings ({store.attrs['config']}, now {config}); "
                        f"re-run with those settings, or pass a new output path")
    started = store.attrs["inputs"]["images"]
    if started["listing"] != listing:
        if Path(started["path"]).resolve() != Path(images).resolve():
            raise UserError(f"{out} holds the latents of {started['path']} ({store.rows} images), not of {images}; "
                            f"pass a new output path for these")
        raise UserError(f"the images in {images} changed since {out} was started ({store.rows} images then); "
                        f"restore them, or pass a new output path")
    return store


def _wait_for_store(out: str) -> None:
    """Ranks other than 0 wait for rank 0 to create the store (no collectives needed)."""
    deadline = time.monotonic() + _WAIT_FOR_RANK0_S
    while probe(out) != "store":
        if time.monotonic() > deadline:
            raise UserError(f"rank 0 did not create {out} within {_WAIT_FOR_RANK0_S} s; check its log")
        time.sleep(1.0)


def encode(
    images: str | os.PathLike,
    out: str | os.PathLike,
    vae: RealsVAE | str | os.PathLike,
    batch_size: int = 64,
    device: str = "auto",
    precision: str = "bf16",
    flip: bool = False,
    workers: int | None = None,
    image_size: int | None = None,
    dtype: str = "float16",
    block_size: int = 256,
) -> dict:
    """Encode every image of a class folder into the latent store `out`; resumable, torchrun-aware."""
    with contextlib.ExitStack() as held:  # the store's folder, let go however the run ends
        return _encode(images, out, vae, batch_size, device, precision, flip, workers, image_size, dtype,
                       block_size, held)


def _encode(images, out, vae, batch_size, device, precision, flip, workers, image_size, dtype, block_size,
            held: contextlib.ExitStack) -> dict:
    started = time.perf_counter()
    out = str(out)
    if not is_url(out):  # where the store is written: its own folder once it exists, else the one it is made in
        check_writable(out if Path(out).is_dir() else Path(out).parent, "OUT", out)
    bundle = vae if isinstance(vae, RealsVAE) else load_reals_vae(vae)
    model = bundle.vae
    trained_size = bundle.manifest["config"].get("image_size")
    if image_size is None and trained_size is None:
        raise UserError("this VAE's folder does not say at which size it was trained; pass --image-size")
    if image_size is not None and trained_size is not None and image_size != trained_size:
        warn(f"encoding at {image_size} px, but the VAE was trained at {trained_size} px")
    size = int(image_size or trained_size)
    factor = model.downsample_factor
    if size % factor:
        raise UserError(f"image size {size} is not divisible by the VAE's downsampling factor {factor}")
    if dtype not in DTYPES:
        raise UserError(f"unknown latent dtype {dtype!r}; use {' or '.join(DTYPES)}")
    if batch_size < 1 or block_size < 1:
        raise UserError("--batch-size and --block-size must be positive")

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and is_h5(out):
        raise UserError(f"{out}: several processes cannot write one HDF5 file; under torchrun write a Zarr store")
    folder = ImageFolder(images, size, flip=False)  # both views are encoded with --flip, none is drawn
    listing = _listing_hash(folder)
    config = {"image_size": size, "flip": flip, "dtype": dtype, "block_size": block_size}
    latent_shape = (model.config.latent_channels, size // factor, size // factor)

    state = probe(out)
    if state == "other":
        raise UserError(f"{out} exists and is not a latent store; pass a new output path, or delete it")
    if rank == 0 and not is_h5(out) and not is_url(out):  # HDF5 locks its file itself; a URL has no lock
        held.enter_context(hold_folder(out, "reals encode", option="output path"))
        state = probe(out)  # as the last holder left it
    if state == "store":
        store = _open_existing(out, bundle.id, config, listing, folder.folder)
    elif rank == 0:
        # Absolute paths: train-dit and sample find the VAE through this one, from any directory.
        inputs = {"images": {"path": str(Path(folder.folder).resolve()), "count": len(folder), "listing": listing},
                  "vae": {"path": None if isinstance(vae, RealsVAE) else str(Path(vae).resolve()), "id": bundle.id}}
        attrs = {"id": artifact_id("latents", config, {"vae": bundle.id, "images": listing}), "config": config,
                 "inputs": inputs, "vae_id": bundle.id, "image_size": size, "classes": folder.classes,
                 "reals_version": __version__}
        store = create_store(out, rows=len(folder), latent_shape=latent_shape, views=2 if flip else 1,
                             dtype=dtype, block_size=block_size, attrs=attrs)
    else:
        _wait_for_store(out)
        store = _open_existing(out, bundle.id, config, listing, folder.folder)

    result = {"out": out, "vae_id": bundle.id, "rows": store.rows, "blocks": store.num_blocks,
              "latent_shape": latent_shape, "views": store.views}
    if store.complete:
        console.print(f"{out} is already complete ({store.count} latents); nothing to do", soft_wrap=True)
        return {**result, "already": True, "complete": True, "count": store.count,
                "skipped": store.skipped, "encoded": 0, "seconds": time.perf_counter() - started}

    if world == 1:
        store.discard_partial_writes()  # with several ranks, another rank's write may be in flight
    done = store.done_blocks()
    if done.any():
        console.print(f"resuming {out}: {int(done.sum())} of {len(done)} blocks already complete, skipped "
                      f"(blocks {_ranges(np.flatnonzero(done))})", soft_wrap=True)
    mine = [b for b in range(len(done)) if b % world == rank and not done[b]]
    bs = store.block_size
    batches = [list(range(s, min(s + batch_size, (b + 1) * bs, store.rows)))
               for b in mine for s in range(b * bs, min((b + 1) * bs, store.rows), batch_size)]

    dev = local_device(resolve_device(device))
    model = model.to(dev).eval()
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    loader = torch.utils.data.DataLoader(_Rows(folder), batch_sampler=batches, num_workers=workers,
                                         pin_memory=dev.type == "cuda")
    encoded, loop_start = 0, time.perf_counter()
    pending: list[tuple[np.ndarray, np.ndarray]] = []  # batches of the block being filled
    with progress() as bar, torch.inference_mode():
        task = bar.add_task(f"encode{f' rank {rank}' if world > 1 else ''}", total=sum(map(len, batches)))
        for rows, x, labels in loader:
            x = x.to(dev, non_blocking=True) * 2 - 1
            if flip:
                x = torch.cat([x, x.flip(3)])
            with autocast(dev, precision):
                mean, logvar = model.encode(x)
            post = torch.stack([mean.float(), torch.exp(0.5 * logvar.float())], 1)  # (V*n, 2, C, H, W)
            post = post.unflatten(0, (store.views, len(rows))).transpose(0, 1)  # (n, V, 2, C, H, W)
            post = post.to("cpu", torch.float16 if dtype == "float16" else torch.float32).numpy()
            post[labels.numpy() < 0] = 0  # rows of unreadable files hold no latent
            pending.append((post, labels.numpy()))
            encoded += len(rows)
            bar.update(task, advance=len(rows), status=f"{encoded / (time.perf_counter() - loop_start):.0f} img/s")
            block, end = int(rows[0]) // bs, int(rows[-1]) + 1
            if end == min((block + 1) * bs, store.rows):
                store.write_block(block, np.concatenate([p for p, _ in pending]),
                                  np.concatenate([lab for _, lab in pending]))
                pending = []

    loop_seconds = time.perf_counter() - loop_start
    grouped = torch.distributed.is_available() and torch.distributed.is_initialized()
    if grouped:
        torch.distributed.barrier()
    all_done = bool(store.done_blocks().all())
    # Without a process group, whichever rank sees every block done writes the (identical) totals.
    if all_done and (rank == 0 or not grouped):
        store.finalize()
    count, skipped = store.count, store.skipped
    if skipped:
        warn(f"{skipped} images in {folder.folder} could not be read and have no latent; "
             f"run `reals data check {shlex.quote(str(images))}` to list them")
    return {**result, "already": False, "complete": all_done, "count": count, "skipped": skipped,
            "encoded": encoded, "seconds": time.perf_counter() - started,
            "images_per_s": encoded / loop_seconds if encoded else 0.0}  # the encoding loop alone


def store_summary(store: LatentStore) -> list[tuple[str, object]]:
    """Rows of the `reals encode --info` table."""
    a = store.attrs
    c, h, w = store.latent_shape
    done = store.done_blocks()
    classes = store.classes
    rows = [
        ("store", store.path),
        ("complete", "yes" if store.complete else f"no: {int(done.sum())} of {len(done)} blocks encoded"),
        ("latents", store.count),
        ("skipped images", store.skipped),
        ("latent shape", f"{c}x{h}x{w}"),
        ("views", "image + horizontal flip" if store.views == 2 else "image"),
        ("dtype", a["config"]["dtype"]),
        ("image size", f"{a['image_size']} px"),
        ("classes", f"{len(classes)} ({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})"),
        ("VAE", f"{store.vae_id} ({a['inputs']['vae']['path'] or 'in memory'})"),
        ("images", a["inputs"]["images"]["path"]),
        ("block size", a["config"]["block_size"]),
        ("id", a["id"]),
        ("created", a["created"]),
    ]
    if store.complete:
        rows += [("latent mean", " ".join(f"{v:.4g}" for v in a["latent_mean"])),
                 ("latent std", " ".join(f"{v:.4g}" for v in a["latent_std"])),
                 ("statistics", a["stats"])]
    return rows


def print_store_info(path: str | os.PathLike) -> None:
    print_summary(f"latent store {path}", store_summary(LatentStore(path)))
