"""DiT (Peebles & Xie 2023), the network that both DiT and SiT train.

Parameter and buffer names and shapes are those of the official DiT and SiT
checkpoints (`DiT-XL-2-256x256.pt`, `SiT-XL-2-256x256.pt`), so they load with
strict=True. The network embeds whatever time it is given: the DiT objective
feeds the DDPM step index 0..999, the SiT objective continuous t in [0, 1]. With
learn_sigma it outputs 2C channels; SiT only reads the first C.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import UserError
from .attention import Attention, resolve_attention

_SIZES = {  # depth, width, heads
    "T": (6, 192, 3),  # not in the DiT paper: a size that trains on CPU, for demos and tests
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
DIT_MODELS = {
    f"DiT-{size}/{patch}": dict(depth=depth, hidden_size=width, num_heads=heads, patch_size=patch)
    for size, (depth, width, heads) in _SIZES.items()
    for patch in (2, 4, 8)
}


def model_config(name: str) -> dict:
    """Architecture of a DiT/SiT name ("DiT-B/2"; "SiT-B/2" is the same network)."""
    key = "DiT-" + name[4:] if name.startswith("SiT-") else name
    if key not in DIT_MODELS:
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(DIT_MODELS)} (or SiT-*)")
    return DIT_MODELS[key]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) t: [cos, sin] halves, as DiT/GLIDE."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """MAE's fixed 2D embedding, grid*grid x dim, tokens in row-major order.

    The first half of the channels encodes the column, the second half the row,
    each as [sin, cos] at frequencies 1 / 10000^(k / (dim/4)).
    """
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    pos = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(pos, pos, indexing="ij")

    def embed(coord: torch.Tensor) -> torch.Tensor:
        angles = coord.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([embed(cols), embed(rows)], dim=1).float()


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # B x T x D


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # Features in fp32 (t * freq reaches 999), then in the weights' dtype: a model cast
        # whole to bf16 or fp64 runs without autocast.
        return self.mlp(timestep_embedding(t, self.frequency_dim).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding; with dropout > 0 the table has one more row, the null class
    `num_classes`, which training substitutes at random and guidance asks for."""

    def __init__(self, num_classes: int, dim: int, dropout: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout = dropout
        self.embedding_table = nn.Embedding(num_classes + int(dropout > 0), dim)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout
            y = torch.where(drop, self.num_classes, y)
        return self.embedding_table(y)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero block: the condition sets shift/scale of both norms and gates both branches."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool | str = False, attn: str = "auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, qk_norm=qk_norm, backend=attn)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size**2 * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        qk_norm: bool | str = False,
        attn: str = "auto",
        class_dropout_prob: float | None = None,
    ):
        super().__init__()
        if class_dropout_prob is not None:  # the official DiT/SiT keyword, so their configs pass as they are
            class_dropout = class_dropout_prob
        if input_size % patch_size:
            raise UserError(f"latent size {input_size} is not a multiple of the patch size {patch_size}")
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.grad_checkpointing = False
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout)
        # Fixed, never trained, but a state-dict key: the official checkpoints carry it.
        grid = input_size // patch_size
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, grid).unsqueeze(0))
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm=qk_norm, attn=attn) for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self._init_weights()

    @property
    def null_class(self) -> int:
        return self.num_classes

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight  # as a linear layer on the flattened patch
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity and the output as zero.
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [
            self.final_layer.adaLN_modulation[-1],
            self.final_layer.linear,
        ]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def compile_blocks(self, device: torch.device | str) -> None:
        """torch.compile each transformer block ("regional" compilation). The blocks share
        one code object, so the first one's compiled graph serves all of them: compiling
        takes the time of one block rather than of the whole network, and the elementwise
        work (norms, adaLN modulation, gates, GELU) fuses as it would in a whole-graph compile.
        """
        for block in self.blocks:
            block.attn.backend = resolve_attention(block.attn.backend, device)  # "auto" is decided outside the graph
            block.compile()

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """B x T x (p*p*C) -> B x C x H x W."""
        p, c = self.patch_size, self.out_channels
        h = w = math.isqrt(x.shape[1])
        x = x.reshape(x.shape[0], h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, return_features_at: int | None = None):
        """x: B x C x H x W, t: B (or scalar) times, y: B class indices (null_class for none).

        With return_features_at=K, also returns the B x T x D tokens after block K
        (1-based, as REPA's encoder depth), for the representation-alignment loss.
        """
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        c = self.t_embedder(t) + self.y_embedder(y)
        h = self.x_embedder(x) + self.pos_embed
        features = None
        for i, block in enumerate(self.blocks, start=1):
            if self.grad_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, c, use_reentrant=False)
            else:
                h = block(h, c)
            if i == return_features_at:
                features = h
        out = self.unpatchify(self.final_layer(h, c))
        return out if return_features_at is None else (out, features)


def build_dit(
    name: str,
    input_size: int,
    in_channels: int,
    num_classes: int,
    learn_sigma: bool = True,
    qk_norm: bool | str = False,
    attn: str = "auto",
    class_dropout: float = 0.1,
) -> DiT:
    """A DiT/SiT network by name, for input_size x input_size latents of in_channels."""
    return DiT(
        input_size=input_size,
        in_channels=in_channels,
        num_classes=num_classes,
        learn_sigma=learn_sigma,
        qk_norm=qk_norm,
        attn=attn,
        class_dropout=class_dropout,
        **model_config(name),
    )


def dit_flops(name: str, input_size: int, in_channels: int, learn_sigma: bool = True) -> int:
    """Forward FLOPs for one sample, counted analytically as 2 x the multiply-adds of
    every matmul (patch embedding, time MLP, adaLN, qkv, QK^T, AV, projection, MLP,
    final linear); norms, activations and softmax are left out. DiT's paper quotes
    multiply-adds as "Gflops" (118.6 for XL/2 at 256 px), i.e. half this number.
    A training step costs about 3x the forward.
    """
    cfg = model_config(name)
    d, p, depth = cfg["hidden_size"], cfg["patch_size"], cfg["depth"]
    tokens = (input_size // p) ** 2
    out_channels = 2 * in_channels if learn_sigma else in_channels
    block = tokens * (3 * d * d + d * d + 8 * d * d) + 2 * tokens * tokens * d + 6 * d * d
    macs = (
        tokens * p * p * in_channels * d  # patch embedding
        + 256 * d + d * d  # time MLP
        + depth * block
        + 2 * d * d + tokens * d * p * p * out_channels  # final adaLN + linear
    )
    return 2 * macs
