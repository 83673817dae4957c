"""Frozen vision encoders whose features the VAE latents are aligned to.

Every teacher takes images in [0, 1] (B x 3 x H x W), does its own resize and
normalisation, and returns a patch-feature grid (B x D x h x w) and a global
feature (B x D). Teachers are frozen, in eval mode, and run without gradients.

- `dinov2-s|b|l|g`: DINOv2 ViT-14 through timm (the paper's teacher). Patch =
  last-block normed patch tokens, global = the normed CLS token.
- `vgg16`: ImageNet VGG16 from the offline assets, a stand-in where DINOv2
  cannot be had. Patch = relu4_3 (stride 8), global = average-pooled relu5_3:
  the deepest map that still has a grid, and the most semantic one pooled.
"""

from __future__ import annotations

import socket
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DINOV2_ARCHS = {
    "dinov2-s": "vit_small_patch14_dinov2.lvd142m",
    "dinov2-b": "vit_base_patch14_dinov2.lvd142m",
    "dinov2-l": "vit_large_patch14_dinov2.lvd142m",
    "dinov2-g": "vit_giant_patch14_dinov2.lvd142m",
}
TEACHERS = [*DINOV2_ARCHS, "vgg16"]

# relu4_3 and relu5_3 are outputs of these torchvision `vgg16().features` indices.
VGG_RELU4_3, VGG_RELU5_3 = 22, 29


class Teacher(nn.Module):
    """Base class: frozen, eval mode, no grad, ImageNet normalisation."""

    name: str
    dim: int
    stride: int  # input pixels per patch-grid cell

    def __init__(self, resolution: int | None):
        super().__init__()
        self.resolution = resolution  # None: features at the input's own size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def grid(self, image_size: int) -> int:
        """Side of the patch grid this teacher returns for square images of `image_size`."""
        return (self.resolution or image_size) // self.stride

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if self.resolution is not None and images.shape[-1] != self.resolution:
            images = F.interpolate(images, size=(self.resolution, self.resolution), mode="bicubic", align_corners=False)
        return (images - self.mean) / self.std

    def freeze(self) -> "Teacher":
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)  # a teacher never leaves eval mode

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class VGGTeacher(Teacher):
    name = "vgg16"
    dim = 512
    stride = 8

    def __init__(self, weights: str | Path | None = None, resolution: int | None = None):
        super().__init__(resolution)
        from torchvision.models.vgg import cfgs, make_layers

        from ..artifacts import load_weights
        from ..assets import asset_path

        # torchvision's VGG16 conv stack without its 120M-parameter classifier.
        self.features = make_layers(cfgs["D"])[: VGG_RELU5_3 + 1]
        state = load_weights(weights or asset_path("vgg16"))
        state = {k.removeprefix("features."): v for k, v in state.items() if int(k.split(".")[1]) <= VGG_RELU5_3}
        self.features.load_state_dict(state, strict=True)
        self.freeze()

    @torch.no_grad()
    def forward(self, images):
        x = self._prepare(images)
        patch = None
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i == VGG_RELU4_3:
                patch = x
        return patch, x.mean(dim=(2, 3))


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_cache_file(arch: str) -> Path | None:
    """The weights file of a timm model already in the local Hugging Face cache, if any."""
    import timm
    from huggingface_hub import try_to_load_from_cache

    hub_id = timm.models.get_pretrained_cfg(arch).hf_hub_id
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(hub_id, filename)
        if isinstance(found, str):
            return Path(found)
    return None


class DINOv2Teacher(Teacher):
    stride = 14

    def __init__(self, name: str = "dinov2-b", weights: str | Path | None = None, resolution: int = 224, **arch_overrides):
        super().__init__(resolution)
        import timm

        if name not in DINOV2_ARCHS:
            raise UserError(f"unknown DINOv2 teacher {name!r}; choose one of {', '.join(DINOV2_ARCHS)}")
        if resolution < self.stride or resolution % self.stride:
            raise UserError(f"--teacher-resolution must be a positive multiple of DINOv2's patch size 14 (224 or 448, say), "
                            f"got {resolution}")
        self.name = name
        arch = DINOV2_ARCHS[name]
        weights = weights or _hub_cache_file(arch)  # a cached download works offline
        if weights is not None:
            self.model = timm.create_model(arch, pretrained=False, img_size=resolution, num_classes=0, **arch_overrides)
            self.model.load_state_dict(self._read_weights(Path(weights)), strict=True)
        else:
            self.model = self._from_hub(arch, resolution)
        self.dim = self.model.embed_dim
        self.freeze()

    def _read_weights(self, path: Path) -> dict:
        """An official `dinov2_vit*14_pretrain.pth` or a timm state dict (.pth/.bin/.safetensors)."""
        from timm.models.vision_transformer import checkpoint_filter_fn

        from ..artifacts import load_weights, torch_load

        if not path.is_file():
            raise UserError(f"--teacher-weights file not found: {path}")
        state = load_weights(path) if path.suffix == ".safetensors" else torch_load(path)
        for key in ("model", "state_dict", "teacher"):  # training checkpoints nest the weights
            if isinstance(state, dict) and key in state and isinstance(state[key], dict):
                state = state[key]
        state = {k.removeprefix("backbone."): v for k, v in state.items()}
        state = checkpoint_filter_fn(state, self.model)  # official key layout -> timm, pos-embed resampled
        state = {k: v for k, v in state.items() if k != "mask_token"}
        expected = self.model.state_dict()
        wrong = [k for k in expected if k not in state or state[k].shape != expected[k].shape]
        if wrong:
            raise UserError(
                f"{path} does not hold {self.name} weights (first mismatching key: {wrong[0]}); "
                f"pass the matching --teacher or the right file"
            )
        return state

    @staticmethod
    def _from_hub(arch: str, resolution: int) -> nn.Module:
        import timm

        remedy = (
            "pass --teacher-weights PATH (an official dinov2_vit*14_pretrain.pth or a timm file), "
            "or connect to the internet so timm can download it from the Hugging Face hub"
        )
        # timm retries a dead network for most of a minute: check reachability first.
        if not _hub_reachable():
            raise UserError(f"cannot get {arch} weights: huggingface.co is unreachable and they are not in the hub cache; {remedy}")
        try:
            return timm.create_model(arch, pretrained=True, img_size=resolution, num_classes=0)
        except Exception as e:
            raise UserError(f"downloading {arch} weights failed ({type(e).__name__}: {e}); {remedy}") from None

    @torch.no_grad()
    def forward(self, images):
        tokens = self.model.forward_features(self._prepare(images))
        cls, patch = tokens[:, 0], tokens[:, self.model.num_prefix_tokens :]
        side = self.grid(images.shape[-1])
        patch = patch.transpose(1, 2).reshape(len(images), self.dim, side, side)
        return patch, cls


def build_teacher(name: str, weights: str | Path | None = None, resolution: int | None = None) -> Teacher:
    """A teacher by name: `vgg16` or `dinov2-s|b|l|g` (resolution defaults: input size / 224)."""
    if name == "vgg16":
        return VGGTeacher(weights, resolution)
    if name in DINOV2_ARCHS:
        return DINOv2Teacher(name, weights, resolution or 224)
    raise UserError(f"unknown teacher {name!r}; choose one of {', '.join(TEACHERS)}")
