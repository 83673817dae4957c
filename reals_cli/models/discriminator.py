"""The adversarial part of the VAE loss, as in LDM/taming: a PatchGAN with hinge loss.

The generator's adversarial term is weighted adaptively (LDM): the ratio of the
gradient norms of the reconstruction loss and the adversarial loss at the
decoder's last layer, so that neither dominates whatever the scales.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchDiscriminator(nn.Module):
    """pix2pix's N-layer PatchGAN: one real/fake logit per receptive-field patch."""

    def __init__(self, in_channels: int = 3, width: int = 64, layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = width
        for i in range(1, layers + 1):
            out = width * min(2**i, 8)
            stride = 2 if i < layers else 1
            blocks += [nn.Conv2d(ch, out, 4, stride, 1, bias=False), nn.BatchNorm2d(out), nn.LeakyReLU(0.2)]
            ch = out
        blocks.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)
        for m in self.modules():  # DCGAN init, as pix2pix and taming do
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def adaptive_weight(rec_loss: torch.Tensor, other_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4,
                    loss_scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """||d rec / d W|| / (||d other / d W|| + 1e-4) at a layer W both losses reach, detached: LDM's
    weight of the adversarial term (W: the decoder's last layer), and VA-VAE's of the alignment
    term (W: the encoder's last layer).

    Under fp16 autocast pass the GradScaler's scale: a per-pixel mean loss has gradients
    of 1 / (B x 3 x H x W) per pixel, which fp16 rounds (to 0 from about 10M pixels); both
    gradients and the 1e-4 are scaled alike, so the ratio is unchanged."""
    rec_grad = torch.autograd.grad(rec_loss * loss_scale, last_layer, retain_graph=True)[0]
    other_grad = torch.autograd.grad(other_loss * loss_scale, last_layer, retain_graph=True)[0]
    weight = rec_grad.float().norm() / (other_grad.float().norm() + 1e-4 * loss_scale)
    # A scale the GradScaler is probing may overflow both (inf / inf): it skips that step, and so
    # must the weighted term, rather than make the loss NaN.
    return torch.where(torch.isfinite(weight), weight, 0.0).clamp(0.0, max_weight).detach()
