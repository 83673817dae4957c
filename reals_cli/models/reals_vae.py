"""The ReaLS VAE artifact: a VAE, its alignment network, and the manifest that made them.

The folder is a diffusers `AutoencoderKL` folder (config.json +
diffusion_pytorch_model.safetensors, loadable by diffusers as is) plus
`align.safetensors` and `manifest.json`. A plain diffusers folder (SD-VAE, the
authors' ReaLS release) also loads, with no alignment network.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..artifacts import MANIFEST, load_weights, read_manifest, save_weights, sha256_file, verify_files, write_manifest
from ..errors import UserError
from .alignment import AlignConfig, AlignmentNet
from .vae import CONFIG_NAME, WEIGHTS_NAMES, AutoencoderKL, find_vae_folder, load_diffusers_vae, save_diffusers_vae

KIND, FORMAT_VERSION = "vae", 1
ALIGN_FILE = "align.safetensors"


@dataclass
class RealsVAE:
    vae: AutoencoderKL
    align: AlignmentNet | None
    manifest: dict

    @property
    def id(self) -> str:
        return self.manifest["id"]


def save_reals_vae(out: str | Path, vae: AutoencoderKL, align: AlignmentNet, config: dict, inputs: dict, metrics: dict) -> dict:
    out = Path(out)
    save_diffusers_vae(vae, out)
    save_weights(out / ALIGN_FILE, align.state_dict())
    config = {**config, "align": align.config.to_dict(), "vae": vae.config.to_diffusers()}
    return write_manifest(out, KIND, FORMAT_VERSION, config, inputs, metrics, files=[WEIGHTS_NAMES[0], CONFIG_NAME, ALIGN_FILE])


def load_reals_vae(path: str | Path, need_align: bool = False) -> RealsVAE:
    path = Path(path)
    if (path / MANIFEST).is_file():
        manifest = read_manifest(path, KIND, FORMAT_VERSION, needs=("align",))
        verify_files(path, manifest)  # its id stands for these files: latents and models record it
        vae = load_diffusers_vae(path)
        align = AlignmentNet(AlignConfig(**manifest["config"]["align"]))
        align.load_state_dict(load_weights(path / ALIGN_FILE))
        return RealsVAE(vae.eval(), align.eval(), manifest)
    vae = load_diffusers_vae(path)  # a plain diffusers folder: identified by its weights' hash
    if need_align:
        raise UserError(f"{path} is a plain VAE without an alignment network; pass a VAE made by `reals train-vae`")
    folder = find_vae_folder(path)
    weights = next(p for p in (folder / n for n in WEIGHTS_NAMES) if p.is_file())
    ident = sha256_file(weights)[:16]
    manifest = {"kind": KIND, "id": ident, "config": {"vae": vae.config.to_diffusers()}, "metrics": {}}
    return RealsVAE(vae.eval(), None, manifest)
