"""Device, precision, seeding and RNG state: the run-time choices every command shares."""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch

from .errors import UserError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu or auto")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UserError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)


def local_device(device: torch.device) -> torch.device:
    """Under torchrun, CUDA work goes to this process's own GPU (LOCAL_RANK)."""
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def autocast(device: torch.device, precision: str):
    """Mixed precision on CUDA; on CPU everything runs in fp32 (CPU half matmuls are slow)."""
    if precision == "fp32" or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=PRECISIONS[precision])


def allow_tf32(device: torch.device) -> None:
    """fp32 matmuls in TF32 on CUDA, as DiT's and SiT's train.py and sample.py set it: several
    times the fp32 rate at ~1e-3 relative error per product (convolutions default to TF32
    already). bf16/fp16 autocast runs are unaffected."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True


# The seeds every command takes: numpy's legacy seeding holds 32 bits, and the trainers scale a seed
# into 64-bit generator seeds (seed * 1_000_003 * 64), which 32 bits keep in range.
SEED_MAX = 2**32 - 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """All global RNG states, in a form `artifacts.save_state` can store."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(int(x) for x in internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def describe_machine(device: torch.device | None = None) -> str:
    """CPU model and threads, the GPU if any, torch and Python: the line reports and benchmarks print."""
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if device is not None and device.type == "cuda":
        accelerator = f"GPU {torch.cuda.get_device_name(device)}"
    else:
        accelerator = f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} CPU threads (torch uses {torch.get_num_threads()}), {accelerator}; "
            f"torch {torch.__version__}, Python {platform.python_version()}")
