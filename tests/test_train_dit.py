"""train-dit: exact resume after SIGKILL, REPA on aligned features, shape checks, bad input."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from reals_cli.artifacts import load_state, load_weights, read_manifest, save_state
from reals_cli.cli import main
from reals_cli.models.alignment import AlignConfig, AlignmentNet
from reals_cli.models.reals_vae import save_reals_vae
from reals_cli.models.vae import AutoencoderKL, vae_config
from reals_cli.pipeline.encode import encode
from reals_cli.pipeline.train_dit import resolve_config, train_dit
from reals_cli.pipeline.training import read_log

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


def _store_of_new_vae(root: Path, tmp_path: Path, align: AlignConfig) -> tuple[Path, Path]:
    """The fixture's images encoded by a fresh VAE with this alignment network: (latents, vae)."""
    torch.manual_seed(1)
    save_reals_vae(tmp_path / "vae", AutoencoderKL(vae_config("tiny")), AlignmentNet(align), {"image_size": 16}, {}, {})
    encode(root / "img", tmp_path / "lat.zarr", tmp_path / "vae", batch_size=8, block_size=8, workers=0, device="cpu")
    return tmp_path / "lat.zarr", tmp_path / "vae"


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


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_saves_the_step_it_stopped_at_and_resume_goes_on_exactly(store, tmp_path, interrupt_after_log, sig):
    """Ctrl-C, or torchrun's SIGTERM, reaches the whole process group, the DataLoader worker too
    (which SIGTERM kills): the run checkpoints the step it is at though no checkpoint was due, and
    exits 128 + the signal (130, 143) saying how to go on."""
    import signal

    latents, _ = store
    out = tmp_path / "stopped"
    args = _cli_args(latents, out, 100_000, ckpt_every=100_000, workers=1, sample_every=0)
    steps = interrupt_after_log([sys.executable, "-m", "reals_cli", "train-dit", *args], out, 3,
                                getattr(signal, sig), group=True) + 2
    # A pipeline's rerun (--auto-resume) goes on as --resume does.
    again = "--resume" if sig == "SIGINT" else "--auto-resume"
    result = CliRunner().invoke(main, ["train-dit", *_cli_args(latents, out, steps, sample_every=0), again])
    assert result.exit_code == 0, result.output
    straight = tmp_path / "straight"
    train_dit(resolve_config(latents=str(latents), out=str(straight), steps=steps, sample_every=0, **FLAGS))
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_weights(straight / name), load_weights(out / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize("death", [RuntimeError("DataLoader worker (pid 7) exited unexpectedly"),
                                   ConnectionResetError(104, "Connection reset by peer"), EOFError()])
def test_a_worker_killed_by_the_signal_ends_the_batches_only_after_the_signal(death):
    """Killed mid-handover of a batch's shared memory, a worker shows as a reset connection, not
    torch's RuntimeError (seen under torchrun on a loaded machine): after the signal, no batch."""
    from reals_cli.pipeline.training import SignalStop

    def batches():
        raise death
        yield

    stop = SignalStop(world=1)
    with pytest.raises(type(death)):
        stop.next_batch(batches())
    stop.requested = "SIGTERM"
    assert stop.next_batch(batches()) is None


def test_sigterm_to_torchrun_stops_every_rank_at_one_checkpointed_step(store, tmp_path, interrupt_after_log):
    """torchrun passes a cluster's SIGTERM to each rank's process group and kills them 30 s later:
    the ranks agree on a step, save it together and exit 143 (torchrun itself 1)."""
    import signal

    latents, _ = store
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "reals_cli", "train-dit",
           *_cli_args(latents, out, 100_000, ckpt_every=100_000, workers=1, sample_every=0)]
    interrupt_after_log(cmd, out, 3, signal.SIGTERM, status=1)
    assert len(load_state(out / "checkpoint.safetensors")["rng"]) == 2  # both ranks' states, at that step


def test_loss_falls(store, tmp_path):
    latents, _ = store
    out = tmp_path / "o"
    train_dit(resolve_config(latents=str(latents), out=str(out), steps=40, ckpt_every=40, **FLAGS))
    records = read_log(out / "log.jsonl")
    losses = [r["loss"] for r in records]
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    # The logged model-FLOP rate: 3 forwards an image, each as torch counts it (tests/test_dit.py).
    from reals_cli.models.dit import dit_flops

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
    from reals_cli.models.dit import build_dit

    torch.save(build_dit("DiT-T/2", 16, 4, 3).state_dict(), tmp_path / "big.pt")  # 16x16 latents, not 8x8
    result = CliRunner().invoke(main, ["train-dit", *_cli_args(latents, tmp_path / "o", 2, init=tmp_path / "big.pt")])
    assert result.exit_code == 2
    assert "does not fit this model (first: pos_embed is torch.Size([1, 64, 192]), needs (1, 16, 192))" in result.output


def test_init_loads_an_official_layout_checkpoint(store, tmp_path):
    latents, _ = store
    from reals_cli.models.dit import build_dit

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
    from reals_cli.data.latent_store import create_store

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


def test_previews_leave_the_training_unchanged(store, tmp_path):
    """A preview builds the VAE (its initial weights are random draws) and samples: none of it
    may move the run's random numbers (label dropout), so the weights equal a run without."""
    latents, _ = store
    weights = {}
    for every in (0, 2):
        out = tmp_path / f"every{every}"
        train_dit(resolve_config(latents=str(latents), out=str(out), steps=4, ckpt_every=4, sample_every=every,
                                 class_dropout=0.5, **FLAGS))
        weights[every] = load_weights(out / "model.safetensors")
    assert (tmp_path / "every2" / "samples_0000002.png").is_file()
    for key, value in weights[0].items():
        assert torch.equal(value, weights[2][key]), key


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
    calls that torch reports does not grow with the number of steps. Six more steps would add
    six or more with a sync per step, three with one every other step; the set-up and the final
    writes vary by one between runs (seen on an H100: 578 and 577)."""
    import warnings

    latents, _ = store
    counts = []
    for steps in (3, 9):
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
    assert abs(counts[1] - counts[0]) <= 1, counts


def test_the_objective_follows_the_model_name_unless_given():
    def resolved(**flags):
        cfg = resolve_config(latents="l", out="o", **flags)
        return cfg.objective, cfg.path, cfg.prediction, cfg.time_distribution

    assert resolved(model="DiT-B/2") == ("dit", None, None, None)  # a dit run has no SiT options
    assert resolved(model="SiT-B/2") == ("sit", "linear", "velocity", "uniform")
    assert resolved() == ("sit", "linear", "velocity", "uniform")  # the default model is SiT-B/2
    assert resolved(model="DiT-B/2", objective="sit", path="gvp") == ("sit", "gvp", "velocity", "uniform")
    assert resolved(model="SiT-B/2", objective="dit")[0] == "dit"


@pytest.mark.parametrize("flags, message", [
    ({"lr": -1}, "--lr must be >= 0, got -1.0"),
    ({"lr": "nan"}, "Invalid value for '--lr': 'nan' is not a finite number. (see `main train-dit --help`)"),
    ({"weight_decay": -1}, "--weight-decay must be >= 0, got -1.0"),
    ({"ema_decay": 1.5}, "--ema-decay must be in [0, 1], got 1.5"),
    ({"ema_decay": -3}, "--ema-decay must be in [0, 1], got -3.0"),
    ({"grad_clip": -1}, "--grad-clip must be >= 0 (0: no clipping), got -1.0"),
    ({"seed": -1}, "Invalid value for '--seed': -1 is not in the range 0<=x<=4294967295. (see `main train-dit --help`)"),
    ({"workers": -1}, "--workers must be >= 0, got -1"),
    ({"steps": 0}, "--steps must be at least 1, got 0"),
    ({"batch_size": 0}, "--batch-size must be at least 1, got 0"),
    ({"sample_every": -1}, "--sample-every must be >= 0 (0: no previews), got -1"),
    ({"keep_every": -1}, "--keep-every must be >= 0 (0: keep none), got -1"),
    ({"class_dropout": 1}, "--class-dropout must be in [0, 1), got 1.0"),
    ({"repa_weight": -1}, "--repa-weight must be >= 0 (0: no REPA), got -1.0"),
    ({"repa_weight": 0.5, "repa_depth": 7}, "--repa-depth must be between 1 and the model's depth 6, got 7"),
    ({"repa_depth": 2}, "--repa-depth applies only with REPA (--repa-weight > 0); drop it, or pass --repa-weight W"),
    ({"repa_weight": 0, "repa_depth": 2, "repa_vae": "v"},
     "--repa-depth, --repa-vae apply only with REPA (--repa-weight > 0); drop them, or pass --repa-weight W"),
    ({"objective": "dit", "path": "gvp", "prediction": "noise", "time_distribution": "lognormal"},
     "--path, --prediction, --time-distribution apply only to the sit objective, and this run trains dit "
     "(as --model DiT-T/2 says); drop them, or pass --objective sit"),
    ({"path": "gvp"}, "--path applies only to the sit objective, and this run trains dit (as --model DiT-T/2 says); "
                      "drop it, or pass --objective sit"),
    ({"model": "SiT-T/2", "objective": "dit", "prediction": "noise"},
     "--prediction applies only to the sit objective, and this run trains dit (--objective dit); drop it, "
     "or pass --objective sit"),
])
def test_bad_values_are_one_line_errors_before_anything_runs(store, tmp_path, flags, message):
    latents, vae = store
    out = tmp_path / "o"
    flags = {"steps": 2, **({"repa_vae": vae} if flags.get("repa_weight", 0) > 0 else {}), **flags}
    result = CliRunner().invoke(main, ["train-dit", *_cli_args(latents, out, flags.pop("steps"), **flags)])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"error: {message}"
    assert not out.exists()


def test_resume_of_a_finished_run_is_a_no_op_or_trains_on(store, tmp_path):
    """A requeued job (the same command with --resume) that had finished changes nothing."""
    latents, _ = store
    out = tmp_path / "o"
    train_dit(resolve_config(latents=str(latents), out=str(out), steps=2, ckpt_every=2, sample_every=0, **FLAGS))
    before = (out / "manifest.json").read_bytes()
    again = CliRunner().invoke(main, ["train-dit", *_cli_args(latents, out, 2, sample_every=0), "--resume"])
    assert (again.exit_code, again.output.strip()) == (0, f"{out} is already trained for 2 steps; nothing to do")
    assert (out / "manifest.json").read_bytes() == before
    fewer = CliRunner().invoke(main, ["train-dit", *_cli_args(latents, out, 1, sample_every=0), "--resume"])
    assert (fewer.exit_code, fewer.output.strip()) == (
        2, f"error: {out} is already trained for 2 steps; pass a larger --steps to train on")
    more = CliRunner().invoke(main, ["train-dit", *_cli_args(latents, out, 3, sample_every=0), "--resume"])
    assert more.exit_code == 0 and read_manifest(out)["metrics"]["steps"] == 3
    # Stopped after its last checkpoint, before the manifest: the requeued job writes the model.
    final = read_manifest(out)
    (out / "manifest.json").unlink()
    done = CliRunner().invoke(main, ["train-dit", *_cli_args(latents, out, 3, sample_every=0), "--resume"])
    assert done.exit_code == 0, done.output
    assert read_manifest(out)["files"] == final["files"]
    assert read_manifest(out)["metrics"]["final_loss"] == read_log(out / "log.jsonl")[-1]["loss"]


@pytest.mark.parametrize("file", ["model.safetensors", "ema.safetensors", "manifest.json"])
def test_killed_while_writing_its_final_files_the_resumed_run_writes_the_identical_artifact(store, tmp_path, file):
    """Killed at the rename of one of its final files (after the last checkpoint): --resume writes the same
    weights and manifest (the final loss too, though the last step was not logged) and leaves no temp file."""
    import subprocess

    latents, _ = store
    args = _cli_args(latents, tmp_path / "straight", 3, log_every=2, sample_every=0)
    assert CliRunner().invoke(main, ["train-dit", *args]).exit_code == 0
    killed = tmp_path / "killed"
    args = _cli_args(latents, killed, 3, log_every=2, sample_every=0)
    code = ("import os, sys; real = os.replace\n"
            "def replace(src, dst):\n"
            f"    if os.fspath(dst) == {str(killed / file)!r}: os._exit(9)\n"
            "    real(src, dst)\n"
            "os.replace = replace\n"
            f"from reals_cli.cli import main; main({['train-dit', *args]!r}, prog_name='reals')")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert child.returncode == 9, child.stderr
    resumed = CliRunner().invoke(main, ["train-dit", *args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    a, b = read_manifest(tmp_path / "straight"), read_manifest(killed)
    assert b["metrics"]["final_loss"] != read_log(killed / "log.jsonl")[-1]["loss"]  # step 3's loss, not step 2's
    for m in (a, b):  # what the other folder alone changes: its path, and with the config the id
        del m["created"], m["wall_s"], m["command"], m["id"], m["config"]["out"]
    assert a == b
    assert [p.name for p in killed.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp")] == []


@pytest.mark.parametrize("workers", [0, 1])
def test_garbage_in_a_shard_stops_training_with_one_line(store, tmp_path, workers):
    """Not NaN training: the reader checks each chunk's checksum, in a DataLoader worker too."""
    latents = shutil.copytree(store[0], tmp_path / "lat.zarr")
    shard = latents / "posterior" / "c" / "1" / "0" / "0" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    # One batch of all 24 images: it holds row 8, the first image of that shard, whose bytes are damaged.
    result = CliRunner().invoke(main, ["train-dit", *_cli_args(latents, tmp_path / "o", 3, workers=workers, batch_size=24)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.output.strip().splitlines()[-1] == (
        f"error: {latents} is a damaged latent store: row 8 in {shard} fails its checksum; delete it and encode "
        f"the images again")


def test_a_second_run_into_a_folder_in_use_stops_at_once(store, tmp_path):
    """A job submitted twice: the second must not interleave its log and checkpoints with the first's."""
    from reals_cli.artifacts import hold_folder

    latents, _ = store
    out = tmp_path / "o"
    with hold_folder(out, "reals train-dit"):  # as the first run holds it
        result = CliRunner().invoke(main, ["train-dit", *_cli_args(latents, out, 2, sample_every=0)])
        assert (result.exit_code, result.output.strip()) == (
            2, f"error: {out} is being written by another `reals train-dit` process; wait for it to end, or pass "
               "another --out")
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    assert CliRunner().invoke(main, ["train-dit", *_cli_args(latents, out, 2, sample_every=0)]).exit_code == 0


def test_init_from_a_folder_that_is_no_model_says_what_it_is(store, tmp_path):
    latents, vae = store
    kind = read_manifest(vae)["kind"]
    result = CliRunner().invoke(main, ["train-dit", *_cli_args(latents, tmp_path / "o", 2, init=vae)])
    assert (result.exit_code, result.output.strip()) == (2, f"error: --init {vae} is a {kind!r} artifact; it takes a "
                                                            "DiT or SiT checkpoint file, or a train-dit model folder")


def test_repa_names_the_patch_size_that_fits(store, tmp_path):
    latents, _ = store
    # An alignment network on 4x4 latent patches: a 2x2 grid, coarser than DiT-T/2's 4x4 tokens.
    latents, vae = _store_of_new_vae(latents.parent, tmp_path, AlignConfig(4, 8, 6, 2, hidden=8))
    result = CliRunner().invoke(main, ["train-dit", *_cli_args(latents, tmp_path / "o", 2, repa_weight=0.5, repa_depth=2,
                                                               repa_vae=vae)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == ("error: REPA: the alignment network's 2x2 feature grid is not a whole "
                                                      "multiple of the model's 4x4 tokens; pass --model DiT-T/4")


def test_repa_pools_a_finer_feature_grid_onto_the_tokens(store, tmp_path):
    """An alignment network on 1x1 latent patches (8x8 grid) under DiT-T/2 (4x4 tokens): each
    token's target is the mean of the 2x2 cells it covers (float64 reference), and it trains."""
    from reals_cli.models.reals_vae import load_reals_vae
    from reals_cli.pipeline.train_dit import repa_target

    latents, _ = store
    latents, vae = _store_of_new_vae(latents.parent, tmp_path, AlignConfig(4, 8, 6, 8, hidden=8))
    align = load_reals_vae(vae, need_align=True).align.eval()
    z = torch.randn(3, 4, 8, 8)
    cells = align(z)[0].double()  # 3 x 6 x 8 x 8
    expected = cells.reshape(3, 6, 4, 2, 4, 2).mean((3, 5)).flatten(2).transpose(1, 2)
    got = repa_target(align, z, 4)
    assert got.shape == (3, 16, 6) and torch.allclose(got.double(), expected, atol=1e-6)
    result = CliRunner().invoke(main, ["train-dit", *_cli_args(latents, tmp_path / "o", 2, repa_weight=0.5, repa_depth=2,
                                                               repa_vae=vae)])
    assert result.exit_code == 0, result.output
    assert all(-1 <= r["repa"] <= 1 and r["repa"] != 0 for r in read_log(tmp_path / "o" / "log.jsonl"))  # a cosine term


def _samples_artifact(out: Path) -> str:
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"kind": "samples", "command": "reals sample --ckpt m --out s"}))
    return f"--out {out} holds a 'samples' artifact made by `reals sample --ckpt m --out s`, not reals train-dit's; pass a new --out"


def _released_model(out: Path) -> str:
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"kind": "dit", "command": "reals import-dit w.pt"}))
    return (f"{out} holds a model made by `reals import-dit w.pt` without the checkpoint.safetensors to train it on; "
            f"pass another --out (--init {out} starts from its weights)")


def _unrelated_files(out: Path) -> str:
    out.mkdir()
    for name in ("notes.txt", "data", "log.jsonl"):
        (out / name).write_text("x")
    return f"--out {out} holds data, notes.txt, which reals train-dit did not write; pass a new or empty --out"


def _a_file(out: Path) -> str:
    out.write_text("x")
    return f"--out {out} is a file; pass a folder"


@pytest.mark.parametrize("make", [_samples_artifact, _released_model, _unrelated_files, _a_file])
@pytest.mark.parametrize("resume", [False, True])
def test_out_holding_something_else_is_refused(store, tmp_path, make, resume):
    latents, _ = store
    out = tmp_path / "o"
    message = make(out)
    if resume and make is _unrelated_files:  # no run to resume there: said so, not a new --out
        message = f"--resume: no checkpoint.safetensors in {out}; start without --resume"
    before = sorted(out.iterdir()) if out.is_dir() else None
    result = CliRunner().invoke(main, ["train-dit", *_cli_args(latents, out, 2), *(["--resume"] if resume else [])])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {message}"
    assert (sorted(out.iterdir()) if out.is_dir() else None) == before


def test_auto_resume_starts_a_new_run_and_does_nothing_on_a_finished_one(store, tmp_path):
    latents, _ = store
    auto, plain = tmp_path / "auto", tmp_path / "plain"
    result = CliRunner().invoke(main, ["train-dit", *_cli_args(latents, auto, 2, sample_every=0), "--auto-resume"])
    assert result.exit_code == 0, result.output
    assert CliRunner().invoke(main, ["train-dit", *_cli_args(latents, plain, 2, sample_every=0)]).exit_code == 0
    a, b = load_weights(auto / "ema.safetensors"), load_weights(plain / "ema.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    result = CliRunner().invoke(main, ["train-dit", *_cli_args(latents, auto, 2, sample_every=0), "--auto-resume"])
    assert result.exit_code == 0 and "already trained for 2 steps; nothing to do" in result.output
    result = CliRunner().invoke(main, ["train-dit", *_cli_args(latents, auto, 2), "--resume", "--auto-resume"])
    assert (result.exit_code, result.output.strip()) == (
        2, "error: --resume and --auto-resume: pass one (--auto-resume also starts a run that is not there)")


def test_a_run_killed_before_its_first_checkpoint_starts_over_in_its_folder(store, tmp_path):
    latents, _ = store
    out = tmp_path / "o"
    out.mkdir()
    (out / "log.jsonl").write_text(json.dumps({"step": 5, "loss": 9.0}) + "\n")
    for leftover in ("samples_0000005.png", ".checkpoint.safetensors.x1y2.tmp", ".tmpUauDID"):  # the last: a library's
        (out / leftover).write_bytes(b"")
    train_dit(resolve_config(latents=str(latents), out=str(out), steps=2, ckpt_every=2, **FLAGS))
    from reals_cli.pipeline.training import read_log

    assert [r["step"] for r in read_log(out / "log.jsonl")] == [1, 2]  # the killed run's lines are gone


def test_resume_names_the_runs_values_and_the_new_ones(store, tmp_path):
    latents, _ = store
    out = tmp_path / "o"
    # A DiT-T/2 run on the sit objective, as --model DiT-T/2 alone trained before the objective followed the name.
    train_dit(resolve_config(latents=str(latents), out=str(out), steps=2, ckpt_every=1, objective="sit", **FLAGS))
    (out / "manifest.json").unlink()  # pretend it stopped after its last checkpoint
    result = CliRunner().invoke(main, ["train-dit", *_cli_args(latents, out, 3, batch_size=4, lr=0.01), "--resume"])
    assert result.exit_code == 2
    assert result.output.strip() == ("error: --resume with other values than the run had: --objective sit (now dit), "
                                     "--batch-size 6 (now 4), --lr 0.001 (now 0.01); resume with the original flags")


def test_resume_of_a_dit_run_that_recorded_the_sit_defaults(store, tmp_path):
    """Older dit runs recorded --path linear etc.; a dit run has none of them now, and still resumes."""
    latents, _ = store
    out = tmp_path / "o"
    train_dit(resolve_config(latents=str(latents), out=str(out), steps=2, ckpt_every=1, **FLAGS))
    (out / "manifest.json").unlink()
    state = load_state(out / "checkpoint.safetensors")
    assert state["config"]["objective"] == "dit" and state["config"]["path"] is None
    state["config"] |= {"path": "linear", "prediction": "velocity", "time_distribution": "uniform"}
    del state["config"]["latents_id"]  # nor did they record the store's id
    save_state(out / "checkpoint.safetensors", state)
    result = CliRunner().invoke(main, ["train-dit", *_cli_args(latents, out, 3), "--resume"])
    assert result.exit_code == 0, result.output
    assert read_manifest(out, "dit", 1)["metrics"]["steps"] == 3


def test_kept_steps_are_model_folders_that_sample_reads(store, tmp_path):
    latents, _ = store
    from reals_cli.pipeline.model_artifact import load_model

    out = tmp_path / "o"
    # log-every 10 > steps: no log line, yet the manifest and the summary have the last step's loss.
    result = CliRunner().invoke(main, ["train-dit", *_cli_args(latents, out, 4, keep_every=2, ckpt_every=4, log_every=10)])
    assert result.exit_code == 0, result.output
    assert "None" not in result.output and not (out / "log.jsonl").exists()
    final = read_manifest(out, "dit", 1)
    assert isinstance(final["metrics"]["final_loss"], float)
    assert final["config"]["objective"] == "dit" and final["config"]["path"] is None  # from the name DiT-T/2
    assert final["config"]["attention_backend"] == "sdpa"  # what --attn auto resolved to on the CPU
    assert sorted(p.name for p in out.glob("step-*")) == ["step-0000002", "step-0000004"]

    # The run as it was at step 2: a run of 2 steps draws the same batches and noise.
    at_2 = tmp_path / "two"
    train_dit(resolve_config(latents=str(latents), out=str(at_2), steps=2, ckpt_every=2, **FLAGS))
    for folder, reference in ((out / "step-0000002", at_2), (out / "step-0000004", out)):
        kept = read_manifest(folder, "dit", 1)
        assert kept["metrics"]["steps"] == kept["config"]["steps"] == int(folder.name[5:])
        assert set(kept["files"]) == set(final["files"])
        for ema in (True, False):
            expected = load_weights(reference / ("ema.safetensors" if ema else "model.safetensors"))
            got = load_model(folder, kept, ema).state_dict()  # hash-checked, as `sample` loads it
            assert all(torch.equal(got[k], expected[k]) for k in expected)

    samples = tmp_path / "samples"
    result = CliRunner().invoke(main, ["sample", "--ckpt", str(out / "step-0000002"), "--out", str(samples), "-n", "2",
                                       "--steps", "2", "--sampler", "ddim", "--forward-batch", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert read_manifest(samples, "samples", 1)["inputs"]["ckpt"]["id"] == read_manifest(out / "step-0000002")["id"]


def test_previews_off_when_the_stores_vae_is_gone_say_so_once(store, tmp_path):
    latents, _ = store
    latents, vae = _store_of_new_vae(latents.parent, tmp_path, AlignConfig(4, 8, 6, 4, hidden=8))
    vae_id = read_manifest(vae)["id"]
    shutil.rmtree(vae)
    out = tmp_path / "o"
    result = CliRunner().invoke(main, ["train-dit", *_cli_args(latents, out, 4, sample_every=2)])
    assert result.exit_code == 0, result.output
    warning = (f"warning: no preview grids (--sample-every): {latents} names its VAE {vae_id} at {vae}, which does not "
               f"exist; re-encode the images with `reals encode --vae PATH` to get them, and sample this model with "
               f"`reals sample --vae PATH`")
    assert "".join(warning.split()) in "".join(result.output.split())  # rich wraps the line
    assert result.output.count("warning:") == 1 and not list(out.glob("samples_*.png"))


def _store_id(latents) -> str:
    from reals_cli.data.latent_store import open_store

    return open_store(latents).attrs["id"]


def test_a_moved_run_resumes_by_another_spelling_of_its_paths(store, tmp_path, monkeypatch):
    """--out is where the run is now, and LATENTS the same store (by id) at any path."""
    import os

    latents, _ = store
    straight = tmp_path / "straight"
    train_dit(resolve_config(latents=str(latents), out=str(straight), steps=4, ckpt_every=2, **FLAGS))
    monkeypatch.chdir(tmp_path)
    train_dit(resolve_config(latents=os.path.relpath(latents), out="runs/o", steps=2, ckpt_every=2, **FLAGS))
    assert load_state(tmp_path / "runs/o/checkpoint.safetensors")["config"]["latents_id"] == _store_id(latents)
    (tmp_path / "runs/o").rename(tmp_path / "moved")
    monkeypatch.chdir(latents.parent)
    result = CliRunner().invoke(main, ["train-dit", *_cli_args(latents.resolve(), tmp_path / "moved", 4), "--resume"])
    assert result.exit_code == 0, result.output
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_weights(straight / name), load_weights(tmp_path / "moved" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_resume_on_another_store_names_both_ids(store, tmp_path):
    latents, _ = store
    other, _ = _store_of_new_vae(latents.parent, tmp_path, AlignConfig(4, 8, 6, 4, hidden=8))
    out = tmp_path / "o"
    train_dit(resolve_config(latents=str(latents), out=str(out), steps=2, ckpt_every=2, **FLAGS))
    result = CliRunner().invoke(main, ["train-dit", *_cli_args(other, out, 3), "--resume"])
    assert result.exit_code == 2
    assert result.output.strip() == (f"error: --resume with other values than the run had: LATENTS id "
                                     f"{_store_id(latents)} (now {_store_id(other)}); resume with the original flags")


def test_a_run_with_other_files_in_its_folder_resumes(store, tmp_path):
    """A resumed run that was killed, in a folder where the user put notes: it is still a run."""
    latents, _ = store
    out = tmp_path / "o"
    train_dit(resolve_config(latents=str(latents), out=str(out), steps=2, ckpt_every=1, **FLAGS))
    (out / "notes.txt").write_text("x")
    (out / "manifest.json").unlink()  # killed while training on
    result = CliRunner().invoke(main, ["train-dit", *_cli_args(latents, out, 3, ckpt_every=1), "--resume"])
    assert result.exit_code == 0, result.output
    assert read_manifest(out, "dit", 1)["metrics"]["steps"] == 3 and (out / "notes.txt").is_file()


def test_previews_off_when_the_stores_vae_path_holds_another_vae(store, tmp_path):
    """Checked at the start, so that no preview stops the run at its first --sample-every step."""
    latents, _ = store
    latents, vae = _store_of_new_vae(latents.parent, tmp_path, AlignConfig(4, 8, 6, 4, hidden=8))
    vae_id = read_manifest(vae)["id"]
    shutil.rmtree(vae)
    torch.manual_seed(7)
    save_reals_vae(vae, AutoencoderKL(vae_config("tiny")), AlignmentNet(AlignConfig(4, 8, 6, 4, hidden=8)),
                   {"image_size": 16}, {}, {})
    out = tmp_path / "o"
    result = CliRunner().invoke(main, ["train-dit", *_cli_args(latents, out, 4, sample_every=2)])
    assert result.exit_code == 0, result.output
    flat = "".join(result.output.split())
    assert "".join(f"warning: no preview grids (--sample-every): {latents} names its VAE {vae_id} at {vae}, which "
                   f"does not load as that VAE (the VAE at {vae} is VAE {read_manifest(vae)['id']}".split()) in flat
    assert result.output.count("warning:") == 1 and not list(out.glob("samples_*.png"))


def test_the_start_up_check_of_the_preview_vae_leaves_the_training_draws_alone(store, tmp_path):
    """Its VAE build draws initial weights from the global generator, which label dropout also
    draws from: a run whose only preview is after its last step trains as one without any."""
    latents, _ = store
    for name, every in (("checked", 3), ("none", 0)):
        result = CliRunner().invoke(main, ["train-dit", *_cli_args(latents, tmp_path / name, 3, sample_every=every)])
        assert result.exit_code == 0, result.output
    assert list((tmp_path / "checked").glob("samples_*.png"))  # the VAE loads: the check ran
    a, b = (load_weights(tmp_path / name / "model.safetensors") for name in ("checked", "none"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sample_every_0_previews_nothing(store, tmp_path):
    latents, _ = store
    out = tmp_path / "o"
    result = CliRunner().invoke(main, ["train-dit", *_cli_args(latents, out, 2, sample_every=0)])
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output and not list(out.glob("samples_*.png"))


def test_a_relative_vae_path_of_an_older_store_is_recorded_absolute(store, tmp_path, monkeypatch):
    import zarr

    latents, _ = store
    latents, vae = _store_of_new_vae(latents.parent, tmp_path, AlignConfig(4, 8, 6, 4, hidden=8))
    group = zarr.open_group(str(latents), mode="r+")
    inputs = group.attrs["inputs"]
    inputs["vae"]["path"] = "vae"  # as older stores recorded it: relative to where `encode` ran
    group.attrs["inputs"] = inputs
    monkeypatch.chdir(tmp_path)
    train_dit(resolve_config(latents=str(latents), out=str(tmp_path / "o"), steps=1, ckpt_every=1, **FLAGS))
    assert read_manifest(tmp_path / "o", "dit", 1)["config"]["vae_path"] == str(vae.resolve())


def test_init_from_a_model_folder_takes_its_ema(store, tmp_path):
    latents, _ = store
    run = tmp_path / "run"
    train_dit(resolve_config(latents=str(latents), out=str(run), steps=2, ckpt_every=2, keep_every=2, **FLAGS))
    out = tmp_path / "o"
    train_dit(resolve_config(latents=str(latents), out=str(out), steps=1, ckpt_every=1, init=str(run / "step-0000002"),
                             **{**FLAGS, "lr": 0.0}))
    ema, got = load_weights(run / "step-0000002" / "ema.safetensors"), load_weights(out / "model.safetensors")
    assert all(torch.equal(got[k], ema[k]) for k in ema)


def test_log_lines_stay_whole_off_a_terminal(store, tmp_path, monkeypatch):
    """A log file: no line split at 80 columns, and the finished progress line has the last step's loss."""
    import io

    from rich.console import Console

    from reals_cli import console
    from reals_cli.pipeline import train_dit as train_dit_module
    from reals_cli.pipeline.training import read_log

    log = io.StringIO()
    narrow = Console(file=log, force_terminal=False, width=80)
    monkeypatch.setattr(console, "console", narrow)
    monkeypatch.setattr(train_dit_module, "console", narrow)
    latents, _ = store
    out = tmp_path / "o"
    console.warn(("a long warning " * 10).rstrip())
    train_dit(resolve_config(latents=str(latents), out=str(out), steps=6, ckpt_every=6, **FLAGS))
    lines = log.getvalue().splitlines()
    assert lines[0] == "warning: " + ("a long warning " * 10).rstrip()
    assert lines[1].startswith("train-dit: DiT-T/2") and lines[1].endswith("1 process(es)")
    steps = [line for line in lines if line.startswith("step ")]
    assert len(steps) == 6 and all("tflop_per_s" in line for line in steps)
    last = read_log(out / "log.jsonl")[-1]["loss"]
    assert any(line.startswith(f"train-dit: 6/6 loss {last:.4f} (") for line in lines), lines
