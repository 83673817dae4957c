"""`reals train-dit`: DiT / SiT on cached latents, as their authors train them.

The objective (`dit`: DDPM eps + learned-sigma VLB; `sit`: interpolant transport)
lives in diffusion.py / transport.py; this file is the loop: AdamW, fp32 EMA,
label dropout (inside the network), autocast, gradient clipping, atomic
checkpoints, exact resume, a JSONL log, model folders kept every --keep-every
steps. Latent draws (view and posterior noise) and the batch order are functions
of (seed, step, rank), so `--resume` after a kill continues bit-for-bit.

`--repa-weight W --repa-depth K` adds a REPA-style loss: block K's tokens, through
a 3-layer MLP projector, are aligned (negative cosine) with the ReaLS alignment
network's patch features of the clean latent, computed on the fly from the cached
latents: no images and no teacher at training time. A feature grid k times finer than the
tokens (an alignment network on 1x1 latent patches under a /2 model) is averaged over k x k
cells onto the tokens, as each token covers those cells.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .. import artifacts
from ..console import console, print_summary, progress, warn
from ..data.batches import ResumableBatchSampler
from ..data.latent_store import LatentDataset, draw_latents
from ..errors import UserError
from ..models.attention import resolve_attention
from ..models.dit import DIT_MODELS, DiT, build_dit, dit_flops, model_config
from ..runtime import allow_tf32, autocast, resolve_device, seed_everything
from .ema import ema_copy, ema_update
from .model_artifact import (
    CHECKPOINT, EMA_FILE, FORMAT_VERSION, KIND, MODEL_FILE, PROJECTOR_FILE, SIT_ONLY, TrainDiTConfig, build_objective,
    default_objective, load_released, write_model,
)
from .training import (
    AT_LEAST_ONE, FRACTION, NON_NEGATIVE, SEED, FiniteGuard, SignalStop, StepLog, already_trained, check_run_folder,
    check_values, init_distributed, load_checkpoint, read_log, save_checkpoint, truncate_log,
)

LOG = "log.jsonl"
# --out is where the run is now, and LATENTS may be the same store (by latents_id) at another path.
RESUMABLE_CHANGES = {"steps", "device", "workers", "log_every", "ckpt_every", "sample_every", "keep_every", "out", "latents"}
# What train-dit writes into --out (check_output_folder lets the hidden temporary files of a kill pass).
RUN_FILES = (CHECKPOINT, LOG, MODEL_FILE, EMA_FILE, PROJECTOR_FILE, artifacts.MANIFEST, "samples_???????.png",
             "step-???????")


class Projector(nn.Sequential):
    """REPA's 3-layer MLP from DiT tokens to the target feature width."""

    def __init__(self, dim: int, out_dim: int, hidden: int = 2048):
        super().__init__(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, out_dim))


ALLOWED_VALUES = {
    **dict.fromkeys(("steps", "batch_size", "log_every", "ckpt_every"), AT_LEAST_ONE),
    **dict.fromkeys(("lr", "weight_decay", "workers"), NON_NEGATIVE),
    "seed": SEED,
    "grad_clip": (lambda v: v >= 0, ">= 0 (0: no clipping)"),
    "repa_weight": (lambda v: v >= 0, ">= 0 (0: no REPA)"),
    "keep_every": (lambda v: v >= 0, ">= 0 (0: keep none)"),
    "sample_every": (lambda v: v >= 0, ">= 0 (0: no previews)"),
    "ema_decay": FRACTION,
    "class_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
}


def _check(cfg: TrainDiTConfig) -> None:
    depth = model_config(cfg.model)["depth"]
    check_values(cfg, ALLOWED_VALUES)
    if cfg.repa_weight > 0 and not 1 <= cfg.repa_depth <= depth:
        raise UserError(f"--repa-depth must be between 1 and the model's depth {depth}, got {cfg.repa_depth}")
    given = [f"--{name.replace('_', '-')}" for name in SIT_ONLY if getattr(cfg, name) is not None]
    if cfg.objective == "dit" and given:
        several = len(given) > 1
        why = f"as --model {cfg.model} says" if default_objective(cfg.model) == "dit" else "--objective dit"
        raise UserError(f"{', '.join(given)} {'apply' if several else 'applies'} only to the sit objective, and this run "
                        f"trains dit ({why}); drop {'them' if several else 'it'}, or pass --objective sit")


class Trainable(nn.Module):
    """The network and, with REPA, its projector: one module for DDP."""

    def __init__(self, model: DiT, projector: Projector | None, repa_depth: int):
        super().__init__()
        self.model, self.projector, self.repa_depth = model, projector, repa_depth

    def forward(self, x_t, t, y):
        if self.projector is None:
            return self.model(x_t, t, y), None
        out, tokens = self.model(x_t, t, y, return_features_at=self.repa_depth)
        return out, self.projector(tokens)


def repa_target(align, z: torch.Tensor, tokens: int) -> torch.Tensor:
    """REPA's target for each token, B x T x D: the alignment network's patch features of the
    clean raw latent, averaged over the cells each token covers."""
    patch = align(z)[0]  # B x D x grid x grid
    return F.avg_pool2d(patch, patch.shape[-1] // tokens).flatten(2).transpose(1, 2)


def train_dit(cfg: TrainDiTConfig, resume: bool | str = False) -> dict:
    """Train (or resume) a DiT/SiT on a latent store; writes the `dit` artifact to cfg.out.
    `resume` "auto": resume the run in cfg.out if there is one, else start it."""
    with contextlib.ExitStack() as held:  # what the run holds (its folder) is let go however it ends
        return _train_dit(cfg, resume, held)


def _train_dit(cfg: TrainDiTConfig, resume: bool | str, held: contextlib.ExitStack) -> dict:
    _check(cfg)
    out = Path(cfg.out)
    rank, world, device = init_distributed(resolve_device(cfg.device))
    allow_tf32(device)
    ckpt_path = out / CHECKPOINT
    resume = check_run_folder(out, CHECKPOINT, resume, KIND, RUN_FILES, "reals train-dit")
    if resume and rank == 0:  # one run a folder: a job submitted twice stops here (a new run's, when it is made)
        held.enter_context(artifacts.hold_folder(out, "reals train-dit"))
    seed_everything(cfg.seed + rank)

    data = LatentDataset(cfg.latents, raw=True)
    store = data.store
    c, h, w = store.latent_shape
    if h != w:
        raise UserError(f"{cfg.latents} holds {h}x{w} latents; DiT needs square latents")
    model = build_dit(cfg.model, h, c, len(store.classes), learn_sigma=cfg.learn_sigma, qk_norm=cfg.qk_norm,
                      attn=cfg.attn, class_dropout=cfg.class_dropout)
    if cfg.init:
        # A model folder (a run's, or a kept step's) starts from its EMA weights.
        init = str(Path(cfg.init) / EMA_FILE) if (Path(cfg.init) / EMA_FILE).is_file() else cfg.init
        if Path(init).is_dir():
            kind = artifacts.describe_input(init).get("kind")
            raise UserError(f"--init {init} is {f'a {kind!r} artifact' if kind else 'a folder'}; it takes a DiT or SiT "
                            f"checkpoint file, or a train-dit model folder")
        load_released(model, init, cfg.model)
    model.grad_checkpointing = cfg.gradient_checkpointing
    objective = build_objective(dataclasses.asdict(cfg))

    align, projector = None, None
    if cfg.repa_weight > 0:
        from ..models.reals_vae import load_reals_vae

        if not cfg.repa_vae:
            raise UserError("--repa-weight needs --repa-vae: the ReaLS VAE (with its alignment network) that made the latents")
        bundle = load_reals_vae(cfg.repa_vae, need_align=True)
        if bundle.id != store.vae_id:
            raise UserError(f"--repa-vae {cfg.repa_vae} is VAE {bundle.id}, but {cfg.latents} was encoded by VAE {store.vae_id}")
        align = bundle.align.to(device).eval().requires_grad_(False)
        tokens = h // model.patch_size
        grid = align.config.latent_grid // align.config.patch
        if grid % tokens:  # coarser than the tokens (or no whole cells a token): nothing to pool
            patches = sorted({m["patch_size"] for m in DIT_MODELS.values()})
            fits = [p for p in patches if grid % (h // p) == 0]
            hint = (f"pass --model {cfg.model.rsplit('/', 1)[0]}/{fits[0]}" if fits else
                    f"no patch size ({', '.join(f'/{p}' for p in patches)}) gives tokens that cover whole cells of it "
                    f"on {h}x{h} latents, so this VAE's alignment network cannot guide a DiT here")
            raise UserError(f"REPA: the alignment network's {grid}x{grid} feature grid is not a whole multiple of the "
                            f"model's {tokens}x{tokens} tokens; {hint}")
        projector = Projector(model.blocks[0].attn.qkv.in_features, align.config.teacher_dim)

    trainable = Trainable(model, projector, cfg.repa_depth).to(device)
    ema = ema_copy(model)
    weight_files = {MODEL_FILE: model, EMA_FILE: ema, **({PROJECTOR_FILE: projector} if projector is not None else {})}
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(trainable.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16" and device.type == "cuda")

    stateful = {"trainable": trainable, "ema": ema, "opt": opt, "scaler": scaler}
    saved_config = dataclasses.asdict(cfg) | {"latents_id": store.attrs.get("id")}
    step, results = 0, {}
    if resume:
        # Older dit runs recorded SiT's defaults for the options a dit run does not have.
        may_change = RESUMABLE_CHANGES | (set(SIT_ONLY) if cfg.objective == "dit" else set())
        step, results = load_checkpoint(ckpt_path, saved_config, stateful, may_change, rank)
        if already_trained(out, step, cfg.steps, rank):
            return artifacts.read_manifest(out, KIND, FORMAT_VERSION) if rank == 0 else {}

    if cfg.compile:
        model.compile_blocks(device)
    net = trainable
    if world > 1:
        net = nn.parallel.DistributedDataParallel(trainable, device_ids=[device.index] if device.type == "cuda" else None)
    sampler = ResumableBatchSampler(len(data), cfg.batch_size, cfg.seed, step, rank, world)
    loader = DataLoader(data, batch_sampler=sampler, num_workers=cfg.workers, pin_memory=device.type == "cuda",
                        persistent_workers=cfg.workers > 0, generator=torch.Generator(), collate_fn=_collate)
    is_main = rank == 0
    backend = resolve_attention(cfg.attn, device)
    config = _model_config(cfg, store, backend)
    inputs = {"latents": {"path": cfg.latents, "kind": "latents", "id": store.attrs.get("id", "?")}}
    if cfg.init:
        inputs["init"] = artifacts.describe_input(cfg.init)
    previews = False
    if is_main:
        if not resume:
            held.enter_context(artifacts.hold_folder(out, "reals train-dit"))
        truncate_log(out / LOG, step)  # lines past the checkpoint, or of a run killed before its first one
        console.print(f"train-dit: {cfg.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), "
                      f"objective {cfg.objective}, latents {c}x{h}x{w} from {cfg.latents} ({len(data)} images, "
                      f"{len(store.classes)} classes), attention {backend}, device {device}, {world} process(es)",
                      soft_wrap=True)
        previews = 0 < cfg.sample_every <= cfg.steps and _store_vae_loads(config, cfg.latents)

    trainable.train()
    log = StepLog(out / LOG, cfg.batch_size * world, step, 3 * dit_flops(cfg.model, h, c, cfg.learn_sigma))
    guard = FiniteGuard(device, ckpt_path, "--qk-norm, --precision fp32, a lower --lr or a smaller --grad-clip")
    # Nothing below reads a value back from the GPU except at log and checkpoint steps, so the
    # host queues step after step; the draws use a generator on the device for that reason.
    g = torch.Generator(device)
    saved, loss = (step if resume else -1), None
    with SignalStop(world) as stop, progress(disable=not is_main) as bar:
        batches = iter(loader)  # the workers start here, inside SignalStop (see there)
        task = bar.add_task("train-dit", total=cfg.steps, completed=step)
        while step < cfg.steps:
            batch = stop.next_batch(batches)  # fetched first: a rank that got none stops them all
            if stop.now():
                break
            post, y = batch
            post, y = post.to(device, non_blocking=True), y.to(device, non_blocking=True)
            g.manual_seed((cfg.seed * 1_000_003 + step) * 64 + rank)
            z = draw_latents(post, g)  # raw latent samples, normalised below
            t = objective.sample_time(len(z), device, g)
            noise = torch.randn(z.shape, generator=g, device=device)
            x1 = store.normalize(z)
            x_t = objective.q_sample(x1, t, noise)
            with autocast(device, cfg.precision):
                out_t, projected = net(x_t, t, y)
                terms = objective.loss(out_t.float(), x1, x_t, t, noise)
                repa = torch.zeros((), device=device)
                if projected is not None:
                    with torch.no_grad():
                        target = repa_target(align, z, h // model.patch_size)
                    repa = -F.cosine_similarity(projected.float(), target.float(), dim=-1).mean()
                loss = terms["loss"].mean() + cfg.repa_weight * repa
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            grad_norm = nn.utils.clip_grad_norm_(trainable.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            scaler.step(opt)
            scaler.update()
            ema_update(ema, model, cfg.ema_decay)
            step += 1
            guard.observe(loss, step)  # numbered as the log numbers steps: 1 is the first
            checkpointing = step % cfg.ckpt_every == 0 or step == cfg.steps
            keeping = cfg.keep_every > 0 and step % cfg.keep_every == 0
            if step % cfg.log_every == 0 or checkpointing or keeping:
                guard.check()
            logging = is_main and step % cfg.log_every == 0
            if logging:
                log.write(step, {"loss": loss.item(), **{k: v.mean().item() for k, v in terms.items() if k != "loss"},
                                 "repa": repa.item(), "grad_norm": float(grad_norm)})
            # The loss with the step, not after it: off a terminal the finished line shows this step's loss.
            bar.update(task, completed=step, **({"status": f"loss {loss.item():.4f}"} if logging else {}))
            if previews and step % cfg.sample_every == 0:
                _preview(out, ema, config, step)
            if is_main and keeping:
                write_model(out / f"step-{step:07d}", config, inputs, weight_files, step, loss.item())
            if checkpointing:
                save_checkpoint(ckpt_path, step, saved_config, stateful, world, {"loss": loss.item()})
                saved = step
        if step < cfg.steps:  # stopped by a signal
            guard.check()
            if saved != step:
                save_checkpoint(ckpt_path, step, saved_config, stateful, world,
                                {"loss": loss.item()} if loss is not None else results)
            raise stop.stopped(step, ckpt_path)

    if world > 1:
        dist.barrier()
    if not is_main:
        return {}
    # No step ran when the run stopped after its last checkpoint, before this: the loss saved with it
    # (a checkpoint older than that record: the last logged loss).
    final_loss = (loss.item() if loss is not None else
                  results.get("loss", next((r["loss"] for r in reversed(read_log(out / LOG))), None)))
    manifest = write_model(out, config, inputs, weight_files, step, final_loss)
    print_summary(f"{cfg.model} {out} ({manifest['id']})",
                  {"steps": step, "final loss": manifest["metrics"]["final_loss"], "attention": backend})
    return manifest


def _collate(items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([p for p, _ in items]), torch.tensor([y for _, y in items])


def _model_config(cfg: TrainDiTConfig, store, attention_backend: str) -> dict:
    """What the `dit` manifest records besides the flags: what `sample` needs to use the model, and the
    attention kernel that --attn resolved to."""
    c, h, w = store.latent_shape
    mean, std = store.statistics()
    return dataclasses.asdict(cfg) | {
        "latent_shape": [c, h, w], "num_classes": len(store.classes), "classes": store.classes,
        "latent_mean": mean, "latent_std": std,
        "vae_id": store.vae_id, "vae_path": _vae_path(store),
        "attention_backend": attention_backend,
    }


def _vae_path(store) -> str | None:
    """The store's VAE path, absolute where it exists from here: older stores recorded it relative to
    where `encode` ran, which `sample` from another directory would not find."""
    path = store.attrs.get("inputs", {}).get("vae", {}).get("path")
    return str(Path(path).resolve()) if path and Path(path).exists() else path


def _store_vae_loads(config: dict, latents: str) -> bool:
    """Whether the VAE that made the latents, which the preview grids decode with, loads from where the store
    says and is that VAE (by id); if not, one warning says so (the training itself does not need it), so that
    no preview stops the run later."""
    from .model_artifact import load_vae

    path, why = config["vae_path"], None
    if not path:
        why = "without a path"
    elif not Path(path).exists():
        why = f"at {path}, which does not exist"
    else:
        try:
            with torch.random.fork_rng(devices=[]):  # building the VAE draws initial weights: not the run's draws
                load_vae(path, config, latents)
        except UserError as e:
            why = f"at {path}, which does not load as that VAE ({e})"
    if why is None:
        return True
    warn(f"no preview grids (--sample-every): {latents} names its VAE {config['vae_id']} {why}; re-encode the images "
         f"with `reals encode --vae PATH` to get them, and sample this model with `reals sample --vae PATH`")
    return False


def _preview(path: Path, ema: DiT, config: dict, step: int) -> None:
    """A grid of 8 EMA samples (class i % classes, no guidance, 25-step ODE/DDIM) decoded by the store's VAE."""
    from PIL import Image

    from ..objectives.samplers import resolve_sampler
    from .model_artifact import load_vae
    from .sample import generate

    device = next(ema.parameters()).device
    spec = (resolve_sampler("sit", "ode", 25, ode_method="euler") if config["objective"] == "sit"
            else resolve_sampler("dit", "ddim", 25))
    labels = torch.arange(8) % config["num_classes"]
    # Building the VAE draws initial weights: on the run's generators they would move its label
    # dropout, so a preview would change the trained weights.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        vae = load_vae(config["vae_path"], config, str(path.parent)).vae.to(device)
        images, _ = generate(ema, config, vae, labels, range(8), seed=0, spec=spec)
    grid = np.concatenate(list(images), axis=1)
    with artifacts.atomic_path(path / f"samples_{step:07d}.png") as tmp:
        Image.fromarray(grid).save(tmp, format="png")


def resolve_config(**flags: Any) -> TrainDiTConfig:
    # Here, where a flag left out is still None: --repa-depth's default must not count as given.
    given = [f"--{name.replace('_', '-')}" for name in ("repa_depth", "repa_vae") if flags.get(name) is not None]
    if given and not (flags.get("repa_weight") or 0) > 0:
        several = len(given) > 1
        raise UserError(f"{', '.join(given)} {'apply' if several else 'applies'} only with REPA (--repa-weight > 0); "
                        f"drop {'them' if several else 'it'}, or pass --repa-weight W")
    return TrainDiTConfig(**{k: v for k, v in flags.items() if v is not None})
