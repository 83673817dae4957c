"""`reals eval-fid`: a thin wrapper over `reals_cli.metrics.fid.compute_metrics`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..artifacts import atomic_write_json, provenance
from ..console import print_summary, warn
from ..errors import UserError
from .options import device_option

# fid.METRICS and inception.EXTRACTORS, spelled out so that `reals --help` does not import
# torch-fidelity (and torchvision); compute_metrics checks the values again.
METRICS = ("fid", "sfid", "kid", "pr", "is")
EXTRACTORS = ("auto", "offline", "torch-fidelity")


def _rows(r: dict) -> list[tuple[str, object]]:
    def value(key: str, metric: str, fmt: str = "{:.4f}") -> str:
        if r[key] is not None:
            return fmt.format(r[key])
        return f"unavailable: {r['unavailable'][metric]}" if metric in r["unavailable"] else "not requested"

    rows = [
        (r["label"], value("fid", "fid")),
        ("sFID", value("sfid", "sfid")),
        ("IS", value("inception_score", "is", "{:.3f}")),
        ("precision", value("precision", "pr", "{:.4f}")),
        ("recall", value("recall", "pr", "{:.4f}")),
        ("KID x 1e3", value("kid", "kid", "{:.4f}") if r["kid"] is None else
         f"{r['kid'] * 1e3:.4f} ± {r['kid_std'] * 1e3:.4f}"),
        ("samples", f"{r['num_samples']} ({r['samples']['kind']}, {r['resolution'][0]}x{r['resolution'][1]})"),
        ("reference", f"{r['num_reference']} ({r['reference']['kind']})"),
        ("extractor", f"{r['extractor']['name']} (sha256 {r['extractor']['weights_sha256'][:12]})"),
        ("seconds", r["seconds"]),
    ]
    if r["protocol"]:
        rows.append(("protocol", f"{r['protocol']['kind']} {r['protocol']['id']} ({r['protocol']['manifest']})"))
    return rows


@click.command("eval-fid", short_help="FID, sFID, IS, precision/recall and KID of samples.")
@click.argument("samples", required=False, type=click.Path(path_type=Path))
@click.option("--ref", required=True, type=click.Path(path_type=Path),
              help="Reference: ADM reference batch (.npz with mu/sigma), .npz of images, image folder, "
                   "class-folder tree, or a statistics file from --save-ref-stats.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Write the metrics JSON here (atomically); without it the JSON goes to stdout.")
@click.option("--save-ref-stats", type=click.Path(path_type=Path), default=None,
              help="Cache the reference statistics (mu, sigma, mu_s, sigma_s, pool features) in this .npz "
                   "(the name must end in .npz).")
@click.option("--ref-size", type=int, default=None,
              help="ADM center-crop size for image-folder references.  [default: the samples' size]")
@click.option("--metrics", default=",".join(METRICS), show_default=True,
              help=f"Comma-separated subset of {', '.join(METRICS)} (pr: precision/recall).")
@click.option("--batch-size", default=50, show_default=True, type=int, help="Images per Inception batch.")
@device_option
@click.option("--extractor", default="auto", show_default=True, type=click.Choice(EXTRACTORS),
              help="auto: torch-fidelity's Inception weights if they can be had, else the offline asset.")
@click.option("--inception-weights", type=click.Path(path_type=Path), default=None,
              help="A local copy of torch-fidelity's weights-inception-2015-12-05-*.pth (offline machines).")
def eval_fid_command(samples: Path, ref: Path, out: Path | None, save_ref_stats: Path | None, ref_size: int | None,
                     metrics: str, batch_size: int, device: str, extractor: str,
                     inception_weights: Path | None) -> None:
    """FID, sFID, IS, precision/recall and KID of SAMPLES against --ref, by ADM's definitions.

    SAMPLES: an ADM .npz (arr_0 = N x H x W x 3 uint8), a `reals sample` folder (samples.npz
    + manifest.json, whose config is recorded as the protocol) or a folder of images.
    The result is labelled FID-50K only for exactly 50,000 samples. Without SAMPLES,
    `--save-ref-stats` computes the reference statistics alone, once for many runs.
    """
    from ..artifacts import check_output_file
    from ..metrics.fid import compute_metrics, compute_reference_stats

    if samples is None:
        if save_ref_stats is None:
            raise UserError("give SAMPLES to evaluate, or --save-ref-stats FILE to cache the reference statistics alone")
        done = compute_reference_stats(ref, save_ref_stats, ref_size=ref_size, batch_size=batch_size, device=device,
                                       extractor=extractor, inception_weights=inception_weights)
        for message in done["warnings"]:
            warn(message)
        print_summary(f"reference statistics -> {save_ref_stats}", [
            ("images", done["count"]), ("resolution", "x".join(map(str, done["resolution"]))),
            ("extractor", done["extractor"]["name"]), ("seconds", done["seconds"])])
        return

    if out is not None:
        check_output_file(out, "--out", "metrics.json")
    chosen = [m.strip() for m in metrics.split(",") if m.strip()]
    result = compute_metrics(samples, ref, metrics=chosen, batch_size=batch_size, device=device,
                             extractor=extractor, inception_weights=inception_weights, ref_size=ref_size,
                             save_ref_stats=save_ref_stats)
    for message in result["warnings"]:
        warn(message)
    print_summary(f"eval-fid: {samples} vs {ref}", _rows(result))
    if out is not None:
        atomic_write_json(out, result | provenance())
    else:
        click.echo(json.dumps(result, indent=2, sort_keys=True))
