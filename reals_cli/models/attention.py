"""Multi-head self-attention with a switchable kernel, for the DiT/SiT blocks.

Backends: `xformers` (memory_efficient_attention, CUDA only), `sdpa` (torch's
scaled_dot_product_attention, which picks flash/memory-efficient kernels itself),
`math` (explicit softmax(QK^T / sqrt(d)) V in float32: the reference the others are
checked against). `auto` is sdpa everywhere: on this project's H100 runs (docs/benchmarks.md,
2026-11-26) SDPA beat xformers by 4% in a compiled DiT-XL/2 training step (530 against 511
images/s) and by 4.7% in a compiled SiT-XL/2 sampling forward (278 against 291 ms), and it
needs no second CUDA runtime. xformers is loaded, with the runtime its wheels link, only
when asked for; `resolve_attention` says which kernel a run really uses.

The module's parameter names (`qkv`, `proj`, optional `q_norm`/`k_norm`) and the
qkv output layout (3 x heads x head_dim) are timm's, which the official DiT and SiT
checkpoints were saved from.
"""

from __future__ import annotations

import ctypes
import functools
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError

BACKENDS = ("auto", "xformers", "sdpa", "math")


def _preload_cuda12_runtime() -> None:
    """xformers' wheels link libcudart.so.12 (their kernels use torch's stable C ABI, so they
    load into any torch >= 2.10). A CUDA 13 torch ships no such runtime; the `cuda` extra's
    nvidia-cuda-runtime-cu12 does, and loading it first lets xformers' library find it.
    Looked up as a file on sys.path, as torch finds its own: `import nvidia.cuda_runtime`
    fails where a CUDA 13 install's `nvidia` namespace is shadowed or shadows this one."""
    for entry in sys.path:
        lib = Path(entry or ".") / "nvidia" / "cuda_runtime" / "lib" / "libcudart.so.12"
        if lib.is_file():
            ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
            return


@functools.cache
def _xformers_works(device_type: str) -> bool:
    if device_type != "cuda":
        return False
    try:
        if not (torch.version.cuda or "").startswith("12."):  # a CUDA 12 torch has loaded the runtime itself
            _preload_cuda12_runtime()
        import xformers.ops as xops

        q = torch.zeros(1, 8, 1, 64, device="cuda", dtype=torch.float16)
        xops.memory_efficient_attention(q, q, q)
        return True
    except Exception:  # an import error, or a build that has no kernel for this GPU
        return False


def resolve_attention(name: str, device: torch.device | str) -> str:
    """The backend that `name` means on `device`: one of xformers, sdpa, math."""
    if name not in BACKENDS:
        raise UserError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "auto":
        return "sdpa"
    device_type = torch.device(device).type
    if name == "xformers" and not _xformers_works(device_type):
        raise UserError(
            f"xformers attention is not usable on {device_type} (it needs CUDA and `pip install reals-cli[cuda]`); "
            "use --attn sdpa or --attn auto"
        )
    return name


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
    """q, k, v: B x T x H x d (xformers' layout) -> B x T x H x d. `backend` must be resolved."""
    if backend == "xformers":
        import xformers.ops as xops

        return xops.memory_efficient_attention(q, k, v)
    q, k, v = (a.transpose(1, 2) for a in (q, k, v))  # B x H x T x d
    if backend == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v)
    elif backend == "math":
        wide = torch.promote_types(q.dtype, torch.float32)  # the reference: fp32 or wider, never narrower
        with torch.autocast(q.device.type, enabled=False):  # which would run its matmuls in bf16
            scores = q.to(wide) @ k.to(wide).transpose(-2, -1) / math.sqrt(q.shape[-1])
            out = (scores.softmax(dim=-1) @ v.to(wide)).to(v.dtype)
    else:
        raise ValueError(f"attention backend {backend!r} is not resolved")
    return out.transpose(1, 2)


def _qk_norm(kind: bool | str, head_dim: int) -> nn.Module:
    # Normalising q and k per head bounds the attention logits, the usual cure for
    # late bf16/fp16 divergence. True means LayerNorm, as timm's qk_norm.
    if kind in (False, None, "none"):
        return nn.Identity()
    if kind in (True, "layernorm"):
        return nn.LayerNorm(head_dim, eps=1e-6)
    if kind == "rmsnorm":
        return nn.RMSNorm(head_dim, eps=1e-6)
    raise UserError(f"unknown qk-norm {kind!r}; choose none, layernorm or rmsnorm")


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qk_norm: bool | str = False, backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise UserError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.num_heads = num_heads
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = _qk_norm(qk_norm, dim // num_heads)
        self.k_norm = _qk_norm(qk_norm, dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads).unbind(2)
        # CUDA autocast runs LayerNorm in fp32: back to v's dtype, as xformers needs one dtype.
        q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        # compile_blocks resolved the backend before compiling; resolving in the graph would
        # break it (the xformers check looks at files).
        compiled = torch.compiler.is_compiling() and self.backend != "auto"
        out = attention(q, k, v, self.backend if compiled else resolve_attention(self.backend, x.device))
        return self.proj(out.reshape(B, T, D))
