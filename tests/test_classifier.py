"""reals_cli.classifier: the classifier artifact, its feature-space Frechet distance (against scipy in
float64) and the class accuracy of labelled samples."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from click.testing import CliRunner
from PIL import Image

from reals_cli.metrics.classifier import classifier_metrics, load_classifier, train_classifier
from reals_cli.cli import main

SIZE = 16


def _colour_images(rng, n: int, channel: int) -> np.ndarray:
    """n images, N x SIZE x SIZE x 3 uint8, bright in one channel, with noise."""
    x = rng.integers(0, 80, (n, SIZE, SIZE, 3))
    x[..., channel] += 150
    return x.astype(np.uint8)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Two separable classes (red, blue) in the class-folder layout, train and test."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("test", 8)):
        for label, (name, channel) in enumerate((("0-red", 0), ("1-blue", 2))):
            (root / split / name).mkdir(parents=True)
            for i, img in enumerate(_colour_images(rng, n, channel)):
                Image.fromarray(img).save(root / split / name / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def model_dir(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("clf") / "classifier"
    manifest = train_classifier(dataset, out, image_size=SIZE, epochs=15, batch_size=8, lr=3e-3, device="cpu")
    assert manifest["metrics"]["test_accuracy"] == 1.0  # the controlled set below relies on it
    return out


def _samples(path, images: np.ndarray, labels: np.ndarray | None):
    path.mkdir(parents=True)
    arrays = {"arr_0": images} | ({} if labels is None else {"arr_1": labels})
    np.savez(path / "samples.npz", **arrays)
    return path


def test_class_accuracy_on_a_controlled_set(model_dir, tmp_path):
    rng = np.random.default_rng(1)
    images = np.concatenate([_colour_images(rng, 10, 0), _colour_images(rng, 10, 2)])
    truth = np.repeat([0, 1], 10)
    drawn_for = truth.copy()
    drawn_for[[0, 1, 2, 15]] = 1 - drawn_for[[0, 1, 2, 15]]  # 4 of 20 drawn for the other class
    r = classifier_metrics(_samples(tmp_path / "s", images, drawn_for), model_dir, tmp_path / "s", device="cpu")
    assert r["class_accuracy"] == pytest.approx(16 / 20)
    assert r["per_class_accuracy"] == pytest.approx([7 / 8, 9 / 12])  # drawn for red: 3..9 and 15, of which 7 are red
    assert r["chance"] == 0.5 and r["num_samples"] == 20
    unlabelled = classifier_metrics(_samples(tmp_path / "u", images, None), model_dir, tmp_path / "u", device="cpu")
    assert unlabelled["class_accuracy"] is None


def test_fd_is_zero_for_identical_sets_and_matches_scipy(model_dir, dataset, tmp_path):
    rng = np.random.default_rng(2)
    images = np.concatenate([_colour_images(rng, 40, 0), _colour_images(rng, 30, 2)])
    same = classifier_metrics(_samples(tmp_path / "a", images, None), model_dir, tmp_path / "a", device="cpu")
    assert same["fd"] == pytest.approx(0, abs=1e-6)

    r = classifier_metrics(tmp_path / "a", model_dir, dataset / "test", device="cpu")
    assert r["reference_accuracy"] == 1.0 and r["num_reference"] == 16
    model, _ = load_classifier(model_dir, torch.device("cpu"))
    ref = np.stack([np.array(Image.open(p)) for p in sorted((dataset / "test").rglob("*.png"))])
    with torch.no_grad():
        fa, fb = (model.features(torch.from_numpy(x).permute(0, 3, 1, 2)).double().numpy() for x in (images, ref))
    sa, sb = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    covmean = scipy.linalg.sqrtm(sa @ sb).real
    expected = ((fa.mean(0) - fb.mean(0)) ** 2).sum() + np.trace(sa + sb - 2 * covmean)
    assert r["fd"] == pytest.approx(expected, rel=1e-4, abs=1e-6) and expected > 0.1


def test_cli_refuses_samples_at_another_size(model_dir, tmp_path):
    _samples(tmp_path / "big", np.zeros((4, 32, 32, 3), np.uint8), np.zeros(4, np.int64))
    result = CliRunner().invoke(main, ["classifier", "eval", str(tmp_path / "big"), "--classifier", str(model_dir),
                                       "--ref", str(tmp_path / "big"), "--device", "cpu"])
    assert result.exit_code == 2 and "trained at 16x16" in result.output
