"""analyze: pooled features, linear probe, channel stats, PCA and t-SNE against independent references; the CLI."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.manifold import TSNE, trustworthiness
from sklearn.preprocessing import StandardScaler

from reals_cli.artifacts import read_manifest, verify_files
from reals_cli.cli import main
from reals_cli.data.latent_store import create_store, open_store
from reals_cli.errors import UserError
from reals_cli.pipeline import analysis
from reals_cli.pipeline.analysis import (
    channel_stats, linear_probe, pca_2d, pooled_features, stratified_split, tsne_2d,
)


def _store(path, n=40, classes=("cat", "dog"), seed=0, finish=True) -> str:
    """A complete 4x8x8 store with 2 views: channel 0's mean tells the classes apart, channel 1
    sits far from zero (mean 5), and row 3 is an unreadable image (label -1, no latent)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(classes)
    labels[3] = -1
    post = np.zeros((n, 2, 2, 4, 8, 8), np.float32)
    post[:, :, 0] = rng.normal(size=(n, 2, 4, 8, 8))
    post[:, :, 0, 0] += 2.0 * labels[:, None, None, None]
    post[:, :, 0, 1] += 5.0
    post[:, :, 1] = rng.uniform(0.1, 0.5, size=(n, 2, 4, 8, 8))
    post[labels < 0] = 0
    store = create_store(path, rows=n, latent_shape=(4, 8, 8), views=2, dtype="float32", block_size=16,
                         attrs={"vae_id": "vae0", "id": "store0", "classes": list(classes),
                                "config": {"block_size": 16}})
    if finish:
        for b in range(-(-n // 16)):
            store.write_block(b, post[16 * b:16 * (b + 1)], labels[16 * b:16 * (b + 1)])
        store.finalize()
    return str(path)


def _readable_means(path) -> tuple[np.ndarray, np.ndarray]:
    store = open_store(path)
    keep = store.labels >= 0
    return store.read(np.arange(store.rows))[keep].astype(np.float64), store.labels[keep]


def test_pooled_features_equal_an_average_pool_of_the_image_view(tmp_path):
    path = _store(tmp_path / "s.zarr")
    post, labels = _readable_means(path)
    image_view = torch.from_numpy(post[:, 0, 0])
    for pool in (1, 2, 8):
        x, y = pooled_features(open_store(path), pool)
        ref = torch.nn.functional.avg_pool2d(image_view, 8 // pool).flatten(1).numpy()
        assert x.dtype == np.float64 and x.shape == (39, 4 * pool * pool) and np.array_equal(y, labels)
        np.testing.assert_allclose(x, ref, rtol=1e-12, atol=1e-12)

    x, y = pooled_features(open_store(path), 2, limit=10, seed=1)
    full, _ = pooled_features(open_store(path), 2)
    assert np.bincount(y).tolist() == [5, 5]
    assert all(any(np.array_equal(row, f) for f in full) for row in x)  # real rows, not the flipped view
    with pytest.raises(UserError, match="--pool 3 does not divide the 8x8 latent grid"):
        pooled_features(open_store(path), 3)


def test_linear_probe_matches_sklearn_separates_and_sits_at_chance_on_noise():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 600)
    # Overlapping classes, and features on very different scales: the standardisation matters.
    x = (rng.normal(size=(600, 8)) + 0.8 * rng.normal(size=(3, 8))[y]) * np.logspace(-2, 2, 8) + 7.0
    train, test = stratified_split(y, 0.2, seed=0)
    assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == 600
    assert np.allclose(np.bincount(y[test]), 0.2 * np.bincount(y), atol=1)

    l2 = 1e-2
    ours = linear_probe(x[train], y[train], x[test], y[test], l2=l2)
    scaler = StandardScaler().fit(x[train])
    ref = LogisticRegression(C=1 / (l2 * len(train)), tol=1e-10, max_iter=10_000)
    ref.fit(scaler.transform(x[train]), y[train])
    assert 0.5 < ours["test_accuracy"] < 0.99
    assert abs(ours["test_accuracy"] - ref.score(scaler.transform(x[test]), y[test])) <= 0.01
    assert abs(ours["train_accuracy"] - ref.score(scaler.transform(x[train]), y[train])) <= 0.01

    separable = rng.normal(size=(200, 5)) + 10 * (np.arange(200) % 2)[:, None]
    labels = np.arange(200) % 2
    train, test = stratified_split(labels, 0.2, seed=1)
    assert linear_probe(separable[train], labels[train], separable[test], labels[test]) == \
        {"train_accuracy": 1.0, "test_accuracy": 1.0}

    noise, random_labels = rng.normal(size=(1000, 8)), rng.integers(0, 4, 1000)
    train, test = stratified_split(random_labels, 0.2, seed=2)
    chance = linear_probe(noise[train], random_labels[train], noise[test], random_labels[test])
    assert abs(chance["test_accuracy"] - 0.25) < 0.08


def test_channel_stats_equal_numpy_over_every_view(tmp_path, monkeypatch):
    path = _store(tmp_path / "s.zarr")
    monkeypatch.setattr(analysis, "READ_ROWS", 7)  # many blocks: the running merge is exercised
    stats = channel_stats(open_store(path))
    post, _ = _readable_means(path)
    means = post[:, :, 0].transpose(2, 0, 1, 3, 4).reshape(4, -1)
    for key, ref in [("mean", means.mean(1)), ("std", means.std(1)), ("min", means.min(1)), ("max", means.max(1)),
                     ("posterior_std", post[:, :, 1].transpose(2, 0, 1, 3, 4).reshape(4, -1).mean(1))]:
        np.testing.assert_allclose(stats[key], ref, rtol=1e-12, err_msg=key)
    assert abs(stats["mean"][1] - 5) < 0.1  # the channel far from zero


def test_pca_equals_sklearn_up_to_sign():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6)) * [5, 3, 1, 0.5, 0.2, 0.1] @ np.linalg.qr(rng.normal(size=(6, 6)))[0] + 3
    ours, ref = pca_2d(x), PCA(2).fit_transform(x)
    for k in range(2):
        sign = np.sign(ours[:, k] @ ref[:, k])
        np.testing.assert_allclose(sign * ours[:, k], ref[:, k], atol=1e-9)


def test_tsne_keeps_separated_clusters_apart():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 50)
    x = rng.normal(size=(150, 10)) + 8 * rng.normal(size=(3, 10))[labels]

    y = tsne_2d(x, perplexity=10, seed=0)
    assert y.shape == (150, 2) and np.isfinite(y).all()
    reference = TSNE(2, perplexity=10, init="pca", random_state=0).fit_transform(x)  # scikit-learn's, as documented
    np.testing.assert_allclose(y, reference, rtol=1e-6, atol=1e-6)
    assert np.array_equal(y, tsne_2d(x, perplexity=10, seed=0))  # seeded
    assert trustworthiness(x, y, n_neighbors=5) > 0.9
    d = np.linalg.norm(y[:, None] - y[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    votes = labels[np.argsort(d, axis=1)[:, :5]]
    knn = np.array([np.bincount(v, minlength=3).argmax() for v in votes])
    assert (knn == labels).mean() >= 0.98


def test_cli_writes_json_plots_and_manifest(tmp_path):
    a, b = _store(tmp_path / "a.zarr", seed=0), _store(tmp_path / "b.zarr", seed=1)
    out = tmp_path / "analysis"
    result = CliRunner().invoke(main, ["analyze", a, b, "--out", str(out), "--method", "pca", "--pool", "2"])
    assert result.exit_code == 0, result.output
    assert "probe test accuracy" in result.output

    report = json.loads((out / "analysis.json").read_text())
    assert [s["name"] for s in report["stores"]] == ["a", "b"]
    first = report["stores"][0]
    assert first["path"] == a and first["vae_id"] == "vae0" and first["count"] == 39 and first["dims"] == 16
    assert first["probe"]["test_accuracy"] == 1.0 and first["probe"]["train"] + first["probe"]["test"] == 39
    assert len(first["channel_stats"]["std"]) == 4
    assert Image.open(out / "a.png").format == "PNG" and (out / "b.png").is_file()
    manifest = read_manifest(out, kind="analysis", format_version=1)
    verify_files(out, manifest)
    assert set(manifest["files"]) == {"analysis.json", "a.png", "b.png"}
    assert manifest["inputs"]["a"]["id"] == "store0" and manifest["metrics"]["b"]["probe_test_accuracy"] == 1.0
    again = CliRunner().invoke(main, ["analyze", a, "--out", str(out), "--method", "pca", "--pool", "2"])
    assert again.exit_code == 0, again.output  # its own earlier analysis is rewritten
    assert set(read_manifest(out, kind="analysis")["files"]) == {"analysis.json", "a.png"}


def _error_line(result) -> str:
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    return result.output.strip().splitlines()[-1]


def test_cli_refuses_with_one_line(tmp_path):
    store = _store(tmp_path / "s.zarr")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "x.txt").write_text("not latents")
    unfinished = _store(tmp_path / "u.zarr", finish=False)
    single = _store(tmp_path / "one.zarr", classes=("cat",))
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "manifest.json").write_text(json.dumps({"kind": "vae"}))
    cases = [
        ([str(tmp_path / "folder")], f"error: {tmp_path / 'folder'} is not a latent store (made by `reals encode`)"),
        ([store, "--pool", "3"],
         f"error: --pool 3 does not divide the 8x8 latent grid of {store}; pass one of 1, 2, 4, 8"),
        ([unfinished], f"error: {unfinished} is an unfinished latent store (0 of 3 blocks encoded); "
                       f"run the same `reals encode` command again to finish it"),
        ([single], f"error: {single} holds latents of 1 class(es); a linear probe needs two or more: "
                   f"encode a folder with one sub-folder per class"),
        ([store, "--out", str(tmp_path / "vae")],
         f"error: --out {tmp_path / 'vae'} holds a 'vae' artifact, not reals analyze's; pass a new --out"),
        ([store, "--out", str(tmp_path / "folder")],
         f"error: --out {tmp_path / 'folder'} holds x.txt, which reals analyze did not write; pass a new or empty --out"),
    ]
    for args, expected in cases:
        result = CliRunner().invoke(main, ["analyze", *args, "--method", "pca"])
        assert _error_line(result) == expected
    assert (tmp_path / "vae" / "manifest.json").is_file()  # the other artifact is left alone
    assert sorted(p.name for p in (tmp_path / "folder").iterdir()) == ["x.txt"]


def test_out_under_a_file_or_read_only_is_one_line_before_the_work(tmp_path, unwritable):
    store = _store(tmp_path / "s.zarr")
    (tmp_path / "file").write_text("x")
    result = CliRunner().invoke(main, ["analyze", store, "--method", "pca", "--out", str(tmp_path / "file" / "a")])
    assert _error_line(result) == (f"error: --out {tmp_path / 'file' / 'a'} is under {tmp_path / 'file'}, which is a "
                                   f"file; pass a path in a folder")
    result = CliRunner().invoke(main, ["analyze", store, "--method", "pca", "--out", str(unwritable / "a")])
    assert _error_line(result).startswith(f"error: --out {unwritable / 'a'} cannot be written: {unwritable} refuses "
                                          f"new files (")
