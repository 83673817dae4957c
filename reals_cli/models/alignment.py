"""The alignment network: maps a VAE latent onto a teacher's patch and global features.

MLP_patch cuts the latent into p x p patches, p = latent grid / teacher grid (a
32x32 latent against DINOv2's 16x16 tokens gives p = 2), and maps each patch to
a teacher patch feature with a 3-layer MLP (1x1 convs over the patch grid).
MLP_cls pools the latent for the global feature: each patch is embedded by a
linear layer, the embeddings are averaged, and an MLP maps the mean to the
teacher's global feature. (The paper draws "pooling + MLP"; pooling the raw
4-channel latent would leave 4 numbers for a 768-d target, so we pool a learned
per-patch embedding instead.)

The same network is saved with the VAE: probes and REPA apply it to latents.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError


@dataclass
class AlignConfig:
    latent_channels: int
    latent_grid: int
    teacher_dim: int
    teacher_grid: int
    hidden: int = 1024

    @property
    def patch(self) -> int:
        return self.latent_grid // self.teacher_grid

    def check(self) -> "AlignConfig":
        if self.teacher_grid < 1 or self.latent_grid % self.teacher_grid:
            raise UserError(
                f"the teacher's {self.teacher_grid}x{self.teacher_grid} feature grid does not divide the "
                f"{self.latent_grid}x{self.latent_grid} latent grid; pick a --teacher-resolution or --image-size "
                f"that makes the latent grid a multiple of the teacher grid"
            )
        return self

    def to_dict(self) -> dict:
        return asdict(self)


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(d_in, hidden, 1), nn.SiLU(),
        nn.Conv2d(hidden, hidden, 1), nn.SiLU(),
        nn.Conv2d(hidden, d_out, 1),
    )


class AlignmentNet(nn.Module):
    def __init__(self, config: AlignConfig):
        super().__init__()
        self.config = config.check()
        d_in = config.latent_channels * config.patch**2
        self.mlp_patch = _mlp(d_in, config.hidden, config.teacher_dim)
        self.cls_embed = nn.Conv2d(d_in, config.hidden, 1)
        self.mlp_cls = _mlp(config.hidden, config.hidden, config.teacher_dim)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z: B x C x H x W latent -> (B x D x h x w patch features, B x D global feature)."""
        if z.shape[1] != self.config.latent_channels or z.shape[-1] != self.config.latent_grid:
            raise UserError(
                f"latent of shape {tuple(z.shape[1:])} does not fit this alignment network "
                f"(made for {self.config.latent_channels}x{self.config.latent_grid}x{self.config.latent_grid})"
            )
        tokens = F.pixel_unshuffle(z, self.config.patch)
        pooled = F.silu(self.cls_embed(tokens)).mean(dim=(2, 3), keepdim=True)
        return self.mlp_patch(tokens), self.mlp_cls(pooled).flatten(1)


def alignment_loss(pred: torch.Tensor, target: torch.Tensor, cos_weight: float = 0.9, l1_weight: float = 0.1) -> torch.Tensor:
    """Cosine-embedding loss (1 - cos) plus smooth-L1, over feature vectors (dim 1)."""
    if pred.dim() == 4:  # patch grids: every grid cell is one feature vector
        pred, target = pred.flatten(2).transpose(1, 2).flatten(0, 1), target.flatten(2).transpose(1, 2).flatten(0, 1)
    cos = 1 - F.cosine_similarity(pred, target, dim=1).mean()
    return cos_weight * cos + l1_weight * F.smooth_l1_loss(pred, target)


def feature_cosine(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity between predicted and teacher features (per grid cell for grids)."""
    return F.cosine_similarity(pred, target, dim=1).mean()
