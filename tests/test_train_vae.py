"""train-vae: resume equivalence after SIGKILL, the baseline's detached alignment, bad input and --out."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from reals_cli.artifacts import load_weights, read_manifest
from reals_cli.cli import main
from reals_cli.errors import UserError
from reals_cli.models.alignment import AlignConfig, AlignmentNet
from reals_cli.models.vae import AutoencoderKL, save_diffusers_vae, vae_config
from reals_cli.pipeline.train_vae import Generator, resolve_config, train_vae
from reals_cli.pipeline.training import read_log

TINY_FLAGS = dict(vae="tiny", image_size=16, teacher="vgg16", align_hidden=16, batch_size=4, workers=0,
                  lr=1e-3, disc_lr=1e-3, disc_start=2, val_count=4, log_every=1, image_every=3, precision="fp32", device="cpu")


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory) -> Path:
    """Two classes of 16 px images: bright squares and bright discs on noise."""
    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:16, :16]
    for label, name in enumerate(["square", "disc"]):
        (root / name).mkdir()
        for i in range(20):
            cy, cx, r = rng.integers(5, 11), rng.integers(5, 11), rng.integers(3, 5)
            shape = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r) if label == 0 else (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            img = rng.integers(0, 60, (16, 16, 3)) + shape[..., None] * rng.integers(150, 195, 3)
            Image.fromarray(img.astype(np.uint8)).save(root / name / f"{i:03d}.png")
    return root


def _args(data, out, steps, **extra):
    flags = {**TINY_FLAGS, "data": str(data), "out": str(out), "steps": steps, **extra}
    args = []
    for k, v in flags.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    return {**load_weights(out / "diffusion_pytorch_model.safetensors"),
            **{"align." + k: v for k, v in load_weights(out / "align.safetensors").items()}}


def test_resume_after_sigkill_equals_uninterrupted_run(assets_home, shapes_data, tmp_path, kill_after_checkpoint):
    steps = 8
    straight = tmp_path / "straight"
    manifest = train_vae(resolve_config(**{**TINY_FLAGS, "data": str(shapes_data), "out": str(straight), "steps": steps, "ckpt_every": 4}))
    assert manifest["metrics"]["steps"] == steps

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "reals_cli", "train-vae", *_args(shapes_data, killed, steps, ckpt_every=1)]
    stopped_at = kill_after_checkpoint(cmd, killed / "checkpoint.safetensors", 3)
    assert not (killed / "manifest.json").exists(), "the run finished before it could be killed"
    assert 3 <= stopped_at < steps

    result = CliRunner().invoke(main, ["train-vae", *_args(shapes_data, killed, steps, ckpt_every=1), "--resume"])
    assert result.exit_code == 0, result.output
    a, b = _final_weights(straight), _final_weights(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # The log has each step once, whatever was written before the kill.
    steps_logged = [int(line.split('"step": ')[1].split(",")[0]) for line in (killed / "log.jsonl").read_text().splitlines()]
    assert steps_logged == list(range(1, steps + 1))


def test_sigterm_saves_the_step_it_stopped_at_and_resume_goes_on_exactly(assets_home, shapes_data, tmp_path,
                                                                           interrupt_after_log):
    """A cluster's SIGTERM (preemption, time limit): the step finishes, is checkpointed though no
    checkpoint was due, and the run exits 143; --resume then ends where an uninterrupted run does."""
    import signal

    out = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "reals_cli", "train-vae", *_args(shapes_data, out, 10_000, ckpt_every=10_000)]
    steps = interrupt_after_log(cmd, out, 2, signal.SIGTERM) + 1
    result = CliRunner().invoke(main, ["train-vae", *_args(shapes_data, out, steps), "--resume"])
    assert result.exit_code == 0, result.output
    straight = tmp_path / "straight"
    train_vae(resolve_config(**{**TINY_FLAGS, "data": str(shapes_data), "out": str(straight), "steps": steps}))
    a, b = _final_weights(straight), _final_weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_of_a_finished_run_is_a_no_op_or_trains_on(assets_home, shapes_data, tmp_path):
    out = tmp_path / "vae"
    train_vae(resolve_config(**{**TINY_FLAGS, "data": str(shapes_data), "out": str(out), "steps": 2}))
    before = (out / "manifest.json").read_bytes()
    again = CliRunner().invoke(main, ["train-vae", *_args(shapes_data, out, 2), "--resume"])
    assert (again.exit_code, again.output.strip()) == (0, f"{out} is already trained for 2 steps; nothing to do")
    assert (out / "manifest.json").read_bytes() == before
    more = CliRunner().invoke(main, ["train-vae", *_args(shapes_data, out, 3), "--resume"])
    assert more.exit_code == 0, more.output
    assert json.loads((out / "manifest.json").read_text())["metrics"]["steps"] == 3


def test_finished_run_manifest_and_metrics(assets_home, shapes_data, tmp_path):
    out = tmp_path / "vae"
    manifest = train_vae(resolve_config(**{**TINY_FLAGS, "data": str(shapes_data), "out": str(out), "steps": 3, "ckpt_every": 3}))
    m = manifest["metrics"]
    for key in ("psnr", "ssim", "lpips", "align_cos_patch", "align_cos_global"):
        assert np.isfinite(m[key]), key
    assert len(m["latent_std"]) == 4
    assert manifest["config"]["align"]["patch"] if "patch" in manifest["config"]["align"] else True
    assert manifest["inputs"]["data"]["path"] == str(shapes_data)
    # The artifact is a diffusers folder too, and its files match the manifest's hashes.
    from reals_cli.artifacts import verify_files
    from reals_cli.models.reals_vae import load_reals_vae

    verify_files(out, manifest)
    bundle = load_reals_vae(out, need_align=True)
    assert bundle.id == manifest["id"] and bundle.align.config.teacher_grid == 2
    # A second run into the same folder is refused, not silently overwritten.
    with pytest.raises(UserError, match="already holds a finished run"):
        train_vae(resolve_config(**{**TINY_FLAGS, "data": str(shapes_data), "out": str(out), "steps": 3}))


def test_teacher_cache_gives_the_uncached_losses(assets_home, shapes_data, tmp_path):
    """36 training images and their mirrors, 20 steps of 4: features drawn again come from the cache,
    and every logged term and the final weights are what the uncached run computes."""
    runs = {name: train_vae(resolve_config(**{**TINY_FLAGS, "data": str(shapes_data), "out": str(tmp_path / name),
                                              "steps": 20, "ckpt_every": 20, "teacher_cache_gb": gb}))
            for name, gb in (("plain", 0.0), ("cached", 0.1))}
    assert "teacher_cache" not in runs["plain"]["metrics"]
    used = runs["cached"]["metrics"]["teacher_cache"]
    assert used["computed"] + used["reused"] == 80 and used["reused"] > 0 and used["computed"] <= 72
    plain, cached = ([{k: v for k, v in r.items() if k != "img_per_s"} for r in read_log(tmp_path / name / "log.jsonl")]
                     for name in ("plain", "cached"))
    assert len(plain) == 20 and plain == cached
    a, b = _final_weights(tmp_path / "plain"), _final_weights(tmp_path / "cached")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UserError, match="the teacher cache needs 0.00[0-9]* GB for 36 images"):
        train_vae(resolve_config(**{**TINY_FLAGS, "data": str(shapes_data), "out": str(tmp_path / "small"),
                                    "steps": 2, "teacher_cache_gb": 1e-6}))


def test_align_weight_zero_detaches_encoder_but_trains_align_net():
    from reals_cli.models.alignment import alignment_loss

    vae = AutoencoderKL(vae_config("tiny"))
    align = AlignmentNet(AlignConfig(4, 8, 6, 4, hidden=8))
    target_patch, target_glob = torch.randn(2, 6, 4, 4), torch.randn(2, 6)
    for detach in (True, False):
        vae.zero_grad(set_to_none=True)
        align.zero_grad(set_to_none=True)
        _, _, _, patch, glob = Generator(vae, align, detach_align=detach)(torch.rand(2, 3, 16, 16) * 2 - 1)
        (alignment_loss(patch, target_patch) + alignment_loss(glob, target_glob)).backward()
        enc_grad = vae.encoder.conv_in.weight.grad
        assert (enc_grad is None) == detach
        assert align.mlp_patch[0].weight.grad.abs().sum() > 0


def test_alignment_patch_size_follows_grids():
    net = AlignmentNet(AlignConfig(latent_channels=4, latent_grid=32, teacher_dim=768, teacher_grid=16, hidden=32))
    patch, glob = net(torch.randn(2, 4, 32, 32))
    assert net.config.patch == 2 and patch.shape == (2, 768, 16, 16) and glob.shape == (2, 768)


@pytest.mark.parametrize("extra, message", [
    (dict(teacher_resolution=24), "the teacher's 3x3 feature grid does not divide the 8x8 latent grid; pick a "
     "--teacher-resolution or --image-size that makes the latent grid a multiple of the teacher grid"),
    (dict(image_size=17), "--image-size 17 is not divisible by the VAE's downsampling factor 2"),
    (dict(rec_loss="huber"), None),  # click refuses the choice itself (exit 2)
    (dict(batch_size=0), "--batch-size must be at least 1, got 0"),
    (dict(align_hidden=0), "--align-hidden must be at least 1, got 0"),
    (dict(image_size=8), "--image-size must be at least 16 (LPIPS's VGG16 halves it 4 times), got 8"),
    (dict(grad_clip=-1), "--grad-clip must be >= 0 (0: no clipping), got -1.0"),
    (dict(ema_decay=-1), "--ema-decay must be in [0, 1], got -1.0"),
    (dict(ema_decay=2), "--ema-decay must be in [0, 1], got 2.0"),
    (dict(align_weight=-1), "--align-weight must be >= 0 (0: the baseline VAE), got -1.0"),
    (dict(align_cos=-1), "--align-cos must be >= 0, got -1.0"),
    (dict(align_l1=-2), "--align-l1 must be >= 0, got -2.0"),
    (dict(align_patch_weight=-1), "--align-patch-weight must be >= 0, got -1.0"),
    (dict(align_global_weight=-1), "--align-global-weight must be >= 0, got -1.0"),
    (dict(kl="nan"), "Invalid value for '--kl': 'nan' is not a finite number. (see `main train-vae --help`)"),
    (dict(seed=-1), "Invalid value for '--seed': -1 is not in the range 0<=x<=4294967295. (see `main train-vae --help`)"),
    (dict(workers=-1), "--workers must be >= 0, got -1"),
    (dict(val_count=-3), "--val-count must be >= 0 (0: no validation), got -3"),
    (dict(teacher_resolution=0), "--teacher-resolution must be at least 16 for --teacher vgg16, got 0"),
    (dict(teacher_resolution=8), "--teacher-resolution must be at least 16 for --teacher vgg16, got 8"),
    (dict(teacher_resolution=-64), "--teacher-resolution must be at least 16 for --teacher vgg16, got -64"),
    (dict(teacher="dinov2-s", teacher_resolution=7), "--teacher-resolution must be at least 14 for --teacher dinov2-s, got 7"),
    # 16 px: 3 layers would leave 2 px for the last two 4x4 convolutions (they crashed at --disc-start).
    (dict(latent_channels=0), "--latent-channels must be at least 1, got 0"),
    (dict(disc_layers=3), "--disc-layers must be between 1 and 2 at --image-size 16, got 3"),
    (dict(disc_layers=0), "--disc-layers must be between 1 and 2 at --image-size 16, got 0"),
    (dict(disc_layers=-1), "--disc-layers must be between 1 and 2 at --image-size 16, got -1"),
    (dict(align_balance="adaptive", align_weight=0), "--align-balance adaptive scales the alignment against the "
     "reconstruction; the baseline (--align-weight 0) has no alignment gradient to scale: drop one of the two flags"),
])
def test_bad_input_one_line_errors(assets_home, shapes_data, tmp_path, extra, message):
    result = CliRunner().invoke(main, ["train-vae", *_args(shapes_data, tmp_path / "o", 2, **extra)])
    assert result.exit_code == 2, result.output
    if message:
        assert result.output.strip() == f"error: {message}"
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_too_few_images_to_hold_out_validation(assets_home, tmp_path):
    data = tmp_path / "few"
    for i in range(9):
        (data / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((16, 16, 3), i * 20, np.uint8)).save(data / "ab"[i % 2] / f"{i}.png")
    result = CliRunner().invoke(main, ["train-vae", *_args(data, tmp_path / "o", 2)])
    assert result.exit_code == 2
    assert result.output.strip() == (f"error: {data} has 9 images, too few to hold a tenth out for validation; add images "
                                     f"or a test/ split, or pass --val-count 0")
    assert not (tmp_path / "o").exists()


def test_val_count_zero_trains_without_validation(assets_home, shapes_data, tmp_path):
    # It used to train every step, then crash on the empty validation set and leave an unfinishable run.
    out = tmp_path / "o"
    result = CliRunner().invoke(main, ["train-vae", *_args(shapes_data, out, 2, val_count=0, grad_clip=0)])
    assert result.exit_code == 0, result.output
    assert read_manifest(out, "vae", 1)["metrics"] == {"val_images": 0, "steps": 2}


def _dit_artifact(out: Path) -> str:
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"kind": "dit", "command": "reals train-dit --latents l --out m"}))
    return f"--out {out} holds a 'dit' artifact made by `reals train-dit --latents l --out m`, not reals train-vae's; pass a new --out"


def _unrelated_files(out: Path) -> str:
    out.mkdir()
    for name in ("cat.png", "notes.txt", "log.jsonl"):
        (out / name).write_text("x")
    return f"--out {out} holds cat.png, notes.txt, which reals train-vae did not write; pass a new or empty --out"


def _a_file(out: Path) -> str:
    out.write_text("x")
    return f"--out {out} is a file; pass a folder"


@pytest.mark.parametrize("make", [_dit_artifact, _unrelated_files, _a_file])
@pytest.mark.parametrize("resume", [False, True])
def test_out_holding_something_else_is_refused(assets_home, shapes_data, tmp_path, make, resume):
    out = tmp_path / "o"
    message = make(out)
    if resume and make is _unrelated_files:  # no run to resume there: said so, not a new --out
        message = f"--resume: no checkpoint.safetensors in {out}; start without --resume"
    before = sorted(out.iterdir()) if out.is_dir() else None
    result = CliRunner().invoke(main, ["train-vae", *_args(shapes_data, out, 2), *(["--resume"] if resume else [])])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {message}"
    assert (sorted(out.iterdir()) if out.is_dir() else None) == before


def test_a_run_killed_before_its_first_checkpoint_starts_over_in_its_folder(assets_home, shapes_data, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "log.jsonl").write_text(json.dumps({"step": 5, "loss": 9.0}) + "\n")
    for leftover in ("recon_0000005.png", ".checkpoint.safetensors.x1y2.tmp"):
        (out / leftover).write_bytes(b"")
    train_vae(resolve_config(**{**TINY_FLAGS, "data": str(shapes_data), "out": str(out), "steps": 2}))
    assert [r["step"] for r in read_log(out / "log.jsonl")] == [1, 2]  # the killed run's lines are gone


def test_init_folder_of_another_architecture(assets_home, shapes_data, tmp_path):
    other = save_diffusers_vae(AutoencoderKL(vae_config("demo")), tmp_path / "other")
    result = CliRunner().invoke(main, ["train-vae", *_args(shapes_data, tmp_path / "o", 2, init=other)])
    assert result.exit_code == 2
    assert result.output.startswith(f"error: --init folder {other} holds a VAE with block_out_channels [32, 64, 128]")
    assert len(result.output.strip().splitlines()) <= 2  # one line, maybe wrapped by the terminal width


def test_latent_channels_replace_the_presets_and_reach_encode_and_the_alignment_net(assets_home, shapes_data, tmp_path):
    """--latent-channels 8 on the tiny preset (4): the VAE, its diffusers config, the alignment
    network's input and the encoded store all have 8 channels; an --init VAE of 4 is refused."""
    from reals_cli.models.reals_vae import load_reals_vae
    from reals_cli.data.latent_store import open_store

    out = tmp_path / "vae8"
    manifest = train_vae(resolve_config(**{**TINY_FLAGS, "data": str(shapes_data), "out": str(out), "steps": 2,
                                           "latent_channels": 8}))
    assert json.loads((out / "config.json").read_text())["latent_channels"] == 8
    assert len(manifest["metrics"]["latent_std"]) == 8 and manifest["config"]["latent_channels"] == 8
    bundle = load_reals_vae(out, need_align=True)
    assert bundle.vae.config.latent_channels == 8 and bundle.align.config.latent_channels == 8
    r = CliRunner().invoke(main, ["encode", str(shapes_data), str(tmp_path / "z.zarr"), "--vae", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert open_store(tmp_path / "z.zarr").latent_shape[0] == 8
    four = save_diffusers_vae(AutoencoderKL(vae_config("tiny")), tmp_path / "four")
    r = CliRunner().invoke(main, ["train-vae", *_args(shapes_data, tmp_path / "o", 2, init=four, latent_channels=8)])
    assert r.exit_code == 2 and r.output.startswith(f"error: --init folder {four} holds a VAE with latent_channels 4")


def test_corrupt_checkpoint_on_resume(assets_home, shapes_data, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "checkpoint.safetensors").write_bytes(b"\x00" * 100)
    result = CliRunner().invoke(main, ["train-vae", *_args(shapes_data, out, 2), "--resume"])
    assert result.exit_code == 2
    assert "is not a readable safetensors file" in result.output and "Traceback" not in result.output


def test_resume_refuses_other_flags(assets_home, shapes_data, tmp_path):
    out = tmp_path / "o"
    train_vae(resolve_config(**{**TINY_FLAGS, "data": str(shapes_data), "out": str(out), "steps": 3, "ckpt_every": 1}))
    (out / "manifest.json").unlink()  # pretend it stopped after its last checkpoint
    result = CliRunner().invoke(main, ["train-vae", *_args(shapes_data, out, 4, kl=1e-3), "--resume"])
    assert result.exit_code == 2
    assert "--resume with other values than the run had: --kl 1e-06 (now 0.001); resume with the original flags" \
        in result.output


def test_batch_order_is_sharded_and_resumable():
    from reals_cli.data.batches import ResumableBatchSampler

    size, batch, world = 50, 4, 3
    samplers = [ResumableBatchSampler(size, batch, seed=7, rank=r, world=world) for r in range(world)]
    per_epoch = samplers[0].per_epoch
    assert per_epoch == size // (batch * world)
    for epoch in range(2):
        seen = [i for s in samplers for step in range(epoch * per_epoch, (epoch + 1) * per_epoch) for i in s.batch(step)]
        assert len(seen) == len(set(seen)) == per_epoch * batch * world  # ranks disjoint, no repeats in an epoch
    first, second = (samplers[0].batch(s) for s in (0, per_epoch))
    assert first != second  # a fresh permutation every epoch
    resumed = ResumableBatchSampler(size, batch, seed=7, start_step=5, rank=1, world=world)
    it = iter(resumed)
    assert [next(it) for _ in range(4)] == [samplers[1].batch(s) for s in range(5, 9)]


def test_torchrun_two_processes(assets_home, shapes_data, tmp_path, train_on_two_ranks):
    """DDP on CPU (gloo): both ranks train, rank 0 writes one artifact."""
    out = tmp_path / "ddp"
    train_on_two_ranks(["train-vae", *_args(shapes_data, out, 3, ckpt_every=3)], out / "checkpoint.safetensors", 3)
    assert (out / "manifest.json").is_file()


def test_adaptive_weight_survives_fp16_with_the_loss_scale():
    # A per-pixel mean over many pixels has per-pixel gradients below fp16's range (here 3e-9).
    from reals_cli.models.discriminator import adaptive_weight

    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 3)
    x, target = torch.randn(4096, 16), torch.randn(4096, 3)

    def weight(dtype, loss_scale=1.0):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = layer(x).float()
            rec = 1e-4 * (out - target).abs().mean()
            g_loss = -out[:, 0].mean()
        return adaptive_weight(rec, g_loss, layer.weight, loss_scale=loss_scale)

    reference = weight(torch.float32)
    assert weight(torch.float16) == 0  # what fp16 did without the scale
    assert weight(torch.float16, loss_scale=torch.tensor(65536.0)) == pytest.approx(reference.item(), rel=1e-2)
    assert weight(torch.float32, loss_scale=65536.0) == pytest.approx(reference.item(), rel=1e-5)
    assert weight(torch.float16, loss_scale=torch.tensor(2.0**40)) == 0  # both overflow: no GAN term, not NaN


def test_adaptive_align_balance_gives_the_alignment_the_reconstructions_gradient_norm(assets_home, shapes_data, tmp_path,
                                                                                         monkeypatch):
    """--align-balance adaptive (VA-VAE's): each step's weight is --align-weight x ||d nll/dW|| / ||d align/dW||
    at the encoder's last layer, recomputed here in float64 from the same graph, and logged as align_w."""
    import reals_cli.pipeline.train_vae as tv

    seen, original = [], tv.adaptive_weight

    def spy(rec, other, layer, **kw):
        g_rec, = torch.autograd.grad(rec, layer, retain_graph=True)
        g_align, = torch.autograd.grad(other, layer, retain_graph=True)
        expected = g_rec.double().norm().item() / (g_align.double().norm().item() + 1e-4)
        seen.append((layer.shape, expected, original(rec, other, layer, **kw)))
        return seen[-1][-1]

    monkeypatch.setattr(tv, "adaptive_weight", spy)
    out = tmp_path / "o"
    train_vae(resolve_config(**{**TINY_FLAGS, "data": str(shapes_data), "out": str(out), "steps": 3, "disc_start": 10,
                                "align_balance": "adaptive", "align_weight": 0.5}))
    assert len(seen) == 3  # one a step; the GAN term is off until step 10
    for shape, expected, weight in seen:
        assert shape[:2] == (2 * 4, 32)  # the tiny encoder's conv_out: mean and logvar of 4 channels
        assert weight.item() == pytest.approx(expected, rel=1e-5)
    logged = [r["align_w"] for r in read_log(out / "log.jsonl")]
    assert logged == pytest.approx([0.5 * w.item() for *_, w in seen], rel=1e-6)
    assert len(set(logged)) == 3  # recomputed every step
    # The fixed balance logs the weight as given.
    train_vae(resolve_config(**{**TINY_FLAGS, "data": str(shapes_data), "out": str(tmp_path / "f"), "steps": 2,
                                "align_weight": 0.5}))
    assert [r["align_w"] for r in read_log(tmp_path / "f" / "log.jsonl")] == [0.5, 0.5]


def test_val_every_draws_the_validation_curves_without_moving_training(assets_home, shapes_data, tmp_path):
    """--val-every N appends the EMA's validation to val.jsonl every N steps and at the end (the
    manifest's numbers); the weights equal a run without it; a resumed run rewrites no line twice."""
    base = {**TINY_FLAGS, "data": str(shapes_data), "steps": 4, "ckpt_every": 2}
    plain = train_vae(resolve_config(**base, out=str(tmp_path / "plain")))
    curves = train_vae(resolve_config(**base, out=str(tmp_path / "curves"), val_every=2))
    a, b = _final_weights(tmp_path / "plain"), _final_weights(tmp_path / "curves")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert curves["metrics"] == plain["metrics"]
    lines = read_log(tmp_path / "curves" / "val.jsonl")
    assert [r["step"] for r in lines] == [2, 4]
    assert lines[-1] == {"step": 4, **{k: curves["metrics"][k] for k in ("psnr", "lpips", "align_cos_patch", "align_cos_global")}}
    assert lines[0]["psnr"] != lines[1]["psnr"]
    # Stopped at step 2 and resumed to 4 with validation every step: each step once.
    split = tmp_path / "split"
    train_vae(resolve_config(**{**base, "steps": 2}, out=str(split), val_every=1))
    train_vae(resolve_config(**base, out=str(split), val_every=1), resume=True)
    assert [r["step"] for r in read_log(split / "val.jsonl")] == [1, 2, 3, 4]


def test_ema_warmup_follows_ldm():
    from reals_cli.pipeline.ema import ema_copy, ema_update

    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = ema_copy(model)
    model.weight.data.fill_(1.0)
    ema_update(ema, model, decay=0.999, step=0)  # decay capped at 1/10
    assert ema.weight.item() == pytest.approx(0.9)
    ema_update(ema, model, decay=0.5, step=1000)  # the cap (1001/1010) is above 0.5
    assert ema.weight.item() == pytest.approx(0.95)


def test_ema_update_matches_float64_recurrence():
    from reals_cli.pipeline.ema import ema_copy, ema_update

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    ema = ema_copy(model)
    expected = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema_update(ema, model, decay=0.9)
        for n, p in model.named_parameters():
            expected[n] = 0.9 * expected[n] + 0.1 * p.detach().double()
    for n, p in ema.named_parameters():
        torch.testing.assert_close(p.double(), expected[n], atol=1e-6, rtol=1e-6)


def test_extra_data_joins_training_only(shapes_data, tmp_path):
    from reals_cli.pipeline.train_vae import _datasets

    extra = tmp_path / "extra"
    (extra / "train" / "noise").mkdir(parents=True)
    for i in range(7):
        Image.fromarray(np.full((16, 16, 3), i * 30, np.uint8)).save(extra / "train" / "noise" / f"{i}.png")
    cfg = resolve_config(**{**TINY_FLAGS, "data": str(shapes_data), "out": str(tmp_path / "o"), "extra_data": [str(extra)]})
    train, val = _datasets(cfg)
    alone, val_alone = _datasets(resolve_config(**{**TINY_FLAGS, "data": str(shapes_data), "out": str(tmp_path / "o")}))
    assert len(train) == len(alone) + 7 and len(val) == len(val_alone) == 4
    assert torch.equal(train[len(alone) + 3][0], torch.full((3, 16, 16), 90 / 255))


def test_a_moved_run_resumes_where_it_is_now(assets_home, shapes_data, tmp_path):
    """--out is where the run is now: a run folder moved elsewhere resumes there, as train-dit's."""
    straight = tmp_path / "straight"
    train_vae(resolve_config(**{**TINY_FLAGS, "data": str(shapes_data), "out": str(straight), "steps": 3}))
    first = tmp_path / "first"
    train_vae(resolve_config(**{**TINY_FLAGS, "data": str(shapes_data), "out": str(first), "steps": 2, "ckpt_every": 1}))
    (first / "manifest.json").unlink()  # stopped after its last checkpoint
    first.rename(tmp_path / "moved")
    result = CliRunner().invoke(main, ["train-vae", *_args(shapes_data, tmp_path / "moved", 3), "--resume"])
    assert result.exit_code == 0, result.output
    a, b = _final_weights(straight), _final_weights(tmp_path / "moved")
    assert all(torch.equal(a[k], b[k]) for k in a)
