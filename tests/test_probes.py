"""probe-seg / probe-depth: metrics by hand, real file layouts, the three-way report, bad input."""

import json
import shlex
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import torch
from click.testing import CliRunner
from PIL import Image

from reals_cli.artifacts import load_weights, read_manifest, verify_files
from reals_cli.cli import main
from reals_cli.data.probe_sets import MotorcycleDepth, open_probe_data
from reals_cli.errors import UserError
from reals_cli.metrics.probe_metrics import DepthMeter, SegMeter, depth_image_scores
from reals_cli.pipeline.probes import DepthHead, SegHead, load_dinov2_depth_head


def _one_line_error(result, fragment: str) -> None:
    """Exit 2 and the error as the last line, after whatever progress was printed before it."""
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("error: ") and fragment in lines[-1], result.output
    assert "Traceback" not in result.output and sum(line.startswith("error") for line in lines) == 1


def _error_line(result) -> str:
    """The one error line (exit 2, no traceback), for an exact comparison."""
    _one_line_error(result, "")
    return result.output.strip().splitlines()[-1]


# -- metrics, against hand-computed values -------------------------------------------------------

def test_miou_excludes_classes_absent_from_both_and_ignores_255():
    pred = np.array([[0, 0, 1], [1, 2, 2]])
    gt = np.array([[0, 1, 1], [1, 255, 2]])
    meter = SegMeter(4)  # class 3 is in neither map: no IoU, not in the mean
    meter.add(pred, gt)
    r = meter.result()
    # class 0: TP 1, gt 1, pred 2 -> 1/2; class 1: TP 2, gt 3, pred 2 -> 2/3; class 2: TP 1 (the 255 pixel is skipped) -> 1
    assert r["iou"][:3] == pytest.approx([1 / 2, 2 / 3, 1.0]) and r["iou"][3] is None
    assert r["miou"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert r["pixel_acc"] == pytest.approx(4 / 5) and r["pixels"] == 5
    # A class predicted but absent from the ground truth has IoU 0 and does count.
    only_pred = SegMeter(3)
    only_pred.add(np.array([0, 0, 2, 2]), np.array([0, 0, 0, 0]))
    assert only_pred.result()["miou"] == pytest.approx((2 / 4 + 0) / 2)


def test_depth_metrics_by_hand_with_invalid_pixels():
    pred = np.array([[1.0, 2.0], [4.0, 5.0]])
    gt = np.array([[1.0, 4.0], [0.0, np.nan]])  # 0 and NaN: no measurement
    s = depth_image_scores(pred, gt)
    assert s["absrel"] == pytest.approx((0 + 2 / 4) / 2)
    assert s["rmse"] == pytest.approx(np.sqrt((0 + 4) / 2))
    assert s["delta1"] == pytest.approx(1 / 2)  # ratios 1 and 2
    meter = DepthMeter()
    meter.add(np.stack([pred, pred]), np.stack([gt, np.zeros((2, 2))]))  # the second image has no valid pixel
    r = meter.result()
    assert r["images"] == 1 and r["images_without_depth"] == 1 and r["absrel"] == pytest.approx(0.25)


# -- file layouts ---------------------------------------------------------------------------------

def test_nyu_mat_layout_and_official_splits(tmp_path):
    rng = np.random.default_rng(0)
    n, h, w = 3, 12, 20  # H != W: a transposition error cannot pass
    images = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    depths = rng.uniform(0.5, 9.0, (n, h, w)).astype(np.float32)
    depths[1, 0, 0], depths[1, 0, 1] = 0.0, np.nan
    mat = tmp_path / "nyu_depth_v2_labeled.mat"
    with h5py.File(mat, "w") as f:  # MATLAB's column-major 480x640x3xN, as h5py sees it: N x 3 x W x H
        f["images"] = images.transpose(0, 3, 2, 1)
        f["depths"] = depths.transpose(0, 2, 1)
    assert h5py.File(mat, "r")["images"].shape == (n, 3, w, h)
    splits = tmp_path / "splits.mat"
    scipy.io.savemat(splits, {"trainNdxs": np.array([[1], [3]]), "testNdxs": np.array([[2]])})  # 1-based

    test = open_probe_data("depth", mat, "test", size=h, splits=str(splits))
    assert test.keys == [1] and test.default_range == (0.001, 10.0)
    image, depth = test._read(1)
    assert np.array_equal(np.array(image), images[1]) and np.array_equal(depth, depths[1], equal_nan=True)
    x, t = test[0]  # ADM centre crop of 20x12 to 12x12: columns 4..15
    assert np.array_equal((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), images[1][:, 4:16])
    assert t.shape == (h, h) and torch.isfinite(t).all() and (t == 0).sum() == 0  # the invalid pixels were cropped off
    assert open_probe_data("depth", mat, "train", size=h, splits=str(splits)).keys == [0, 2]
    full = open_probe_data("depth", mat, "test", size=w)
    assert full.keys == [2]  # no splits.mat: first 80% (round(2.4) = 2 images) train, the rest test


def _palette_png(path: Path, labels: np.ndarray) -> None:
    mask = Image.fromarray(labels.astype(np.uint8), "P")
    mask.putpalette([v for k in range(256) for v in (k, 255 - k, (7 * k) % 256)])
    mask.save(path)


def test_voc_and_ade_layouts(tmp_path):
    rng = np.random.default_rng(1)
    labels = rng.choice([0, 15, 255], (16, 16)).astype(np.uint8)
    voc = tmp_path / "voc"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(voc / "JPEGImages/a.jpg", quality=95)
    _palette_png(voc / "SegmentationClass/a.png", labels)
    (voc / "ImageSets/Segmentation/train.txt").write_text("a\n")
    (voc / "ImageSets/Segmentation/val.txt").write_text("a\n")
    data = open_probe_data("seg", voc, "test", size=16)
    assert data.fmt == "voc" and len(data.classes) == 21
    _, target = data[0]
    assert np.array_equal(target.numpy(), labels)  # palette indices, 255 kept as ignore

    ade = tmp_path / "ade"
    (ade / "images/validation").mkdir(parents=True)
    (ade / "annotations/validation").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(ade / "images/validation/x.jpg")
    ade_labels = np.array([[0, 1], [150, 2]], np.uint8).repeat(8, 0).repeat(8, 1)
    Image.fromarray(ade_labels, "L").save(ade / "annotations/validation/x.png")
    data = open_probe_data("seg", ade, "test", size=16)
    assert data.fmt == "ade" and len(data.classes) == 150
    assert set(data[0][1].unique().tolist()) == {255, 0, 149, 1}  # 0 = other -> ignore; k -> k - 1

    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(voc / "SegmentationClass/a.png")  # colour-coded
    with pytest.raises(UserError, match="not colour-coded"):
        open_probe_data("seg", voc, "train", size=16)[0]


def test_png_depth_folder_millimetres(tmp_path):
    (tmp_path / "train").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "train/a.png")
    mm = np.full((8, 8), 2500, np.uint16)
    mm[0, 0] = 0
    Image.fromarray(mm).save(tmp_path / "train/a.depth.png")
    data = open_probe_data("depth", tmp_path, "train", size=8)
    _, depth = data[0]
    assert data.fmt == "png" and depth[0, 0] == 0 and torch.allclose(depth[1:], torch.tensor(2.5))
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "train/a.depth.png")
    with pytest.raises(UserError, match="must be 16-bit"):
        data[0]


def test_motorcycle_tiles_are_disjoint_and_metric(assets_home):
    train = open_probe_data("depth", "motorcycle", "train", size=16)
    test = open_probe_data("depth", "motorcycle", "test", size=16)
    assert len(train) == 169 and len(test) == 65
    assert max(x for x, _ in train.keys) + MotorcycleDepth.TILE <= MotorcycleDepth.SPLIT_COLUMN
    assert min(x for x, _ in test.keys) >= MotorcycleDepth.SPLIT_COLUMN
    valid = train.depth[train.depth > 0]
    assert 2.0 < valid.min() < valid.max() < 5.1  # metres, from baseline * focal / (disparity + doffs)
    assert 0.05 < (train.depth == 0).mean() < 0.1  # the disparity map's inf pixels


def test_fitted_heads_read_feature_directions_only():
    """The alignment network matches the teacher's directions, not its norms: heads must not care."""
    torch.manual_seed(0)
    patch, glob = torch.randn(3, 6, 2, 2), torch.randn(3, 6)
    scale = torch.rand(3, 1, 2, 2) * 20 + 0.05  # a different norm for every token
    for head in (SegHead(6, 4), DepthHead(6, 1.0, 5.0, 16)):
        head.eval()
        for p in head.parameters():
            torch.nn.init.normal_(p)
        same = head(patch * scale, glob * 0.03, 8)
        assert torch.allclose(same, head(patch, glob, 8), atol=1e-5)
        assert not torch.allclose(same, head(patch.flip(1), glob, 8), atol=1e-3)


def test_dinov2_release_head_keys(tmp_path):
    dim, rng = 6, torch.Generator().manual_seed(0)
    weight, bias = torch.randn(256, 2 * dim, 1, 1, generator=rng), torch.randn(256, generator=rng)
    path = tmp_path / "dinov2_vits14_nyu_linear_head.pth"
    torch.save({"meta": {"note": "mmcv"}, "state_dict": {"decode_head.conv_depth.weight": weight,
                                                         "decode_head.conv_depth.bias": bias}}, path)
    head = DepthHead(dim, 0.001, 10.0, 256, norm="linear", unit=False)  # the release reads raw tokens
    head.load_state_dict(load_dinov2_depth_head(path, dim))
    head.eval()
    patch, glob = torch.randn(1, dim, 2, 2, generator=rng), torch.randn(1, dim, generator=rng)
    # DINOv2's BNHead: concat(patch, cls) -> 4x bilinear -> 1x1 conv -> relu + 0.1, normalised -> bins
    x = torch.cat([patch, glob[:, :, None, None].expand_as(patch)], 1)
    x = torch.nn.functional.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False)
    prob = torch.relu(torch.nn.functional.conv2d(x, weight, bias)) + 0.1
    expected = torch.einsum("bkhw,k->bhw", prob / prob.sum(1, keepdim=True), torch.linspace(0.001, 10, 256))
    assert torch.allclose(head(patch, glob, 8), expected, atol=1e-5)
    torch.save({"state_dict": {"decode_head.conv_depth.weight": torch.zeros(256, 8 * dim, 1, 1),
                               "decode_head.conv_depth.bias": bias}}, path)
    with pytest.raises(UserError, match="linear4"):
        load_dinov2_depth_head(path, dim)


# -- the three-way report on tiny VAEs --------------------------------------------------------------

@pytest.fixture(scope="module")
def mask_data(tmp_path_factory) -> Path:
    """Bright squares and discs on dark noise, 16 px, with foreground masks; train and test splits."""
    root = tmp_path_factory.mktemp("masks")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:16, :16]
    for split, count in (("train", 24), ("test", 8)):
        for label, name in enumerate(["0-square", "1-disc"]):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                cy, cx, r = rng.integers(5, 11), rng.integers(5, 11), rng.integers(3, 5)
                square = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r)
                shape = square if label == 0 else (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
                img = rng.integers(0, 60, (16, 16, 3)) + shape[..., None] * rng.integers(150, 195, 3)
                Image.fromarray(img.astype(np.uint8)).save(root / split / name / f"{i:03d}.png")
                Image.fromarray(shape.astype(np.uint8)).save(root / split / name / f"{i:03d}.mask.png")
    return root


@pytest.fixture(scope="module")
def vaes(assets_home, tmp_path_factory) -> dict[str, Path]:
    """Two untrained tiny VAE artifacts (f2, 16 px, VGG16 teacher: 2x2 grid), saved as train-vae saves them.

    The report's plumbing is what is tested here (training them costs minutes on busy cores);
    whether ReaLS beats the baseline is measured on the demo VAEs.
    """
    from reals_cli.models.alignment import AlignConfig, AlignmentNet
    from reals_cli.models.reals_vae import save_reals_vae
    from reals_cli.models.vae import AutoencoderKL, vae_config

    root = tmp_path_factory.mktemp("vaes")
    out = {}
    for seed, (name, align_weight) in enumerate((("reals", 1.0), ("baseline", 0.0))):
        torch.manual_seed(seed)
        config = {"teacher": "vgg16", "teacher_dim": 512, "teacher_resolution": None, "teacher_weights": None,
                  "image_size": 16, "align_weight": align_weight}
        out[name] = root / name
        save_reals_vae(out[name], AutoencoderKL(vae_config("tiny")), AlignmentNet(AlignConfig(4, 8, 512, 2, hidden=16)),
                       config, inputs={}, metrics={})
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One feature cache for the module: the teacher runs once per (dataset, split)."""
    return tmp_path_factory.mktemp("feature-cache")


def test_seg_fit_cache_and_three_way_eval(vaes, mask_data, cache, tmp_path):
    fit = ["probe-seg", "fit", "--data", str(mask_data), "--vae", str(vaes["reals"]), "--epochs", "5",
           "--batch-size", "16", "--device", "cpu", "--cache-dir", str(cache)]
    first = CliRunner().invoke(main, [*fit, "--out", str(tmp_path / "seg")])
    assert first.exit_code == 0, first.output
    manifest = json.loads((tmp_path / "seg/manifest.json").read_text())
    assert manifest["kind"] == "probe-seg" and manifest["config"]["teacher"] == "vgg16"
    assert manifest["config"]["teacher_dim"] == 512 and manifest["config"]["classes"] == ["background", "object"]
    again = CliRunner().invoke(main, [*fit, "--out", str(tmp_path / "seg2")])  # same data and teacher: no teacher run
    assert again.exit_code == 0 and "teacher features: cached" in again.output, again.output
    # A warm cache changes nothing: the head is the same, bit for bit.
    heads = [load_weights(tmp_path / name / "head.safetensors") for name in ("seg", "seg2")]
    assert all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0])

    # Generated latents stand-in: any N x C x h x w unnormalised latents, here from each VAE itself
    # (5 of them, a batch of 2: the scores must gather over batches).
    from reals_cli.models.reals_vae import load_reals_vae

    images = torch.stack([open_probe_data("seg", mask_data, "test", 16)[i][0] for i in range(5)])
    bundles = {way: load_reals_vae(vaes[way]) for way in ("reals", "baseline")}
    with torch.no_grad():
        z = {way: b.vae.encode(images * 2 - 1)[0] for way, b in bundles.items()}
    for way in z:
        np.savez(tmp_path / f"{way}.npz", latents=z[way].numpy())

    out = tmp_path / "eval"
    result = CliRunner().invoke(main, [
        "probe-seg", "eval", "--data", str(mask_data), "--vae", str(vaes["reals"]), "--head", str(tmp_path / "seg"),
        "--baseline-vae", str(vaes["baseline"]), "--latents", str(tmp_path / "reals.npz"), "--baseline-latents",
        str(tmp_path / "baseline.npz"), "--out", str(out), "--device", "cpu", "--cache-dir", str(cache),
        "--panels", "3", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "metrics.json").read_text())
    assert set(report["results"]) == {"teacher", "reals", "baseline", "constant"}
    for scores in report["results"].values():
        assert 0 <= scores["miou"] <= 1 and 0 <= scores["pixel_acc"] <= 1 and scores["pixels"] == 16 * 16 * 16
    # The constant row predicts the training set's majority class everywhere.
    train_labels = np.concatenate([t.numpy().ravel() for _, t in open_probe_data("seg", mask_data, "train", 16)])
    majority = np.bincount(train_labels).argmax()
    assert manifest["config"]["constant"] == majority
    test_labels = np.concatenate([t.numpy().ravel() for _, t in open_probe_data("seg", mask_data, "test", 16)])
    assert report["results"]["constant"]["pixel_acc"] == pytest.approx((test_labels == majority).mean())
    assert isinstance(report["reals_beats_constant"], bool)
    assert isinstance(report["reals_beats_baseline"], bool)
    assert "teacher (upper bound)" in result.output and "baseline VAE" in result.output
    assert Image.open(out / "panels.png").size[1] > 3 * 96
    # Generated latents, scored against the head on the teacher's features of their decoded images:
    # the same numbers computed here step by step, with mIoU in float64 over the classes present.
    from reals_cli.models.teachers import build_teacher
    from reals_cli.pipeline.probes import load_head, predict

    head = load_head(tmp_path / "seg", manifest)
    teacher = build_teacher("vgg16")
    for way, bundle in bundles.items():
        with torch.no_grad():
            target = predict(head, "seg", *teacher((bundle.vae.decode(z[way]).clamp(-1, 1) + 1) / 2), 16).numpy()
            aligned = predict(head, "seg", *bundle.align(z[way]), 16).numpy()
        generated = report["generated"][way]
        assert generated["count"] == 5 and generated["latents"] == str(tmp_path / f"{way}.npz")
        for pred, scores in ((aligned, generated["results"]["aligned"]),
                             (np.full_like(target, majority), generated["results"]["constant"])):
            ious = [((pred == c) & (target == c)).sum() / ((pred == c) | (target == c)).sum()
                    for c in range(2) if ((pred == c) | (target == c)).any()]
            assert scores["miou"] == pytest.approx(np.mean(ious), abs=1e-12)
            assert scores["pixel_acc"] == pytest.approx((pred == target).mean(), abs=1e-12)
        assert Image.open(out / f"generated-{way}.png").size[0] == 4 + 3 * (96 + 4)
    assert "on generated latents" in result.output
    # The evaluation is an artifact like the others: its manifest, written last, vouches for its files.
    made = read_manifest(out, "probe-seg-eval", 1)
    verify_files(out, made)
    assert set(made["files"]) == {"metrics.json", "panels.png", "generated-reals.png", "generated-baseline.png"}
    assert made["inputs"]["head"]["id"] == manifest["id"] and made["inputs"]["baseline_vae"]["kind"] == "vae"
    assert made["inputs"]["latents"]["path"] == str(tmp_path / "reals.npz") and "sha256" in made["inputs"]["latents"]
    assert made["inputs"]["baseline_latents"]["path"] == str(tmp_path / "baseline.npz")
    assert made["metrics"]["reals_miou"] == report["results"]["reals"]["miou"] and made["config"]["panels"] == 3
    assert made["metrics"]["generated_baseline_miou"] == report["generated"]["baseline"]["results"]["aligned"]["miou"]


def test_depth_fit_and_three_way_eval_on_motorcycle(vaes, cache, tmp_path):
    common = ["--data", "motorcycle", "--vae", str(vaes["reals"]), "--device", "cpu", "--cache-dir", str(cache),
              "--limit", "40"]
    fit = CliRunner().invoke(main, ["probe-depth", "fit", *common, "--epochs", "5", "--out", str(tmp_path / "depth")])
    assert fit.exit_code == 0, fit.output
    config = json.loads((tmp_path / "depth/manifest.json").read_text())["config"]
    assert 2.0 < config["min_depth"] < config["max_depth"] < 5.1 and config["bins"] == 256
    result = CliRunner().invoke(main, ["probe-depth", "eval", *common, "--head", str(tmp_path / "depth"),
                                       "--baseline-vae", str(vaes["baseline"]), "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval/metrics.json").read_text())
    for scores in report["results"].values():
        assert scores["images"] == 40 and 0 < scores["rmse"] < 3 and 0 <= scores["delta1"] <= 1
    # The constant row: the training tiles' mean measured depth everywhere, scored per image in float64.
    train = np.stack([t.numpy() for _, t in open_probe_data("depth", "motorcycle", "train", 16, limit=40)])
    mean = train[train > 0].astype(np.float64).mean()
    assert config["constant"] == pytest.approx(mean, rel=1e-6)
    test = [t.numpy().astype(np.float64) for _, t in open_probe_data("depth", "motorcycle", "test", 16, limit=40)]
    rmse = np.mean([np.sqrt(((mean - t[t > 0]) ** 2).mean()) for t in test])
    assert report["results"]["constant"]["rmse"] == pytest.approx(rmse, rel=1e-5)
    assert (tmp_path / "eval/panels.png").is_file()
    assert set(read_manifest(tmp_path / "eval", "probe-depth-eval", 1)["files"]) == {"metrics.json", "panels.png"}

    # --panels 0 draws nothing, and says so; run again into its own folder, the earlier panels go too.
    # Generated latents of a baseline VAE that was not given are refused.
    eval0 = ["probe-depth", "eval", *common, "--head", str(tmp_path / "depth"), "--panels", "0"]
    result = CliRunner().invoke(main, [*eval0, "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0 and "no panels (--panels 0)" in result.output, result.output
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["manifest.json", "metrics.json"]
    assert json.loads((tmp_path / "eval/metrics.json").read_text())["panels"] is None
    result = CliRunner().invoke(main, [*eval0, "--baseline-latents", str(tmp_path / "z.npz")])
    assert _error_line(result) == ("error: --baseline-latents are read through the baseline VAE's alignment network; "
                                   "pass --baseline-vae too")


# -- bad input: one red line, exit 2 --------------------------------------------------------------------

def test_mask_label_outside_class_list(vaes, mask_data, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(mask_data / "train", bad / "train")
    mask = next((bad / "train/1-disc").glob("*.mask.png"))
    Image.fromarray(np.full((16, 16), 7, np.uint8)).save(mask)
    result = CliRunner().invoke(main, ["probe-seg", "fit", "--data", str(bad), "--split", "train", "--vae",
                                       str(vaes["reals"]), "--out", str(tmp_path / "o"), "--device", "cpu",
                                       "--cache-dir", str(tmp_path)])
    _one_line_error(result, "has label 7, outside the 2 classes")


def test_head_of_another_teacher_is_refused(vaes, mask_data, cache, tmp_path):
    from reals_cli.artifacts import write_manifest

    head = tmp_path / "head"
    result = CliRunner().invoke(main, ["probe-seg", "fit", "--data", str(mask_data), "--vae", str(vaes["reals"]),
                                       "--epochs", "1", "--out", str(head), "--device", "cpu", "--cache-dir", str(cache)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((head / "manifest.json").read_text())
    write_manifest(head, "probe-seg", 1, {**manifest["config"], "teacher": "dinov2-s", "teacher_dim": 384},
                   files=["head.safetensors"])
    result = CliRunner().invoke(main, ["probe-seg", "eval", "--data", str(mask_data), "--vae", str(vaes["reals"]),
                                       "--head", str(head), "--device", "cpu", "--cache-dir", str(cache)])
    _one_line_error(result, "was fitted on dinov2-s features (384-d), but VAE")


def test_depth_without_any_measurement(vaes, tmp_path):
    data = tmp_path / "depth"
    (data / "train").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(data / f"train/{i}.png")
        Image.fromarray(np.zeros((16, 16), np.uint16)).save(data / f"train/{i}.depth.png")  # 0 = no measurement
    result = CliRunner().invoke(main, ["probe-depth", "fit", "--data", str(data), "--vae", str(vaes["reals"]),
                                       "--out", str(tmp_path / "o"), "--device", "cpu", "--cache-dir", str(tmp_path)])
    _one_line_error(result, "has a depth measurement (all 0, NaN or inf)")


def test_latents_from_a_latent_store(vaes, mask_data, tmp_path):
    from reals_cli.models.reals_vae import load_reals_vae
    from reals_cli.pipeline.encode import encode
    from reals_cli.pipeline.probes import load_latents

    store = tmp_path / "latents.zarr"
    encode(mask_data / "test", store, vaes["reals"], batch_size=8, device="cpu", precision="fp32", workers=0,
           dtype="float32")
    bundle = load_reals_vae(vaes["reals"])
    z = load_latents(store, bundle, 3)
    images = torch.stack([open_probe_data("seg", mask_data, "test", 16)[i][0] for i in range(3)])  # same order
    with torch.no_grad():
        assert torch.allclose(z, bundle.vae.encode(images * 2 - 1)[0], atol=1e-5)
    with pytest.raises(UserError, match="holds latents of VAE"):
        load_latents(store, load_reals_vae(vaes["baseline"]), 3)


def test_classes_must_name_every_label(vaes, mask_data, cache, tmp_path):
    fit = ["probe-seg", "fit", "--data", str(mask_data), "--vae", str(vaes["reals"]), "--epochs", "1",
           "--device", "cpu"]
    warm = CliRunner().invoke(main, [*fit, "--cache-dir", str(cache), "--out", str(tmp_path / "two")])
    assert warm.exit_code == 0, warm.output
    # Cached features skip reading the masks: the class list is checked against the cached labels.
    result = CliRunner().invoke(main, [*fit, "--cache-dir", str(cache), "--out", str(tmp_path / "one"),
                                       "--classes", "only"])
    assert _error_line(result) == (f"error: {mask_data} (train) has label 1, outside the 1 classes (0..0); "
                                   f"pass --classes with 2 names, one for each label 0..1")
    assert not (tmp_path / "one").exists()
    # Read afresh, the first mask with a label past the list is named.
    result = CliRunner().invoke(main, [*fit, "--cache-dir", str(tmp_path / "cold"), "--out", str(tmp_path / "one"),
                                       "--classes", "only"])
    assert _error_line(result) == (f"error: {mask_data / 'train/0-square/000.mask.png'} has label 1, outside the 1 "
                                   f"classes (0..0; 255 = ignore); fit the head with --classes listing every class")
    result = CliRunner().invoke(main, [*fit, "--out", str(tmp_path / "none"), "--classes", ","])
    assert _error_line(result) == ("error: --classes ',' names no class; pass names separated by commas "
                                   "(e.g. background,object), or a file with one per line")


def test_missing_data_head_file_and_foreign_splits(vaes, tmp_path):
    vae = str(vaes["reals"])
    result = CliRunner().invoke(main, ["probe-seg", "fit", "--vae", vae, "--out", str(tmp_path / "o")])
    assert _error_line(result) == "error: --data is required: the labelled images to fit the head on"
    result = CliRunner().invoke(main, ["probe-depth", "fit", "--vae", vae, "--out", str(tmp_path / "o")])
    assert _error_line(result) == "error: --data is required (or --dinov2-head to import DINOv2's released depth head)"

    pth = tmp_path / "dinov2_vitb14_nyu_linear_head.pth"
    pth.write_bytes(b"not read")
    result = CliRunner().invoke(main, ["probe-depth", "eval", "--data", "motorcycle", "--vae", vae, "--head", str(pth)])
    assert _error_line(result) == (
        f"error: --head {pth} is a file; --head takes a head folder made by `reals probe-depth fit` (to import "
        f"DINOv2's released head: `reals probe-depth fit --dinov2-head {pth} --vae VAE --out DIR`, then --head DIR)")
    result = CliRunner().invoke(main, ["probe-seg", "eval", "--data", str(tmp_path), "--vae", vae, "--head", str(pth)])
    assert _error_line(result) == f"error: --head {pth} is a file; --head takes a head folder made by `reals probe-seg fit`"

    result = CliRunner().invoke(main, ["probe-depth", "fit", "--data", "motorcycle", "--splits", str(tmp_path / "s.mat"),
                                       "--vae", vae, "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert _error_line(result) == ("error: --splits applies only to NYU .mat data; motorcycle data has its own train "
                                   "and test splits: drop --splits")
    assert not (tmp_path / "o").exists()


def test_out_must_be_new_empty_or_the_commands_own(vaes, mask_data, cache, tmp_path):
    head = tmp_path / "head"
    common = ["--data", str(mask_data), "--vae", str(vaes["reals"]), "--device", "cpu", "--cache-dir", str(cache)]
    fit = ["probe-seg", "fit", *common, "--epochs", "1"]
    assert CliRunner().invoke(main, [*fit, "--out", str(head)]).exit_code == 0
    a_file, stranger = tmp_path / "notes.txt", tmp_path / "stranger"
    a_file.write_text("x")
    stranger.mkdir()
    (stranger / "thesis.tex").write_text("x")
    vae = vaes["reals"]
    cases = [
        (fit, a_file, f"error: --out {a_file} is a file; pass a folder"),
        (fit, vae, f"error: --out {vae} holds a 'vae' artifact, not reals probe-seg fit's; pass a new --out"),
        (fit, stranger, f"error: --out {stranger} holds thesis.tex, which reals probe-seg fit did not write; "
                        f"pass a new or empty --out"),
        (fit, head, f"error: {head} already holds a finished head; pass another --out, or delete it to fit again"),
        (["probe-seg", "eval", *common, "--head", str(head)], vae,
         f"error: --out {vae} holds a 'vae' artifact, not reals probe-seg eval's; pass a new --out"),
        (["probe-seg", "eval", *common, "--head", str(head)], head,
         f"error: --out {head} holds a 'probe-seg' artifact made by `{shlex.join(['reals', *fit, '--out', str(head)])}`, "
         f"not reals probe-seg eval's; pass a new --out"),
    ]
    before = sorted(p.name for p in vae.iterdir())
    for command, out, expected in cases:
        assert _error_line(CliRunner().invoke(main, [*command, "--out", str(out)])) == expected
    assert sorted(p.name for p in vae.iterdir()) == before  # nothing was written into the VAE


def test_depth_panels_use_matplotlibs_viridis_exactly():
    import matplotlib

    from reals_cli.pipeline.probes import viridis

    t = np.linspace(0, 1, 1001)
    assert np.array_equal(viridis(t), matplotlib.colormaps["viridis"](t, bytes=True)[:, :3])
    assert np.array_equal(viridis(np.array([-1.0, 2.0])), viridis(np.array([0.0, 1.0])))  # clipped
