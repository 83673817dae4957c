"""`reals train-vae`: train a KL VAE whose latents an alignment network maps onto a teacher.

loss = rec (L1/MSE) + lpips * LPIPS + kl * KL + d_w * adv + align * (patch + global)

with LDM's conventions: KL summed over the latent and averaged over the batch,
scaled here by 1/(pixels per image) because our reconstruction terms are per-pixel
means, so `--kl 1e-6` keeps LDM's balance; the adversarial weight d_w is LDM's
adaptive gradient-norm ratio, switched on at `--disc-start`. With `--align-weight 0`
(the paper's control) the alignment network still trains, on detached latents.

Against LDM's summed units: LDM sums L1 + LPIPS over the pixels of an image, so our nll is
LDM's divided by the pixels (3 H W), KL/pixels keeps `--kl`'s meaning, and an alignment term
at weight w here weighs w x 3 H W in LDM's units (3,072 at 32 px; 196,608 at 256 px).
`--align-balance adaptive` sets the weight each step instead, as VA-VAE does: w times
||d nll / d W|| / ||d align / d W|| at the encoder's last layer W (detached), so that
w = 1 gives the alignment the reconstruction's gradient norm where both reach the latent.

The whole state (models, EMA, both optimizers, grad scalers, step, RNG) is saved
atomically every `ckpt_every` steps; the batch order and flips are a function of
(seed, step), so `--resume` continues bit-for-bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Subset

from .. import artifacts
from ..console import console, print_summary, progress
from ..data.batches import ResumableBatchSampler
from ..data.images import ImageFolder
from ..errors import UserError
from ..metrics.image_metrics import psnr, ssim
from ..models.alignment import AlignConfig, AlignmentNet, alignment_loss, feature_cosine
from ..models.discriminator import PatchDiscriminator, adaptive_weight, hinge_d_loss, hinge_g_loss
from ..models.perceptual import LPIPS
from ..models.reals_vae import ALIGN_FILE, FORMAT_VERSION, KIND, save_reals_vae
from ..models.teachers import DINOv2Teacher, Teacher, build_teacher
from ..models.vae import CONFIG_NAME, WEIGHTS_NAMES, AutoencoderKL, kl_loss, load_diffusers_vae, vae_config
from ..runtime import autocast, resolve_device, seed_everything
from .ema import ema_copy, ema_update
from .training import (
    AT_LEAST_ONE, FRACTION, NON_NEGATIVE, SEED, FiniteGuard, SignalStop, StepLog, already_trained, check_run_folder,
    append_log, check_values, init_distributed, load_checkpoint, save_checkpoint, truncate_log,
)

CHECKPOINT = "checkpoint.safetensors"
LOG = "log.jsonl"
VAL_LOG = "val.jsonl"  # the validation curves (--val-every)
VAL_CURVES = ("psnr", "lpips", "align_cos_patch", "align_cos_global")
# Flags that may differ on --resume without changing what the run computes (steps: train longer).
# --out is where the run is now: a run folder moved elsewhere resumes there. teacher_cache_gb too: a
# cached row is the row the teacher computes in the step's own batch (see TeacherCache).
RESUMABLE_CHANGES = {"steps", "device", "workers", "log_every", "ckpt_every", "image_every", "out", "teacher_cache_gb",
                     "val_every"}
# What train-vae writes into --out (check_output_folder lets the hidden temporary files of a kill pass).
RUN_FILES = (CHECKPOINT, LOG, VAL_LOG, artifacts.MANIFEST, CONFIG_NAME, WEIGHTS_NAMES[0], ALIGN_FILE, "recon_???????.png")
# VGG16 (LPIPS on the images, and the vgg16 teacher) pools 4 times before its last block.
VGG_MIN_SIZE = 16


@dataclass
class TrainVAEConfig:
    data: str
    out: str
    extra_data: list[str] = dataclasses.field(default_factory=list)  # more training folders; validation uses `data`
    vae: str = "sd-f8c4"
    init: str | None = None
    image_size: int = 256
    latent_channels: int | None = None  # None: the --vae preset's (4 in each)
    teacher: str = "dinov2-b"
    teacher_weights: str | None = None
    teacher_resolution: int | None = None
    align_hidden: int = 1024
    steps: int = 100_000
    batch_size: int = 8
    lr: float = 1e-4
    disc_lr: float = 1e-4
    weight_decay: float = 0.0
    rec_loss: str = "l1"
    lpips_weight: float = 1.0
    kl: float = 1e-6
    disc_weight: float = 0.5
    disc_start: int = 50_001
    disc_layers: int | None = None  # None: 3 (LDM's), fewer below 32 px
    align_weight: float = 1.0
    align_balance: str = "fixed"  # adaptive: align_weight times VA-VAE's gradient-norm ratio (see the module docstring)
    align_patch_weight: float = 1.0
    align_global_weight: float = 1.0
    align_cos: float = 0.9
    align_l1: float = 0.1
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    precision: str = "bf16"
    device: str = "auto"
    seed: int = 0
    workers: int = 2
    val_count: int = 64
    val_every: int = 0  # steps between validation lines in val.jsonl; 0: the final validation only
    log_every: int = 10
    ckpt_every: int = 500
    image_every: int = 500
    gradient_checkpointing: bool = False
    teacher_cache_gb: float = 0.0  # > 0: keep the teacher's features of every training image and its mirror (in RAM)


# Recipes by name; explicit flags override them.
PRESETS: dict[str, dict[str, Any]] = {
    # Fashion-MNIST at 32 px (28 px natively), VGG16 teacher on a 64 px upsample (8x8 relu4_3
    # grid = the 8x8 latent grid of the f4 demo VAE): minutes on 2 CPU cores. lr 1e-3: at 4e-4, the
    # Makefile's 150 steps left the photographs' latents too little aligned for the depth probe (docs/probes.md).
    "demo": dict(
        data="runs/demo/data", out="runs/demo/reals/vae", vae="demo", image_size=32, teacher="vgg16",
        teacher_resolution=64, align_hidden=256, steps=300, batch_size=32, lr=1e-3, disc_lr=1e-3,
        disc_start=200, ckpt_every=100, image_every=200, log_every=10, val_count=256, workers=1,
    ),
    # The paper's setting as far as it is published (see docs): SD-VAE architecture at 256 px, DINOv2-B.
    "imagenet": dict(vae="sd-f8c4", image_size=256, teacher="dinov2-b", batch_size=8, steps=200_000),
}


def resolve_config(preset: str | None = None, **overrides: Any) -> TrainVAEConfig:
    if preset and preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    values = dict(PRESETS[preset]) if preset else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    missing = [k for k in ("data", "out") if k not in values]
    if missing:
        raise UserError(f"--{missing[0]} is required (or pick a --preset that sets it)")
    return TrainVAEConfig(**values)


class Generator(nn.Module):
    """VAE + alignment network, one module so that DDP syncs both."""

    def __init__(self, vae: AutoencoderKL, align: AlignmentNet, detach_align: bool):
        super().__init__()
        self.vae, self.align, self.detach_align = vae, align, detach_align

    def forward(self, x: torch.Tensor):
        recon, mean, logvar, z = self.vae(x)
        patch, glob = self.align(z.detach() if self.detach_align else z)
        return recon, mean, logvar, patch, glob


ALLOWED_VALUES = {
    **dict.fromkeys(("steps", "batch_size", "align_hidden", "log_every", "ckpt_every", "image_every"), AT_LEAST_ONE),
    **dict.fromkeys(("lr", "disc_lr", "weight_decay", "kl", "lpips_weight", "disc_weight", "disc_start", "align_patch_weight",
                     "align_global_weight", "align_cos", "align_l1", "workers", "teacher_cache_gb"), NON_NEGATIVE),
    "seed": SEED,
    "image_size": (lambda v: v >= VGG_MIN_SIZE, f"at least {VGG_MIN_SIZE} (LPIPS's VGG16 halves it 4 times)"),
    "align_weight": (lambda v: v >= 0, ">= 0 (0: the baseline VAE)"),
    "grad_clip": (lambda v: v >= 0, ">= 0 (0: no clipping)"),
    "ema_decay": FRACTION,
    "val_count": (lambda v: v >= 0, ">= 0 (0: no validation)"),
    "val_every": (lambda v: v >= 0, ">= 0 (0: the final validation only)"),
}


def _check_config(cfg: TrainVAEConfig) -> None:
    if cfg.rec_loss not in ("l1", "mse"):
        raise UserError(f"--rec-loss must be l1 or mse, got {cfg.rec_loss!r}")
    if cfg.align_balance not in ("fixed", "adaptive"):
        raise UserError(f"--align-balance must be fixed or adaptive, got {cfg.align_balance!r}")
    if cfg.align_balance == "adaptive" and cfg.align_weight == 0:
        raise UserError("--align-balance adaptive scales the alignment against the reconstruction; the baseline "
                        "(--align-weight 0) has no alignment gradient to scale: drop one of the two flags")
    check_values(cfg, ALLOWED_VALUES)
    if cfg.latent_channels is not None and cfg.latent_channels < 1:
        raise UserError(f"--latent-channels must be at least 1, got {cfg.latent_channels}")
    # The smallest input a teacher has a feature grid for: one DINOv2 patch; VGG16 as above.
    smallest = VGG_MIN_SIZE if cfg.teacher == "vgg16" else DINOv2Teacher.stride
    if cfg.teacher_resolution is not None and cfg.teacher_resolution < smallest:
        raise UserError(f"--teacher-resolution must be at least {smallest} for --teacher {cfg.teacher}, "
                        f"got {cfg.teacher_resolution}")
    # Each discriminator layer halves the image, and its last two convolutions (kernel 4, stride 1,
    # padding 1) need 3 px left: `fits` layers fit.
    fits = (cfg.image_size // 3).bit_length() - 1
    if cfg.disc_layers is not None and not 1 <= cfg.disc_layers <= fits:
        raise UserError(f"--disc-layers must be between 1 and {fits} at --image-size {cfg.image_size}, got {cfg.disc_layers}")


def _build_vae(cfg: TrainVAEConfig) -> AutoencoderKL:
    arch = vae_config(cfg.vae)
    arch.latent_channels = cfg.latent_channels or arch.latent_channels
    if cfg.init:
        vae = load_diffusers_vae(cfg.init, expected=arch, role="--init folder")
    else:
        vae = AutoencoderKL(arch)
    if cfg.image_size % vae.downsample_factor:
        raise UserError(
            f"--image-size {cfg.image_size} is not divisible by the VAE's downsampling factor {vae.downsample_factor}"
        )
    vae.gradient_checkpointing = cfg.gradient_checkpointing
    return vae


def _datasets(cfg: TrainVAEConfig) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
    """Training set, and held-out images: the `test` split when there is one, else a seeded hold-out."""
    root = Path(cfg.data)
    train = ImageFolder(root, cfg.image_size, flip=False)  # flips are drawn per step, see _flips
    extra = [ImageFolder(folder, cfg.image_size, flip=False) for folder in cfg.extra_data]
    if (root / "test").is_dir() and train.split == "train":
        val = ImageFolder(root, cfg.image_size, flip=False, split="test")
        keep = torch.linspace(0, len(val) - 1, min(cfg.val_count, len(val))).long().tolist()
        return ConcatDataset([train, *extra]), Subset(val, keep)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    n_val = min(cfg.val_count, len(train) // 10)
    if cfg.val_count and not n_val:
        raise UserError(f"{root} has {len(train)} images, too few to hold a tenth out for validation; add images "
                        f"or a test/ split, or pass --val-count 0")
    return ConcatDataset([Subset(train, order[n_val:]), *extra]), Subset(train, order[:n_val])


def _flips(n: int, seed: int, step: int, rank: int) -> torch.Tensor:
    """Which images of the step's batch are mirrored: a function of (seed, step, rank)."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 64 + rank)
    return torch.rand(n, generator=g) < 0.5


class TeacherCache:
    """The frozen teacher's features of each training image and of its mirror, computed the first
    time a step draws that (image, view) and reused after, as latent-diffusion codebases cache
    what is frozen. Held on the CPU in float32 (a VGG16 8x8 grid: 133 kB a view).

    New rows go through the teacher in batches of exactly the step's batch size (padded, as
    sample.in_fixed_batches does), so each row meets the kernels the uncached step would have
    run it through: the loss, and --resume, come out the same with or without the cache.
    """

    def __init__(self, teacher: Teacher, images: int, batch_size: int, grid: int, limit_gb: float):
        self.teacher, self.batch_size = teacher, batch_size
        row = teacher.dim * (grid * grid + 1)
        need = images * 2 * row * 4 / 1e9
        if need > limit_gb:
            raise UserError(f"the teacher cache needs {need:.2f} GB for {images} images and their mirrors "
                            f"({teacher.dim}-d on a {grid}x{grid} grid), over --teacher-cache-gb {limit_gb:g}; "
                            f"raise it or pass 0 (no cache)")
        self.grid = grid
        self.rows = torch.empty(images, 2, row)
        self.done = torch.zeros(images, 2, dtype=torch.bool)
        self.computed = self.reused = 0

    def _features(self, x01: torch.Tensor) -> torch.Tensor:
        patch, glob = self.teacher(x01)
        return torch.cat([patch.float().flatten(1), glob.float()], 1)

    def __call__(self, x01: torch.Tensor, indices: list[int], flipped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(patch B x D x g x g, global B x D) of the step's images x01 (already mirrored where `flipped`)."""
        from .sample import in_fixed_batches

        index, view = torch.as_tensor(indices), flipped.long()
        todo = (~self.done[index, view]).nonzero().squeeze(1)
        if len(todo):
            rows = in_fixed_batches(self._features, self.batch_size)(x01[todo.to(x01.device)]).cpu()
            self.rows[index[todo], view[todo]] = rows
            self.done[index[todo], view[todo]] = True
        self.computed += len(todo)
        self.reused += len(index) - len(todo)
        rows = self.rows[index, view].to(x01.device, non_blocking=True)
        d, g = self.teacher.dim, self.grid
        return rows[:, : d * g * g].view(-1, d, g, g), rows[:, d * g * g:]


@torch.no_grad()
def evaluate(vae: AutoencoderKL, align: AlignmentNet, teacher: Teacher, lpips: LPIPS, loader, device) -> dict[str, float]:
    """PSNR/SSIM/LPIPS of posterior-mean reconstructions, latent stats, teacher cosines. Its latent
    draws come from a forked RNG: validating mid-run leaves the training trajectory as it was."""
    devices = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        return _evaluate(vae, align, teacher, lpips, loader, device)


def _evaluate(vae: AutoencoderKL, align: AlignmentNet, teacher: Teacher, lpips: LPIPS, loader, device) -> dict[str, float]:
    sums: dict[str, float] = {}
    zs, n = [], 0
    for batch in loader:
        x01 = batch[0].to(device)
        x = x01 * 2 - 1
        mean, logvar = vae.encode(x)
        recon = vae.decode(mean).clamp(-1, 1)
        r01 = (recon + 1) / 2
        patch_t, glob_t = teacher(x01)
        patch, glob = align(vae.sample_latent(mean, logvar))
        values = {
            "psnr": psnr(r01, x01).sum(), "ssim": ssim(r01, x01).sum(), "lpips": lpips(recon, x).sum(),
            "align_cos_patch": feature_cosine(patch, patch_t) * len(x), "align_cos_global": feature_cosine(glob, glob_t) * len(x),
        }
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        zs.append(vae.sample_latent(mean, logvar).transpose(0, 1).flatten(1).double().cpu())
        n += len(x)
    metrics = {k: v / n for k, v in sums.items()}
    z = torch.cat(zs, dim=1)
    metrics["latent_mean"] = z.mean(1).tolist()
    metrics["latent_std"] = z.std(1).tolist()
    metrics["val_images"] = n
    return metrics


def _log_validation(path: Path, step: int, metrics: dict) -> None:
    append_log(path, {"step": step, **{k: metrics[k] for k in VAL_CURVES}})


def _save_grid(path: Path, x01: torch.Tensor, recon01: torch.Tensor) -> None:
    from torchvision.utils import save_image

    grid = torch.cat([x01[:8], recon01[:8]]).clamp(0, 1).float().cpu()
    with artifacts.atomic_path(path) as tmp:
        save_image(grid, tmp, nrow=min(8, len(x01)), format="png")


def train_vae(cfg: TrainVAEConfig, resume: bool | str = False) -> dict:
    """Train (or resume) and write the ReaLS VAE artifact to `cfg.out`; returns its manifest.
    `resume` "auto": resume the run in cfg.out if there is one, else start it."""
    with contextlib.ExitStack() as held:  # what the run holds (its folder) is let go however it ends
        return _train_vae(cfg, resume, held)


def _train_vae(cfg: TrainVAEConfig, resume: bool | str, held: contextlib.ExitStack) -> dict:
    _check_config(cfg)
    out = Path(cfg.out)
    rank, world, device = init_distributed(resolve_device(cfg.device))
    ckpt_path = out / CHECKPOINT
    resume = check_run_folder(out, CHECKPOINT, resume, KIND, RUN_FILES, "reals train-vae")
    if resume and rank == 0:  # one run a folder: a job submitted twice stops here (a new run's, when it is made)
        held.enter_context(artifacts.hold_folder(out, "reals train-vae"))
    seed_everything(cfg.seed + rank)

    train_set, val_set = _datasets(cfg)
    vae = _build_vae(cfg)
    teacher = build_teacher(cfg.teacher, cfg.teacher_weights, cfg.teacher_resolution).to(device)
    latent_grid = cfg.image_size // vae.downsample_factor
    align = AlignmentNet(AlignConfig(vae.config.latent_channels, latent_grid, teacher.dim, teacher.grid(cfg.image_size), cfg.align_hidden))
    gen = Generator(vae, align, detach_align=cfg.align_weight == 0).to(device)
    disc = PatchDiscriminator(layers=cfg.disc_layers or min(3, int(math.log2(cfg.image_size // 4)))).to(device)
    lpips = LPIPS().to(device)
    ema = ema_copy(gen)
    opt_g = torch.optim.AdamW(gen.parameters(), lr=cfg.lr, betas=(0.5, 0.9), weight_decay=cfg.weight_decay)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.9), weight_decay=cfg.weight_decay)
    fp16 = cfg.precision == "fp16" and device.type == "cuda"
    scaler_g = torch.amp.GradScaler("cuda", enabled=fp16)
    scaler_d = torch.amp.GradScaler("cuda", enabled=fp16)

    stateful = {"gen": gen, "disc": disc, "ema": ema, "opt_g": opt_g, "opt_d": opt_d, "scaler_g": scaler_g, "scaler_d": scaler_d}
    step = 0
    if resume:
        step, _ = load_checkpoint(ckpt_path, dataclasses.asdict(cfg), stateful, RESUMABLE_CHANGES, rank)
        if already_trained(out, step, cfg.steps, rank):
            return artifacts.read_manifest(out, KIND, FORMAT_VERSION) if rank == 0 else {}
        console.print(f"resumed {out} at step {step}")

    model_g, model_d = gen, disc
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        model_g = nn.parallel.DistributedDataParallel(gen, device_ids=ids)
        # The discriminator runs twice (real, fake) before one backward. Broadcasting its BatchNorm
        # buffers at each forward would modify, in place, a tensor the first graph saved (torch 2.11
        # refuses that); in training mode BatchNorm uses batch statistics, so each rank keeps its own.
        model_d = nn.parallel.DistributedDataParallel(disc, device_ids=ids, broadcast_buffers=False)

    sampler = ResumableBatchSampler(len(train_set), cfg.batch_size, cfg.seed, step, rank, world)
    order = ResumableBatchSampler(len(train_set), cfg.batch_size, cfg.seed, step, rank, world)  # the loader's, by step
    cache = (TeacherCache(teacher, len(train_set), cfg.batch_size, align.config.teacher_grid, cfg.teacher_cache_gb)
             if cfg.teacher_cache_gb > 0 else None)
    loader = DataLoader(
        train_set, batch_sampler=sampler, num_workers=cfg.workers, pin_memory=device.type == "cuda",
        persistent_workers=cfg.workers > 0, generator=torch.Generator(),  # keeps the global RNG untouched
    )
    val_loader = DataLoader(val_set, batch_size=cfg.batch_size, num_workers=0)
    pixels = 3 * cfg.image_size**2
    last_layer = vae.decoder.conv_out.weight
    encoder_last_layer = vae.encoder.conv_out.weight  # the last layer both nll and alignment reach
    is_main = rank == 0
    if is_main:
        if not resume:
            held.enter_context(artifacts.hold_folder(out, "reals train-vae"))
        truncate_log(out / LOG, step)  # lines past the checkpoint, or of a run killed before its first one
        truncate_log(out / VAL_LOG, step)
        console.print(
            f"train-vae: {len(train_set)} images at {cfg.image_size}px, VAE {cfg.vae} (latent "
            f"{vae.config.latent_channels}x{latent_grid}x{latent_grid}), teacher {cfg.teacher} "
            f"({teacher.dim}-d, {align.config.teacher_grid}x{align.config.teacher_grid} grid, patch {align.config.patch}), "
            f"device {device}, {world} process(es)"
        )

    gen.train()
    disc.train()
    log = StepLog(out / LOG, cfg.batch_size * world, step)
    guard = FiniteGuard(device, ckpt_path, "--precision fp32, a lower --lr or a smaller --grad-clip")
    saved = step if resume else -1
    with SignalStop(world) as stop, progress(disable=not is_main) as bar:
        data_iter = iter(loader)  # the workers start here, inside SignalStop (see there)
        task = bar.add_task("train-vae", total=cfg.steps, completed=step, status="")
        while step < cfg.steps:
            batch = stop.next_batch(data_iter)  # fetched first: a rank that got none stops them all
            if stop.now():
                break
            flipped = _flips(len(batch[0]), cfg.seed, step, rank)
            x01 = torch.where(flipped[:, None, None, None], batch[0].flip(-1), batch[0]).to(device, non_blocking=True)
            x = x01 * 2 - 1
            with autocast(device, cfg.precision):
                target_patch, target_glob = teacher(x01) if cache is None else cache(x01, order.batch(step), flipped)
                recon, mean, logvar, patch, glob = model_g(x)
                rec = (recon.float() - x).abs().mean() if cfg.rec_loss == "l1" else F.mse_loss(recon.float(), x)
                perc = lpips(recon.float(), x).mean() if cfg.lpips_weight else torch.zeros((), device=device)
                nll = rec + cfg.lpips_weight * perc
                kl = kl_loss(mean.float(), logvar.float()) / pixels
                align_patch = alignment_loss(patch.float(), target_patch.float(), cfg.align_cos, cfg.align_l1)
                align_glob = alignment_loss(glob.float(), target_glob.float(), cfg.align_cos, cfg.align_l1)
                align_term = cfg.align_patch_weight * align_patch + cfg.align_global_weight * align_glob
                loss_scale = scaler_g.scale(torch.ones((), device=device))  # 1 unless fp16
                a_w = torch.full((), cfg.align_weight or 1.0, device=device)  # weight 0: align net still learns
                if cfg.align_balance == "adaptive":
                    a_w = adaptive_weight(nll, align_term, encoder_last_layer, loss_scale=loss_scale) * cfg.align_weight
                loss = nll + cfg.kl * kl + a_w * align_term
                d_active = step >= cfg.disc_start and cfg.disc_weight > 0
                d_w = torch.zeros((), device=device)
                if d_active:
                    g_loss = hinge_g_loss(model_d(recon.float()))
                    d_w = adaptive_weight(nll, g_loss, last_layer, loss_scale=loss_scale) * cfg.disc_weight
                    loss = loss + d_w * g_loss
            opt_g.zero_grad(set_to_none=True)
            scaler_g.scale(loss).backward()
            scaler_g.unscale_(opt_g)
            grad_norm = nn.utils.clip_grad_norm_(gen.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            scaler_g.step(opt_g)
            scaler_g.update()

            d_loss = torch.zeros((), device=device)
            if d_active:
                with autocast(device, cfg.precision):
                    d_loss = hinge_d_loss(model_d(x), model_d(recon.detach().float()))
                opt_d.zero_grad(set_to_none=True)
                scaler_d.scale(d_loss).backward()
                scaler_d.step(opt_d)
                scaler_d.update()
            ema_update(ema, gen, cfg.ema_decay, step)
            step += 1
            guard.observe(loss, step)  # numbered as the log numbers steps: 1 is the first

            terms = {"loss": loss.item(), "rec": rec.item(), "lpips": perc.item(), "kl": kl.item(),
                     "align_patch": align_patch.item(), "align_global": align_glob.item(), "align_w": float(a_w),
                     "d_weight": float(d_w), "d_loss": d_loss.item(), "grad_norm": float(grad_norm)}
            bar.update(task, completed=step, status=f"loss {terms['loss']:.4f} rec {terms['rec']:.4f} align {align_term.item():.3f}")
            guard.check()  # the line above has synchronised already: stop at the first bad step
            if is_main and step % cfg.log_every == 0:
                log.write(step, terms)
            if is_main and cfg.val_every and step % cfg.val_every == 0 and step < cfg.steps and len(val_set):
                _log_validation(out / VAL_LOG, step, evaluate(ema.vae, ema.align, teacher, lpips, val_loader, device))
            if is_main and (step % cfg.image_every == 0 or step == cfg.steps):  # the last step always shows
                _save_grid(out / f"recon_{step:07d}.png", x01, (recon.detach().float() + 1) / 2)
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                save_checkpoint(ckpt_path, step, dataclasses.asdict(cfg), stateful, world)
                saved = step
        if step < cfg.steps:  # stopped by a signal
            if saved != step:
                save_checkpoint(ckpt_path, step, dataclasses.asdict(cfg), stateful, world)
            raise stop.stopped(step, ckpt_path)

    if world > 1:
        dist.barrier()
    if not is_main:
        return {}
    # --val-count 0: no validation metrics, and the manifest says so with val_images 0.
    metrics = evaluate(ema.vae, ema.align, teacher, lpips, val_loader, device) if len(val_set) else {"val_images": 0}
    metrics["steps"] = step
    if cfg.val_every and len(val_set):
        _log_validation(out / VAL_LOG, step, metrics)
    if cache is not None:  # this run's (a resumed run's cache starts empty)
        metrics["teacher_cache"] = {"computed": cache.computed, "reused": cache.reused}
    inputs = {"data": artifacts.describe_input(cfg.data)}
    inputs |= {f"extra_data_{i}": artifacts.describe_input(folder) for i, folder in enumerate(cfg.extra_data)}
    if cfg.init:
        inputs["init"] = artifacts.describe_input(cfg.init)
    if cfg.teacher_weights:
        inputs["teacher_weights"] = artifacts.describe_input(cfg.teacher_weights)
    config = dataclasses.asdict(cfg) | {"teacher_dim": teacher.dim, "teacher_grid": align.config.teacher_grid}
    manifest = save_reals_vae(out, ema.vae, ema.align, config, inputs, metrics)
    summary: dict[str, Any] = {"steps": step}
    if len(val_set):
        summary |= {"PSNR (dB)": metrics["psnr"], "SSIM": metrics["ssim"], "LPIPS": metrics["lpips"],
                    "align cos patch": metrics["align_cos_patch"], "align cos global": metrics["align_cos_global"],
                    "latent std": " ".join(f"{s:.3f}" for s in metrics["latent_std"])}
    else:
        summary["validation"] = "none (--val-count 0)"
    print_summary(f"VAE {out} ({manifest['id']})", summary)
    return manifest
