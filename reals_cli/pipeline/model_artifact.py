"""The `dit` model artifact: the one module that writes, reads and loads a DiT/SiT model folder.

A model folder holds `model.safetensors` and `ema.safetensors` (and, with REPA, the
projector) beside a manifest whose config is the run's `TrainDiTConfig` plus what
`sample` needs: the latent shape, classes and statistics, the objective and the VAE.
`train-dit` writes it (`write_model`), `import-dit` writes one from a released
checkpoint (`import_released`), and `sample` reads it (`read_model_manifest`,
`load_model`, `load_vae`).

Released checkpoints (`DiT-XL-2-256x256.pt`, `SiT-XL-2-256x256.pt`) keep the official
state-dict keys, so their weights load as they are; what a release file lacks is what
`sample` needs besides them. The official models were trained on SD-VAE latents scaled
by the VAE's `scaling_factor` (0.18215) and not shifted, so the artifact records mean
`shift_factor` (or 0) and std 1 / `scaling_factor` per channel, and the VAE's id.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import shlex
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import artifacts
from ..console import print_summary
from ..data.latent_store import LatentStore, open_store
from ..errors import UserError
from ..models.dit import DIT_MODELS, DiT, build_dit
from ..models.reals_vae import RealsVAE, load_reals_vae
from ..objectives.diffusion import Diffusion
from ..objectives.transport import Transport

KIND, FORMAT_VERSION = "dit", 1

CHECKPOINT = "checkpoint.safetensors"  # a train-dit run's; its presence without a manifest: unfinished

MODEL_FILE, EMA_FILE, PROJECTOR_FILE = "model.safetensors", "ema.safetensors", "projector.safetensors"

# The sit objective's own options and their defaults; a dit run has none (None in its config).
SIT_ONLY = {"path": "linear", "prediction": "velocity", "time_distribution": "uniform"}
# What `sample` reads from a model manifest's config (train-dit's and import-dit's both write them).
MODEL_KEYS = ("objective", "model", "learn_sigma", "qk_norm", "class_dropout", *SIT_ONLY, "latent_shape", "num_classes",
              "classes", "latent_mean", "latent_std", "vae_id", "vae_path")


def default_objective(model: str) -> str:
    """The objective a model name stands for, as import-dit reads it: DiT-* dit, SiT-* sit."""
    return "dit" if model.startswith("DiT-") else "sit"


@dataclass
class TrainDiTConfig:
    latents: str
    out: str
    model: str = "SiT-B/2"
    objective: str | None = None  # dit | sit; None: default_objective(model)
    path: str | None = None  # sit: linear | gvp; stays None for dit, as the two below
    prediction: str | None = None  # sit: velocity | noise | score
    time_distribution: str | None = None  # sit: uniform | lognormal
    learn_sigma: bool = True
    steps: int = 400_000
    batch_size: int = 256
    lr: float = 1e-4
    weight_decay: float = 0.0
    ema_decay: float = 0.9999
    class_dropout: float = 0.1
    grad_clip: float = 1.0
    precision: str = "bf16"
    attn: str = "auto"
    qk_norm: bool = False
    gradient_checkpointing: bool = False
    compile: bool = False
    repa_weight: float = 0.0
    repa_depth: int = 4
    repa_vae: str | None = None
    init: str | None = None
    device: str = "auto"
    seed: int = 0
    workers: int = 4
    log_every: int = 100
    ckpt_every: int = 5000
    sample_every: int = 10_000
    keep_every: int = 0  # 0: keep no intermediate model folders

    def __post_init__(self):
        if self.objective is None:
            self.objective = default_objective(self.model)
        if self.objective == "sit":
            for name, default in SIT_ONLY.items():
                if getattr(self, name) is None:
                    setattr(self, name, default)


def build_objective(config: dict) -> Diffusion | Transport:
    """The training/sampling maths a checkpoint was trained with (from its config)."""
    if config["objective"] == "dit":
        return Diffusion.linear()
    if config["objective"] == "sit":
        return Transport(path=config["path"], prediction=config["prediction"], time_distribution=config["time_distribution"])
    raise UserError(f"--objective must be dit or sit, got {config['objective']!r}")


def read_model_manifest(ckpt: str) -> dict:
    """The manifest of the model folder `ckpt`, with a way forward for what people pass instead."""
    path = Path(ckpt)
    if (path / "zarr.json").is_file() or path.suffix in (".zarr", ".h5"):
        raise UserError(f"{ckpt} is a latent store; --ckpt takes a model folder, made by `reals train-dit {shlex.quote(str(ckpt))} "
                        f"--out DIR` or `reals import-dit`")
    run = path.parent if path.is_file() else path
    kept = sorted(p.name for p in run.glob("step-???????") if (p / artifacts.MANIFEST).is_file()) if run.is_dir() else []
    unfinished = (run / CHECKPOINT).is_file() and not (run / artifacts.MANIFEST).is_file()
    if unfinished or path.name == CHECKPOINT:
        steps = f"a kept step's folder ({', '.join(kept[-3:])}) or " if kept else ""
        raise UserError(f"{run} is a train-dit run{' that has not finished' if unfinished else ''}, and --ckpt takes a "
                        f"model folder: {steps}the run's folder once it has finished")
    if path.is_file():
        if (path.parent / artifacts.MANIFEST).is_file():
            raise UserError(f"--ckpt takes the model folder, not a file in it: pass {path.parent}")
        raise UserError(f"--ckpt takes a model folder and {ckpt} is a file; a released DiT/SiT checkpoint becomes one "
                        f"with `reals import-dit {shlex.quote(str(ckpt))} --model NAME --vae VAE --out DIR`")
    return artifacts.read_manifest(ckpt, KIND, FORMAT_VERSION, needs=MODEL_KEYS)


def load_model(ckpt: str | Path, manifest: dict, ema: bool = True, attn: str = "auto") -> DiT:
    """The checkpoint's network with its EMA (default) or raw weights, hash-checked, in eval mode.
    `attn` is this machine's choice: the training run's kernel may not exist here."""
    config, name = manifest["config"], EMA_FILE if ema else MODEL_FILE
    artifacts.verify_files(ckpt, manifest, [name])
    c, h, _ = config["latent_shape"]
    model = build_dit(config["model"], h, c, config["num_classes"], learn_sigma=config["learn_sigma"],
                      qk_norm=config["qk_norm"], attn=attn, class_dropout=config["class_dropout"])
    model.load_state_dict(artifacts.load_weights(Path(ckpt) / name))
    return model.eval()


def resolve_vae_path(override: str | None, config: dict, ckpt: str) -> str:
    path = override or config.get("vae_path")
    if not path or not Path(path).exists():
        where = f"at {path}, which does not exist" if path else "without a path"
        raise UserError(f"{ckpt} names VAE {config['vae_id']} {where}; pass --vae PATH to that VAE")
    return path


def load_vae(path: str, config: dict, ckpt: str) -> RealsVAE:
    """The VAE at `path`, which must be the one (by id) whose latents the checkpoint was trained on."""
    bundle = load_reals_vae(path)
    if bundle.id != config["vae_id"]:
        raise UserError(f"the VAE at {path} is VAE {bundle.id}, but {ckpt} was trained on latents of VAE "
                        f"{config['vae_id']}; pass --vae PATH to the VAE that made its latents")
    return bundle


def write_model(folder: Path, config: dict, inputs: dict, weight_files: dict[str, nn.Module], step: int,
                 loss: float | None) -> dict:
    """The model folder that `sample --ckpt` reads (the run's, or a kept step's): the weights of each module
    in its file, then the manifest."""
    (folder / artifacts.MANIFEST).unlink(missing_ok=True)  # rewritten after a resume: never a manifest over other weights
    for name, module in weight_files.items():
        artifacts.save_weights(folder / name, module.state_dict())
    metrics = {"steps": step, "final_loss": loss}
    config = {**config, "steps": step}  # a kept step's folder describes its own model, not the run's plan
    return artifacts.write_manifest(folder, KIND, FORMAT_VERSION, config, inputs, metrics, files=list(weight_files))


def load_released(model: DiT, path: str, model_name: str = "DiT", downsample: int | None = None,
                  store: bool = False) -> argparse.Namespace | None:
    """Official weights into `model`, strictly: a plain state dict, a .safetensors file, SiT's
    {'model', 'ema'} release or a checkpoint of DiT's or SiT's train.py (the EMA is taken, and
    its `args` returned), less the key prefix of a DDP or compiled model. A file that does not
    fit is a one-line error with what to pass: `import-dit`'s flags given the VAE's
    `downsample` (`store`: it reads the classes from --latents), else (`train-dit --init`)
    which latents; `model_name` (DiT-* or SiT-*) names the --model it suggests. `model` is
    left in eval mode."""
    # DiT's and SiT's train.py save their args as an argparse.Namespace, a plain attribute container.
    state = (artifacts.load_weights(path) if path.endswith(".safetensors")
             else artifacts.torch_load(path, allow=[argparse.Namespace]))
    args = state.get("args") if isinstance(state, dict) and isinstance(state.get("args"), argparse.Namespace) else None
    if isinstance(state, dict) and "ema" in state and isinstance(state["ema"], dict):
        state = state["ema"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise UserError(f"{path} holds no state dict of tensors (nor an 'ema' one); pass the weights of a DiT or SiT")
    state = _unwrapped(state)
    own = model.state_dict()
    bad = [k for k in own if k not in state or state[k].shape != own[k].shape]
    extra = [k for k in state if k not in own]
    if bad or _network(state) != _network(own):
        first = bad[0] if bad else extra[0]
        was = "missing" if first not in state else "unexpected" if first not in own else state[first].shape
        needs = f", needs {tuple(own[first].shape)}" if first in own and first in state else ""
        raise UserError(f"{path} does not fit this model (first: {first} is {was}{needs}); "
                        f"{_fix(state, own, model_name, downsample, store)}")
    if extra:
        raise UserError(f"{path} holds weights that a DiT/SiT does not have (first: {extra[0]}); it is not a DiT or SiT "
                        f"release (REPA's checkpoints add projectors, and their SiT runs time the other way)")
    model.load_state_dict(state, strict=True)
    model.eval()  # as released weights are used: label dropout off (a trainer switches it back on)
    return args


def _unwrapped(state: dict) -> dict:
    """`state` without the prefix that DDP (`module.`) or torch.compile (`_orig_mod.`) puts on
    every key of the model it wraps, in either nesting."""
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            return _unwrapped({k.removeprefix(prefix): v for k, v in state.items()})
    return state


def _network(state: dict) -> tuple[int, int, int] | None:
    """(depth, width, patch) of a DiT state dict; None without its patch embedding."""
    proj = state.get("x_embedder.proj.weight")
    if proj is None or proj.dim() != 4:
        return None
    return len({k.split(".")[1] for k in state if k.startswith("blocks.")}), proj.shape[0], proj.shape[-1]


def _fix(state: dict, own: dict, model_name: str, downsample: int | None, store: bool) -> str:
    """What to pass so that the network built fits the weights `state`, in one clause."""
    prefix = "SiT-" if model_name.startswith("SiT") else "DiT-"
    net = _network(state)
    if net != _network(own):
        if net is None:
            return "it is not a DiT or SiT checkpoint"
        name = next((prefix + k[4:] for k, c in DIT_MODELS.items()
                     if (c["depth"], c["hidden_size"], c["patch_size"]) == net), None)
        if name is None:
            return f"it is a network of depth {net[0]}, width {net[1]} and patch {net[2]}, which no --model builds"
        return f"it is a {name}: pass --model {name}"
    fixes = []
    channels, want = state["x_embedder.proj.weight"].shape[1], own["x_embedder.proj.weight"].shape[1]
    if channels != want:
        fixes.append(f"it takes {channels}-channel latents, not {want}: pass " +
                     ("the --vae it was trained on" if downsample else "LATENTS of the VAE it was trained on"))
    tokens = state["pos_embed"].shape[1] if "pos_embed" in state else None
    if tokens and tokens != own["pos_embed"].shape[1] and math.isqrt(tokens) ** 2 == tokens:
        size = math.isqrt(tokens) * net[2]
        # With --latents the image size is the store's: the store is what has to change.
        fixes.append(f"it was trained on {size}x{size} latents: pass " +
                     (f"--latents, a store encoded at {size * downsample} px" if downsample and store else
                      f"--image-size {size * downsample}" if downsample else "LATENTS of that size"))
    table = state.get("y_embedder.embedding_table.weight")
    if table is not None and table.shape[0] != own["y_embedder.embedding_table.weight"].shape[0]:
        n = table.shape[0] - 1  # the last row is the null class
        fixes.append(f"it has {n} classes (and the null class): pass " +
                     (f"--num-classes {n}" if downsample and not store else
                      "--latents of that many classes" if downsample else "LATENTS of that many classes"))
    return ", and ".join(fixes) or "its layers differ from the official layout that --model builds (learned sigma, a null class)"


def import_released(weights: str, out: str, model: str, vae: str, image_size: int | None = None,
                    num_classes: int | None = None, path: str | None = None, prediction: str | None = None,
                    latents: str | None = None) -> dict:
    """Write the `dit` artifact `out` from a released checkpoint: its weights as both the
    model and the EMA (the releases are EMA weights), the objective its name says (DiT-*:
    DDPM, SiT-*: transport with `path` and `prediction`), and the VAE whose latents it
    models. Those latents were normalised by the VAE's scaling factor (DiT, SiT) or, with
    `latents` (a store that `reals encode` made with that VAE), by the per-channel statistics
    measured over it (ReaLS' releases), whose class names the model then takes.
    `num_classes` and `image_size` default to the store's, else 1000 and 256; `path` and
    `prediction` (SiT only) to what the checkpoint's train.py args say, else linear and
    velocity. `reals sample --ckpt out` then samples it."""

    if Path(out).exists() and (not Path(out).is_dir() or any(Path(out).iterdir())):
        raise UserError(f"--out {out} is {'not empty' if Path(out).is_dir() else 'a file'}; pass a new folder")
    objective = default_objective(model)
    sit_flags = [flag for flag, value in (("--path", path), ("--prediction", prediction)) if value is not None]
    if objective == "dit" and sit_flags:
        raise UserError(f"{', '.join(sit_flags)}: a DiT-* model is DDPM; they describe a SiT-* (transport) model")
    store = open_store(latents) if latents is not None else None
    if image_size is None:
        image_size = int(store.attrs.get("image_size", 256)) if store is not None else 256
    bundle = load_reals_vae(vae)
    vae_config = bundle.vae.config
    channels, factor = vae_config.latent_channels, bundle.vae.downsample_factor
    if image_size % factor:
        raise UserError(f"--image-size {image_size} is not a multiple of the VAE's downsampling factor {factor}")
    size = image_size // factor
    # `sample` reads the VAE and the store from any working directory.
    vae_path = str(Path(vae).resolve())
    if store is not None:
        _check_store(store, latents, bundle.id, vae, [channels, size, size], image_size)
        if num_classes is not None and num_classes != len(store.classes):
            raise UserError(f"--num-classes {num_classes} disagrees with the {len(store.classes)} classes of {latents}, "
                            f"whose names the model takes; pass a store of the model's classes, or drop --num-classes")
        classes = store.classes
        mean, std = store.statistics()
        scaling = f"per-channel statistics of {latents}"
    elif bundle.align is not None or (vae_config.scaling_factor == 1 and not vae_config.shift_factor):
        # Without a scaling of its own, the latents were normalised by statistics measured over them.
        what = "is a `reals train-vae` VAE" if bundle.align is not None else "has no latent scaling (scaling_factor 1)"
        raise UserError(f"--vae {vae} {what}: models on it are trained on per-channel latent statistics; pass "
                        f"--latents STORE, a latent store made by `reals encode --vae {shlex.quote(str(vae))}`")
    else:
        classes = [str(i) for i in range(num_classes or 1000)]
        shift = float(vae_config.shift_factor or 0.0)
        mean, std = [shift] * channels, [1.0 / vae_config.scaling_factor] * channels
        scaling = (f"(z - {shift}) x {vae_config.scaling_factor} (the VAE's shift_factor and scaling_factor)" if shift
                   else f"x {vae_config.scaling_factor} (the VAE's scaling_factor)")
    net = build_dit(model, size, channels, len(classes))  # learned sigma and a null class, as released
    args = load_released(net, weights, model, factor, store is not None)
    trained_as = getattr(args, "model", None)
    if trained_as and trained_as != model:
        raise UserError(f"{weights} was trained as {trained_as}, its args say; pass --model {trained_as}")
    if objective == "sit":  # SiT's train.py args name its path ("Linear", "GVP") and prediction
        theirs = {"--path": str(getattr(args, "path_type", "")).lower(), "--prediction": getattr(args, "prediction", None)}
        for flag, value in (("--path", path), ("--prediction", prediction)):
            if value and theirs[flag] and value != theirs[flag]:
                raise UserError(f"{weights} was trained with {flag} {theirs[flag]}, its args say; pass {flag} {theirs[flag]}")
        path, prediction = path or theirs["--path"] or "linear", prediction or theirs["--prediction"] or "velocity"
    cfg = TrainDiTConfig(latents="", out=out, model=model, objective=objective, path=path, prediction=prediction, steps=0)
    build_objective(dataclasses.asdict(cfg))  # refuses an unknown path or prediction before anything is written
    config = dataclasses.asdict(cfg) | {
        "latent_shape": [channels, size, size], "num_classes": len(classes), "classes": classes,
        "latent_mean": mean, "latent_std": std, "latent_statistics": "store" if latents else "vae scaling_factor",
        "vae_id": bundle.id, "vae_path": vae_path, "released": True,
    }
    Path(out).mkdir(parents=True, exist_ok=True)
    state = net.state_dict()
    artifacts.save_weights(Path(out) / MODEL_FILE, state)
    artifacts.save_weights(Path(out) / EMA_FILE, state)
    inputs = {"weights": artifacts.describe_input(Path(weights).resolve()), "vae": artifacts.describe_input(vae_path)}
    if store is not None:
        inputs["latents"] = {"path": str(Path(latents).resolve()), "kind": "latents", "id": store.attrs.get("id", "?")}
    manifest = artifacts.write_manifest(out, KIND, FORMAT_VERSION, config, inputs, {"steps": None},
                                        files=[MODEL_FILE, EMA_FILE])
    print_summary(f"{model} {out} ({manifest['id']})", {
        "from": weights, "objective": objective, "latents": f"{channels}x{size}x{size}", "vae": f"{vae} ({bundle.id})",
        "latent scaling": scaling, "classes": f"{len(classes)}: {', '.join(classes[:3])}{', ...' if len(classes) > 3 else ''}"})
    return manifest


def _check_store(store: LatentStore, latents: str, vae_id: str, vae: str, shape: list[int], image_size: int) -> None:
    """The latent store `latents` must be VAE `vae_id`'s at the model's latent shape."""
    if store.vae_id != vae_id:
        raise UserError(f"{latents} was encoded by VAE {store.vae_id}, but --vae {vae} is VAE {vae_id}; "
                        f"pass a store that this VAE made")
    if list(store.latent_shape) != shape:  # only with an explicit --image-size: it defaults to the store's
        raise UserError(f"{latents} holds {'x'.join(map(str, store.latent_shape))} latents, and --image-size "
                        f"{image_size} makes {'x'.join(map(str, shape))}; drop --image-size, or pass a store "
                        f"encoded at {image_size} px")
