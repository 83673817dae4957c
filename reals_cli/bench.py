"""`make bench`: throughput of each stage, written to docs/benchmarks.md with the machine.

Each benchmark returns rows of (what, value, unit); results accumulate in
docs/benchmarks.json (one entry per benchmark and device, the newest wins) and
the markdown page is rebuilt from it, so a CPU run and a GPU run sit side by side.
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import click
import numpy as np
import torch

from .artifacts import atomic_write_bytes, atomic_write_json
from .console import console
from .runtime import resolve_device


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def _image_folder(root: Path, size: int, count: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    (root / "a").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / "a" / f"{i}.png")
    return root


def bench_train_vae(device: torch.device) -> list[tuple[str, float, str]]:
    """One sd-f8c4 train step at 256 px with a dinov2-b-shaped teacher (random weights), as in training."""
    import timm

    from .train_vae import resolve_config, train_vae

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


BENCHMARKS: dict[str, Callable[[torch.device], list[tuple[str, float, str]]]] = {
    "train-vae": bench_train_vae,
}


def write_page(results: dict, out: Path) -> None:
    lines = [
        "# Benchmarks", "",
        "Made by `make bench` (`python -m reals_cli.bench`); each section names its machine and date.",
        "CPU numbers are for ratios measured in the same run; absolute times mean something only on a GPU.", "",
    ]
    for key in sorted(results):
        r = results[key]
        lines += [f"## {r['benchmark']} on {r['device']}", "", f"Machine: {r['machine']}. Date: {r['date']}. Command: `{r['command']}`.", "",
                  "| what | value | unit |", "|---|---|---|"]
        lines += [f"| {what} | {value:.4g} | {unit} |" for what, value, unit in r["rows"]]
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
        console.print(f"[bold]bench {name}[/bold] on {dev}")
        start = time.perf_counter()
        rows = BENCHMARKS[name](dev)
        results[f"{name}@{dev.type}"] = {
            "benchmark": name, "device": dev.type, "machine": machine(dev), "rows": rows,
            "date": time.strftime("%Y-%m-%d"), "seconds": time.perf_counter() - start,
            "command": "python -m reals_cli.bench " + " ".join(sys.argv[1:]),
        }
        atomic_write_json(store, results)
    write_page(results, out_path)


if __name__ == "__main__":
    main()
