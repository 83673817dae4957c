"""Latent-space diagnostics (ReaLS, arXiv 2502.00359, Figure 1a): how much semantics a latent store carries.

For each store: a linear probe (multinomial logistic regression on average-pooled
posterior means, seeded stratified train/test split), per-channel statistics, and a
2-D t-SNE or PCA scatter coloured by class. The paper's claim is that aligning the
VAE's latents with a vision foundation model makes them more semantic: a ReaLS store
should probe better than a store of the same VAE trained with `--align-weight 0`.

Everything is a plain function of a `LatentStore` or of arrays, so a notebook can use
the pieces; `analyze` runs them all and writes `analysis.json`, one PNG per store and
a manifest.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..artifacts import MANIFEST, atomic_path, atomic_write_json, check_output_folder, describe_input, write_manifest
from ..console import progress
from ..data.latent_store import LatentDataset, LatentStore
from ..errors import UserError
from .training import AT_LEAST_ONE, SEED, check_values

KIND, FORMAT_VERSION = "analysis", 1
METHODS = ("tsne", "pca")
PLOT_POINTS = 2000  # a scatter of more is unreadable, and t-SNE's time grows with them
READ_ROWS = 1024  # images per read: bounded memory whatever the store's size
MAX_LEGEND = 20  # more classes than this make a legend unreadable; colours alone remain


# -- reading ----------------------------------------------------------------------------------------

def balanced_subset(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of `n` items, as even over the classes as they allow, chosen at random by `seed`."""
    if n >= len(labels):
        return np.arange(len(labels))
    order = np.random.default_rng(seed).permutation(len(labels))
    # Each item's rank within its class in the shuffled order: taking the lowest ranks first
    # takes one item of every class, then a second of every class, and so on.
    rank = np.empty(len(labels), np.int64)
    for c in np.unique(labels):
        members = order[labels[order] == c]
        rank[members] = np.arange(len(members))
    return np.sort(order[np.argsort(rank[order], kind="stable")[:n]])


def select_rows(store: LatentStore, limit: int | None = None, seed: int = 0) -> np.ndarray:
    """The store rows analysed: every readable image (label -1 has no latent), or a balanced `limit` of them."""
    rows = np.flatnonzero(store.labels >= 0)
    return rows if limit is None else rows[balanced_subset(store.labels[rows], limit, seed)]


def _posteriors(store: LatentStore, rows: np.ndarray):
    """The posteriors (n x V x 2 x C x H x W, float64) of `rows`, a bounded block at a time."""
    for start in range(0, len(rows), READ_ROWS):
        yield store.read(rows[start:start + READ_ROWS]).astype(np.float64)


def check_pool(store: LatentStore, pool: int) -> None:
    _, h, w = store.latent_shape
    if pool < 1 or h % pool or w % pool:
        divisors = [d for d in range(1, min(h, w) + 1) if h % d == 0 and w % d == 0]
        raise UserError(f"--pool {pool} does not divide the {h}x{w} latent grid of {store.path}; "
                        f"pass one of {', '.join(map(str, divisors))}")


def pooled_features(store: LatentStore, pool: int, limit: int | None = None,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(N x C*pool*pool float64 features, N labels): each image's posterior mean (view 0, not the
    flipped copy) average-pooled to C x pool x pool and flattened; pool=1 is the global average."""
    check_pool(store, pool)
    rows = select_rows(store, limit, seed)
    c, h, w = store.latent_shape
    blocks = [post[:, 0, 0].reshape(len(post), c, pool, h // pool, pool, w // pool).mean(axis=(3, 5))
              .reshape(len(post), -1) for post in _posteriors(store, rows)]
    return np.concatenate(blocks) if blocks else np.zeros((0, c * pool * pool)), store.labels[rows]


def channel_stats(store: LatentStore, rows: np.ndarray | None = None) -> dict[str, list[float]]:
    """Per channel, over every view of `rows` (default: every readable image): mean, std, min and max
    of the posterior mean, and the average posterior std (how much noise the encoder adds)."""
    rows = select_rows(store) if rows is None else rows
    c = store.latent_shape[0]
    n, mean, m2, post_std = 0, np.zeros(c), np.zeros(c), np.zeros(c)
    lo, hi = np.full(c, np.inf), np.full(c, -np.inf)
    for post in _posteriors(store, rows):
        x = post[:, :, 0].transpose(2, 0, 1, 3, 4).reshape(c, -1)
        # Chan et al.'s merge of (count, mean, sum of squared deviations): a plain sum of squares
        # cancels badly when a channel's mean is large next to its spread.
        k, block_mean = x.shape[1], x.mean(axis=1)
        delta = block_mean - mean
        m2 += ((x - block_mean[:, None]) ** 2).sum(axis=1) + delta**2 * n * k / (n + k)
        mean += delta * k / (n + k)
        n += k
        lo, hi = np.minimum(lo, x.min(axis=1)), np.maximum(hi, x.max(axis=1))
        post_std += post[:, :, 1].transpose(2, 0, 1, 3, 4).reshape(c, -1).sum(axis=1)
    return {"mean": mean.tolist(), "std": np.sqrt(m2 / max(n, 1)).tolist(), "min": lo.tolist(),
            "max": hi.tolist(), "posterior_std": (post_std / max(n, 1)).tolist()}


# -- linear probe -----------------------------------------------------------------------------------

def stratified_split(labels: np.ndarray, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices: `test_fraction` of each class, at random by `seed`; every class keeps
    at least one training item."""
    rng = np.random.default_rng(seed)
    test = [members[:min(len(members) - 1, round(len(members) * test_fraction))]
            for members in (rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels))]
    test = np.sort(np.concatenate(test)) if test else np.zeros(0, np.int64)
    return np.setdiff1d(np.arange(len(labels)), test), test


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 l2: float = 1e-3, max_iter: int = 2000) -> dict[str, float]:
    """Train and test accuracy of multinomial logistic regression on standardised features.

    Minimises mean cross-entropy + l2/2 |W|^2 (bias unpenalised) full-batch in float64 with
    L-BFGS, to convergence: the optimum of sklearn's LogisticRegression(C=1 / (l2 * len(train_x))).
    """
    mean, std = train_x.mean(axis=0), train_x.std(axis=0)
    std[std == 0] = 1.0  # a constant feature: leave it at zero rather than divide by zero
    xtr, xte = (torch.from_numpy((x - mean) / std) for x in (train_x, test_x))
    ytr, yte = torch.from_numpy(train_y).long(), torch.from_numpy(test_y).long()
    classes = int(max(ytr.max(), yte.max())) + 1
    w = torch.zeros(xtr.shape[1], classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-14,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xtr @ w + b, ytr) + 0.5 * l2 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return {"train_accuracy": float(((xtr @ w + b).argmax(1) == ytr).double().mean()),
                "test_accuracy": float(((xte @ w + b).argmax(1) == yte).double().mean())}


# -- 2-D embeddings ---------------------------------------------------------------------------------

def pca_2d(x: np.ndarray) -> np.ndarray:
    """Projection of the centred data on its first two principal axes (SVD)."""
    centred = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:2].T


def tsne_2d(x: np.ndarray, perplexity: float = 30.0, seed: int = 0) -> np.ndarray:
    """scikit-learn's t-SNE (Barnes-Hut, PCA initialisation, its learning rate "auto"), seeded.
    The perplexity is capped at (n - 1) / 3: a row's entropy cannot exceed log(n - 1)."""
    from sklearn.manifold import TSNE

    perplexity = min(perplexity, (len(x) - 1) / 3)
    return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(np.asarray(x, np.float64))


def plot_embedding(xy: np.ndarray, labels: np.ndarray, class_names: list[str], path: str | Path, title: str) -> None:
    """A scatter of the 2-D points coloured by class (legend up to MAX_LEGEND classes), saved atomically as PNG."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    k = len(class_names)
    cmap = matplotlib.colormaps["tab10" if k <= 10 else "tab20" if k <= 20 else "turbo"]
    colors = cmap(np.arange(k) if k <= 20 else np.linspace(0, 1, k))
    fig = Figure(figsize=(7, 6), dpi=120)  # no pyplot: no global figure state, no display backend
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.scatter(xy[:, 0], xy[:, 1], c=colors[labels], s=6, linewidths=0)
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    if k <= MAX_LEGEND:
        handles = [Line2D([], [], ls="", marker="o", color=colors[c], label=class_names[c]) for c in np.unique(labels)]
        ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


# -- everything, for the CLI ------------------------------------------------------------------------

def _open(path: str, pool: int) -> LatentStore:
    """A complete store with two classes or more whose grid `pool` divides, or one line saying why not."""
    store = LatentDataset(path, raw=True).store  # refuses a missing, foreign or unfinished store
    classes = np.unique(store.labels[store.labels >= 0])
    if len(classes) < 2:
        raise UserError(f"{path} holds latents of {len(classes)} class(es); a linear probe needs two or more: "
                        f"encode a folder with one sub-folder per class")
    check_pool(store, pool)
    return store


def _names(paths: list[str]) -> list[str]:
    """Distinct short names for the table and the PNGs: the store's stem, with its folder if stems repeat."""
    for name in (lambda p: Path(p).stem, lambda p: f"{Path(p).parent.name}-{Path(p).stem}"):
        names = [name(p) for p in paths]
        if len(set(names)) == len(names):
            return names
    return [f"{i}-{Path(p).stem}" for i, p in enumerate(paths)]


def analyze(stores: list[str], out: str | Path | None = None, method: str = "tsne", pool: int = 4,
            limit: int | None = None, test_fraction: float = 0.2, seed: int = 0, perplexity: float = 30.0,
            l2: float = 1e-3) -> dict:
    """Probe, channel statistics and (with `out`) a 2-D embedding plot of each latent store.

    With `out`, writes out/analysis.json, out/<name>.png per store and out/manifest.json (last).
    """
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; pass one of {', '.join(METHODS)}")
    if not 0 < test_fraction < 1:
        raise UserError(f"--test-fraction {test_fraction} is not between 0 and 1 (exclusive)")
    check_values({"perplexity": perplexity, "seed": seed}, {"perplexity": AT_LEAST_ONE, "seed": SEED})
    paths = [str(p) for p in stores]
    opened = [_open(p, pool) for p in paths]  # every refusal before any work
    if out is not None:  # never write into another artifact or among unrelated files
        check_output_folder(out, KIND, ["analysis.json", "*.png"], "reals analyze")
    config = {"method": method, "pool": pool, "limit": limit, "test_fraction": test_fraction, "seed": seed,
              "perplexity": perplexity, "l2": l2, "plot_points": PLOT_POINTS}
    if out is not None:
        out = Path(out)
        (out / MANIFEST).unlink(missing_ok=True)  # a run killed halfway must not look finished
    results = []
    with progress(transient=True) as bar:
        task = bar.add_task("analyze", total=len(paths) * (3 if out is None else 4))
        for name, path, store in zip(_names(paths), paths, opened):
            started = time.perf_counter()
            bar.update(task, status=f"{name}: features")
            x, y = pooled_features(store, pool, limit, seed)
            train, test = stratified_split(y, test_fraction, seed)
            if len(test) == 0:
                raise UserError(f"{path}: {len(y)} latents are too few for a train/test split; "
                                f"raise --limit or --test-fraction")
            bar.update(task, advance=1, status=f"{name}: linear probe")
            probe = linear_probe(x[train], y[train], x[test], y[test], l2=l2)
            bar.update(task, advance=1, status=f"{name}: channel statistics")
            stats = channel_stats(store, select_rows(store, limit, seed))
            bar.update(task, advance=1)
            plot = None
            if out is not None:
                bar.update(task, status=f"{name}: {method}")
                keep = balanced_subset(y, PLOT_POINTS, seed)
                xy = tsne_2d(x[keep], perplexity, seed) if method == "tsne" else pca_2d(x[keep])
                plot = f"{name}.png"
                title = (f"{name}: {'t-SNE' if method == 'tsne' else 'PCA'} of {len(keep)} latents (pool {pool}), "
                         f"probe test accuracy {probe['test_accuracy']:.3f}")
                plot_embedding(xy, y[keep], store.classes, out / plot, title)
                bar.update(task, advance=1)
            results.append({"name": name, "path": path, "vae_id": store.vae_id, "count": len(y),
                            "classes": len(np.unique(y)), "latent_shape": list(store.latent_shape), "pool": pool,
                            "dims": x.shape[1], "probe": {**probe, "train": len(train), "test": len(test)},
                            "channel_stats": stats, "plot": plot, "seconds": time.perf_counter() - started})
    result = {"config": config, "stores": results}
    if out is not None:
        atomic_write_json(out / "analysis.json", result)
        inputs = {r["name"]: {**describe_input(r["path"]), "id": s.attrs.get("id"), "vae_id": r["vae_id"]}
                  for r, s in zip(results, opened)}
        metrics = {r["name"]: {"probe_test_accuracy": r["probe"]["test_accuracy"]} for r in results}
        write_manifest(out, KIND, FORMAT_VERSION, config, inputs, metrics,
                       files=["analysis.json", *(r["plot"] for r in results)])
    return result
