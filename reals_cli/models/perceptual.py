"""LPIPS (VGG) from the `lpips` package, with the offline VGG16 conv weights.

The package's own linear heads (`lpips/weights/v0.1/vgg.pth`) are the real ones;
only its torchvision backbone download is replaced by the converted asset.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch
from torch import nn

from ..artifacts import load_weights


class LPIPS(nn.Module):
    """Perceptual distance between images in [-1, 1]; returns one value per image."""

    def __init__(self, vgg_weights: str | Path | None = None):
        super().__init__()
        import lpips

        from ..assets import asset_path

        # lpips prints on construction and asks torchvision with a deprecated argument.
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            self.net = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
        conv = load_weights(vgg_weights or asset_path("vgg16"))
        # lpips keeps torchvision's layer index as the module name inside each slice.
        loaded = 0
        for name, module in self.net.net.named_modules():
            index = name.rpartition(".")[2]
            if isinstance(module, nn.Conv2d):
                module.weight.data.copy_(conv[f"features.{index}.weight"])
                module.bias.data.copy_(conv[f"features.{index}.bias"])
                loaded += 1
        assert loaded == 13, f"expected 13 VGG16 conv layers in lpips, found {loaded}"
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(x, y, normalize=False).flatten()
