"""`reals sample`: images and latents from a trained DiT/SiT, at FID-50K scale.

Sample i is a function of (seed, i) alone: its initial noise and every per-step
noise come from its own generator, seeded by (seed, i), drawn on the CPU and then
moved, and its label is classes[i % len(classes)]. By default the network and the
decoder run on a batch's own rows, none padded; a matmul's rounding depends on its
shape, so the batch size is then part of the protocol. With `forward_batch` they run
on exactly that many rows (the last pass padded), and the result does not depend on
the batch size either. Either way it does not depend on the number of processes or
where a killed run stopped, bit for bit: batches never cross a block.

The indices are cut into blocks of `block_size`; under `torchrun` rank r takes
blocks r, r + world, ... Each finished block is written atomically to
`parts/block_NNNNNN.npz` (images, raw latents, labels); a block is done when its
file exists, so the same command run again does only the missing blocks and never
makes an index twice. Once every block is there, rank 0 assembles the outputs:

  samples.npz   ADM format: arr_0 = N x H x W x 3 uint8, arr_1 = N labels
  latents.zarr  the raw (unnormalised) latents as a latent store, for the probes
  grid.png      a preview, one row per class (the first 10 classes, 8 images each); images/NNNNNN.png with --png
  manifest.json kind "samples": the full protocol, written last
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import __version__, artifacts
from ..console import console, print_summary, progress
from ..data.latent_store import create_store
from ..errors import UserError
from ..models.attention import resolve_attention
from ..models.dit import DiT
from ..objectives.samplers import SamplerSpec, guided, noise_level, resolve_sampler, run_sampler
from ..runtime import PRECISIONS, allow_tf32, autocast, local_device, resolve_device
from .model_artifact import build_objective, load_model, load_vae, read_model_manifest, resolve_vae_path
from .training import SEED, check_values

KIND, FORMAT_VERSION = "samples", 1
PARTS, PROTOCOL = "parts", "protocol.json"
NPZ, GRID, LATENTS, PNG_DIR = "samples.npz", "grid.png", "latents.zarr", "images"
GRID_ROWS, GRID_COLS = 10, 8
_POLL_S = 2.0
TIME_CONVENTION = "noise level tau in [0, 1]: 0 data, 1 noise; SiT tau = 1 - t, DiT tau = step / 999"


@dataclass
class SampleConfig:
    ckpt: str
    out: str
    num_samples: int = 50_000
    cfg: float = 1.0
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    cfg_channels: int | None = None  # None: all latent channels; DiT's and SiT's releases guide the first 3 of 4
    classes: list[int | str] | None = None  # None: every class, sample i gets class i % num_classes
    sampler: str | None = None  # None: by objective (dit: ddpm, sit: sde)
    steps: int | None = None  # None: the sampler's default
    ode_method: str | None = None  # None for these three: not given (dopri5, 1e-3, 1e-6 where they apply)
    rtol: float | None = None
    atol: float | None = None
    ema: bool = True
    vae: str | None = None
    batch_size: int = 64
    forward_batch: int | None = None  # None: each pass runs the batch's rows, none padded
    block_size: int = 256
    png: bool = False
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    compile: bool = False
    attn: str = "auto"


class SampleNoise:
    """N(0, I) draws for a batch of sample indices, each row from its own (seed, index) stream.

    The CPU streams are what make sample i depend on (seed, i) alone, but a draw costs the
    host a few milliseconds per 256 rows. So the next draw is made on a background thread
    while the GPU runs the current step, into pinned memory that copies without a sync.
    The streams advance in the same order as without it: the samples do not change.
    """

    _thread: ThreadPoolExecutor | None = None  # one for every SampleNoise: draws stay in order

    def __init__(self, seed: int, indices: range | list[int], shape: tuple[int, ...], device: torch.device | str):
        # SeedSequence mixes (seed, index) into unrelated 64-bit seeds: neighbouring streams do not correlate.
        self.gens = [torch.Generator().manual_seed(int(np.random.SeedSequence([seed, i]).generate_state(1, np.uint64)[0]))
                     for i in indices]
        self.shape, self.device = tuple(shape), torch.device(device)
        if SampleNoise._thread is None:
            SampleNoise._thread = ThreadPoolExecutor(1, thread_name_prefix="reals-noise")
        self._next = SampleNoise._thread.submit(self._draw)

    def _draw(self) -> torch.Tensor:
        z = torch.stack([torch.randn(self.shape, generator=g) for g in self.gens])
        return z.pin_memory() if self.device.type == "cuda" else z

    def __call__(self, like: torch.Tensor | None = None) -> torch.Tensor:
        z, self._next = self._next.result(), SampleNoise._thread.submit(self._draw)
        return z.to(self.device, non_blocking=True) if like is None else z.to(like.device, like.dtype, non_blocking=True)


def _check(cfg: SampleConfig) -> None:
    low, high = cfg.cfg_interval
    if cfg.num_samples < 1:
        raise UserError(f"-n/--num-samples must be at least 1, got {cfg.num_samples}")
    if not 0 <= low <= high <= 1:
        raise UserError(f"--cfg-interval must be LOW,HIGH with 0 <= LOW <= HIGH <= 1 ({TIME_CONVENTION}), got {low},{high}")
    if not (math.isfinite(cfg.cfg) and cfg.cfg >= 0):
        raise UserError(f"--cfg must be a number >= 0 (1: no guidance), got {cfg.cfg}")
    if min(cfg.batch_size, 1 if cfg.forward_batch is None else cfg.forward_batch, cfg.block_size) < 1:
        raise UserError("--batch-size, --forward-batch and --block-size must be at least 1")
    check_values(cfg, {"seed": SEED})
    if cfg.cfg == 1 and (cfg.cfg_channels is not None or tuple(cfg.cfg_interval) != (0.0, 1.0)):
        raise UserError("--cfg-channels and --cfg-interval shape the guidance, and --cfg 1 is none; drop them, "
                        "or pass a --cfg other than 1")
    if cfg.cfg_channels is not None and cfg.cfg_channels < 1:
        raise UserError(f"--cfg-channels must be at least 1, got {cfg.cfg_channels}")
    if cfg.precision not in PRECISIONS:
        raise UserError(f"unknown --precision {cfg.precision!r}; use {', '.join(PRECISIONS)}")


def resolve_classes(classes: list[int | str] | None, config: dict) -> list[int]:
    """Class ids (ints or the checkpoint's class names) checked against the model; None: all of them."""
    names, n = config["classes"], config["num_classes"]
    if not classes:
        return list(range(n))
    ids = []
    for c in classes:
        if isinstance(c, str) and not c.lstrip("-").isdigit():
            if c not in names:
                raise UserError(f"unknown class name {c!r}; this model's classes are {', '.join(names[:10])}"
                                f"{', ...' if len(names) > 10 else ''}")
            ids.append(names.index(c))
        elif not 0 <= int(c) < n:
            raise UserError(f"class {c} is beyond this model's {n} classes (0 to {n - 1})")
        else:
            ids.append(int(c))
    return ids


def _part(parts: Path, block: int) -> Path:
    return parts / f"block_{block:06d}.npz"


def _done_blocks(parts: Path, num_blocks: int) -> np.ndarray:
    names = set(os.listdir(parts)) if parts.is_dir() else set()
    return np.array([_part(parts, b).name in names for b in range(num_blocks)])


def _claim(out: Path, protocol: dict, world: int) -> None:
    """Start `out`, or check that its unfinished run had this protocol; clear a killed run's temp files.
    A run that failed before its first block (a bad flag, a damaged checkpoint) made nothing: its
    protocol gives way to this one."""
    parts = out / PARTS
    saved = parts / PROTOCOL
    if saved.is_file() and any(parts.glob("block_*.npz")):  # the parts that _part names
        _same_protocol(out, json.loads(saved.read_text()), protocol)
    else:
        artifacts.atomic_write_json(saved, protocol)  # every rank writes the same bytes
    if world == 1:  # with several ranks, another rank's write may be in flight
        artifacts.discard_temporary(parts)


def _same_protocol(out: Path, saved: dict, protocol: dict, any_attention: bool = False, any_rows: bool = False) -> None:
    """Refuse `out` if its run had another protocol. Left out of the comparison: `png`, which
    was part of it before PNGs were written from samples.npz, the attention kernel where
    the run predates its record or where any will do (`any_attention`), and the passes' row
    counts, which change only the rounding, where any will do (`any_rows`)."""
    skip = {"png"} | ({"attention"} if any_attention or "attention" not in saved else set()) \
        | ({"forward_batch", "batch_size"} if any_rows else set())
    changed = [f"{k} {saved.get(k)!r} (now {protocol.get(k)!r})" for k in sorted((set(saved) | set(protocol)) - skip)
               if saved.get(k) != protocol.get(k)]
    if changed:
        raise UserError(f"{out} holds samples made with other settings: {', '.join(changed)}; "
                        f"run with those settings, or pass another --out")


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """N x 3 x H x W in [-1, 1] -> N x H x W x 3 uint8, rounded."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def sample(cfg: SampleConfig) -> dict:
    """Generate cfg.num_samples images and latents into cfg.out; resumable, torchrun-aware."""
    with contextlib.ExitStack() as held:  # what the run holds (its folder) is let go however it ends
        return _sample(cfg, held)


def _sample(cfg: SampleConfig, held: contextlib.ExitStack) -> dict:
    started = time.perf_counter()
    _check(cfg)
    manifest = read_model_manifest(cfg.ckpt)
    config = manifest["config"]
    spec = resolve_sampler(config["objective"], cfg.sampler, cfg.steps, cfg.ode_method, cfg.rtol, cfg.atol)
    classes = resolve_classes(cfg.classes, config)
    channels = config["latent_shape"][0]
    if cfg.cfg_channels is not None and cfg.cfg_channels > channels:
        raise UserError(f"--cfg-channels {cfg.cfg_channels} is more than the model's {channels} latent channels")
    if cfg.cfg_channels == channels:
        cfg = replace(cfg, cfg_channels=None)  # all of them, however it was said
    if cfg.compile and cfg.forward_batch is None:
        # A compiled graph is fixed to its first row count and then recompiled for any count, so
        # a sample's kernels would depend on the batches before it: one count, a full batch's rows.
        cfg = replace(cfg, forward_batch=cfg.batch_size * (1 if cfg.cfg == 1 else 2))
    device = local_device(resolve_device(cfg.device))
    if cfg.cfg != 1 and config["class_dropout"] <= 0:
        raise UserError(f"{cfg.ckpt} was trained without label dropout, so it has no unconditional class; "
                        f"it can only sample with --cfg 1")
    vae_path = resolve_vae_path(cfg.vae, config, cfg.ckpt)
    protocol = _protocol(cfg, manifest, spec, classes, device)
    out, n, bs = Path(cfg.out), cfg.num_samples, cfg.block_size
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))

    if artifacts.check_output_folder(out, KIND, [PARTS, NPZ, GRID, LATENTS, PNG_DIR], "reals sample"):
        done = artifacts.read_manifest(out, KIND, FORMAT_VERSION)
        # Run again on a finished folder, `--attn auto` accepts the kernel it was made with:
        # on another machine auto may resolve to another, and nothing is generated here. So
        # do the default passes accept its rows (a folder of the old default, --forward-batch 128).
        saved = {k: done["config"][k] for k in protocol if k in done["config"]}
        _same_protocol(out, saved, protocol, any_attention=cfg.attn == "auto", any_rows=cfg.forward_batch is None)
        shutil.rmtree(out / PARTS, ignore_errors=True)  # a run killed right after its manifest
        written = write_pngs(out) if cfg.png and rank == 0 else 0
        then = f"wrote {written} missing PNG{'s' * (written > 1)} into {out / PNG_DIR}" if written else "nothing to do"
        console.print(f"{out} is already complete ({n} samples); {then}", soft_wrap=True)
        return {"manifest": done, "already": True, "generated": 0}
    # Before any output: a wrong VAE, or weights changed or not finite, must not start a run.
    vae = load_vae(vae_path, config, cfg.ckpt)
    model = load_model(cfg.ckpt, manifest, cfg.ema, resolve_attention(cfg.attn, device))
    if rank == 0:  # one run a folder: a job submitted twice stops here
        held.enter_context(artifacts.hold_folder(out, "reals sample", keep=[PARTS]))  # _claim clears parts
    _claim(out, protocol, world)
    parts = out / PARTS
    num_blocks = -(-n // bs)
    done = _done_blocks(parts, num_blocks)
    if rank == 0:
        console.print(f"sample {n} from {cfg.ckpt} ({config['model']}, {_describe(spec)}, cfg {cfg.cfg}) on "
                      f"{device.type}{f' x {world}' if world > 1 else ''}, {protocol['precision']}, into {out}"
                      + (f"; resuming: {int(done.sum())} of {num_blocks} blocks already done" if done.any() else ""),
                      soft_wrap=True)
    mine = [b for b in range(num_blocks) if b % world == rank and not done[b]]
    labels = np.array([classes[i % len(classes)] for i in range(n)], dtype=np.int64)
    generated, loop_s = (_generate(cfg, config, model, spec, vae, device, mine, labels, parts, rank, world)
                         if mine else (0, 0.0))
    rate = generated / loop_s if generated else 0.0
    summary = {"generated": generated, "images_per_s": rate, "seconds": time.perf_counter() - started}
    if rank != 0:
        return {**summary, "already": False}

    if not (done := _done_blocks(parts, num_blocks)).all():  # the other ranks' blocks; torchrun ends us if one fails
        console.print(f"waiting for {int((~done).sum())} blocks of the other ranks", soft_wrap=True)
        while not _done_blocks(parts, num_blocks).all():
            time.sleep(_POLL_S)
    result = _assemble(cfg, config, protocol, parts, num_blocks, {**summary, "world_size": world}, device)
    if cfg.png:
        write_pngs(out)
    low, high = cfg.cfg_interval
    print_summary(f"samples {out} ({result['id']})", {
        "samples": n, "sampler": _describe(spec),
        "cfg": f"{cfg.cfg} on tau in [{low}, {high}], {protocol['cfg_channels']} channels",
        "weights": protocol["weights"], "images/s": f"{rate:.3g} (this process)" if generated else "-",
        "network evaluations / sample": result["metrics"]["network_evaluations_per_sample"]})
    return {**summary, "manifest": result, "already": False}


def _describe(spec: SamplerSpec) -> str:
    """"sde, steps 250, ..." for a person."""
    name, *rest = spec.settings().items()
    return ", ".join([name[1], *(f"{k} {v}" for k, v in rest)])


def _protocol(cfg: SampleConfig, manifest: dict, spec: SamplerSpec, classes: list[int], device: torch.device) -> dict:
    """Everything that decides the samples: compared on resume, recorded in the manifest."""
    config = manifest["config"]
    return {
        "ckpt_id": manifest["id"], "objective": config["objective"], "model": config["model"],
        "weights": "ema" if cfg.ema else "model", "vae_id": config["vae_id"], **spec.settings(),
        "cfg": cfg.cfg, "cfg_channels": cfg.cfg_channels or "all", "cfg_interval": list(cfg.cfg_interval),
        "cfg_interval_time": TIME_CONVENTION,
        "classes": None if cfg.classes is None else classes, "labels": "sample i has class classes[i % len(classes)]",
        "seed": cfg.seed, "noise": "per sample: torch CPU generator seeded by SeedSequence([seed, i])",
        "num_samples": cfg.num_samples, "block_size": cfg.block_size, "forward_batch": cfg.forward_batch,
        # Unpadded passes are as many rows as a batch has, which decides their rounding.
        **({"batch_size": cfg.batch_size} if cfg.forward_batch is None else {}),
        "precision": cfg.precision if device.type == "cuda" else "fp32",  # autocast is CUDA's only
        "compile": cfg.compile, "attention": resolve_attention(cfg.attn, device),  # kernels round differently
    }


def in_fixed_batches(fn: Callable[..., torch.Tensor], rows: int) -> Callable[..., torch.Tensor]:
    """fn over its inputs' rows in passes of exactly `rows` rows, the last padded with copies
    of its final row: every row then goes through kernels of one shape, so its result does
    not depend on how many rows came in (fn must treat rows independently)."""
    def run(*inputs: torch.Tensor) -> torch.Tensor:
        outs = []
        for start in range(0, len(inputs[0]), rows):
            part = [x[start:start + rows] for x in inputs]
            n = len(part[0])
            if n < rows:
                part = [torch.cat([x, x[-1:].expand(rows - n, *x.shape[1:])]) for x in part]
            outs.append(fn(*part)[:n])
        return torch.cat(outs)

    return run


@torch.inference_mode()
def generate(model: DiT, config: dict, vae, labels: torch.Tensor, indices: range, seed: int, spec: SamplerSpec,
             cfg: float = 1.0, interval: tuple[float, float] = (0.0, 1.0), precision: str = "fp32",
             forward_batch: int | None = None, cfg_channels: int | None = None,
             evaluations: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (n x H x W x 3) and raw latents for `labels`, on the model's device.

    Sample indices[j]'s noise depends only on (seed, indices[j]); the store's normalisation
    (config's latent_mean/std) is undone before decoding. The network and the decoder run
    on the rows the sampler gives them (None), or on `forward_batch` rows at a time, padded,
    whatever the number of labels. Guidance mixes the first `cfg_channels` prediction
    channels (None: all of the latent's). `evaluations`, if given, gets the number of rows of
    each network call, padding left out (a guided step counts two per sample).
    """
    device = next(model.parameters()).device
    objective = build_objective(config)
    shape = tuple(config["latent_shape"])
    mean = torch.tensor(config["latent_mean"], device=device).view(-1, 1, 1)
    std = torch.tensor(config["latent_std"], device=device).view(-1, 1, 1)

    passes = partial(in_fixed_batches, rows=forward_batch) if forward_batch else (lambda fn: fn)

    @passes
    def forward(x, t, y):
        with autocast(device, precision):
            return model(x, t, y).float()

    def net(x, t, y):
        if evaluations is not None:
            evaluations.append(len(x))
        return forward(x, t, y)

    @passes
    def decode(z):
        with autocast(device, precision):
            return vae.decode(z).float()

    guide = guided(net, cfg, interval, noise_level(objective), model.null_class, cfg_channels or shape[0])
    noise = SampleNoise(seed, indices, shape, device)
    z = run_sampler(objective, spec, guide, noise(), labels.to(device), noise) * std + mean
    return _to_uint8(decode(z)), z.cpu().numpy()


def _generate(cfg, config, model, spec, bundle, device, blocks, labels, parts, rank, world) -> tuple[int, float]:
    """Make and write this rank's blocks; (samples made, seconds). Each block's part file keeps
    its images, latents, labels and the rows it put through the network."""
    allow_tf32(device)
    model = model.to(device)
    if cfg.compile:
        model.compile_blocks(device)
    vae = bundle.vae.to(device)
    n, bs = len(labels), cfg.block_size
    total = sum(min((b + 1) * bs, n) - b * bs for b in blocks)
    made, start = 0, time.perf_counter()
    with progress() as bar:
        task = bar.add_task(f"sample{f' rank {rank}' if world > 1 else ''}", total=total)
        for b in blocks:
            lo, hi = b * bs, min((b + 1) * bs, n)
            images, latents, evaluations = [], [], []
            for s in range(lo, hi, cfg.batch_size):
                e = min(s + cfg.batch_size, hi)
                img, z = generate(model, config, vae, torch.from_numpy(labels[s:e]), range(s, e), cfg.seed, spec,
                                  cfg.cfg, cfg.cfg_interval, cfg.precision, cfg.forward_batch, cfg.cfg_channels,
                                  evaluations)
                images.append(img)
                latents.append(z)
                made += e - s
                bar.update(task, advance=e - s, status=f"{made / (time.perf_counter() - start):.3g} img/s")
            with artifacts.atomic_path(_part(parts, b)) as tmp, open(tmp, "wb") as f:
                np.savez(f, images=np.concatenate(images), latents=np.concatenate(latents), labels=labels[lo:hi],
                         evaluations=np.int64(sum(evaluations)))
    return made, time.perf_counter() - start


def write_pngs(out: Path) -> int:
    """images/NNNNNN.png for each sample in out's samples.npz that has none yet; how many it wrote.

    PNGs are a copy of the array, so they are not part of the protocol: `--png` on a finished
    folder writes them, and one cut off by a kill is completed (each file appears whole, by a
    rename). The array is streamed, never whole in memory.
    """
    folder = out / PNG_DIR
    folder.mkdir(exist_ok=True)

    def save(i: int, img: np.ndarray) -> None:
        tmp = folder / f".{i:06d}.png.tmp"
        Image.fromarray(img).save(tmp, format="PNG")
        os.replace(tmp, folder / f"{i:06d}.png")

    written = 0
    with zipfile.ZipFile(out / NPZ) as npz, npz.open("arr_0.npy") as f, ThreadPoolExecutor(4) as pool, progress() as bar:
        np.lib.format.read_magic(f)
        shape, _, _ = np.lib.format.read_array_header_1_0(f)  # as _assemble writes it
        n, size = shape[0], math.prod(shape[1:])
        task = bar.add_task("png", total=n)
        for start in range(0, n, 256):
            chunk = np.frombuffer(f.read(min(256, n - start) * size), np.uint8).reshape(-1, *shape[1:])
            todo = [i for i in range(start, start + len(chunk)) if not (folder / f"{i:06d}.png").is_file()]
            list(pool.map(lambda i: save(i, chunk[i - start]), todo))
            written += len(todo)
            bar.update(task, advance=len(chunk))
    return written


def _assemble(cfg, config, protocol, parts, num_blocks, summary, device) -> dict:
    """samples.npz, latents.zarr and grid.png from the finished parts, then the manifest; parts removed.

    Streamed block by block, so 50,000 256 px images (10 GB) never sit in memory at once.
    Starting over after a kill here is safe: every output is rewritten whole.
    """
    out, n = parts.parent, cfg.num_samples  # an assembly cut off by a kill left temp files: hold_folder cleared them
    with np.load(_part(parts, 0)) as first:
        h, w = first["images"].shape[1:3]
    shape = tuple(config["latent_shape"])
    vae = {"path": str(Path(cfg.vae or config["vae_path"]).resolve()), "id": config["vae_id"]}
    store_config = {"block_size": cfg.block_size, "dtype": "float32", "flip": False, "image_size": h,
                    "source": "reals sample"}
    latents_id = artifacts.artifact_id("latents", store_config, {"samples": json.dumps(protocol, sort_keys=True)})
    store = create_store(out / LATENTS, rows=n, latent_shape=shape, views=1, dtype="float32",
                         block_size=cfg.block_size, attrs={
        "id": latents_id,
        "config": store_config, "vae_id": config["vae_id"], "image_size": h, "classes": config["classes"],
        "inputs": {"images": {"path": str(out / NPZ), "count": n}, "vae": vae}, "reals_version": __version__,
    })
    labels, preview, evaluations = [], {}, []
    with artifacts.atomic_path(out / NPZ) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as npz:
        with npz.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (n, h, w, 3)})
            for b in range(num_blocks):
                with np.load(_part(parts, b)) as stored:
                    part = dict(stored)
                f.write(np.ascontiguousarray(part["images"]).tobytes())
                z = part["latents"]
                # As a posterior [mean, std] = [z, 0], one view: readers take the mean.
                store.write_block(b, np.stack([z, np.zeros_like(z)], 1)[:, None], part["labels"])
                labels.append(part["labels"])
                evaluations.append(int(part["evaluations"]) if "evaluations" in part else None)  # None: an older part
                for img, label in zip(part["images"], part["labels"].tolist()):
                    if label in preview or len(preview) < GRID_ROWS:
                        row = preview.setdefault(label, [])
                        if len(row) < GRID_COLS:
                            row.append(img)
        with npz.open("arr_1.npy", "w") as f:
            np.lib.format.write_array(f, np.concatenate(labels))
    store.finalize()
    grid = np.zeros((len(preview) * h, max(map(len, preview.values())) * w, 3), np.uint8)
    for r, label in enumerate(sorted(preview)):
        for c, img in enumerate(preview[label]):
            grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = img
    with artifacts.atomic_path(out / GRID) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
    full = {**protocol, "image_size": [h, w], "latent_shape": list(shape), "latent_mean": config["latent_mean"],
            "latent_std": config["latent_std"], "batch_size": cfg.batch_size, "device": device.type,
            "latents_id": latents_id}
    inputs = {"ckpt": artifacts.describe_input(cfg.ckpt), "vae": vae}
    # The sampler's cost as it ran: for dopri5 the steps it chose, for a guidance interval the steps it left unguided.
    nfe = None if None in evaluations else sum(evaluations) / n
    metrics = {**summary, "network_evaluations_per_sample": nfe}
    result = artifacts.write_manifest(out, KIND, FORMAT_VERSION, full, inputs, metrics, files=[NPZ, GRID])
    shutil.rmtree(parts)
    return result
