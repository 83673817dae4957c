"""The Stable-Diffusion KL autoencoder, weight-compatible with diffusers' `AutoencoderKL`.

ReaLS publishes its VAE as a diffusers folder, and most starting points (SD-VAE, sd-vae-ft-mse)
are diffusers folders too, so the modules here carry exactly diffusers' parameter names: a
`state_dict()` of this model loads into diffusers and back with strict key matching. diffusers
itself is never imported (it is a test-only dependency that checks the equivalence).

Shapes, for block_out_channels (c0, .., cn) and L = layers_per_block:
  encoder: conv_in -> n+1 down blocks (L resnets each, a stride-2 conv after all but the last)
           -> mid (resnet, attention, resnet) -> GroupNorm, SiLU, conv to 2*latent (mean, logvar)
  decoder: conv_in -> mid -> n+1 up blocks (L+1 resnets each, nearest 2x + conv after all but
           the last) -> GroupNorm, SiLU, conv to out_channels
so an image of side S becomes a latent of side S / 2**n. Inputs and outputs are in [-1, 1].
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..artifacts import atomic_write_json, load_weights, save_weights, torch_load
from ..errors import UserError

CONFIG_NAME = "config.json"
WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
EPS = 1e-6  # every GroupNorm in the SD VAE uses 1e-6, not torch's default 1e-5
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' clamp: keeps exp(logvar) finite in float32


# -- config --------------------------------------------------------------------------------------

@dataclass
class VAEConfig:
    """Architecture and latent scaling, with diffusers' config.json field names."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 256
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    # Fields that decide the network's computation (the rest only describe its latents).
    ARCH_FIELDS = (
        "in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels",
        "norm_num_groups", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention",
    )

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        if isinstance(self.sample_size, list):
            self.sample_size = tuple(self.sample_size)
        for name in ("latents_mean", "latents_std"):
            if getattr(self, name) is not None:
                setattr(self, name, tuple(float(v) for v in getattr(self, name)))
        if not self.block_out_channels or self.layers_per_block < 1:
            raise UserError(f"VAE needs at least one block and one layer per block, got {self.arch_summary()}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise UserError(
                f"VAE norm_num_groups {self.norm_num_groups} does not divide block_out_channels {list(bad)}"
            )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def arch(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.ARCH_FIELDS}

    def arch_summary(self, fields: tuple[str, ...] | None = None) -> str:
        return ", ".join(f"{k} {_fmt(getattr(self, k))}" for k in (fields or self.ARCH_FIELDS))

    @classmethod
    def from_diffusers(cls, cfg: dict[str, Any]) -> "VAEConfig":
        """Read a diffusers `AutoencoderKL` config.json dict; refuse variants this module does not build."""
        n = len(cfg.get("block_out_channels", (64,)))  # diffusers' own defaults where a key is absent
        expected = {
            "act_fn": "silu",
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
        }
        for key, want in expected.items():
            got = list(cfg[key]) if isinstance(cfg.get(key), (list, tuple)) else cfg.get(key, want)
            if got != want:
                raise UserError(
                    f"unsupported VAE config: {key} {_fmt(got)} (only {_fmt(want)} is supported: the plain SD KL autoencoder)"
                )
        if cfg.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise UserError(f"unsupported VAE class {cfg['_class_name']!r}: only diffusers' AutoencoderKL is supported")
        names = {f.name for f in dataclasses.fields(cls)}
        # Absent keys take diffusers' defaults (not ours): old SD configs omit e.g. scaling_factor.
        defaults = {"block_out_channels": (64,), "layers_per_block": 1, "sample_size": 32}
        return cls(**{**defaults, **{k: v for k, v in cfg.items() if k in names}})

    def to_diffusers(self) -> dict[str, Any]:
        """A config.json dict that diffusers' `AutoencoderKL.from_pretrained` accepts."""
        out = dataclasses.asdict(self)
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}
        n = len(self.block_out_channels)
        out.update(
            _class_name="AutoencoderKL",
            act_fn="silu",
            down_block_types=["DownEncoderBlock2D"] * n,
            up_block_types=["UpDecoderBlock2D"] * n,
            force_upcast=True,
        )
        return out


def _fmt(v: Any) -> str:
    return str(list(v)) if isinstance(v, tuple) else str(v)


VAE_PRESETS: dict[str, VAEConfig] = {
    # Stable Diffusion's KL-f8 VAE (ReaLS's architecture): 83,653,863 parameters, 256px -> 4x32x32.
    "sd-f8c4": VAEConfig(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                         norm_num_groups=32, sample_size=256, scaling_factor=0.18215),
    # A CPU-trainable VAE for 64x64 demos: f4 (64px -> 4x16x16), 2,702,087 parameters; about 18
    # images/s forward+backward+AdamW at batch 16 on 2 CPU threads.
    # scaling_factor 1: the latent statistics are measured and carried with the artifacts.
    "demo": VAEConfig(block_out_channels=(32, 64, 128), layers_per_block=1, latent_channels=4,
                      norm_num_groups=16, sample_size=64, scaling_factor=1.0),
    # For tests: f2, 167,959 parameters.
    "tiny": VAEConfig(block_out_channels=(16, 32), layers_per_block=1, latent_channels=4,
                      norm_num_groups=8, sample_size=32, scaling_factor=1.0),
}


def vae_config(name: str) -> VAEConfig:
    if name not in VAE_PRESETS:
        raise UserError(f"unknown VAE preset {name!r}; choose one of {', '.join(VAE_PRESETS)}")
    return dataclasses.replace(VAE_PRESETS[name])  # a copy: callers may edit theirs


# -- building blocks ------------------------------------------------------------------------------

class ResnetBlock(nn.Module):
    """Pre-norm residual block; a 1x1 `conv_shortcut` only where the channel count changes."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=EPS)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=EPS)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Single-head self-attention over all spatial positions, residual (the mid block's only attention)."""

    # diffusers before 0.14 named these query/key/value/proj_attn; such .bin files still circulate.
    LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # a list only for the `to_out.0` key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = (proj(t).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # one head
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        out = self.to_out[0](out).transpose(1, 2).reshape(b, c, h, w)
        return x + out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # torch hands every module the (copied) full state dict: rename legacy keys in place.
        for old, new in self.LEGACY_NAMES.items():
            for p in ("weight", "bias"):
                if f"{prefix}{old}.{p}" in state_dict:
                    state_dict[f"{prefix}{new}.{p}"] = state_dict.pop(f"{prefix}{old}.{p}")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class MidBlock(nn.Module):
    """resnet -> attention -> resnet at the lowest resolution."""

    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        # Registered in diffusers' order, so even state_dict() key order matches.
        self.attentions = nn.ModuleList([Attention(channels, groups)] if attention else [])
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    """Stride-2 3x3 conv, padded only right and bottom (as LDM), so even sides halve exactly."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x then a 3x3 conv (no checkerboard artefacts of transposed convs)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(layers)])
        self.downsamplers = nn.ModuleList([Downsample(cout)] if downsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in (*self.resnets, *self.downsamplers):
            x = m(x)
        return x


class UpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(layers)])
        self.upsamplers = nn.ModuleList([Upsample(cout)] if upsample else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in (*self.resnets, *self.upsamplers):
            x = m(x)
        return x


def _run(block: nn.Module, x: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    # Recompute activations in backward instead of storing them: trades ~30% time for memory.
    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(block, x, use_reentrant=False)
    return block(x)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, downsample=i < n - 1) for i in range(n)
        )
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)  # mean and logvar
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in (*self.down_blocks, self.mid_block):
            x = _run(block, x, self.gradient_checkpointing)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        # One more resnet per block than the encoder: the decoder gets the larger share of capacity.
        self.up_blocks = nn.ModuleList(
            UpBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, upsample=i < n - 1) for i in range(n)
        )
        self.mid_block = MidBlock(ch[0], g, cfg.mid_block_add_attention)  # runs first, registered after (key order)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)
        self.gradient_checkpointing = False

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(z)
        for block in (self.mid_block, *self.up_blocks):
            x = _run(block, x, self.gradient_checkpointing)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


# -- the autoencoder ------------------------------------------------------------------------------

def sample_latent(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Reparameterised draw z = mean + std * eps from the diagonal Gaussian posterior."""
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + torch.exp(0.5 * logvar) * eps


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) summed over C, H, W and averaged over the batch (LDM's convention)."""
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).sum(1).mean()


class AutoencoderKL(nn.Module):
    """encode(x) -> (mean, logvar); decode(z) -> x; forward(x) -> (recon, mean, logvar, z)."""

    sample_latent = staticmethod(sample_latent)
    kl_loss = staticmethod(kl_loss)

    def __init__(self, config: VAEConfig, gradient_checkpointing: bool = False):
        super().__init__()
        self.config = config
        c = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if config.use_post_quant_conv else None
        self.gradient_checkpointing = gradient_checkpointing

    @property
    def gradient_checkpointing(self) -> bool:
        return self.encoder.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        self.encoder.gradient_checkpointing = self.decoder.gradient_checkpointing = bool(on)

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(
        self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        mean, logvar = self.encode(x)
        z = sample_latent(mean, logvar, generator) if sample else mean
        return self.decode(z), mean, logvar, z


# -- diffusers folders ----------------------------------------------------------------------------

_LEGACY_KEY = re.compile(r"(\.attentions\.\d+\.)(query|key|value|proj_attn)\.")


def rename_legacy_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of `sd` with pre-0.14 diffusers attention names (query/key/value/proj_attn) renamed."""
    return {_LEGACY_KEY.sub(lambda m: m[1] + Attention.LEGACY_NAMES[m[2]] + ".", k): v for k, v in sd.items()}


def _weights_arch(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What the shapes in a state dict say about the architecture (norm_num_groups is not visible)."""
    found: dict[str, Any] = {}
    if "encoder.conv_in.weight" in sd:
        found["in_channels"] = sd["encoder.conv_in.weight"].shape[1]
    if "decoder.conv_out.weight" in sd:
        found["out_channels"] = sd["decoder.conv_out.weight"].shape[0]
    chans = []
    while f"encoder.down_blocks.{len(chans)}.resnets.0.conv1.weight" in sd:
        chans.append(sd[f"encoder.down_blocks.{len(chans)}.resnets.0.conv1.weight"].shape[0])
    if chans:
        found["block_out_channels"] = tuple(chans)
        found["layers_per_block"] = sum(1 for k in sd if k.startswith("encoder.down_blocks.0.resnets.") and k.endswith(".conv1.weight"))
    if "decoder.conv_in.weight" in sd:
        found["latent_channels"] = sd["decoder.conv_in.weight"].shape[1]
    found["use_quant_conv"] = "quant_conv.weight" in sd
    found["use_post_quant_conv"] = "post_quant_conv.weight" in sd
    found["mid_block_add_attention"] = any(k.startswith("encoder.mid_block.attentions.0.") for k in sd)
    return found


def _describe(arch: dict[str, Any], fields: list[str]) -> str:
    return ", ".join(f"{k} {_fmt(arch[k])}" for k in fields)


def _check_weights(model: AutoencoderKL, sd: dict[str, torch.Tensor], weights_file: Path) -> None:
    """Raise a one-line UserError unless `sd` has exactly the model's keys and shapes."""
    own = model.state_dict()
    if sd.keys() == own.keys() and all(sd[k].shape == own[k].shape for k in own):
        return
    found, expected = _weights_arch(sd), model.config.arch()
    diff = [k for k in found if found[k] != expected[k]]
    if diff:
        raise UserError(
            f"{weights_file} holds a VAE with {_describe(found, diff)}, but its {CONFIG_NAME} says "
            f"{_describe(expected, diff)}; the folder is inconsistent, re-create it"
        )
    missing, extra = sorted(own.keys() - sd.keys()), sorted(sd.keys() - own.keys())
    bad = sorted(k for k in own.keys() & sd.keys() if sd[k].shape != own[k].shape)
    raise UserError(
        f"{weights_file} does not match the AutoencoderKL its {CONFIG_NAME} describes "
        f"({len(missing)} missing keys, {len(extra)} unexpected, {len(bad)} of another shape; "
        f"first: {(missing + extra + bad)[0]}); re-create the folder"
    )


def find_vae_folder(path: Path) -> Path:
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if not path.is_dir():
        raise UserError(f"{path} is a file; pass the diffusers VAE folder (with {CONFIG_NAME}) that holds it")
    if not any((path / n).is_file() for n in (CONFIG_NAME, *WEIGHTS_NAMES)) and (path / "vae").is_dir():
        return path / "vae"  # a diffusers pipeline root
    return path


def _read_state_dict(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    safetensors, pickled = (folder / n for n in WEIGHTS_NAMES)
    if safetensors.is_file():
        return load_weights(safetensors), safetensors
    if pickled.is_file():
        sd = torch_load(pickled)  # weights_only: a .bin never runs code
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise UserError(f"{pickled} is not a plain state dict of tensors")
        return sd, pickled
    raise UserError(
        f"{folder} has neither {WEIGHTS_NAMES[0]} nor {WEIGHTS_NAMES[1]} "
        f"(nor a vae/ subfolder with one); pass a diffusers AutoencoderKL folder"
    )


def load_diffusers_vae(path: str | Path, expected: VAEConfig | None = None, role: str = "folder") -> AutoencoderKL:
    """Load a diffusers AutoencoderKL folder (or a pipeline root with `vae/`), strictly.

    `expected`: the architecture the caller needs; a folder holding another raises a one-line
    UserError naming both. `role` words that line for the caller, e.g. "--init folder".
    """
    folder = find_vae_folder(Path(path))
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise UserError(f"{folder} has no {CONFIG_NAME}; pass a diffusers AutoencoderKL folder")
    try:
        cfg = VAEConfig.from_diffusers(json.loads(cfg_path.read_text()))
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg_path} is not valid JSON ({e})") from None
    except TypeError as e:  # a field of the wrong type reached the dataclass
        raise UserError(f"{cfg_path} is not an AutoencoderKL config ({e})") from None
    if expected is not None:
        diff = [k for k in VAEConfig.ARCH_FIELDS if getattr(cfg, k) != getattr(expected, k)]
        if diff:
            raise UserError(
                f"{role} {path} holds a VAE with {cfg.arch_summary(tuple(diff))}, "
                f"but {expected.arch_summary(tuple(diff))} is expected"
            )
    sd, weights_file = _read_state_dict(folder)
    model = AutoencoderKL(cfg)
    sd = rename_legacy_keys(sd)  # before the check; load_state_dict alone would rename too late for it
    _check_weights(model, sd, weights_file)
    model.load_state_dict(sd, strict=True)
    return model


def save_diffusers_vae(vae: AutoencoderKL, folder: str | Path) -> Path:
    """Write config.json + diffusion_pytorch_model.safetensors, a folder diffusers loads as is."""
    folder = Path(folder)
    # "format": "pt" is the metadata diffusers/transformers write; some loaders check it.
    save_weights(folder / WEIGHTS_NAMES[0], vae.state_dict(), metadata={"format": "pt"})
    atomic_write_json(folder / CONFIG_NAME, vae.config.to_diffusers())
    return folder
