"""reals import-dit: released DiT/SiT checkpoints become model folders that `reals sample` reads."""

from __future__ import annotations

import argparse
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from reals_cli.artifacts import load_weights, read_manifest
from reals_cli.cli import main
from reals_cli.errors import UserError
from reals_cli.models.dit import build_dit
from reals_cli.models.reals_vae import load_reals_vae
from reals_cli.models.vae import AutoencoderKL, save_diffusers_vae, vae_config


@pytest.fixture(scope="module")
def sd_like_vae(tmp_path_factory):
    """A plain diffusers VAE folder whose latents, like SD-VAE's, are scaled by a factor (0.5 here)."""
    torch.manual_seed(0)
    cfg = vae_config("tiny")
    cfg.scaling_factor = 0.5
    folder = tmp_path_factory.mktemp("sd-vae")
    save_diffusers_vae(AutoencoderKL(cfg), folder)
    return folder


def _import(weights, vae, out, model="DiT-T/2", *extra, num_classes=3):
    classes = [] if num_classes is None else ["--num-classes", str(num_classes)]
    return CliRunner().invoke(main, ["import-dit", str(weights), "--model", model, "--vae", str(vae), "--out", str(out),
                                     "--image-size", "16", *classes, *extra])


def _text(output):
    """The summary table's words, with the rows that rich wrapped joined again."""
    return " ".join(output.replace("│", " ").split())


class Custom:
    """A class in a pickle: weights_only must refuse it."""


@pytest.mark.parametrize("model, objective, nested", [("DiT-T/2", "dit", False), ("SiT-T/2", "sit", True)])
def test_a_released_checkpoint_samples_with_its_vae_scaling(sd_like_vae, tmp_path, model, objective, nested):
    torch.manual_seed(1)
    state = build_dit(model, 8, 4, 3).state_dict()  # 16 px through the /2 VAE: 8x8 latents
    torch.save({"model": state, "ema": state} if nested else state, tmp_path / "release.pt")
    result = _import(tmp_path / "release.pt", sd_like_vae, tmp_path / "m", model)
    assert result.exit_code == 0, result.output
    m = read_manifest(tmp_path / "m", "dit", 1)
    assert m["config"]["objective"] == objective and m["config"]["latent_shape"] == [4, 8, 8]
    assert m["config"]["latent_mean"] == [0.0] * 4 and m["config"]["latent_std"] == [2.0] * 4  # 1 / scaling_factor
    assert m["config"]["vae_id"] == load_reals_vae(sd_like_vae).id
    assert m["inputs"]["weights"]["sha256"]
    assert "latent scaling x 0.5 (the VAE's scaling_factor)" in _text(result.output)
    for name in ("model.safetensors", "ema.safetensors"):
        got = load_weights(tmp_path / "m" / name)
        assert all(torch.equal(got[k], state[k]) for k in state)

    out = tmp_path / "samples"
    result = CliRunner().invoke(main, ["sample", "--ckpt", str(tmp_path / "m"), "--out", str(out), "-n", "3", "--steps", "4",
                                       "--cfg", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    with np.load(out / "samples.npz") as f:
        assert f["arr_0"].shape == (3, 16, 16, 3) and list(f["arr_1"]) == [0, 1, 2]


def test_bad_released_checkpoints_are_one_line_errors(sd_like_vae, tmp_path):
    torch.save(build_dit("DiT-T/2", 16, 4, 3).state_dict(), tmp_path / "big.pt")  # a 32 px model
    result = _import(tmp_path / "big.pt", sd_like_vae, tmp_path / "m")
    assert result.exit_code == 2
    assert result.output.strip() == (f"error: {tmp_path / 'big.pt'} does not fit this model (first: pos_embed is "
                                      "torch.Size([1, 64, 192]), needs (1, 16, 192)); it was trained on 16x16 latents: "
                                      "pass --image-size 32")
    assert not (tmp_path / "m").exists()
    state = build_dit("DiT-T/2", 8, 4, 3).state_dict()
    torch.save({**state, "projectors.0.0.weight": torch.zeros(2, 2)}, tmp_path / "repa.pt")
    result = _import(tmp_path / "repa.pt", sd_like_vae, tmp_path / "m")
    assert result.exit_code == 2 and result.output.strip() == (
        f"error: {tmp_path / 'repa.pt'} holds weights that a DiT/SiT does not have (first: projectors.0.0.weight); it is "
        "not a DiT or SiT release (REPA's checkpoints add projectors, and their SiT runs time the other way)")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    result = _import(tmp_path / "big.pt", sd_like_vae, tmp_path / "full")
    assert result.exit_code == 2 and "is not empty; pass a new folder" in result.output


def test_checkpoints_of_the_official_train_py_and_of_wrapped_models_load(sd_like_vae, tmp_path):
    torch.manual_seed(2)
    net, ema = build_dit("DiT-T/2", 8, 4, 3), build_dit("DiT-T/2", 8, 4, 3)
    opt = torch.optim.AdamW(net.parameters())
    net(torch.randn(1, 4, 8, 8), torch.ones(1), torch.zeros(1, dtype=torch.long)).sum().backward()
    opt.step()
    # What DiT's and SiT's train.py save: the EMA beside the model, the optimizer and their argparse flags.
    torch.save({"model": net.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                "args": argparse.Namespace(model="DiT-T/2", image_size=16, num_classes=3, global_batch_size=256)},
               tmp_path / "0000040.pt")
    result = _import(tmp_path / "0000040.pt", sd_like_vae, tmp_path / "m")
    assert result.exit_code == 0, result.output
    got = load_weights(tmp_path / "m" / "ema.safetensors")
    assert all(torch.equal(got[k], v) for k, v in ema.state_dict().items())
    # Its args name the model: the same network under the other name (and objective) is refused.
    result = _import(tmp_path / "0000040.pt", sd_like_vae, tmp_path / "sit", "SiT-T/2")
    assert result.exit_code == 2 and result.output.strip() == (
        f"error: {tmp_path / '0000040.pt'} was trained as DiT-T/2, its args say; pass --model DiT-T/2")
    # SiT's train.py args give the path and prediction, unless the flags say otherwise (then refused).
    torch.save({"ema": ema.state_dict(), "args": argparse.Namespace(model="SiT-T/2", path_type="GVP", prediction="noise")},
               tmp_path / "sit.pt")
    result = _import(tmp_path / "sit.pt", sd_like_vae, tmp_path / "s1", "SiT-T/2")
    assert result.exit_code == 0, result.output
    config = read_manifest(tmp_path / "s1")["config"]
    assert (config["objective"], config["path"], config["prediction"]) == ("sit", "gvp", "noise")
    result = _import(tmp_path / "sit.pt", sd_like_vae, tmp_path / "s2", "SiT-T/2", "--path", "linear")
    assert result.exit_code == 2 and result.output.strip() == (
        f"error: {tmp_path / 'sit.pt'} was trained with --path gvp, its args say; pass --path gvp")
    result = _import(tmp_path / "0000040.pt", sd_like_vae, tmp_path / "d2", "DiT-T/2", "--prediction", "noise")
    assert result.exit_code == 2 and result.output.strip() == (
        "error: --prediction: a DiT-* model is DDPM; they describe a SiT-* (transport) model")
    assert read_manifest(tmp_path / "m")["config"]["path"] is None  # a DiT has no interpolant
    (tmp_path / "file").touch()
    result = _import(tmp_path / "0000040.pt", sd_like_vae, tmp_path / "file")
    assert result.exit_code == 2 and result.output.strip() == f"error: --out {tmp_path / 'file'} is a file; pass a new folder"
    # The state dict of a DDP-wrapped, compiled model: every key has a prefix.
    torch.save({f"module._orig_mod.{k}": v for k, v in net.state_dict().items()}, tmp_path / "ddp.pt")
    result = _import(tmp_path / "ddp.pt", sd_like_vae, tmp_path / "m2")
    assert result.exit_code == 0, result.output
    got = load_weights(tmp_path / "m2" / "model.safetensors")
    assert all(torch.equal(got[k], v) for k, v in net.state_dict().items())


def test_files_that_are_not_weights_only_state_dicts_are_one_line_errors(sd_like_vae, tmp_path):
    torch.save({"ema": build_dit("DiT-T/2", 8, 4, 3).state_dict(), "args": Custom()}, tmp_path / "unsafe.pt")
    result = _import(tmp_path / "unsafe.pt", sd_like_vae, tmp_path / "m")
    assert result.exit_code == 2 and result.output.strip() == (
        f"error: {tmp_path / 'unsafe.pt'} is not a plain weights file: it holds an object of class "
        f"{Custom.__module__}.Custom, and rebuilding it could run code, so it is not loaded; pass a .safetensors file, "
        f"or a .pt/.pth of tensors alone (a state dict)")
    (tmp_path / "junk.pt").write_bytes(b"PK\x03\x04 not a zip")
    result = _import(tmp_path / "junk.pt", sd_like_vae, tmp_path / "m")
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert result.output.startswith(f"error: cannot load {tmp_path / 'junk.pt'} as a plain tensor checkpoint "
                                    "(RuntimeError: PytorchStreamReader failed reading zip archive")
    torch.save({"model": build_dit("DiT-T/2", 8, 4, 3).state_dict(), "steps": 40}, tmp_path / "no-ema.pt")
    result = _import(tmp_path / "no-ema.pt", sd_like_vae, tmp_path / "m")
    assert result.exit_code == 2 and result.output.strip() == (
        f"error: {tmp_path / 'no-ema.pt'} holds no state dict of tensors (nor an 'ema' one); pass the weights of a DiT or SiT")


@pytest.mark.parametrize("built, model, fix", [
    (("DiT-T/2", 8, 4, 10), "DiT-T/2", "(first: y_embedder.embedding_table.weight is torch.Size([11, 192]), needs (4, 192)); "
     "it has 10 classes (and the null class): pass --num-classes 10"),
    (("DiT-T/2", 16, 4, 10), "DiT-T/2", "(first: pos_embed is torch.Size([1, 64, 192]), needs (1, 16, 192)); it was trained "
     "on 16x16 latents: pass --image-size 32, and it has 10 classes (and the null class): pass --num-classes 10"),
    (("DiT-T/2", 8, 8, 3), "DiT-T/2", "(first: x_embedder.proj.weight is torch.Size([192, 8, 2, 2]), needs (192, 4, 2, 2)); "
     "it takes 8-channel latents, not 4: pass the --vae it was trained on"),
    (("SiT-T/4", 8, 4, 3), "SiT-T/2", "(first: pos_embed is torch.Size([1, 4, 192]), needs (1, 16, 192)); "
     "it is a SiT-T/4: pass --model SiT-T/4"),
])
def test_a_checkpoint_of_another_shape_names_the_flag_that_fits_it(sd_like_vae, tmp_path, built, model, fix):
    torch.save(build_dit(*built).state_dict(), tmp_path / "w.pt")
    result = _import(tmp_path / "w.pt", sd_like_vae, tmp_path / "m", model)
    assert result.exit_code == 2 and result.output.strip() == f"error: {tmp_path / 'w.pt'} does not fit this model {fix}"


def test_a_checkpoint_of_no_known_size_and_one_for_train_dit_init_say_what_fits(tmp_path):
    from reals_cli.pipeline.model_artifact import load_released

    state = build_dit("DiT-T/2", 8, 4, 3).state_dict()
    torch.save({**state, **{k.replace("blocks.0.", "blocks.6."): v for k, v in state.items() if k.startswith("blocks.0.")}},
               tmp_path / "deep.pt")
    with pytest.raises(UserError, match=r"\(first: blocks\.6\.attn\.qkv\.weight is unexpected\); it is a network of depth 7, "
                                        r"width 192 and patch 2, which no --model builds$"):
        load_released(build_dit("DiT-T/2", 8, 4, 3), str(tmp_path / "deep.pt"), "DiT-T/2", 2)
    # train-dit --init: the latents set the latent size and the classes.
    torch.save(build_dit("DiT-T/2", 16, 4, 10).state_dict(), tmp_path / "big.pt")
    with pytest.raises(UserError, match=r"it was trained on 16x16 latents: pass LATENTS of that size, and it has 10 "
                                        r"classes \(and the null class\): pass LATENTS of that many classes$"):
        load_released(build_dit("DiT-T/2", 8, 4, 3), str(tmp_path / "big.pt"))


def test_a_vae_without_a_scaling_of_its_own_needs_the_latent_store(tmp_path):
    from reals_cli.models.alignment import AlignConfig, AlignmentNet
    from reals_cli.models.reals_vae import save_reals_vae

    torch.save(build_dit("DiT-T/2", 8, 4, 3).state_dict(), tmp_path / "release.pt")
    save_reals_vae(tmp_path / "reals-vae", AutoencoderKL(vae_config("tiny")), AlignmentNet(AlignConfig(4, 8, 6, 4, hidden=8)),
                   {"image_size": 16}, {}, {})
    save_diffusers_vae(AutoencoderKL(vae_config("tiny")), tmp_path / "plain")  # scaling_factor 1, as ReaLS' VAEs
    for vae, what in (("reals-vae", "is a `reals train-vae` VAE"), ("plain", "has no latent scaling (scaling_factor 1)")):
        result = _import(tmp_path / "release.pt", tmp_path / vae, tmp_path / "m")
        assert result.exit_code == 2 and result.output.strip() == (
            f"error: --vae {tmp_path / vae} {what}: models on it are trained on per-channel latent statistics; pass "
            f"--latents STORE, a latent store made by `reals encode --vae {tmp_path / vae}`")
        assert not (tmp_path / "m").exists()


def test_a_vae_shift_factor_is_the_latent_mean(tmp_path):
    cfg = vae_config("tiny")
    cfg.scaling_factor, cfg.shift_factor = 0.5, 0.25  # as FLUX's VAE shifts, then scales
    save_diffusers_vae(AutoencoderKL(cfg), tmp_path / "vae")
    torch.save(build_dit("DiT-T/2", 8, 4, 3).state_dict(), tmp_path / "release.pt")
    result = _import(tmp_path / "release.pt", tmp_path / "vae", tmp_path / "m")
    assert result.exit_code == 0, result.output
    assert "latent scaling (z - 0.25) x 0.5 (the VAE's shift_factor and scaling_factor)" in _text(result.output)
    m = read_manifest(tmp_path / "m", "dit", 1)
    assert m["config"]["latent_mean"] == [0.25] * 4 and m["config"]["latent_std"] == [2.0] * 4


def test_statistics_and_class_names_from_a_latent_store_as_releases_of_reals_need(sd_like_vae, tmp_path, monkeypatch):
    from reals_cli.data.latent_store import open_store
    from reals_cli.pipeline.encode import encode

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / "img" / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "img" / name / f"{i}.png")
    encode(tmp_path / "img", tmp_path / "lat.zarr", sd_like_vae, batch_size=4, block_size=4, workers=0, device="cpu",
           image_size=16)
    torch.save(build_dit("SiT-T/2", 8, 4, 2).state_dict(), tmp_path / "release.pt")
    # Paths as given relative to the working directory; the folder records them absolute.
    monkeypatch.chdir(tmp_path)
    vae = os.path.relpath(sd_like_vae)
    result = _import("release.pt", vae, "m", "SiT-T/2", "--latents", "lat.zarr", num_classes=None)
    assert result.exit_code == 0, result.output
    assert "latent scaling per-channel statistics of lat.zarr" in _text(result.output)
    m = read_manifest(tmp_path / "m", "dit", 1)
    attrs = open_store(tmp_path / "lat.zarr").attrs
    assert m["config"]["latent_mean"] == attrs["latent_mean"] and m["config"]["latent_std"] == attrs["latent_std"]
    assert m["config"]["latent_statistics"] == "store" and m["inputs"]["latents"]["id"] == attrs["id"]
    assert m["config"]["classes"] == ["a", "b"] and m["config"]["num_classes"] == 2
    assert m["config"]["vae_path"] == str(sd_like_vae.resolve()) == m["inputs"]["vae"]["path"]
    assert m["inputs"]["latents"]["path"] == str(tmp_path / "lat.zarr")
    monkeypatch.chdir(tmp_path / "img")
    result = CliRunner().invoke(main, ["sample", "--ckpt", str(tmp_path / "m"), "--out", str(tmp_path / "s"), "-n", "2",
                                       "--steps", "2", "--classes", "b", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    monkeypatch.chdir(tmp_path)
    # A class count other than the store's is refused, as is a model of another latent size.
    result = _import("release.pt", vae, "m1", "SiT-T/2", "--latents", "lat.zarr")
    assert result.exit_code == 2 and result.output.strip() == (
        "error: --num-classes 3 disagrees with the 2 classes of lat.zarr, whose names the model takes; pass a store of "
        "the model's classes, or drop --num-classes")
    torch.save(build_dit("SiT-T/2", 16, 4, 2).state_dict(), tmp_path / "release32.pt")
    result = _import(tmp_path / "release32.pt", sd_like_vae, tmp_path / "m2", "SiT-T/2", "--latents",
                     str(tmp_path / "lat.zarr"), "--image-size", "32", num_classes=None)
    assert result.exit_code == 2 and result.output.strip() == (
        f"error: {tmp_path / 'lat.zarr'} holds 4x8x8 latents, and --image-size 32 makes 4x16x16; drop --image-size, "
        "or pass a store encoded at 32 px")
    # Without --image-size (the store's 16 px) the release's size is told to come from the store, not the flag.
    result = _import(tmp_path / "release32.pt", sd_like_vae, tmp_path / "m2", "SiT-T/2", "--latents",
                     str(tmp_path / "lat.zarr"), num_classes=None)
    assert result.exit_code == 2 and result.output.strip().endswith(
        "it was trained on 16x16 latents: pass --latents, a store encoded at 32 px")
    # Without --image-size the store's is taken; a release of other classes is told to bring their store.
    result = CliRunner().invoke(main, ["import-dit", "release.pt", "--model", "SiT-T/2", "--vae", vae, "--out", "m3",
                                       "--latents", "lat.zarr"])
    assert result.exit_code == 0, result.output
    torch.save(build_dit("SiT-T/2", 8, 4, 3).state_dict(), tmp_path / "release3.pt")
    result = CliRunner().invoke(main, ["import-dit", "release3.pt", "--model", "SiT-T/2", "--vae", vae, "--out", "m4",
                                       "--latents", "lat.zarr"])
    assert result.exit_code == 2 and result.output.strip().endswith(
        "it has 3 classes (and the null class): pass --latents of that many classes")


def test_released_weights_load_in_eval_mode_so_labels_are_not_dropped(tmp_path):
    """A notebook that loads released weights and samples must not see label dropout: a model in
    training mode replaces a tenth of the labels by the null class, at random."""
    from reals_cli.pipeline.model_artifact import load_released

    torch.manual_seed(0)
    source = build_dit("DiT-T/2", 8, 4, 3, class_dropout=0.5)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    model = build_dit("DiT-T/2", 8, 4, 3, class_dropout=0.5)
    assert model.training
    load_released(model, str(tmp_path / "w.pt"), "DiT-T/2")
    assert not model.training
    x, t, y = torch.randn(64, 4, 8, 8), torch.rand(64) * 999, torch.randint(0, 3, (64,))
    with torch.no_grad():
        assert torch.equal(model(x, t, y), model(x, t, y))  # no random label dropped


def test_a_checkpoint_with_nan_weights_is_refused(sd_like_vae, tmp_path):
    state = build_dit("DiT-T/2", 8, 4, 3).state_dict()
    state["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    torch.save({"model": state, "ema": state}, tmp_path / "nan.pt")
    result = _import(tmp_path / "nan.pt", sd_like_vae, tmp_path / "m")
    assert result.exit_code == 2 and result.output.strip() == (
        f"error: {tmp_path / 'nan.pt'} holds NaN or infinite values (first in model.blocks.0.attn.qkv.weight), so it "
        f"is no usable weights file; re-create it (from a checkpoint before the values broke) or pass another file")
    assert not (tmp_path / "m").exists()


@pytest.fixture
def model(sd_like_vae, tmp_path):
    torch.save(build_dit("SiT-T/2", 8, 4, 3).state_dict(), tmp_path / "release.pt")
    result = _import(tmp_path / "release.pt", sd_like_vae, tmp_path / "m", "SiT-T/2")
    assert result.exit_code == 0, result.output
    return tmp_path / "m"


def _sample(ckpt, out):
    return CliRunner().invoke(main, ["sample", "--ckpt", str(ckpt), "--out", str(out), "-n", "2", "--steps", "2",
                                     "--device", "cpu"])


def test_sample_refuses_nan_weights_that_match_their_manifest(model, tmp_path):
    """The hash vouches for the bytes, not for what they hold."""
    import json

    from reals_cli.artifacts import save_weights, sha256_file

    ema = load_weights(model / "ema.safetensors")
    ema["final_layer.linear.bias"][0] = float("nan")
    save_weights(model / "ema.safetensors", ema)
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["files"]["ema.safetensors"] = sha256_file(model / "ema.safetensors")
    (model / "manifest.json").write_text(json.dumps(manifest))
    result = _sample(model, tmp_path / "s")  # refused before the run starts: no output folder
    assert result.exit_code == 2 and not (tmp_path / "s").exists()
    assert result.output.strip() == (
        f"error: {model / 'ema.safetensors'} holds NaN or infinite values (first in final_layer.linear.bias), so it "
        f"is no usable weights file; re-create it (from a checkpoint before the values broke) or pass another file")


@pytest.mark.parametrize("key", ["objective", "latent_std", "prediction"])
def test_a_model_manifest_missing_a_key_is_one_line(model, tmp_path, key):
    import json

    manifest = json.loads((model / "manifest.json").read_text())
    del manifest["config"][key]
    (model / "manifest.json").write_text(json.dumps(manifest))
    result = _sample(model, tmp_path / "s")
    assert result.exit_code == 2 and result.output.strip() == (
        f"error: {model / 'manifest.json'} lacks {key} in its config (edited or damaged); delete {model} and run "
        f"`{manifest['command']}` again")


def test_sample_out_under_a_file_or_read_only_is_one_line_before_the_work(model, tmp_path, unwritable):
    (tmp_path / "file").write_text("x")
    result = _sample(model, tmp_path / "file" / "s")
    assert (result.exit_code, result.output) == (
        2, f"error: --out {tmp_path / 'file' / 's'} is under {tmp_path / 'file'}, which is a file; pass a path in a "
           f"folder\n")
    result = _sample(model, unwritable / "s")
    assert result.exit_code == 2 and result.output.startswith(
        f"error: --out {unwritable / 's'} cannot be written: {unwritable} refuses new files ("), result.output
