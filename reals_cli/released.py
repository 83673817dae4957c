"""Released DiT and SiT checkpoints (`DiT-XL-2-256x256.pt`, `SiT-XL-2-256x256.pt`) as `dit` artifacts.

The network's state-dict keys are the official ones, so the weights load as they are;
what a release file lacks is what `sample` needs besides them: the objective, the latent
statistics and the VAE. The official models were trained on SD-VAE latents scaled by the
VAE's `scaling_factor` (0.18215) and not shifted, so the artifact records mean
`shift_factor` (or 0) and std 1 / `scaling_factor` per channel, and the VAE's id.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from . import artifacts
from .console import print_summary
from .dit import DiT, build_dit
from .errors import UserError
from .latent_store import LatentStore, open_store
from .reals_vae import load_reals_vae


def load_released(model: DiT, path: str) -> None:
    """Official weights (a plain state dict, or SiT's {'model', 'ema'}: the EMA is taken) or
    a .safetensors file into `model`, strictly; a file of another size is a one-line error."""
    state = artifacts.load_weights(path) if path.endswith(".safetensors") else artifacts.torch_load(path)
    if isinstance(state, dict) and "ema" in state and isinstance(state["ema"], dict):
        state = state["ema"]
    own = model.state_dict()
    bad = [k for k in own if k not in state or state[k].shape != own[k].shape]
    if bad:
        have = state.get(bad[0]).shape if bad[0] in state else "missing"
        raise UserError(f"{path} does not fit this model (first: {bad[0]} is {have}, needs {tuple(own[bad[0]].shape)}); "
                        f"pick the matching --model and latent size")
    extra = [k for k in state if k not in own]
    if extra:
        raise UserError(f"{path} holds weights that a DiT/SiT does not have (first: {extra[0]}); it is not a DiT or SiT "
                        f"release (REPA's checkpoints add projectors, and their SiT runs time the other way)")
    model.load_state_dict(state, strict=True)


def import_released(weights: str, out: str, model: str, vae: str, image_size: int = 256, num_classes: int = 1000,
                    path: str = "linear", prediction: str = "velocity", latents: str | None = None) -> dict:
    """Write the `dit` artifact `out` from a released checkpoint: its weights as both the
    model and the EMA (the releases are EMA weights), the objective its name says (DiT-*:
    DDPM, SiT-*: transport with `path` and `prediction`), and the VAE whose latents it
    models. Those latents were normalised by the VAE's scaling factor (DiT, SiT) or, with
    `latents` (a store that `reals encode` made with that VAE), by the per-channel statistics
    measured over it (ReaLS' releases). `reals sample --ckpt out` then samples it."""
    from .train_dit import EMA_FILE, FORMAT_VERSION, KIND, MODEL_FILE, TrainDiTConfig, build_objective

    if Path(out).exists() and any(Path(out).iterdir()):
        raise UserError(f"{out} is not empty; pass a new --out folder")
    bundle = load_reals_vae(vae)
    vae_config = bundle.vae.config
    channels, factor = vae_config.latent_channels, bundle.vae.downsample_factor
    if image_size % factor:
        raise UserError(f"--image-size {image_size} is not a multiple of the VAE's downsampling factor {factor}")
    size = image_size // factor
    net = build_dit(model, size, channels, num_classes)  # learned sigma and a null class, as released
    load_released(net, weights)
    objective = "sit" if model.startswith("SiT-") else "dit"
    cfg = TrainDiTConfig(latents="", out=out, model=model, objective=objective, path=path, prediction=prediction, steps=0)
    build_objective(dataclasses.asdict(cfg))  # refuses an unknown path or prediction before anything is written
    mean, std = [float(vae_config.shift_factor or 0.0)] * channels, [1.0 / vae_config.scaling_factor] * channels
    store = None
    if latents is not None:
        store = _matching_store(latents, bundle.id, vae, [channels, size, size])
        mean, std = store.statistics()
    config = dataclasses.asdict(cfg) | {
        "latent_shape": [channels, size, size], "num_classes": num_classes, "classes": [str(i) for i in range(num_classes)],
        "latent_mean": mean, "latent_std": std, "latent_statistics": "store" if latents else "vae scaling_factor",
        "vae_id": bundle.id, "vae_path": str(vae), "released": True,
    }
    Path(out).mkdir(parents=True, exist_ok=True)
    state = net.state_dict()
    artifacts.save_weights(Path(out) / MODEL_FILE, state)
    artifacts.save_weights(Path(out) / EMA_FILE, state)
    inputs = {"weights": artifacts.describe_input(weights), "vae": artifacts.describe_input(vae)}
    if store is not None:
        inputs["latents"] = {"path": latents, "kind": "latents", "id": store.attrs.get("id", "?")}
    manifest = artifacts.write_manifest(out, KIND, FORMAT_VERSION, config, inputs, {"steps": None},
                                        files=[MODEL_FILE, EMA_FILE])
    print_summary(f"{model} {out} ({manifest['id']})", {
        "from": weights, "objective": objective, "latents": f"{channels}x{size}x{size}",
        "latent scaling": f"x {vae_config.scaling_factor} (VAE {bundle.id})"})
    return manifest


def _matching_store(latents: str, vae_id: str, vae: str, shape: list[int]) -> LatentStore:
    """The latent store `latents`, checked to be VAE `vae_id`'s at the model's latent shape."""
    store = open_store(latents)
    if store.vae_id != vae_id:
        raise UserError(f"{latents} was encoded by VAE {store.vae_id}, but --vae {vae} is VAE {vae_id}; "
                        f"pass a store that this VAE made")
    if list(store.latent_shape) != shape:
        raise UserError(f"{latents} holds {'x'.join(map(str, store.latent_shape))} latents, the model "
                        f"{'x'.join(map(str, shape))}; pass the matching --image-size")
    return store
