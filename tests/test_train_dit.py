"""train-dit: exact resume after SIGKILL, REPA on aligned features, shape checks, bad input."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from reals_cli.alignment import AlignConfig, AlignmentNet
from reals_cli.artifacts import load_state, load_weights, read_manifest
from reals_cli.cli import main
from reals_cli.encode import encode
from reals_cli.reals_vae import save_reals_vae
from reals_cli.train_dit import resolve_config, train_dit
from reals_cli.vae import AutoencoderKL, vae_config

# Tiny: 16 px images -> 4x8x8 latents -> DiT-T/2 sees 4x4 tokens, the alignment network's grid.
FLAGS = dict(model="DiT-T/2", batch_size=6, workers=0, device="cpu", precision="fp32", lr=1e-3, log_every=1)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("dit")
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        (root / "img" / name).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "img" / name / f"{i}.png")
    torch.manual_seed(0)
    # Alignment net: 8x8 latent -> 4x4 grid of 6-d features, i.e. DiT-S/2's 4x4 tokens.
    save_reals_vae(root / "vae", AutoencoderKL(vae_config("tiny")), AlignmentNet(AlignConfig(4, 8, 6, 4, hidden=8)),
                   {"image_size": 16}, {}, {})
    encode(root / "img", root / "lat.zarr", root / "vae", batch_size=8, block_size=8, workers=0, device="cpu", flip=True)
    return root / "lat.zarr", root / "vae"


def _cli_args(latents, out, steps, **extra):
    args = [str(latents), "--out", str(out), "--steps", str(steps)]
    for k, v in {**FLAGS, **extra}.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


@pytest.mark.parametrize("objective", ["sit", "dit"])
def test_resume_after_sigkill_equals_uninterrupted(store, tmp_path, objective, kill_after_checkpoint):
    latents, _ = store
    steps = 8
    straight = tmp_path / "straight"
    train_dit(resolve_config(latents=str(latents), out=str(straight), steps=steps, ckpt_every=4, objective=objective, **FLAGS))
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "reals_cli", "train-dit", *_cli_args(latents, killed, steps, ckpt_every=1, objective=objective)]
    kill_after_checkpoint(cmd, killed / "checkpoint.safetensors", 3)
    assert not (killed / "manifest.json").exists(), "finished before the kill"
    result = CliRunner().invoke(main, ["train-dit", *_cli_args(latents, killed, steps, ckpt_every=1, objective=objective), "--resume"])
    assert result.exit_code == 0, result.output
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_weights(straight / name), load_weights(killed / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    m = read_manifest(killed, "dit", 1)
    assert m["config"]["latent_shape"] == [4, 8, 8] and m["config"]["num_classes"] == 3
    assert len(m["config"]["latent_mean"]) == 4  # the store's normalisation travels with the model


def test_loss_falls(store, tmp_path):
    latents, _ = store
    out = tmp_path / "o"
    train_dit(resolve_config(latents=str(latents), out=str(out), steps=40, ckpt_every=40, **FLAGS))
    records = __import__("reals_cli.training", fromlist=["read_log"]).read_log(out / "log.jsonl")
    losses = [r["loss"] for r in records]
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    # The logged model-FLOP rate: 3 forwards an image, each as torch counts it (tests/test_dit.py).
    from reals_cli.dit import dit_flops

    assert all(r["tflop_per_s"] == pytest.approx(r["img_per_s"] * 3 * dit_flops("DiT-T/2", 8, 4) / 1e12) for r in records)


def test_repa_aligns_to_the_alignment_network(store, tmp_path):
    latents, vae = store
    out = tmp_path / "repa"
    train_dit(resolve_config(latents=str(latents), out=str(out), steps=3, ckpt_every=3, sample_every=3, repa_weight=0.5,
                                 repa_depth=2, repa_vae=str(vae), **FLAGS))
    proj = load_weights(out / "projector.safetensors")
    assert proj["4.weight"].shape[0] == 6  # projects to the alignment network's feature width
    log = (out / "log.jsonl").read_text()
    assert '"repa": -' in log or '"repa": 0.' in log  # a real cosine term was logged


def test_repa_refuses_another_vae(store, tmp_path):
    latents, _ = store
    torch.manual_seed(5)
    other = tmp_path / "other_vae"
    save_reals_vae(other, AutoencoderKL(vae_config("tiny")), AlignmentNet(AlignConfig(4, 8, 6, 4, hidden=8)), {"image_size": 16}, {}, {})
    result = CliRunner().invoke(main, ["train-dit", *_cli_args(latents, tmp_path / "o", 2, repa_weight=0.5, repa_vae=other)])
    assert result.exit_code == 2
    assert "but" in result.output and "was encoded by VAE" in result.output


def test_official_checkpoint_of_another_size_is_refused(store, tmp_path):
    latents, _ = store
    from reals_cli.dit import build_dit

    torch.save(build_dit("DiT-T/2", 16, 4, 3).state_dict(), tmp_path / "big.pt")  # 16x16 latents, not 8x8
    result = CliRunner().invoke(main, ["train-dit", *_cli_args(latents, tmp_path / "o", 2, init=tmp_path / "big.pt")])
    assert result.exit_code == 2
    assert "does not fit this model (first: pos_embed is torch.Size([1, 64, 192]), needs (1, 16, 192))" in result.output


def test_init_loads_an_official_layout_checkpoint(store, tmp_path):
    latents, _ = store
    from reals_cli.dit import build_dit

    torch.manual_seed(3)
    ref = build_dit("DiT-T/2", 8, 4, 3).state_dict()
    torch.save(ref, tmp_path / "init.pt")
    out = tmp_path / "o"
    train_dit(resolve_config(latents=str(latents), out=str(out), steps=1, ckpt_every=1, init=str(tmp_path / "init.pt"), **{**FLAGS, "lr": 0.0}))
    got = load_weights(out / "model.safetensors")
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_a_diverging_run_stops_before_checkpointing_broken_weights(store, tmp_path):
    latents, _ = store
    out = tmp_path / "nan"
    # lr 1e30: the first update is finite, the second step's loss overflows.
    result = CliRunner().invoke(main, ["train-dit", *_cli_args(latents, out, 6, ckpt_every=1, lr=1e30)])
    assert result.exit_code == 2
    ckpt = out / "checkpoint.safetensors"
    assert result.output.strip().splitlines()[-1] == (
        f"error: the loss stopped being finite at step 2 (last good checkpoint: {ckpt}); resume with --resume "
        "and try --qk-norm, --precision fp32, a lower --lr or a smaller --grad-clip")
    state = load_state(ckpt)
    assert state["step"] == 1 and all(torch.isfinite(v).all() for v in state["trainable"].values())


def test_unfinished_store_is_refused(tmp_path):
    from reals_cli.latent_store import create_store

    create_store(tmp_path / "s.zarr", rows=4, latent_shape=(4, 8, 8), views=1, dtype="float16", block_size=4,
                 attrs={"vae_id": "x", "config": {"block_size": 4}, "classes": ["a"]})
    result = CliRunner().invoke(main, ["train-dit", str(tmp_path / "s.zarr"), "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert result.exit_code == 2
    assert "is an unfinished latent store (0 of 1 blocks encoded)" in result.output


def test_preview_grid_is_written(store, tmp_path):
    latents, _ = store
    out = tmp_path / "p"
    train_dit(resolve_config(latents=str(latents), out=str(out), steps=2, ckpt_every=2, sample_every=2, **FLAGS))
    from PIL import Image

    grid = Image.open(out / "samples_0000002.png")
    assert grid.size == (8 * 16, 16)  # 8 samples of 16 px, decoded by the store's VAE


@pytest.mark.slow
def test_compile_trains_as_eager(store, tmp_path):
    latents, _ = store
    runs = {}
    for compiled in (False, True):
        out = tmp_path / f"compile-{compiled}"
        train_dit(resolve_config(latents=str(latents), out=str(out), steps=3, ckpt_every=3, compile=compiled, **FLAGS))
        runs[compiled] = load_weights(out / "model.safetensors")
    assert runs[True].keys() == runs[False].keys()
    for k in runs[False]:
        torch.testing.assert_close(runs[True][k], runs[False][k], atol=1e-4, rtol=1e-3)


def test_torchrun_two_processes(store, tmp_path, train_on_two_ranks):
    """DDP on CPU (gloo): each rank draws its own batches, rank 0 writes one artifact."""
    latents, _ = store
    out = tmp_path / "ddp"
    train_on_two_ranks(["train-dit", *_cli_args(latents, out, 3, ckpt_every=3)], out / "checkpoint.safetensors", 3)
    assert read_manifest(out, "dit", 1)["metrics"]["steps"] == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("objective", ["sit", "dit"])
def test_no_host_sync_per_step_on_cuda(store, tmp_path, objective):
    """Between log and checkpoint steps the GPU is never waited for: the number of synchronising
    calls that torch reports does not grow with the number of steps."""
    import warnings

    latents, _ = store
    counts = []
    for steps in (3, 6):
        flags = {**FLAGS, "device": "cuda", "precision": "bf16", "log_every": 10**6}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train_dit(resolve_config(latents=str(latents), out=str(tmp_path / f"{objective}{steps}"), steps=steps,
                                         ckpt_every=10**6, objective=objective, **flags))
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchronizing" in str(w.message) for w in caught))
    assert counts[0] == counts[1], counts
