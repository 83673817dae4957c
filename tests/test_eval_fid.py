"""`reals eval-fid`: metric numerics, agreement with torch-fidelity, extractor equivalence, bad input.

Inception runs at 299 px whatever the input size, about a second per image on a busy
CPU, so the image sets are small (16 Fashion-MNIST images a side at 32 px) and every
image pass is shared through module-scoped fixtures.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from click.testing import CliRunner
from PIL import Image

from reals_cli import artifacts
from reals_cli.artifacts import write_manifest
from reals_cli.cli import main
from reals_cli.errors import UserError
from reals_cli.metrics.fid import frechet_distance, inception_score, kernel_inception_distance, precision_recall
from reals_cli.metrics.inception import OFFLINE, POOL_FEATURE, SFID_FEATURE, TORCH_FIDELITY, choose_extractor

N = 16  # images per side


# -- metrics on features ------------------------------------------------------------------------

def _scipy_fid(mu1, s1, mu2, s2) -> float:
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def _stats(x: np.ndarray):
    return x.mean(0), np.cov(x, rowvar=False)


def test_frechet_distance_matches_scipy_on_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 32)) @ rng.normal(size=(32, 32)) + 1.0
    b = rng.normal(size=(400, 32)) @ rng.normal(size=(32, 32)) * 0.7
    got, want = frechet_distance(*_stats(a), *_stats(b)), _scipy_fid(*_stats(a), *_stats(b))
    assert got == pytest.approx(want, rel=1e-6)


def test_frechet_distance_real_and_finite_on_rank_deficient_covariances():
    # 10 points in 64 dims (rank 9 covariances), both sets inside one 5-d subspace: FID is unchanged by
    # an isometric embedding, so the full-rank 5-d value (scipy's, well conditioned there) is exact.
    rng = np.random.default_rng(1)
    basis = np.linalg.qr(rng.normal(size=(64, 5)))[0].T  # 5 x 64, orthonormal rows
    za, zb = rng.normal(size=(10, 5)), rng.normal(size=(10, 5)) * 2 + 0.5
    got = frechet_distance(*_stats(za @ basis), *_stats(zb @ basis))
    assert isinstance(got, float) and np.isfinite(got)
    assert got == pytest.approx(_scipy_fid(*_stats(za), *_stats(zb)), rel=1e-6)
    # scipy's sqrtm on the singular 64-d product is what goes wrong (users' complaint 3): not our path.
    assert np.isfinite(frechet_distance(*_stats(za @ basis), *_stats(za @ basis * 1e-8)))


@pytest.mark.parametrize("n", [500, 20])  # full rank, and rank 19 in 128 dims
def test_frechet_distance_zero_for_identical_sets(n):
    x = np.random.default_rng(2).normal(size=(n, 128)) * 3 + 1
    assert abs(frechet_distance(*_stats(x), *_stats(x))) < 1e-8


def _brute_pr(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Independent hand computation: explicit loops over Euclidean distances."""
    def radii(points):
        out = []
        for i, p in enumerate(points):
            d = sorted(float(np.sqrt(((p - q) ** 2).sum())) for j, q in enumerate(points) if j != i)
            out.append(d[k - 1])  # distance to the k-th nearest other point
        return out

    def covered(points, centres, r):
        hits = 0
        for p in points:
            hits += any(np.sqrt(((p - c) ** 2).sum()) <= rc for c, rc in zip(centres, r))
        return hits / len(points)

    return covered(fake, real, radii(real)), covered(real, fake, radii(fake))


def test_precision_recall_hand_example():
    # 1-d, k=1. real radii: 0->1, 1->1, 2->1, 10->8; fake radii: 0.5->1, 1.5->1, 5->3.5, 20->15.
    # precision: 0.5, 1.5 (near 0..2) and 5 (within 8 of 10) covered, 20 not -> 3/4.
    # recall: 0, 1, 2 within 1 of 0.5/1.5; 10 within 15 of 20 -> 4/4.
    real = np.array([[0.0], [1.0], [2.0], [10.0]])
    fake = np.array([[0.5], [5.0], [20.0], [1.5]])
    assert precision_recall(real, fake, k=1) == (0.75, 1.0)
    assert _brute_pr(real, fake, 1) == (0.75, 1.0)


def test_precision_recall_matches_brute_force_on_partial_overlap():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(60, 8))
    # 30 samples on the real distribution, 20 in a far cluster that no real ball reaches
    fake = np.concatenate([rng.normal(size=(30, 8)), rng.normal(size=(20, 8)) * 0.5 + 40])
    p, r = precision_recall(real, fake, k=3, block=7)  # odd block size: the blocking must not matter
    assert (p, r) == pytest.approx(_brute_pr(real, fake, 3), abs=1e-12)
    assert p <= 30 / 50 and r > 0.5


def test_kid_matches_torch_fidelity_on_whole_sets():
    from torch_fidelity.metric_kid import kid_features_to_metric

    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(40, 16)), rng.normal(size=(40, 16)) + 0.3
    ours, _ = kernel_inception_distance(a, b, subsets=3, subset_size=40)  # each subset: the whole set
    theirs = kid_features_to_metric(torch.from_numpy(a), torch.from_numpy(b), kid_subsets=1, kid_subset_size=40,
                                    verbose=False)["kernel_inception_distance_mean"]
    assert ours == pytest.approx(theirs, rel=1e-9)


def test_inception_score_by_hand():
    assert inception_score(np.zeros((20, 5)), split_size=10) == pytest.approx((1.0, 0.0))  # uniform p(y|x): IS 1
    sure = np.full((16, 4), -1e4)
    sure[np.arange(16), np.arange(16) % 4] = 0  # each split of 8: confident, spread evenly over 4 classes: IS 4
    assert inception_score(sure, split_size=8)[0] == pytest.approx(4.0)
    # ADM's splits: 12,000 rows are 5,000 + 5,000 + 2,000. Rows 10,000+ spread over 2 classes, the rest over 4.
    rows = np.arange(12_000)
    labels = np.where(rows < 10_000, rows % 4, rows % 2)
    sure = np.full((12_000, 4), -40.0)  # not -1e4: p(y) of an unseen class must stay above 0
    sure[rows, labels] = 0
    mean, std = inception_score(sure)
    assert mean == pytest.approx(np.mean([4, 4, 2]), rel=1e-9) and std == pytest.approx(np.std([4, 4, 2]), rel=1e-9)


# -- real images ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fm(assets_home, tmp_path_factory) -> dict[str, Path]:
    """N train images as a `reals sample`-style folder (samples.npz + manifest), N test images as class folders."""
    from reals_cli.data.exports import export_fashion_mnist

    root = tmp_path_factory.mktemp("fid")
    export_fashion_mnist(root / "fm", size=32, limit=N, progress=False)
    train = sorted(p for p in (root / "fm" / "train").glob("*/*.png") if not p.name.endswith(".mask.png"))
    samples = root / "samples"
    samples.mkdir()
    np.savez(samples / "samples.npz", arr_0=np.stack([np.array(Image.open(p).convert("RGB")) for p in train]))
    write_manifest(samples, "samples", 1, {"sampler": "sde", "steps": 250, "cfg": 1.5}, files=["samples.npz"])
    return {"root": root, "samples": samples, "ref": root / "fm" / "test"}


def _invoke(*args: str):
    return CliRunner().invoke(main, ["eval-fid", *map(str, args)])


@pytest.fixture(scope="module")
def run(fm) -> dict:
    """One offline eval-fid over both sets, caching the reference statistics."""
    out, stats = fm["root"] / "metrics.json", fm["root"] / "ref-stats.npz"
    r = _invoke(fm["samples"], "--ref", fm["ref"], "--extractor", "offline", "--batch-size", 10,
                "--out", out, "--save-ref-stats", stats, "--device", "cpu")
    assert r.exit_code == 0, r.output
    return {"metrics": json.loads(out.read_text()), "stats": stats, "output": r.output}


class _Images(torch.utils.data.Dataset):
    def __init__(self, images: list[np.ndarray]) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.images[i]).permute(2, 0, 1)


@pytest.mark.slow
@pytest.mark.assets
def test_eval_fid_equals_torch_fidelity_with_the_same_extractor(fm, run):
    import torch_fidelity

    m = run["metrics"]
    assert m["extractor"]["name"] == OFFLINE and m["num_samples"] == N and m["label"] == f"FID-{N} (not FID-50K)"
    assert m["protocol"]["config"] == {"sampler": "sde", "steps": 250, "cfg": 1.5}
    assert "not FID-50K" in run["output"] and "warning" in run["output"]
    assert m["inception_score"] is None and "no classifier" in m["unavailable"]["is"]
    assert all(np.isfinite(m[k]) for k in ("fid", "sfid", "kid", "precision", "recall"))

    with np.load(fm["samples"] / "samples.npz") as z:
        fake = list(z["arr_0"])
    ref = [np.array(Image.open(p).convert("RGB"))
           for p in sorted(fm["ref"].glob("*/*.png")) if not p.name.endswith(".mask.png")]
    theirs = torch_fidelity.calculate_metrics(
        input1=_Images(fake), input2=_Images(ref), feature_extractor=OFFLINE, fid=True, kid=True, prc=True,
        kid_subsets=1, kid_subset_size=N, cuda=False, batch_size=10, save_cpu_ram=True, verbose=False)
    assert m["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-3)
    assert m["kid"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-3)
    assert (m["precision"], m["recall"]) == pytest.approx((theirs["precision"], theirs["recall"]))


def _offline_to_torch_fidelity(ts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The TorchScript's TF-named weights in torch-fidelity's FeatureExtractorInceptionV3 layout.

    TF conv+batchnorm (no scale: gamma = 1) -> BasicConv2d's conv + BatchNorm2d (eps 0.001 in both).
    torch-fidelity's strict load_state_dict checks that every module got its weights, and every
    TorchScript tensor must be used: the two are the same network layer for layer.
    """
    a = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
         "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
         "tower_2.conv": "branch_pool"}
    b = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
         "tower.conv_2": "branch3x3dbl_3"}
    c = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
         "tower.conv_2": "branch7x7_3", "tower_2.conv": "branch_pool",
         **{f"tower_1.conv{'' if i == 0 else f'_{i}'}": f"branch7x7dbl_{i + 1}" for i in range(5)}}
    d = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
         **{f"tower_1.conv{'' if i == 0 else f'_{i}'}": f"branch7x7x3_{i + 1}" for i in range(4)}}
    e = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
         "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
         "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
         "tower_2_conv": "branch_pool"}
    names = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
             "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
    blocks = [("mixed", "Mixed_5b", a), ("mixed_1", "Mixed_5c", a), ("mixed_2", "Mixed_5d", a),
              ("mixed_3", "Mixed_6a", b), ("mixed_4", "Mixed_6b", c), ("mixed_5", "Mixed_6c", c),
              ("mixed_6", "Mixed_6d", c), ("mixed_7", "Mixed_6e", c), ("mixed_8", "Mixed_7a", d),
              ("mixed_9", "Mixed_7b", e), ("mixed_10", "Mixed_7c", e)]
    for src, dst, branches in blocks:
        names.update({f"{src}.{s}": f"{dst}.{t}" for s, t in branches.items()})
    out, used = {}, set()
    for src, dst in names.items():
        p = f"net.layers.{src}."
        out[f"{dst}.conv.weight"] = ts[p + "weight"]
        out[f"{dst}.bn.weight"] = torch.ones_like(ts[p + "beta"])
        out[f"{dst}.bn.bias"] = ts[p + "beta"]
        out[f"{dst}.bn.running_mean"] = ts[p + "mean"]
        out[f"{dst}.bn.running_var"] = ts[p + "var"]
        out[f"{dst}.bn.num_batches_tracked"] = torch.tensor(0)
        used |= {p + k for k in ("weight", "beta", "mean", "var")}
    assert used == set(ts), f"TorchScript tensors without a place: {sorted(set(ts) - used)[:5]}"
    return out


@pytest.fixture(scope="module")
def converted_weights(assets_home, tmp_path_factory) -> Path:
    """The offline weights as a torch-fidelity weight file; the classifier (absent offline) is zero."""
    from reals_cli.metrics.inception import load_torchscript

    ts = load_torchscript(choose_extractor("offline").weights).state_dict()
    state = _offline_to_torch_fidelity(ts)
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    path = tmp_path_factory.mktemp("weights") / "inception-from-offline.pth"
    torch.save(state, path)
    return path


@pytest.mark.slow
@pytest.mark.assets
def test_offline_torchscript_is_torch_fidelity_inception(fm, converted_weights):
    offline = choose_extractor("offline")
    tf = choose_extractor("torch-fidelity", inception_weights=converted_weights)
    assert (offline.name, tf.name) == (OFFLINE, TORCH_FIDELITY)
    rng = np.random.default_rng(5)
    with np.load(fm["samples"] / "samples.npz") as z:
        images = torch.from_numpy(z["arr_0"][:2]).permute(0, 3, 1, 2)
    images = torch.cat([images, torch.from_numpy(rng.integers(0, 256, (1, 3, 32, 32), dtype=np.uint8))])
    feats = [POOL_FEATURE, SFID_FEATURE]
    with torch.inference_mode():
        a = offline.build(feats, torch.device("cpu"))(images)
        b = tf.build(feats, torch.device("cpu"))(images)
    for name, x, y in zip(feats, a, b):
        assert x.shape == y.shape == (3, 2048 if name == POOL_FEATURE else 2023)
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-4 * float(y.abs().max())), (name, (x - y).abs().max())


@pytest.mark.slow
@pytest.mark.assets
def test_cached_stats_adm_reference_batch_and_torch_fidelity_path(fm, run, converted_weights):
    from reals_cli.metrics.fid import compute_metrics

    small = fm["root"] / "small.npz"
    with np.load(fm["samples"] / "samples.npz") as z:
        np.savez(small, arr_0=z["arr_0"][:5])
    # A few samples against the cached statistics: FID, KID and P/R from the file, no reference pass.
    r = _invoke(small, "--ref", run["stats"], "--extractor", "offline", "--metrics", "fid,kid,pr",
                "--out", fm["root"] / "small.json")
    assert r.exit_code == 0, r.output
    m = json.loads((fm["root"] / "small.json").read_text())
    assert m["reference"]["kind"] == "stats" and m["num_reference"] == N
    assert all(np.isfinite(m[k]) for k in ("fid", "kid", "precision", "recall")) and m["sfid"] is None

    # An ADM reference batch: its stored mu/sigma are used as they are (its images, all black here, are not).
    with np.load(run["stats"]) as z:
        stored = {k: z[k] for k in ("mu", "sigma", "mu_s", "sigma_s")}
    adm = _npz(fm["root"] / "VIRTUAL_ref.npz", arr_0=np.zeros((3, 32, 32, 3), np.uint8), **stored)
    got = compute_metrics(small, adm, metrics=("fid",), extractor="offline", device="cpu", progress=False)
    assert got["reference"]["kind"] == "adm-reference-batch" and got["num_reference"] == 3
    assert got["reference"]["stored_statistics"] == ["mu/sigma", "mu_s/sigma_s"]
    assert got["fid"] == pytest.approx(m["fid"], rel=1e-12)

    # torch-fidelity's extractor (here with the converted offline weights): IS exists (zero logits: IS 1).
    r = _invoke(small, "--ref", small, "--inception-weights", converted_weights, "--metrics", "is",
                "--out", fm["root"] / "tf.json")
    assert r.exit_code == 0, r.output
    m = json.loads((fm["root"] / "tf.json").read_text())
    assert m["extractor"]["name"] == TORCH_FIDELITY and m["extractor"]["classifier"]
    assert m["inception_score"] == pytest.approx(1.0) and m["unavailable"] == {}


def test_auto_falls_back_to_offline_only_when_torch_fidelity_weights_cannot_be_had(assets_home, monkeypatch):
    import reals_cli.metrics.inception as inception
    from reals_cli.errors import UserError

    def no_network():
        raise OSError("urlopen error [Errno -2] Name or service not known")

    monkeypatch.setattr(inception, "torch_fidelity_weights", no_network)
    choice = choose_extractor("auto")
    assert choice.name == OFFLINE and not choice.has_classifier and "could not be downloaded" in choice.note
    with pytest.raises(UserError, match="--inception-weights"):
        choose_extractor("torch-fidelity")
    with pytest.raises(UserError, match="cannot be combined"):
        choose_extractor("offline", inception_weights="x.pth")


def test_image_folder_inputs(tmp_path):
    from reals_cli.errors import UserError
    from reals_cli.metrics.fid import ClassFolderImages, FolderImages, open_input

    rng = np.random.default_rng(6)
    images = rng.integers(0, 256, (3, 12, 16, 3), dtype=np.uint8)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img).save(flat / f"{i:02d}.png")
    Image.fromarray(images[0][:, :, 0]).save(flat / "00.mask.png")  # masks are not samples
    src = open_input(flat)
    assert isinstance(src, FolderImages) and (src.count, src.resolution) == (3, (12, 16))
    batches = list(src.batches(2))
    assert [b.shape for b in batches] == [(2, 3, 12, 16), (1, 3, 12, 16)]
    assert torch.equal(torch.cat(batches), torch.from_numpy(images).permute(0, 3, 1, 2))

    Image.fromarray(images[0][:8]).save(flat / "03.png")
    with pytest.raises(UserError, match="differ in size"):
        open_input(flat)
    tree = tmp_path / "tree"
    (tree / "a").mkdir(parents=True)
    flat.rename(tree / "a" / "x")
    with pytest.raises(UserError, match="no image files directly"):
        open_input(tree, classes=False)
    src = open_input(tree, crop=8)  # ADM center crop of every image, whatever its size
    assert isinstance(src, ClassFolderImages) and (src.count, src.resolution) == (4, (8, 8))
    assert all(b.dtype == torch.uint8 and b.shape[1:] == (3, 8, 8) for b in src.batches(4))


def _image_tree(root: Path, side: int, n: int) -> Path:
    """n random side x side images in two class folders."""
    rng = np.random.default_rng(7)
    for i in range(n):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(root / f"c{i % 2}" / f"{i}.png")
    return root


def test_images_enlarged_by_the_center_crop_are_counted(tmp_path):
    from reals_cli.metrics.fid import open_input

    small, large = _image_tree(tmp_path / "small", 16, 3), _image_tree(tmp_path / "large", 40, 3)
    for path, crop, enlarged in [(small, 32, 3), (large, 32, 0), (small / "c0", 32, 2), (large / "c0", 32, 0)]:
        src = open_input(path, crop=crop)  # a class-folder tree, then a flat folder
        assert sum(len(b) for b in src.batches(2)) == src.count and src.upsampled == enlarged, path


# -- bad input: one red line, exit 2 ---------------------------------------------------------------

def _one_line_error(r, *fragments: str) -> str:
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def test_error_npz_without_arr_0(tmp_path):
    bad = _npz(tmp_path / "bad.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    _one_line_error(_invoke(bad, "--ref", bad), "has no arr_0", "images")


def test_error_fewer_than_two_images(tmp_path):
    one = _npz(tmp_path / "one.npz", arr_0=np.zeros((1, 8, 8, 3), np.uint8))
    _one_line_error(_invoke(one, "--ref", one), "1 image", "at least 2")


@pytest.mark.slow
@pytest.mark.assets
def test_error_reference_at_another_resolution(run, tmp_path):
    big = _npz(tmp_path / "big.npz", arr_0=np.zeros((4, 64, 64, 3), np.uint8))
    _one_line_error(_invoke(big, "--ref", run["stats"], "--extractor", "offline"), "32x32", "64x64")


@pytest.mark.assets
def test_error_when_no_metric_asked_for_can_be_computed(fm, run):
    r = _invoke(fm["samples"], "--ref", run["stats"], "--extractor", "offline", "--metrics", "is")
    _one_line_error(r, "none of the metrics asked for can be computed here: is: the offline FID Inception",
                    "--extractor torch-fidelity")


@pytest.mark.slow
@pytest.mark.assets
def test_error_stats_from_another_extractor(fm, run, converted_weights):
    r = _invoke(fm["samples"], "--ref", run["stats"], "--inception-weights", converted_weights)
    _one_line_error(r, f"from extractor {OFFLINE}", f"this run uses {TORCH_FIDELITY}")


@pytest.mark.assets
def test_reference_statistics_alone_equal_those_saved_beside_an_evaluation(fm, run, tmp_path):
    alone = tmp_path / "alone.npz"
    r = _invoke("--ref", fm["ref"], "--ref-size", 32, "--extractor", "offline", "--batch-size", 10, "--save-ref-stats", alone,
                "--device", "cpu")
    assert r.exit_code == 0, r.output
    with np.load(alone) as a, np.load(run["stats"]) as b:
        assert a.files == b.files
        for k in b.files:
            if b[k].dtype.kind == "f":
                np.testing.assert_array_equal(a[k], b[k])
    nothing = _invoke("--ref", fm["ref"])
    assert nothing.exit_code == 2
    assert nothing.output.strip() == ("error: give SAMPLES to evaluate, or --save-ref-stats FILE to cache the "
                                      "reference statistics alone")


@pytest.fixture
def no_inputs_opened(monkeypatch):
    """Outputs are checked first: opening an input (hashing a 10 GB npz, say) is already work."""
    import reals_cli.metrics.fid as fid

    monkeypatch.setattr(fid, "open_input", lambda *a, **k: pytest.fail("an input was opened"))


@pytest.mark.parametrize("option", ["--out", "--save-ref-stats"])
def test_error_output_that_is_a_folder(tmp_path, no_inputs_opened, option):
    example = "metrics.json" if option == "--out" else "ref-stats.npz"
    r = _invoke(tmp_path / "samples.npz", "--ref", tmp_path / "ref.npz", option, tmp_path)
    assert _one_line_error(r) == f"error: {option} {tmp_path} is a folder; pass a file path, e.g. {tmp_path / example}"


def test_error_output_under_a_file(tmp_path, no_inputs_opened):
    (tmp_path / "file").write_text("")
    r = _invoke(tmp_path / "samples.npz", "--ref", tmp_path / "ref.npz", "--out", tmp_path / "file" / "m.json")
    assert _one_line_error(r) == (f"error: --out {tmp_path / 'file' / 'm.json'} is under {tmp_path / 'file'}, "
                                  f"which is a file; pass a path in a folder")


@pytest.mark.parametrize("with_samples", [True, False])
def test_error_reference_statistics_file_without_npz_suffix(tmp_path, no_inputs_opened, with_samples):
    # --ref reads only .npz files as statistics: a name it would refuse is refused before they are made.
    stats = tmp_path / "refstats"
    r = _invoke(*([tmp_path / "samples.npz"] if with_samples else []), "--ref", tmp_path / "ref",
                "--save-ref-stats", stats)
    assert _one_line_error(r) == (f"error: --save-ref-stats {stats} does not end in .npz, which --ref needs to "
                                  f"read it back; pass {stats}.npz")
    assert not stats.exists()


def _sample_folder(folder: Path, monkeypatch) -> dict:
    """A finished `reals sample` folder (4 images of 8 px), its manifest recording the command."""
    folder.mkdir()
    np.savez(folder / "samples.npz", arr_0=np.random.default_rng(8).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    monkeypatch.setattr(artifacts, "invocation", {"command": f"reals sample --out {folder}", "started": 0.0})
    return write_manifest(folder, "samples", 1, {"seed": 0}, files=["samples.npz"])


def test_samples_npz_is_checked_against_the_hash_in_its_manifest(tmp_path, monkeypatch):
    from reals_cli.metrics.fid import open_input

    folder = tmp_path / "samples"
    manifest = _sample_folder(folder, monkeypatch)
    for path in (folder, folder / "samples.npz"):
        assert open_input(path, classes=False).protocol["id"] == manifest["id"]
    with np.load(folder / "samples.npz") as z:
        images = z["arr_0"].copy()
    images[1] ^= 1  # one image changed: its protocol would no longer describe it
    np.savez(folder / "samples.npz", arr_0=images)
    for path in (folder, folder / "samples.npz"):
        assert _one_line_error(_invoke(path, "--ref", path)) == (
            f"error: {folder / 'samples.npz'} does not match the hash in its manifest (corrupt or replaced); "
            f"delete {folder} and run `reals sample --out {folder}` again")


def test_error_unfinished_sample_run(tmp_path, monkeypatch):
    folder = tmp_path / "samples"
    (folder / "parts").mkdir(parents=True)
    (folder / "parts" / "protocol.json").write_text("{}")
    _npz(folder / "parts" / "block_000000.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    expected = (f"error: {folder} is an unfinished `reals sample` run (no manifest.json yet); run the same "
                f"`reals sample` command again to finish it")
    assert _one_line_error(_invoke(folder, "--ref", folder)) == expected
    # Killed while assembling: samples.npz is written before the manifest.
    _npz(folder / "samples.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    for path in (folder, folder / "samples.npz"):
        assert _one_line_error(_invoke(path, "--ref", path)) == expected


def test_error_artifact_that_holds_no_images(tmp_path):
    vae = tmp_path / "vae"
    vae.mkdir()
    Image.fromarray(np.zeros((16, 32, 3), np.uint8)).save(vae / "recon_0000010.png")  # a preview, not a sample set
    write_manifest(vae, "vae", 1, {})
    samples = _npz(tmp_path / "s.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    assert _one_line_error(_invoke(samples, "--ref", vae)) == (
        f"error: {vae} is a 'vae' artifact, not images; --ref takes an ADM reference batch, an .npz of images, "
        f"a statistics file from --save-ref-stats, a folder of images or a class-folder tree")
    assert _one_line_error(_invoke(vae, "--ref", samples)) == (
        f"error: {vae} is a 'vae' artifact, not images; SAMPLES takes an ADM .npz (arr_0 = N x H x W x 3 uint8), "
        f"a `reals sample` folder or a folder of images")


@pytest.mark.assets
def test_warning_reference_smaller_than_the_samples(tmp_path):
    samples = _npz(tmp_path / "s.npz", arr_0=np.random.default_rng(9).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8))
    ref = _image_tree(tmp_path / "ref", 16, 3)
    r = _invoke(samples, "--ref", ref, "--metrics", "fid", "--extractor", "offline", "--device", "cpu",
                "--out", tmp_path / "m.json")
    assert r.exit_code == 0, r.output
    expected = (f"3 of 3 reference images in {ref} are smaller than the samples' 32x32 and were upsampled to it: "
                f"FID then also measures the upsampling; use reference images at least as large as the samples")
    assert expected in json.loads((tmp_path / "m.json").read_text())["warnings"]
    assert f"warning: {expected}" in r.output.splitlines()


@pytest.mark.parametrize("option", ["--out", "--save-ref-stats"])
def test_error_output_in_a_read_only_folder(tmp_path, no_inputs_opened, unwritable, option):
    target = unwritable / "sub" / "m.npz"
    r = _invoke(tmp_path / "samples.npz", "--ref", tmp_path / "ref.npz", option, target)
    assert _one_line_error(r).startswith(f"error: {option} {target} cannot be written: {unwritable} refuses new files (")


# -- the Inception weights: read once, checked, and never unpickled in full -------------------------

class _Touch:
    """A pickle whose full unpickling makes a file: the sign that code from it ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.assets
def test_inception_weights_swapped_after_the_check_run_no_code(converted_weights, tmp_path, monkeypatch):
    """Whoever replaces the file between our check and its use (a shared folder, a symlink) gets no
    code run: the network is built from the tensors read and checked once, not from the path."""
    import shutil

    import reals_cli.metrics.inception as inception
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    path, marker = tmp_path / "weights.pth", tmp_path / "code-ran"
    shutil.copy(converted_weights, path)
    read = inception.torch_load

    def read_then_swap(*args, **kwargs):
        state = read(*args, **kwargs)
        with open(path, "wb") as f:
            torch.save({"fc.weight": _Touch(marker)}, f)
        return state

    monkeypatch.setattr(inception, "torch_load", read_then_swap)
    choice = choose_extractor("torch-fidelity", inception_weights=path)
    monkeypatch.setattr(inception, "torch_load", read)
    assert choice.weights_sha256 == artifacts.sha256_file(converted_weights)  # of the bytes loaded, not the swap's
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8))
    with torch.inference_mode():
        (got,) = choice.build([POOL_FEATURE], torch.device("cpu"))(images)
    assert not marker.exists()
    # The verified tensors are what ran: the features of the file as it was checked.
    with torch.inference_mode():
        (want,) = choose_extractor("torch-fidelity", inception_weights=converted_weights).build(
            [POOL_FEATURE], torch.device("cpu"))(images)
    assert torch.equal(got, want)
    # torch-fidelity's own route to the extractor (calculate_metrics by name) refuses the swapped file too.
    with pytest.raises(UserError, match="is not a plain weights file"):
        FEATURE_EXTRACTORS_REGISTRY[TORCH_FIDELITY](TORCH_FIDELITY, [POOL_FEATURE], feature_extractor_weights_path=str(path))
    assert not marker.exists()


@pytest.mark.assets
def test_error_inception_weights_with_the_right_keys_but_wrong_shapes(fm, converted_weights, tmp_path):
    state = torch.load(converted_weights, weights_only=True)
    state["fc.weight"] = torch.zeros(10, 2048)
    torch.save(state, tmp_path / "bad.pth")
    r = _invoke(fm["samples"], "--ref", fm["ref"], "--inception-weights", tmp_path / "bad.pth", "--device", "cpu")
    assert _one_line_error(r) == (
        "error: the Inception weights do not fit torch-fidelity's InceptionV3 (size mismatch for fc.weight: copying a "
        "param with shape torch.Size([10, 2048]) from checkpoint, the shape in current model is torch.Size([1008, "
        "2048]).); pass torch-fidelity's weights-inception-2015-12-05-*.pth or use --extractor offline")


@pytest.mark.assets
def test_the_inception_asset_is_checked_by_hash_before_it_loads(assets_home, tmp_path, monkeypatch):
    """Same size, one byte changed: the size check passes, the sha256 does not."""
    from reals_cli.assets import asset_path

    data = bytearray(asset_path("inception-fid").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "inception-fid").mkdir()
    (tmp_path / "inception-fid" / asset_path("inception-fid").name).write_bytes(bytes(data))
    monkeypatch.setenv("REALS_HOME", str(tmp_path))
    with pytest.raises(UserError) as refused:
        choose_extractor("offline")
    assert str(refused.value) == (f"{tmp_path / 'inception-fid' / 'default_1.pt'} does not have the sha256 of the FID "
                                  f"Inception asset (corrupt or replaced); run `reals assets fetch inception-fid --force`")
