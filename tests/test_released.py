"""reals import-dit: released DiT/SiT checkpoints become model folders that `reals sample` reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from reals_cli.artifacts import load_weights, read_manifest
from reals_cli.cli import main
from reals_cli.dit import build_dit
from reals_cli.reals_vae import load_reals_vae
from reals_cli.vae import AutoencoderKL, save_diffusers_vae, vae_config


@pytest.fixture(scope="module")
def sd_like_vae(tmp_path_factory):
    """A plain diffusers VAE folder whose latents, like SD-VAE's, are scaled by a factor (0.5 here)."""
    torch.manual_seed(0)
    cfg = vae_config("tiny")
    cfg.scaling_factor = 0.5
    folder = tmp_path_factory.mktemp("sd-vae")
    save_diffusers_vae(AutoencoderKL(cfg), folder)
    return folder


def _import(weights, vae, out, model="DiT-T/2", *extra):
    return CliRunner().invoke(main, ["import-dit", str(weights), "--model", model, "--vae", str(vae), "--out", str(out),
                                     "--image-size", "16", "--num-classes", "3", *extra])


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
                                      "torch.Size([1, 64, 192]), needs (1, 16, 192)); pick the matching --model and latent size")
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
    assert result.exit_code == 2 and "is not empty; pass a new --out folder" in result.output


def test_statistics_from_a_latent_store_as_releases_of_reals_need(sd_like_vae, tmp_path):
    from reals_cli.encode import encode
    from reals_cli.latent_store import open_store

    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (tmp_path / "img" / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "img" / name / f"{i}.png")
    encode(tmp_path / "img", tmp_path / "lat.zarr", sd_like_vae, batch_size=4, block_size=4, workers=0, device="cpu",
           image_size=16)
    torch.save(build_dit("SiT-T/2", 8, 4, 3).state_dict(), tmp_path / "release.pt")
    result = _import(tmp_path / "release.pt", sd_like_vae, tmp_path / "m", "SiT-T/2", "--latents", str(tmp_path / "lat.zarr"))
    assert result.exit_code == 0, result.output
    m = read_manifest(tmp_path / "m", "dit", 1)
    attrs = open_store(tmp_path / "lat.zarr").attrs
    assert m["config"]["latent_mean"] == attrs["latent_mean"] and m["config"]["latent_std"] == attrs["latent_std"]
    assert m["config"]["latent_statistics"] == "store" and m["inputs"]["latents"]["id"] == attrs["id"]
    # A model of another latent size than the store's is refused, with what to change.
    torch.save(build_dit("SiT-T/2", 16, 4, 3).state_dict(), tmp_path / "release32.pt")
    result = _import(tmp_path / "release32.pt", sd_like_vae, tmp_path / "m2", "SiT-T/2", "--latents",
                     str(tmp_path / "lat.zarr"), "--image-size", "32")
    assert result.exit_code == 2 and result.output.strip() == (
        f"error: {tmp_path / 'lat.zarr'} holds 4x8x8 latents, the model 4x16x16; pass the matching --image-size")
