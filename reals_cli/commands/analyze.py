"""`reals analyze`: a thin wrapper over `reals_cli.pipeline.analysis.analyze`."""

from __future__ import annotations

import click
from rich.table import Table

from .options import FiniteFloat, seed_option


def _table(result: dict) -> Table:
    """One column per store, so that a ReaLS store and its baseline read side by side."""
    stores = result["stores"]
    config = result["config"]
    table = Table(title=f"analyze (pool {config['pool']}, {config['method']})", title_justify="left")
    table.add_column(style="bold")
    for s in stores:
        table.add_column(s["name"])
    rows = [
        ("probe test accuracy", lambda s: f"{s['probe']['test_accuracy']:.4f} ({s['probe']['test']} latents)"),
        ("probe train accuracy", lambda s: f"{s['probe']['train_accuracy']:.4f} ({s['probe']['train']} latents)"),
        ("latents", lambda s: f"{s['count']} ({s['classes']} classes)"),
        ("pooled dims", lambda s: f"{s['dims']} ({s['latent_shape'][0]}x{s['pool']}x{s['pool']})"),
        ("latent std per channel", lambda s: " ".join(f"{v:.3g}" for v in s["channel_stats"]["std"])),
        ("latent mean per channel", lambda s: " ".join(f"{v:.3g}" for v in s["channel_stats"]["mean"])),
        ("posterior std per channel", lambda s: " ".join(f"{v:.3g}" for v in s["channel_stats"]["posterior_std"])),
        ("VAE", lambda s: s["vae_id"]),
        ("plot", lambda s: s["plot"] or "-"),
    ]
    for label, cell in rows:
        table.add_row(label, *(cell(s) for s in stores))
    return table


@click.command("analyze", short_help="Latent-space diagnostics: linear probe, channel stats, t-SNE/PCA plot.")
@click.argument("stores", nargs=-1, required=True)
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Write analysis.json, one <store>.png plot per store and a manifest here "
                   "[default: print the table only, no plot].")
@click.option("--method", default="tsne", show_default=True, type=click.Choice(["tsne", "pca"]),
              help="2-D embedding of the plot (at most 2000 latents, class-balanced): exact t-SNE or PCA.")
@click.option("--pool", default=4, show_default=True, type=click.IntRange(min=1),
              help="Average-pool each posterior mean to C x POOL x POOL before the probe (1: global average); "
                   "must divide the latent grid.")
@click.option("--limit", default=None, type=click.IntRange(min=2),
              help="Analyse N latents per store, class-balanced, chosen by --seed [default: all].")
@click.option("--test-fraction", default=0.2, show_default=True,
              type=FiniteFloat(0, 1, min_open=True, max_open=True),
              help="Share of each class held out to test the linear probe.")
@click.option("--perplexity", default=30.0, show_default=True, type=FiniteFloat(min=1),
              help="t-SNE perplexity: roughly the number of neighbours each point keeps close.")
@seed_option
def analyze_command(stores, out, method, pool, limit, test_fraction, perplexity, seed):
    """Linear-probe accuracy, per-channel statistics and a 2-D plot of each latent store STORES.

    The probe is multinomial logistic regression on the pooled posterior means (image view,
    not the flip), on a seeded stratified train/test split: higher test accuracy means
    more linearly decodable class semantics. Pass a ReaLS store and a baseline store to
    compare them in one table.
    """
    from ..console import console
    from ..pipeline.analysis import analyze

    result = analyze(list(stores), out, method=method, pool=pool, limit=limit, test_fraction=test_fraction,
                     seed=seed, perplexity=perplexity)
    console.print(_table(result))
    if out is not None:
        console.print(f"wrote {out}/analysis.json, the plots and the manifest", soft_wrap=True)
