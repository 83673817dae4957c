"""`make bench`: throughput of each stage, written to docs/benchmarks.md with the machine.

Each benchmark returns rows of (what, value, unit), and a ratio of A to B also its spread:
A and B are timed interleaved, A, B, A, B, ..., so a change of background load hits both
runs of a pair; the row gives the median of the pairs' ratios, their min and max. Results
accumulate in docs/benchmarks.json (one entry per benchmark and device, the newest wins)
and the markdown page is rebuilt from it, so a CPU run and a GPU run sit side by side.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable
from unittest import mock

import click
import numpy as np
import torch
from rich.text import Text

from .artifacts import atomic_write_bytes, atomic_write_json
from .console import console
from .errors import UserError
from .runtime import describe_machine, resolve_device

Row = tuple  # (what, value, unit), or (what, ratio, "x", spread) from _ratio


def _image_folder(root: Path, size: int, count: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "a").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / "a" / f"{i}.png")
    return root


def bench_train_vae(device: torch.device) -> list[Row]:
    """One sd-f8c4 train step at 256 px with a dinov2-b-shaped teacher (random weights), as in training."""
    import timm

    from .pipeline.train_vae import resolve_config, train_vae

    batch, steps = (8, 6) if device.type == "cuda" else (1, 3)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teacher = tmp / "dinov2_b_random.safetensors"
        from .artifacts import save_weights

        save_weights(teacher, timm.create_model("vit_base_patch14_dinov2.lvd142m", pretrained=False, img_size=224, num_classes=0).state_dict())
        data = _image_folder(tmp / "data", 256, batch * (steps + 2) + 8)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        cfg = resolve_config(
            data=str(data), out=str(tmp / "vae"), vae="sd-f8c4", image_size=256, teacher="dinov2-b",
            teacher_weights=str(teacher), batch_size=batch, steps=steps, disc_start=0, log_every=1,
            ckpt_every=10**9, image_every=10**9, val_count=1, workers=2, device=device.type, precision="bf16",
        )
        train_vae(cfg)
        log = [json.loads(line) for line in (tmp / "vae" / "log.jsonl").read_text().splitlines()]
    rate = float(np.median([r["img_per_s"] for r in log[1:]]))  # the first step includes warm-up
    rows = [(f"train-vae step, sd-f8c4 256px, dinov2-b teacher, LPIPS + GAN, batch {batch}", rate, "images/s")]
    if device.type == "cuda":
        rows.append(("peak memory of that step", torch.cuda.max_memory_allocated(device) / 2**30, "GiB"))
    return rows


def _timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median seconds of fn() over `repeats` runs, after `warmup` runs (synchronised on CUDA)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


PAIRS = 3  # interleaved A-B pairs behind each ratio: the bench stays within minutes on 2 cores


def _interleaved(a: Callable[[], object], b: Callable[[], object], pairs: int = PAIRS) -> tuple[list, list]:
    """Results of a() and b() run A, B, A, B, ... `pairs` times."""
    runs_a, runs_b = [], []
    for _ in range(pairs):
        runs_a.append(a())
        runs_b.append(b())
    return runs_a, runs_b


def _ratio(what: str, a: list[float], b: list[float]) -> Row:
    """The median of the pairs' ratios a[i] / b[i], with their spread."""
    ratios = [x / y for x, y in zip(a, b)]
    return what, float(np.median(ratios)), "x", {"min": min(ratios), "max": max(ratios), "pairs": len(ratios)}


def bench_encode(device: torch.device) -> list[Row]:
    """`encode` against the bare encoder forward on the same batches (goal: >= 0.9).

    Two rates for encode: its encoding loop (decoding workers, transfer, forward, float16
    conversion and Zarr writes, as `encode` reports it) and the whole command (plus loading
    the VAE, creating the store and the statistics pass that finalises it). On a CPU the
    workers decode on the same cores the encoder computes on, so the CPU also runs the
    split the goal is about: the encoder on one core (one torch thread, bare and in encode
    alike) and one decoding worker on another.
    """
    from .models.alignment import AlignConfig, AlignmentNet
    from .models.reals_vae import save_reals_vae
    from .models.vae import AutoencoderKL, vae_config

    name, size, batch, count = ("sd-f8c4", 256, 64, 2048) if device.type == "cuda" else ("demo", 64, 64, 1024)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vae = AutoencoderKL(vae_config(name))
        grid = size // vae.downsample_factor
        save_reals_vae(tmp / "vae", vae, AlignmentNet(AlignConfig(4, grid, 8, grid, hidden=8)), {"image_size": size}, {}, {})
        data = _image_folder(tmp / "img", size, count)
        threads = torch.get_num_threads()
        splits = [(None, threads)] + ([(1, 1)] if device.type == "cpu" and threads > 1 else [])
        for workers, torch_threads in splits:
            torch.set_num_threads(torch_threads)
            try:
                rows += _encode_against_bare(vae, tmp, data, count, batch, size, device, workers, torch_threads)
            finally:
                torch.set_num_threads(threads)
    return [(f"{what}, {name} at {size}px, batch {batch}, {count} PNGs" if i == 0 else what, *rest)
            for i, (what, *rest) in enumerate(rows)]


def _encode_against_bare(vae, tmp: Path, data: Path, count: int, batch: int, size: int, device: torch.device,
                         workers: int | None, threads: int) -> list[Row]:
    from .pipeline.encode import encode
    from .runtime import autocast

    model = vae.to(device).eval()
    x = torch.rand(batch, 3, size, size, device=device) * 2 - 1

    def run_encode() -> tuple[float, float]:
        out = tmp / f"lat-{workers}.zarr"
        start = time.perf_counter()
        result = encode(data, out, tmp / "vae", batch_size=batch, device=device.type, block_size=256,
                        precision="bf16", workers=workers)
        end_to_end = count / (time.perf_counter() - start)
        shutil.rmtree(out)
        return result["images_per_s"], end_to_end

    def forward():
        with torch.no_grad(), autocast(device, "bf16"):
            model.encode(x)

    encodes, bare = _interleaved(run_encode, lambda: batch / _timed(forward, repeats=5))
    loop, end_to_end = (list(r) for r in zip(*encodes))
    setup = f"{'default' if workers is None else workers} workers, {threads} torch thread{'s' if threads > 1 else ''}"
    return [
        (f"encode loop ({setup})", float(np.median(loop)), "images/s"),
        (f"encode command end to end ({setup}; load, create, finalise included)", float(np.median(end_to_end)), "images/s"),
        (f"bare encoder forward, same batch ({threads} torch thread{'s' if threads > 1 else ''})", float(np.median(bare)),
         "images/s"),
        _ratio(f"ratio encode loop / bare, {setup} (goal >= 0.9)", loop, bare),
        _ratio(f"ratio end to end / bare, {setup}", end_to_end, bare),
    ]


def _random_store(path: Path, rows: int, shape=(4, 32, 32), views: int = 2, classes: int = 10):
    from .data.latent_store import create_store

    store = create_store(path, rows=rows, latent_shape=shape, views=views, dtype="float16", block_size=256,
                         attrs={"vae_id": "bench", "config": {"block_size": 256}, "classes": [str(i) for i in range(classes)]})
    rng = np.random.default_rng(0)
    for block in range(-(-rows // 256)):
        n = min(256, rows - block * 256)
        post = rng.standard_normal((n, views, 2, *shape)).astype(np.float16)
        post[:, :, 1] = np.abs(post[:, :, 1])
        store.write_block(block, post, rng.integers(0, classes, n))
    store.finalize()


def bench_latent_reads(device: torch.device) -> list[Row]:
    """Random minibatches from the latent store against what a DiT-B/2 step consumes (goal: >= 20x)."""
    from torch.utils.data import DataLoader

    from .data.latent_store import LatentDataset

    rows = 8192
    with tempfile.TemporaryDirectory() as tmp:
        _random_store(Path(tmp) / "s.zarr", rows)
        data = LatentDataset(Path(tmp) / "s.zarr")

        def read() -> float:
            loader = DataLoader(data, batch_size=256, shuffle=True, num_workers=2, generator=torch.Generator().manual_seed(0))
            it = iter(loader)
            next(it)  # the workers' start is not reading
            start, n = time.perf_counter(), 0
            for _ in range(20):
                n += len(next(it)[0])
            return n / (time.perf_counter() - start)

        def consume() -> float:
            return _train_dit_run(device, "DiT-B/2", compile=device.type == "cuda", steps=_SHORT_RUN[device.type])["rate"]

        reads, consumption = _interleaved(read, consume)
    return [
        ("LatentDataset random minibatches (256 of 4x32x32, flip views, 2 workers)", float(np.median(reads)), "latents/s"),
        ("DiT-B/2 training consumption at 32x32x4 (`train_dit`, same machine)", float(np.median(consumption)), "latents/s"),
        _ratio("ratio reads / consumption (goal >= 20)", reads, consumption),
    ]


def _dit_batch(device: torch.device, name: str) -> int:
    xl = "XL" in name
    return (64 if xl else 128) if device.type == "cuda" else (2 if xl else 8)


_SHORT_RUN = {"cpu": 4, "cuda": None}  # train_dit steps of one side of a pair: 2 measured after 2 of warm-up


def _train_dit_run(device: torch.device, name: str, compile: bool, batch: int | None = None, attn: str = "auto",
                   steps: int | None = None) -> dict:
    """`train_dit` itself for a few dozen steps at 256 px (32x32x4 latents, 1000 classes) on a
    random latent store: loading, the step, clipping, the EMA and the NaN guard, all as a
    user runs them. Images/s is the median of the log's windows after the warm-up (which
    holds the compilation); the final loss is read from the log."""
    from .pipeline.train_dit import LOG, resolve_config, train_dit
    from .pipeline.training import read_log

    cuda = device.type == "cuda"
    batch = batch or _dit_batch(device, name)
    torch._dynamo.reset()  # each model compiles afresh: another model's shapes would turn on dynamic shapes
    default_steps, log_every, warmup_windows = (30, 5, 2) if cuda else (6, 1, 2)
    steps = steps or default_steps
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    # The run would end by writing a checkpoint and a model folder (for XL/2: 16 GB, a minute of
    # a GPU session): not what is measured, so they are skipped.
    skipped = {"id": "bench", "metrics": {"final_loss": None}}
    with tempfile.TemporaryDirectory() as tmp, mock.patch("reals_cli.pipeline.train_dit.save_checkpoint"), \
            mock.patch("reals_cli.pipeline.train_dit.write_model", return_value=skipped):
        tmp = Path(tmp)
        _random_store(tmp / "s.zarr", rows=max(4 * batch, 256), classes=1000)
        train_dit(resolve_config(
            latents=str(tmp / "s.zarr"), out=str(tmp / "run"), model=name, objective="sit", batch_size=batch, steps=steps,
            log_every=log_every, ckpt_every=10**9, sample_every=10**9, workers=4 if cuda else 1, device=device.type,
            precision="bf16", compile=compile, attn=attn))
        log = read_log(tmp / "run" / LOG)
    measured = log[warmup_windows:]
    return {"rate": float(np.median([r["img_per_s"] for r in measured])),
            "tflops": float(np.median([r["tflop_per_s"] for r in measured])), "loss": log[-1]["loss"],
            "batch": batch, "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")}


def _reference_step_rate(device: torch.device, name: str) -> float:
    """Training images/s of a plain eager fp32 step of the same model: explicit attention,
    plain AdamW, no autocast, no EMA (the CPU reference of #5)."""
    from .models.dit import build_dit
    from .objectives.transport import Transport

    batch = _dit_batch(device, name)
    model = build_dit(name, 32, 4, 1000, attn="math").to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    objective = Transport()
    x1 = torch.randn(batch, 4, 32, 32, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)

    def step():
        t = objective.sample_time(batch, device)
        x0 = torch.randn_like(x1)
        x_t = objective.q_sample(x1, t, x0)
        loss = objective.loss(model(x_t, t, y), x1, x_t, t, x0)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return batch / _timed(step, repeats=2 if device.type == "cpu" else 10, warmup=1 if device.type == "cpu" else 3)


def _peak_flops(device: torch.device) -> float:
    """Dense bf16 peak of the GPU (NaN where unknown): H100 SXM and H200 share 989 TFLOP/s;
    the H100 PCIe and NVL cards run slower clocks."""
    name = torch.cuda.get_device_name(device)
    for card, peak in (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12)):
        if card in name:
            return peak
    return float("nan")


def bench_train_dit(device: torch.device) -> list[Row]:
    """`train_dit` throughput and model-FLOP utilisation: training FLOPs = 3 x the forward
    FLOPs, counted analytically (`dit_flops`: 2 x the multiply-adds of every matmul, equal to
    torch's FlopCounterMode; a training step counts 3.00 forwards there). On a CPU, against
    the plain reference step, interleaved (S/2 and B/2: XL/2 pairs would take minutes each)."""
    from .models.attention import resolve_attention

    rows = []
    attn = resolve_attention("auto", device)
    if device.type == "cpu":
        for name in ("DiT-S/2", "DiT-B/2"):
            what = f"{name} `train_dit`, batch {_dit_batch(device, name)}, {attn} attention"
            runs, reference = _interleaved(lambda: _train_dit_run(device, name, False, steps=_SHORT_RUN["cpu"]),
                                           lambda: _reference_step_rate(device, name))
            rates = [run["rate"] for run in runs]
            rows += [(f"{what}: training", float(np.median(rates)), "images/s"),
                     (f"{what}: FLOP rate (3 x analytic forward FLOPs, as train-dit logs it)",
                      float(np.median([run["tflops"] for run in runs])), "TFLOP/s"),
                     (f"{name} plain eager fp32 reference step", float(np.median(reference)), "images/s"),
                     _ratio(f"{name} ratio `train_dit` / reference", rates, reference)]
        return rows
    # (model, --compile, batch): XL/2 eager and compiled at the batch of #5's NaN check, then
    # compiled at twice that batch, where the matmuls are larger.
    runs = [("DiT-B/2", True, None), ("DiT-XL/2", False, None), ("DiT-XL/2", True, None), ("DiT-XL/2", True, 128)]
    peak = _peak_flops(device)
    for name, compiled, batch in runs:
        what = f"{name} `train_dit`, batch {batch or _dit_batch(device, name)}, {attn} attention{', --compile' if compiled else ''}"
        try:
            run = _train_dit_run(device, name, compiled, batch)
        except torch.cuda.OutOfMemoryError:  # the larger batch may not fit: the rows measured so far still count
            rows.append((f"{what}: out of GPU memory", float("nan"), ""))
            continue
        rows += [(f"{what}: training", run["rate"], "images/s"),
                 (f"{what}: FLOP rate (3 x analytic forward FLOPs, as train-dit logs it)", run["tflops"], "TFLOP/s"),
                 (f"{what}: MFU (bf16 dense peak {peak / 1e12:.0f} TFLOP/s; goal for XL/2 >= 55%)", 100 * run["tflops"] * 1e12 / peak, "%"),
                 (f"{what}: final loss (finite: no NaN in bf16)", run["loss"], ""),
                 (f"{what}: peak memory", run["peak_gib"], "GiB")]
    return rows


def bench_inception(device: torch.device) -> list[Row]:
    """FID feature extraction: the offline Inception (pool + sFID map) on uint8 images."""
    from .metrics.inception import OfflineInception

    batch = 200 if device.type == "cuda" else 50
    net = OfflineInception("bench", ["2048", "2023"]).to(device)
    images = torch.randint(0, 256, (batch, 3, 256, 256), dtype=torch.uint8, device=device)

    def run():
        with torch.no_grad():
            net(images)

    return [(f"Inception features (pool + sFID), 256 px uint8 -> 299, batch {batch}", batch / _timed(run, repeats=2), "images/s")]


def bench_sample(device: torch.device) -> list[Row]:
    """Sampling throughput: SiT 250-step SDE with cfg 4, latents only (the VAE decode of 50,000
    images costs minutes, the sampler hours). On CUDA also the model-FLOP utilisation, the
    projected hours for 50,000 samples, and the same for the guidance interval [0, 0.75]
    of the REPA/ReaLS protocol. On a CPU also what padding a small batch up to a fixed
    forward batch cost (`--forward-batch`, before it was opt-in)."""
    from .models.dit import build_dit, dit_flops
    from .objectives.samplers import guided, noise_level, resolve_sampler, run_sampler
    from .objectives.transport import Transport
    from .pipeline.sample import SampleNoise, in_fixed_batches
    from .runtime import autocast

    cuda = device.type == "cuda"
    objective = Transport()
    batch, steps = (256, 50) if cuda else (2, 5)  # per-step cost is constant: measured over `steps`, scaled to 250

    def rate(model, rows: int | None, interval: tuple[float, float], steps: int = steps) -> float:
        """= `reals sample --batch-size {batch} --forward-batch {rows}`; rows None: no padding, the default."""
        def forward(x, t, y):
            with autocast(device, "bf16"):
                return model(x, t, y).float()

        net = forward if rows is None else in_fixed_batches(forward, rows)
        guide = guided(net, 4.0, interval, noise_level(objective), model.null_class, 4)
        x = torch.randn(batch, 4, 32, 32, device=device)
        y = torch.randint(0, 1000, (batch,), device=device)

        def run(spec=resolve_sampler("sit", "sde", steps)):
            with torch.inference_mode():  # the per-sample noise streams of `reals sample`, as it draws them
                run_sampler(objective, spec, guide, x, y, SampleNoise(0, range(batch), (4, 32, 32), device))

        if cuda:
            run(resolve_sampler("sit", "sde", 3))  # warm-up (and compilation) on a short run
        return batch / _timed(run, repeats=1, warmup=0) * steps / 250

    rows = []
    for name in ["SiT-B/2", "SiT-XL/2"]:
        model = build_dit(name, 32, 4, 1000).to(device).eval()
        if cuda:
            torch._dynamo.reset()
            model.compile_blocks(device)  # = `reals sample --compile`
        what = f"{name}, 250-step SDE, cfg 4, 256 px latents, batch {batch}"
        # Compiled: one graph at a full batch's rows, as `reals sample --compile` takes it.
        full = rate(model, 2 * batch if cuda else None, (0.0, 1.0))
        rows.append((f"{what}, {f'forward batch {2 * batch}, --compile, bf16' if cuda else 'no padded row (the default)'} "
                     f"(measured over {steps} steps)", full, "images/s"))
        if not cuda:
            if "B/2" in name:  # 4 rows a pass against 16: the issue's --batch-size 16 under a forward batch of 128, scaled
                unpadded, padded = _interleaved(lambda: rate(model, None, (0.0, 1.0), steps=2),
                                                lambda: rate(model, 8 * batch, (0.0, 1.0), steps=2))
                rows.append(_ratio(f"{name}, batch {batch}: ratio no padded row (default) / --forward-batch {8 * batch}",
                                   unpadded, padded))
            continue
        flops = 250 * 2 * dit_flops(name, 32, 4)  # per image: 250 steps, a conditional and an unconditional row
        peak = _peak_flops(device)
        rows += [(f"{name}: MFU of that run (bf16 dense peak {peak / 1e12:.0f} TFLOP/s)", 100 * full * flops / peak, "%"),
                 (f"{name}: 50,000 samples at that rate", 50_000 / full / 3600, "hours"),
                 (f"{name}: 50,000 samples at 100% of the bf16 peak (the FLOP floor)", 50_000 * flops / peak / 3600, "hours")]
        if "XL" in name:
            # The unguided steps run `batch` rows: a forward batch of `batch` pads none of them. Compiled
            # afresh for that shape: on top of the first it would compile a dynamic-shape graph.
            torch._dynamo.reset()
            interval = rate(model, batch, (0.0, 0.75))
            rows += [(f"{name}, cfg interval [0, 0.75], forward batch {batch}", interval, "images/s"),
                     (f"{name}, cfg interval [0, 0.75]: 50,000 samples at that rate", 50_000 / interval / 3600, "hours")]
    return rows


# Kernel kinds by name, first match wins: the attention kernels of xformers, FlashAttention and
# SDPA (some are CUTLASS kernels too), then Inductor's fused Triton kernels, then the GEMMs of
# cuBLAS (nvjet, sm90 xmma) and CUTLASS (cuDNN's patch-embedding convolutions among them), then
# the multi-tensor kernels of the fused AdamW, the gradient norm and the EMA.
KERNEL_KINDS = [("attention", ("fmha", "flash", "attention", "sdpa")), ("fused elementwise and norms (Triton)", ("triton",)),
                ("matmuls (GEMM)", ("gemm", "nvjet", "xmma", "cutlass", "sm90")),
                ("optimizer, gradient clipping and EMA", ("adam", "multi_tensor", "foreach"))]


def _kernel_shares(prof, count: int) -> tuple[float, dict[str, float]]:
    """GPU kernel milliseconds per step (over `count` steps) and the share of each kernel kind."""
    times: dict[str, float] = {}
    for evt in prof.key_averages():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        kind = next((k for k, keys in KERNEL_KINDS if any(key in evt.key.lower() for key in keys)), "other (copies, casts, eager elementwise)")
        times[kind] = times.get(kind, 0.0) + evt.self_device_time_total
    total = sum(times.values())
    if not total:  # the profiler saw no kernel (CUPTI unavailable): no shares, rather than no rows
        return float("nan"), {}
    return total / count / 1e3, {k: 100 * v / total for k, v in sorted(times.items(), key=lambda kv: -kv[1])}


def bench_profile(device: torch.device) -> list[Row]:
    """Where the GPU time goes (CUDA only): the kernel time of DiT-XL/2 `train_dit` steps
    (batch 128, --compile) and of SiT-XL/2 sampling forwards (512 rows, --compile, bf16), split
    by kernel kind, next to the wall time per step; then the training rate with xformers in
    place of torch SDPA (auto's choice), and at batch 256."""
    from torch.profiler import ProfilerActivity, profile, schedule

    from .models.attention import resolve_attention
    from .models.dit import build_dit
    from .pipeline import train_dit as train_dit_module
    from .runtime import autocast

    if device.type != "cuda":
        return []
    rows = []
    active = 5
    prof = profile(activities=[ProfilerActivity.CUDA], schedule=schedule(wait=12, warmup=2, active=active, repeat=1))
    ema_update = train_dit_module.ema_update

    def step_then_tick(*args, **kwargs):  # ema_update ends every step of the loop
        ema_update(*args, **kwargs)
        prof.step()

    with prof, mock.patch.object(train_dit_module, "ema_update", step_then_tick):
        run = _train_dit_run(device, "DiT-XL/2", True, 128)
    what = "DiT-XL/2 `train_dit` step, batch 128, --compile"
    busy, shares = _kernel_shares(prof, active)
    rows += [(f"{what}: wall time", 1e3 * run["batch"] / run["rate"], "ms"), (f"{what}: GPU kernel time", busy, "ms")]
    rows += [(f"{what}: share of kernel time in {kind}", share, "%") for kind, share in shares.items()]

    def sampling_forward() -> list:  # its own scope: the model and inputs are freed when it returns
        rows = []
        model = build_dit("SiT-XL/2", 32, 4, 1000).to(device).eval()
        torch._dynamo.reset()
        model.compile_blocks(device)
        x = torch.randn(512, 4, 32, 32, device=device)
        t = torch.rand(512, device=device)
        y = torch.randint(0, 1000, (512,), device=device)

        def forward():
            with torch.inference_mode(), autocast(device, "bf16"):
                model(x, t, y)

        wall = _timed(forward, repeats=active, warmup=3)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(active):
                forward()
            torch.cuda.synchronize()
        what = "SiT-XL/2 sampling forward, 512 rows, --compile, bf16"
        busy, shares = _kernel_shares(prof, active)
        rows += [(f"{what}: wall time", 1e3 * wall, "ms"), (f"{what}: GPU kernel time", busy, "ms")]
        rows += [(f"{what}: share of kernel time in {kind}", share, "%") for kind, share in shares.items()]
        return rows

    rows += sampling_forward()

    peak = _peak_flops(device)
    for attn, batch in (("xformers", 128), ("auto", 256)):
        what = f"DiT-XL/2 `train_dit`, batch {batch}, {attn} attention, --compile"
        try:
            what = f"DiT-XL/2 `train_dit`, batch {batch}, {resolve_attention(attn, device)} attention, --compile"
            run = _train_dit_run(device, "DiT-XL/2", True, batch, attn)
        except UserError as e:  # xformers not installed: the other rows still count
            rows.append((f"{what}: not run ({e})", float("nan"), ""))
            continue
        except torch.cuda.OutOfMemoryError:
            rows.append((f"{what}: out of GPU memory", float("nan"), ""))
            continue
        rows += [(f"{what}: training", run["rate"], "images/s"), (f"{what}: MFU", 100 * run["tflops"] * 1e12 / peak, "%")]
    return rows


BENCHMARKS: dict[str, Callable[[torch.device], list[Row]]] = {
    "train-vae": bench_train_vae,
    "encode": bench_encode,
    "latent-reads": bench_latent_reads,
    "train-dit": bench_train_dit,
    "sample": bench_sample,
    "inception": bench_inception,
    "profile": bench_profile,
}


def _spread(extra: list) -> str:
    return f"{extra[0]['min']:.4g} to {extra[0]['max']:.4g} ({extra[0]['pairs']} pairs)" if extra else ""


def write_page(results: dict, out: Path) -> None:
    newest = max((r["date"] for r in results.values()), default="")
    lines = [
        "# Benchmarks", "",
        "Made by `make bench` (`python -m reals_cli.bench`), and on a GPU by `make gpu-check`;",
        "each section names its machine, date and command. Sections dated before the newest were",
        "kept from that earlier run, as measured then (GPU sections need a GPU to remeasure).", "",
        "A ratio of A to B comes from A and B timed interleaved (A, B, A, B, ...): each pair ran",
        "under the same background load. The value is the median of the pairs' ratios, the spread",
        "their min and max; the rates beside it are medians of the same runs. CPU numbers are for",
        "those ratios; absolute times mean something only on a GPU.", "",
    ]
    for key in sorted(results):
        r = results[key]
        kept = f" Kept from the run of {r['date']}, not remeasured since." if r["date"] != newest else ""
        load = (f" Load average (1 min) before and after: {r['load'][0]:.2f}, {r['load'][1]:.2f} on {r['cpus']} cores"
                + (": shared with other jobs, so the rates are slowed and the spreads wide." if max(r["load"]) > r["cpus"]
                   else ".") if "load" in r else "")
        lines += [f"## {r['benchmark']} on {r['device']}", "",
                  f"Machine: {r['machine']}. Date: {r['date']}. Command: `{r['command']}`.{load}{kept}", "",
                  "| what | value | unit | spread |", "|---|---|---|---|"]
        lines += [f"| {what} | {value:.4g} | {unit} | {_spread(extra)} |" for what, value, unit, *extra in r["rows"]]
        lines.append("")
    atomic_write_bytes(out, "\n".join(lines).encode())


@click.command()
@click.option("--out", default="docs/benchmarks.md", show_default=True, help="Markdown page to write.")
@click.option("--only", multiple=True, type=click.Choice(list(BENCHMARKS)), help="Run only these benchmarks.")
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]), show_default=True)
def main(out: str, only: tuple[str, ...], device: str) -> None:
    """Run the benchmarks and rebuild the benchmarks page."""
    dev = resolve_device(device)
    out_path = Path(out)
    store = out_path.with_suffix(".json")
    results = json.loads(store.read_text()) if store.is_file() else {}
    for name in only or BENCHMARKS:
        console.print(Text.assemble((f"bench {name}", "bold"), f" on {dev}"))
        start, load = time.perf_counter(), os.getloadavg()[0]  # others' work on the cores, for the record
        rows = BENCHMARKS[name](dev)
        if not rows:  # a benchmark for another device
            continue
        results[f"{name}@{dev.type}"] = {
            "benchmark": name, "device": dev.type, "machine": describe_machine(dev), "rows": rows,
            "date": time.strftime("%Y-%m-%d"), "seconds": time.perf_counter() - start,
            "load": [load, os.getloadavg()[0]], "cpus": os.cpu_count(),
            "command": "python -m reals_cli.bench " + " ".join(sys.argv[1:]),
        }
        atomic_write_json(store, results)
    write_page(results, out_path)


if __name__ == "__main__":
    main()
