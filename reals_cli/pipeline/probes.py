"""Training-free downstream tasks: linear heads fitted on teacher features, applied to latents.

A head is fitted once on a frozen teacher's features of real labelled images. Because
the ReaLS alignment network maps a latent onto those features, the same head then reads
latents, real or generated, with no further training. `evaluate_head` scores three
feature sources on the same held-out images:
  (a) teacher      the teacher's own features: the upper bound;
  (b) reals        align(posterior mean of the ReaLS VAE): the training-free path;
  (c) baseline     the same for a VAE trained with --align-weight 0 (its alignment network
                   was fitted to detached latents), the control the paper compares with.

Heads follow DINOv2's linear heads. Segmentation: BatchNorm + 1x1 conv on the patch grid,
logits upsampled bilinearly to the image. Depth (BNHead): the global feature broadcast to
every patch and concatenated to it, BatchNorm + 1x1 conv to 256 bins, logits upsampled 4x,
depth = probability-weighted centres of linear bins over [min_depth, max_depth], upsampled
to the image. Our fitted heads normalise the bins with a softmax; DINOv2's released head
(`load_dinov2_depth_head`) uses its own "linear" normalisation (ReLU + 0.1, divided by
the sum), which is kept for it. Losses: cross-entropy (255 ignored) and DINOv2's SigLoss.

Teacher features are computed with the VAE manifest's teacher settings (name,
resolution, weights) on images at the VAE's image size, so a head sees the grid the
alignment network predicts. They are cached in one safetensors file per (dataset
fingerprint, teacher), so a second fit, or the evaluation's teacher row, skips the teacher.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from rich.table import Table
from torch import nn

from ..artifacts import (

    MANIFEST, atomic_path, atomic_write_json, check_output_folder, describe_input, load_weights, provenance,

    read_manifest, save_weights, torch_load, verify_files, write_manifest,

)
from ..console import console, print_summary, progress, warn
from ..data.probe_sets import ProbeData, open_probe_data
from ..errors import UserError
from ..metrics.probe_metrics import IGNORE_INDEX, DepthMeter, SegMeter, valid_depth
from ..models.reals_vae import RealsVAE, load_reals_vae
from ..runtime import autocast, resolve_device, seed_everything
from .training import AT_LEAST_ONE, POSITIVE, SEED, check_values

KINDS = {"seg": "probe-seg", "depth": "probe-depth"}
EVAL_KINDS = {"seg": "probe-seg-eval", "depth": "probe-depth-eval"}
FORMAT_VERSION = 1
HEAD_FILE = "head.safetensors"
METRICS_FILE, PANELS_FILE = "metrics.json", "panels.png"
# decoded | teacher on decoded | aligned latent, for each VAE's generated latents (--latents, --baseline-latents)
GENERATED_FILES = {"reals": "generated-reals.png", "baseline": "generated-baseline.png"}
DEPTH_UPSAMPLE = 4  # DINOv2's BNHead upsamples the patch grid 4x before predicting bins
SIG_LAMBDA, SIG_EPS = 0.15, 1e-3  # DINOv2's SigLoss
# (key, label) of each task's scores as printed; the first is the primary one (lower is better for depth)
SCORES = {"seg": [("miou", "mIoU"), ("pixel_acc", "pixel accuracy")],
          "depth": [("rmse", "RMSE (m)"), ("absrel", "AbsRel"), ("delta1", "delta1"), ("images", "images scored")]}
# (table row, panel column) of each feature source
WAYS = {"teacher": ("teacher (upper bound)", "teacher"), "reals": ("ReaLS VAE: align(latent)", "ReaLS"),
        "baseline": ("baseline VAE: align(latent)", "baseline"), "constant": ("constant (training prior)", "constant")}


# -- heads ----------------------------------------------------------------------------------------

def unit_features(patch: torch.Tensor, glob: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token and the global feature scaled to unit length.

    The alignment loss is 90% cosine: the alignment network learns the teacher's feature
    directions, not their norms (its outputs are a few percent of a VGG feature's norm). A
    head that reads directions only applies to teacher and aligned features alike.
    """
    return F.normalize(patch, dim=1), F.normalize(glob, dim=1)


class SegHead(nn.Module):
    def __init__(self, dim: int, num_classes: int, unit: bool = True):
        super().__init__()
        self.bn = nn.BatchNorm2d(dim)
        self.conv_seg = nn.Conv2d(dim, num_classes, 1)
        self.unit = unit

    def forward(self, patch: torch.Tensor, glob: torch.Tensor, size: int) -> torch.Tensor:
        """Class logits B x K x size x size."""
        if self.unit:
            patch, glob = unit_features(patch, glob)
        return F.interpolate(self.conv_seg(self.bn(patch)), size=(size, size), mode="bilinear", align_corners=False)


class DepthHead(nn.Module):
    def __init__(self, dim: int, min_depth: float, max_depth: float, bins: int = 256, norm: str = "softmax",
                 unit: bool = True):
        super().__init__()
        self.bn = nn.BatchNorm2d(2 * dim)
        self.conv_depth = nn.Conv2d(2 * dim, bins, 1)
        self.norm, self.unit = norm, unit
        self.register_buffer("centres", torch.linspace(min_depth, max_depth, bins), persistent=False)

    def forward(self, patch: torch.Tensor, glob: torch.Tensor, size: int) -> torch.Tensor:
        """Depth B x size x size, in the units of the bins (metres)."""
        if self.unit:
            patch, glob = unit_features(patch, glob)
        x = torch.cat([patch, glob[:, :, None, None].expand_as(patch)], dim=1)
        logits = self.conv_depth(self.bn(x))
        # DINOv2 upsamples the features before the conv; both are linear per pixel, so this is the same.
        h, w = logits.shape[-2:]
        logits = F.interpolate(logits, size=(h * DEPTH_UPSAMPLE, w * DEPTH_UPSAMPLE), mode="bilinear", align_corners=False)
        if self.norm == "softmax":
            prob = logits.softmax(dim=1)
        else:  # DINOv2's "linear" strategy (AdaBins)
            prob = torch.relu(logits) + 0.1
            prob = prob / prob.sum(dim=1, keepdim=True)
        depth = torch.einsum("bkhw,k->bhw", prob, self.centres)[:, None]
        return F.interpolate(depth, size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def build_head(config: dict) -> nn.Module:
    unit = config.get("features") == "unit"
    if config["task"] == "seg":
        return SegHead(config["teacher_dim"], len(config["classes"]), unit)
    return DepthHead(config["teacher_dim"], config["min_depth"], config["max_depth"], config["bins"], config["norm"], unit)


def predict(head: nn.Module, task: str, patch: torch.Tensor, glob: torch.Tensor, size: int) -> torch.Tensor:
    """Label maps (seg) or depth maps, B x size x size, on the CPU."""
    out = head(patch.float(), glob.float(), size)
    return (out.argmax(1) if task == "seg" else out).cpu()


def seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # Summed over labelled pixels, then divided: a batch with none gives 0, not NaN.
    labelled = (target != IGNORE_INDEX).sum().clamp(min=1)
    return F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum") / labelled


def sig_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DINOv2's SigLoss over measured pixels: sqrt(Var(g) + 0.15 mean(g)^2), g = log pred - log target."""
    valid = target > 0
    if valid.sum() < 2:
        return pred.sum() * 0
    g = torch.log(pred[valid] + SIG_EPS) - torch.log(target[valid] + SIG_EPS)
    return (g.var() + SIG_LAMBDA * g.mean() ** 2).clamp(min=1e-12).sqrt()


def load_dinov2_depth_head(path: str | os.PathLike, teacher_dim: int) -> dict[str, torch.Tensor]:
    """A released DINOv2 linear depth head (`dinov2_vit{s,b,l,g}14_{nyu,kitti}_linear_head.pth`)
    as a DepthHead state dict.

    The file is an mmcv checkpoint, {"state_dict": {"decode_head.conv_depth.weight":
    256 x 2D x 1 x 1, "decode_head.conv_depth.bias": 256}} (read with weights_only); its
    input channels are the last block's patch tokens then the class token. The release has
    no BatchNorm (BNHead's `bn` is commented out): where the file has no `decode_head.bn.*`,
    our BatchNorm is set to the identity. The `linear4` files (4 layers, 8D channels) need
    intermediate layers this project's teachers do not return, and are refused.
    """
    ckpt = torch_load(path)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else {}
    state = {k.removeprefix("decode_head."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    weight = state.get("conv_depth.weight")
    if weight is None or weight.dim() != 4 or "conv_depth.bias" not in state:
        raise UserError(f"{path} has no decode_head.conv_depth weight and bias: not a DINOv2 linear depth head")
    channels = weight.shape[1]
    if channels == 8 * teacher_dim:
        raise UserError(f"{path} is a 4-layer (linear4) head; this teacher gives only the last layer: "
                        f"use the 1-layer *_linear_head.pth file")
    if channels != 2 * teacher_dim:
        raise UserError(f"{path} reads {channels} channels (2 x {channels // 2}-d features), but this VAE's teacher "
                        f"is {teacher_dim}-d; use the head of the matching DINOv2 size")
    eps = nn.BatchNorm2d(1).eps
    identity = {"bn.weight": torch.ones(channels), "bn.bias": torch.zeros(channels),
                "bn.running_mean": torch.zeros(channels), "bn.running_var": torch.full((channels,), 1 - eps),
                "bn.num_batches_tracked": torch.tensor(0)}  # 1 - eps: (x - 0) / sqrt(var + eps) is exactly x
    bn = {k: state[k] for k in identity if k in state}
    return {**identity, **bn, "conv_depth.weight": weight.float(), "conv_depth.bias": state["conv_depth.bias"].float()}


# -- data and teacher settings --------------------------------------------------------------------

@dataclass
class DataSpec:
    """Where and how to read labelled data (the CLI's data flags); `open` gives one split."""

    task: str
    path: str
    fmt: str = "auto"
    limit: int | None = None
    classes: list[str] | None = None
    splits: str | None = None
    depth_scale: float = 1000.0

    def open(self, split: str, size: int, classes: list[str] | None = None) -> ProbeData:
        return open_probe_data(self.task, self.path, split, size, self.fmt, self.limit, classes or self.classes,
                               self.splits, self.depth_scale)


@dataclass
class TeacherSpec:
    """The teacher a VAE was aligned to, as its manifest records it."""

    name: str
    dim: int
    resolution: int | None
    weights: str | None
    image_size: int

    @classmethod
    def of(cls, bundle: RealsVAE) -> "TeacherSpec":
        c = bundle.manifest["config"]
        return cls(c["teacher"], int(c["teacher_dim"]), c.get("teacher_resolution"), c.get("teacher_weights"),
                   int(c["image_size"]))

    def identity(self) -> dict:
        weights = None
        if self.weights and os.path.isfile(self.weights):
            st = os.stat(self.weights)
            weights = [os.path.abspath(self.weights), st.st_size, st.st_mtime_ns]
        return {"teacher": self.name, "resolution": self.resolution, "weights": weights}


def default_cache_dir() -> Path:
    from ..assets import reals_home

    return reals_home() / "probe-features"


def teacher_features(data: ProbeData, spec: TeacherSpec, cache_dir: str | os.PathLike | None, device: torch.device,
                     precision: str, batch_size: int) -> dict[str, torch.Tensor]:
    """{"patch": N x D x h x w, "global": N x D (float16), "target": N x S x S} of every image of `data`."""
    key = hashlib.sha256(json.dumps([data.fingerprint(), spec.identity()]).encode()).hexdigest()[:24]
    path = Path(cache_dir or default_cache_dir()) / f"{data.task}-{spec.name}-{key}.safetensors"
    if path.is_file():
        try:
            cached = load_weights(path)
        except UserError as e:
            warn(f"{e}; computing the features again")
        else:
            if len(cached.get("target", ())) == len(data):
                console.print(f"teacher features: cached, {path}", soft_wrap=True)
                return cached
    from ..models.teachers import build_teacher

    teacher = build_teacher(spec.name, spec.weights, spec.resolution).to(device)
    parts: dict[str, list[torch.Tensor]] = {"patch": [], "global": [], "target": []}
    started = time.perf_counter()
    with progress(transient=True) as bar:
        task = bar.add_task(f"{spec.name} features, {data.split}", total=len(data))
        for images, targets in torch.utils.data.DataLoader(data, batch_size=batch_size):
            with autocast(device, precision):
                patch, glob = teacher(images.to(device))
            parts["patch"].append(patch.half().cpu())
            parts["global"].append(glob.half().cpu())
            parts["target"].append(targets.to(torch.uint8) if data.task == "seg" else targets)
            bar.advance(task, len(images))
    feats = {k: torch.cat(v) for k, v in parts.items()}
    save_weights(path, feats, metadata={"data": json.dumps(data.describe()), "teacher": json.dumps(spec.identity())})
    console.print(f"teacher features: {len(data)} images in {time.perf_counter() - started:.1f} s, cached at {path}",
                  soft_wrap=True)
    return feats


def _batches(n: int, batch_size: int, generator: torch.Generator | None = None):
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return order.split(batch_size)


def _meter(task: str, classes: list[str] | None):
    return SegMeter(len(classes)) if task == "seg" else DepthMeter()


@torch.no_grad()
def _score_features(head, config: dict, feats: dict, device, batch_size: int) -> dict:
    head.eval()
    meter = _meter(config["task"], config.get("classes"))
    for idx in _batches(len(feats["target"]), batch_size):
        pred = predict(head, config["task"], feats["patch"][idx].to(device), feats["global"][idx].to(device),
                       config["image_size"])
        meter.add(pred.numpy(), feats["target"][idx].numpy())
    return meter.result()


# -- fit ------------------------------------------------------------------------------------------

def training_prior(task: str, targets: torch.Tensor) -> float | int:
    """The best feature-free guess: the mean measured depth, or the most frequent labelled class.
    Evaluation scores it beside the features: features that do not beat it carry nothing."""
    t = targets.numpy()
    if task == "depth":
        return float(t[valid_depth(t)].astype(np.float64).mean())
    return int(np.bincount(t[t != IGNORE_INDEX].ravel().astype(np.int64)).argmax())


def _depth_range(data: ProbeData, targets: torch.Tensor, min_depth: float | None, max_depth: float | None):
    measured = targets[torch.from_numpy(valid_depth(targets.numpy()))]
    if measured.numel() == 0:
        raise UserError(f"no pixel of {data.path} ({data.split}) has a depth measurement (all 0, NaN or inf)")
    lo, hi = data.default_range or (float(measured.min()), float(measured.max()))
    lo, hi = min_depth if min_depth is not None else lo, max_depth if max_depth is not None else hi
    if not 0 < lo < hi < math.inf:
        raise UserError(f"the depth range must satisfy 0 < --min-depth < --max-depth, got {lo:g} .. {hi:g}")
    return lo, hi


def _check_classes(data: ProbeData, targets: torch.Tensor) -> None:
    """Refuse labels past the class list before training: each image's labels are checked as it is
    read, but features from the cache (made under any --classes) skip the reading."""
    labels = targets[targets != IGNORE_INDEX]
    top, n = (int(labels.max()) if labels.numel() else -1), len(data.classes)
    if top >= n:
        raise UserError(f"{data.path} ({data.split}) has label {top}, outside the {n} classes (0..{n - 1}); "
                        f"pass --classes with {top + 1} names, one for each label 0..{top}")


def _train_head(head: nn.Module, config: dict, feats: dict, epochs: int, batch_size: int, lr: float, seed: int,
                device: torch.device) -> float:
    """AdamW with the rate decayed linearly to 0 (DINOv2's linear probes use a poly schedule); last epoch's mean loss."""
    loss_fn = seg_loss if config["task"] == "seg" else sig_loss
    n = len(feats["target"])
    steps = epochs * math.ceil(n / batch_size)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / steps)
    generator = torch.Generator().manual_seed(seed)
    head.train()
    with progress(transient=True) as bar:
        task = bar.add_task(f"fitting {KINDS[config['task']]} head", total=epochs)
        for _ in range(epochs):
            total = 0.0
            for idx in _batches(n, batch_size, generator):
                target = feats["target"][idx].to(device)
                out = head(feats["patch"][idx].to(device).float(), feats["global"][idx].to(device).float(),
                           config["image_size"])
                loss = loss_fn(out, target.long() if config["task"] == "seg" else target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                schedule.step()
                total += float(loss.detach()) * len(idx)
            bar.update(task, advance=1, status=f"loss {total / n:.4f}")
    return total / n


def fit_head(data: DataSpec, vae: str | os.PathLike, out: str | os.PathLike, *, split: str = "train",
             epochs: int = 20, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
             min_depth: float | None = None, max_depth: float | None = None, bins: int = 256,
             dinov2_head: str | None = None, cache_dir: str | None = None, device: str = "auto",
             precision: str = "fp32") -> dict:
    """Fit a head on teacher features of `data` (or import DINOv2's depth head) into the artifact `out`."""
    out = Path(out)
    if check_output_folder(out, KINDS[data.task], [HEAD_FILE], f"reals {KINDS[data.task]} fit"):
        raise UserError(f"{out} already holds a finished head; pass another --out, or delete it to fit again")
    check_values({"epochs": epochs, "batch_size": batch_size, "bins": bins, "lr": lr, "seed": seed},
                 {**dict.fromkeys(("epochs", "batch_size", "bins"), AT_LEAST_ONE), "lr": POSITIVE, "seed": SEED})
    seed_everything(seed)
    dev = resolve_device(device)
    bundle = load_reals_vae(vae, need_align=True)
    spec = TeacherSpec.of(bundle)
    config = {"task": data.task, "teacher": spec.name, "teacher_dim": spec.dim, "teacher_resolution": spec.resolution,
              "teacher_grid": bundle.align.config.teacher_grid, "image_size": spec.image_size}
    inputs = {"vae": describe_input(vae)}
    started = time.perf_counter()
    if dinov2_head is not None:
        if data.path is not None:
            warn("--dinov2-head imports a fitted head: --data is not used")
        if data.task != "depth" or not spec.name.startswith("dinov2"):
            raise UserError(f"--dinov2-head is DINOv2's depth head; VAE {vae} is aligned to {spec.name}")
        state = load_dinov2_depth_head(dinov2_head, spec.dim)
        lo = 0.001 if min_depth is None else min_depth  # the release's NYU range
        hi = 10.0 if max_depth is None else max_depth
        config |= {"min_depth": lo, "max_depth": hi, "bins": state["conv_depth.weight"].shape[0], "norm": "linear",
                   "source": "dinov2-release", "features": "raw",
                   "note": "trained on DINOv2's last-block tokens before the final LayerNorm; this project's "
                           "teacher features are after it, so expect a shift"}
        head = build_head(config)
        head.load_state_dict(state)
        inputs["dinov2_head"] = describe_input(dinov2_head)
        metrics = {}
    else:
        train = data.open(split, spec.image_size)
        feats = teacher_features(train, spec, cache_dir, dev, precision, batch_size)
        if data.task == "seg":
            _check_classes(train, feats["target"])
            config |= {"classes": train.classes}
        else:
            lo, hi = _depth_range(train, feats["target"], min_depth, max_depth)
            config |= {"min_depth": lo, "max_depth": hi, "bins": bins, "norm": "softmax"}
        config["constant"] = training_prior(data.task, feats["target"])
        config |= {"source": "fit", "data": train.describe(), "epochs": epochs, "batch_size": batch_size, "lr": lr,
                   "seed": seed, "features": "unit"}
        # Seeded here, not only above: computing the features draws from the global RNG (the
        # DataLoader's base seed) and reading them from the cache does not, so the head's
        # initialisation would otherwise depend on whether the cache was warm.
        seed_everything(seed)
        head = build_head(config).to(dev)
        loss = _train_head(head, config, feats, epochs, batch_size, lr, seed, dev)
        metrics = {"final_loss": loss, "train": _score_features(head, config, feats, dev, batch_size)}
        inputs["data"] = describe_input(data.path)
    metrics["seconds"] = round(time.perf_counter() - started, 2)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(out / HEAD_FILE, head.state_dict())
    manifest = write_manifest(out, KINDS[data.task], FORMAT_VERSION, config, inputs, metrics, files=[HEAD_FILE])
    rows = [("teacher", f"{spec.name} ({spec.dim}-d, {config['teacher_grid']}x{config['teacher_grid']} grid)"),
            ("image size", spec.image_size)]
    if data.task == "seg":
        rows.append(("classes", len(config["classes"])))
    else:
        rows.append(("depth bins", f"{config['bins']} over {config['min_depth']:g} .. {config['max_depth']:g} m"))
    if "train" in metrics:
        scores = [k for k in ("miou", "pixel_acc", "rmse", "absrel", "delta1") if k in metrics["train"]]
        rows += [("images", config["data"]["images"]), ("final loss", metrics["final_loss"]),
                 *[(f"train {k}", metrics["train"][k]) for k in scores]]
    rows.append(("seconds", metrics["seconds"]))
    print_summary(f"{KINDS[data.task]} head {out} ({manifest['id']})", rows)
    return manifest


# -- evaluation -----------------------------------------------------------------------------------

def load_head(path: str | os.PathLike, manifest: dict) -> nn.Module:
    """The head of an artifact whose manifest has been read (and its teacher checked)."""
    verify_files(path, manifest)
    head = build_head(manifest["config"])
    try:
        head.load_state_dict(load_weights(Path(path) / HEAD_FILE))
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise UserError(f"{path}: the head's weights do not fit its manifest ({first}); fit it again") from None
    return head.eval()


def check_teacher(head_manifest: dict, head_path, bundle: RealsVAE, vae_path) -> None:
    """A head reads one teacher's features: refuse a VAE aligned to another teacher."""
    h, v = head_manifest["config"], bundle.manifest["config"]
    if (h["teacher"], h["teacher_dim"]) != (v.get("teacher"), v.get("teacher_dim")):
        raise UserError(f"head {head_path} was fitted on {h['teacher']} features ({h['teacher_dim']}-d), but VAE "
                        f"{vae_path} is aligned to {v.get('teacher')} ({v.get('teacher_dim')}-d); fit a head with "
                        f"--vae {vae_path}")
    if h["teacher_resolution"] != v.get("teacher_resolution"):
        warn(f"head {head_path} was fitted at teacher resolution {h['teacher_resolution']}, VAE {vae_path} "
             f"is aligned at {v.get('teacher_resolution')}")


def load_latents(path: str | os.PathLike, bundle: RealsVAE, count: int) -> torch.Tensor:
    """Up to `count` unnormalised latents (N x C x h x w): from a latent store (`reals sample`'s
    latents.zarr, whose posterior means are the generated latents, or a `reals encode` store:
    stores keep raw latents, so nothing is denormalised), or from a .safetensors/.npz/.npy
    file (the array `latents`, or its only array)."""
    path = str(path)
    if path.endswith(".safetensors") or path.endswith((".npz", ".npy")):
        if path.endswith(".safetensors"):
            arrays = load_weights(path)
        else:
            try:
                loaded = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise UserError(f"cannot read {path} as numpy data ({e})") from None
            arrays = {"latents": loaded} if isinstance(loaded, np.ndarray) else dict(loaded)
        if "latents" not in arrays and len(arrays) != 1:
            raise UserError(f"{path} holds {sorted(arrays)}; name the latents array 'latents'")
        z = torch.as_tensor(arrays["latents"] if "latents" in arrays else next(iter(arrays.values())))
    else:
        from ..data.latent_store import open_store

        store = open_store(path)
        if not store.complete:
            raise UserError(f"{path} is an unfinished latent store; finish it with the same `reals encode` command")
        if store.vae_id != bundle.id:
            raise UserError(f"{path} holds latents of VAE {store.vae_id}, not of this VAE ({bundle.id})")
        rows = np.flatnonzero(store.labels >= 0)[:count]
        z = torch.from_numpy(store.read(rows)[:, 0, 0].astype(np.float32))  # view 0, posterior mean
    if z.dim() != 4:
        raise UserError(f"latents in {path} have shape {tuple(z.shape)}; expected N x C x h x w")
    return z[:count].float()


def evaluate_head(data: DataSpec, vae: str | os.PathLike, head_path: str | os.PathLike, *, split: str = "test",
                  baseline_vae: str | None = None, latents: str | None = None, baseline_latents: str | None = None,
                  latent_count: int = 1000, out: str | None = None, panels: int = 8, batch_size: int = 64,
                  cache_dir: str | None = None, device: str = "auto", precision: str = "fp32") -> dict:
    """Score the head three ways on `split`, and on generated latents of each VAE (`latents`,
    `baseline_latents`) against the head on the teacher's features of their decoded images; write
    metrics.json, PNG panels (none when `panels` is 0) and, last, a manifest into the artifact `out`."""
    kind, command = KINDS[data.task], f"reals {KINDS[data.task]}"
    if Path(head_path).is_file():
        hint = (f" (to import DINOv2's released head: `{command} fit --dinov2-head {head_path} --vae VAE --out DIR`, "
                f"then --head DIR)" if data.task == "depth" else "")
        raise UserError(f"--head {head_path} is a file; --head takes a head folder made by `{command} fit`{hint}")
    if baseline_latents is not None and baseline_vae is None:
        raise UserError("--baseline-latents are read through the baseline VAE's alignment network; "
                        "pass --baseline-vae too")
    dev = resolve_device(device)
    head_manifest = read_manifest(head_path, kind, FORMAT_VERSION)
    config = head_manifest["config"]
    out = Path(out) if out else Path(head_path) / f"eval-{split}"
    check_output_folder(out, EVAL_KINDS[data.task], [METRICS_FILE, PANELS_FILE, *GENERATED_FILES.values()],
                        f"{command} eval")
    vaes = {"reals": (vae, load_reals_vae(vae, need_align=True))}
    if baseline_vae is not None:
        vaes["baseline"] = (baseline_vae, load_reals_vae(baseline_vae, need_align=True))
    for path, bundle in vaes.values():
        check_teacher(head_manifest, head_path, bundle, path)
        bundle.vae.to(dev)
        bundle.align.to(dev)
    head = load_head(head_path, head_manifest).to(dev)
    spec = TeacherSpec.of(vaes["reals"][1])
    if "baseline" in vaes and TeacherSpec.of(vaes["baseline"][1]).image_size != spec.image_size:
        raise UserError(f"--baseline-vae {baseline_vae} works at {TeacherSpec.of(vaes['baseline'][1]).image_size} px, "
                        f"VAE {vae} at {spec.image_size} px; compare VAEs trained at one size")
    test = data.open(split, spec.image_size, config.get("classes"))
    feats = teacher_features(test, spec, cache_dir, dev, precision, batch_size)
    results, shown = _score_split(test, feats, head, config, {w: b for w, (_, b) in vaes.items()}, panels, batch_size,
                                  dev, precision)
    key, higher_is_better = SCORES[data.task][0][0], data.task == "seg"

    def better(way: str, other: str) -> bool | None:
        if other not in results:
            return None
        b, c = results[way][key], results[other][key]
        return bool(b > c) if higher_is_better else bool(b < c)

    beats, informative = better("reals", "baseline"), better("reals", "constant")

    generated_paths = {w: p for w, p in (("reals", latents), ("baseline", baseline_latents)) if p is not None}
    generated, generated_cells = {}, {}
    if generated_paths:
        from ..models.teachers import build_teacher

        teacher = build_teacher(spec.name, spec.weights, spec.resolution).to(dev)
        for way, path in generated_paths.items():
            generated[way], generated_cells[way] = _score_generated(path, vaes[way][1], teacher, head, config,
                                                                    latent_count, panels, batch_size, dev, precision)

    out.mkdir(parents=True, exist_ok=True)
    # An earlier run's: a re-run killed halfway must not look finished, nor keep pictures it did not draw.
    for name in (MANIFEST, PANELS_FILE, *GENERATED_FILES.values()):
        (out / name).unlink(missing_ok=True)
    files = [METRICS_FILE]
    if panels > 0:
        drawn = [w for w in results if w != "constant"]  # a flat map says nothing on a panel
        columns = ["image", "ground truth", *[WAYS[w][1] for w in drawn]]
        cells = [[_rgb(shown["image"][i])] + [_colorize(shown[k][i], config) for k in ["target", *drawn]]
                 for i in range(len(shown["image"]))]
        _save_png(out / PANELS_FILE, _panel(columns, cells, config))
        files.append(PANELS_FILE)
        for way, cells in generated_cells.items():
            name = GENERATED_FILES[way]
            _save_png(out / name, _panel(["decoded latent", "teacher on decoded", "aligned latent"], cells, config))
            generated[way]["panels"] = str(out / name)
            files.append(name)
    report = {
        "task": data.task, "split": split, "data": test.describe(), "head": describe_input(head_path),
        "vae": describe_input(vae), "baseline_vae": describe_input(baseline_vae) if baseline_vae else None,
        "teacher": spec.name, "results": results, "primary_metric": key, "reals_beats_baseline": beats,
        "reals_beats_constant": informative, "panels": str(out / PANELS_FILE) if panels > 0 else None,
        "generated": generated, **provenance(),
    }
    atomic_write_json(out / METRICS_FILE, report)
    inputs = {"head": report["head"], "vae": report["vae"], "data": describe_input(data.path)}
    if baseline_vae is not None:
        inputs["baseline_vae"] = report["baseline_vae"]
    for way, path in generated_paths.items():
        inputs["latents" if way == "reals" else "baseline_latents"] = describe_input(path)
    eval_config = {"task": data.task, "split": split, "data": test.describe(), "teacher": spec.name,
                   "panels": panels, "batch_size": batch_size, "precision": precision, "latent_count": latent_count}
    metrics = {**{f"{way}_{key}": r[key] for way, r in results.items()},
               **{f"generated_{way}_{key}": g["results"]["aligned"][key] for way, g in generated.items()},
               "reals_beats_baseline": beats, "reals_beats_constant": informative}
    write_manifest(out, EVAL_KINDS[data.task], FORMAT_VERSION, eval_config, inputs, metrics, files=files)
    _print_results(data.task, results, test, beats, informative)
    if generated:
        _print_generated(data.task, generated)
    drew = f"panels: {out / PANELS_FILE}" if panels > 0 else "no panels (--panels 0)"
    console.print(f"metrics: {out / METRICS_FILE}; {drew}", soft_wrap=True)
    return report


@torch.no_grad()
def _score_split(data: ProbeData, feats: dict, head, config: dict, vaes: dict[str, RealsVAE], panels: int,
                 batch_size: int, dev, precision) -> tuple[dict, dict]:
    """Scores of each feature source over `data`, and images, targets and predictions of `panels`
    images evenly spaced over it (the first few would often all be of one class)."""
    task, size = config["task"], data.size
    ways = ["teacher", *vaes, *(["constant"] if "constant" in config else [])]
    meters = {w: _meter(task, config.get("classes")) for w in ways}
    picks = torch.from_numpy(np.unique(np.linspace(0, len(data) - 1, panels).round().astype(np.int64)))
    shown: dict[str, list[torch.Tensor]] = {k: [] for k in ["image", "target", *ways]}
    start = 0
    for images, targets in torch.utils.data.DataLoader(data, batch_size=batch_size):
        idx = torch.arange(start, start + len(images))
        start += len(images)
        preds = {"teacher": predict(head, task, feats["patch"][idx].to(dev), feats["global"][idx].to(dev), size)}
        for way, bundle in vaes.items():
            with autocast(dev, precision):
                mean, _ = bundle.vae.encode(images.to(dev) * 2 - 1)  # the posterior mean, as `reals encode` stores it
                patch, glob = bundle.align(mean)
            preds[way] = predict(head, task, patch, glob, size)
        if "constant" in config:
            preds["constant"] = torch.full_like(targets, config["constant"])
        for way in ways:
            meters[way].add(preds[way].numpy(), targets.numpy())
        keep = torch.isin(idx, picks)
        for k, v in {"image": images, "target": targets, **preds}.items():
            shown[k].append(v[keep])
    return {w: meters[w].result() for w in ways}, {k: torch.cat(v) for k, v in shown.items()}


@torch.no_grad()
def _score_generated(path: str, bundle: RealsVAE, teacher: nn.Module, head, config: dict, count: int, panels: int,
                     batch_size: int, dev, precision) -> tuple[dict, list]:
    """Generated latents have no ground truth; what the training-free path must give is what the
    image shows. So the target of each latent is the head on the teacher's features of its decoded
    image, and the head on align(latent) is scored against it (so is the constant). Returns the
    scores and the panel cells of the first `panels` latents."""
    task, size = config["task"], config["image_size"]
    z = load_latents(path, bundle, count)
    meters = {w: _meter(task, config.get("classes")) for w in ("aligned", *(["constant"] if "constant" in config else []))}
    cells = []
    for part in z.split(batch_size):
        part = part.to(dev)
        with autocast(dev, precision):
            images = (bundle.vae.decode(part).float().clamp(-1, 1) + 1) / 2
            target = predict(head, task, *teacher(images), size)
            preds = {"aligned": predict(head, task, *bundle.align(part), size)}
        if "constant" in meters:
            preds["constant"] = torch.full_like(target, config["constant"])
        for way, meter in meters.items():
            meter.add(preds[way].numpy(), target.numpy())
        for i in range(min(len(part), panels - len(cells))):
            cells.append([_rgb(images[i].cpu()), _colorize(target[i], config), _colorize(preds["aligned"][i], config)])
    return {"latents": str(path), "count": len(z), "target": "the head on the teacher's features of the decoded latent",
            "results": {w: m.result() for w, m in meters.items()}}, cells


def _print_results(task: str, results: dict, data: ProbeData, beats: bool | None, informative: bool | None) -> None:
    metrics = SCORES[task]
    table = Table(title=f"{KINDS[task]} on {data.path} ({data.split}, {len(data)} images)", title_justify="left")
    table.add_column("features")
    for _, label in metrics:
        table.add_column(label, justify="right")
    for way, r in results.items():
        table.add_row(WAYS[way][0], *[f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k, _ in metrics])
    console.print(table)
    if beats is not None:
        console.print(f"ReaLS aligned features {'beat' if beats else 'do not beat'} the baseline VAE's", soft_wrap=True)
    if informative is False:
        what = "segmentation" if task == "seg" else "depth"
        warn(f"ReaLS aligned features do not beat the constant training prior: they carry no {what} information "
             f"on this data (the alignment does not reach it)")


def _print_generated(task: str, generated: dict) -> None:
    key, label = SCORES[task][0]
    table = Table(title=f"{KINDS[task]} on generated latents, against the teacher on their decoded images",
                  title_justify="left")
    for column in ("VAE", "latents", f"align(latent) {label}", f"constant {label}"):
        table.add_column(column, justify="left" if column == "VAE" else "right")
    for way, g in generated.items():
        constant = g["results"].get("constant", {}).get(key)
        table.add_row(WAYS[way][1], str(g["count"]), f"{g['results']['aligned'][key]:.4g}",
                      "–" if constant is None else f"{constant:.4g}")
    console.print(table)


# -- panels ---------------------------------------------------------------------------------------

_IGNORE_RGB = (224, 224, 192)  # VOC's colour for 255
_NO_DEPTH_RGB = (0, 0, 0)
_CELL = 96  # smallest drawn side of an image cell, px


def voc_palette(n: int) -> np.ndarray:
    """The PASCAL VOC colour map: class bits spread over the high bits of R, G and B."""
    palette = np.zeros((n, 3), np.uint8)
    for k in range(n):
        c, rgb = k, [0, 0, 0]
        for bit in range(8):
            for ch in range(3):
                rgb[ch] |= ((c >> ch) & 1) << (7 - bit)
            c >>= 3
        palette[k] = rgb
    return palette


def viridis(t: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (clipped) as matplotlib's viridis RGB, uint8."""
    import matplotlib

    return matplotlib.colormaps["viridis"](np.clip(t, 0, 1), bytes=True)[..., :3]


def _rgb(image: torch.Tensor) -> np.ndarray:
    return (image.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def _colorize(values: torch.Tensor, config: dict) -> np.ndarray:
    """A label map through the VOC palette, or a depth map through viridis over the head's range."""
    v = values.numpy()
    if config["task"] == "seg":
        palette = voc_palette(len(config["classes"]))
        out = palette[np.where(v == IGNORE_INDEX, 0, v)]
        out[v == IGNORE_INDEX] = _IGNORE_RGB
        return out
    out = viridis((v - config["min_depth"]) / (config["max_depth"] - config["min_depth"]))
    out[~valid_depth(v)] = _NO_DEPTH_RGB
    return out


def _legend(config: dict, width: int, font) -> Image.Image:
    """Class swatches with names, or a colour bar with its range in metres."""
    if config["task"] == "seg":
        palette, x, y, entries = voc_palette(len(config["classes"])), 4, 4, []
        for k, name in enumerate(config["classes"]):
            w = 16 + int(font.getlength(name)) + 12
            if x + w > width and x > 4:
                x, y = 4, y + 16
            entries.append((x, y, tuple(int(c) for c in palette[k]), name))
            x += w
        legend = Image.new("RGB", (width, y + 20), "white")
        draw = ImageDraw.Draw(legend)
        for x, y, colour, name in entries:
            draw.rectangle([x, y + 1, x + 11, y + 12], fill=colour, outline="gray")
            draw.text((x + 16, y), name, fill="black", font=font)
        return legend
    lo, hi = config["min_depth"], config["max_depth"]
    bar_w = max(width - 8, 16)
    legend = Image.new("RGB", (width, 50), "white")
    bar = viridis(np.linspace(0, 1, bar_w))[None].repeat(12, axis=0)
    legend.paste(Image.fromarray(bar), (4, 4))
    draw = ImageDraw.Draw(legend)
    for frac in (0, 0.5, 1):
        label = f"{lo + frac * (hi - lo):.3g} m"
        x = 4 + frac * (bar_w - 1)
        draw.line([(x, 16), (x, 19)], fill="black")
        draw.text((min(max(x - font.getlength(label) / 2, 0), width - font.getlength(label)), 21), label,
                  fill="black", font=font)
    draw.text((4, 35), "black: no measurement", fill="black", font=font)
    return legend


def _panel(columns: list[str], rows: list[list[np.ndarray]], config: dict) -> Image.Image:
    """A grid of cells (one row per image) under column titles, with a legend below."""
    font = ImageFont.load_default()
    side = rows[0][0].shape[0] if rows else _CELL
    scale = max(1, math.ceil(_CELL / side))
    cell, gap, title_h = side * scale, 4, 16
    width = gap + len(columns) * (cell + gap)
    legend = _legend(config, width, font)
    height = title_h + len(rows) * (cell + gap) + legend.height
    panel = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(panel)
    for j, title in enumerate(columns):
        draw.text((gap + j * (cell + gap), 2), title, fill="black", font=font)
    for i, row in enumerate(rows):
        for j, pixels in enumerate(row):
            img = Image.fromarray(pixels).resize((cell, cell), Image.NEAREST)
            panel.paste(img, (gap + j * (cell + gap), title_h + i * (cell + gap)))
    panel.paste(legend, (0, height - legend.height))
    return panel


def _save_png(path: Path, image: Image.Image) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
