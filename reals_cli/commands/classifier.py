"""`reals classifier`: a thin wrapper over `reals_cli.metrics.classifier` (a domain metric beside Inception FID)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .options import FiniteFloat, device_option, seed_option


@click.group("classifier", short_help="A domain classifier: its feature-space FD and class accuracy of samples.")
def classifier() -> None:
    """A small CNN trained on the training split; samples are scored in its feature space."""


@classifier.command("fit")
@click.argument("data", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder for the artifact.")
@click.option("--image-size", default=32, show_default=True, type=click.IntRange(min=8), help="ADM centre-crop size.")
@click.option("--epochs", default=10, show_default=True, type=click.IntRange(min=1), help="Passes over train/.")
@click.option("--batch-size", default=128, show_default=True, type=click.IntRange(min=1), help="Images per step.")
@click.option("--lr", default=2e-3, show_default=True, type=FiniteFloat(min=0, min_open=True),
              help="AdamW learning rate (cosine decay to 0).")
@seed_option
@device_option
def fit(data: Path, out: Path, image_size: int, epochs: int, batch_size: int, lr: float, seed: int, device: str) -> None:
    """Train the classifier on DATA/train (a class-folder dataset) and score it on DATA/test."""
    from ..metrics.classifier import train_classifier

    train_classifier(data, out, image_size=image_size, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                     device=device)


@classifier.command("eval")
@click.argument("samples", type=click.Path(path_type=Path))
@click.option("--classifier", "model", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="A folder made by `reals classifier fit`.")
@click.option("--ref", required=True, type=click.Path(path_type=Path),
              help="Reference images: a class-folder split (e.g. DATA/test), an image folder or an .npz.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Write the metrics JSON here (atomically); without it the JSON goes to stdout.")
@click.option("--batch-size", default=250, show_default=True, type=click.IntRange(min=1), help="Images per batch.")
@device_option
def eval_(samples: Path, model: Path, ref: Path, out: Path | None, batch_size: int, device: str) -> None:
    """Classifier FD of SAMPLES against --ref, and the share of samples classified as the class they were drawn for.

    SAMPLES as for eval-fid; the class accuracy needs a `reals sample` folder (its arr_1 labels).
    """
    from ..artifacts import atomic_write_json, check_output_file, provenance
    from ..metrics.classifier import classifier_metrics
    from ..console import print_summary

    if out is not None:
        check_output_file(out, "--out", "classifier.json")
    r = classifier_metrics(samples, model, ref, batch_size=batch_size, device=device)
    accuracy = "no labels" if r["class_accuracy"] is None else f"{r['class_accuracy']:.4f} (chance {r['chance']:.3f})"
    print_summary(f"classifier: {samples} vs {ref}", [
        (r["label"], f"{r['fd']:.4f}"), ("class accuracy", accuracy),
        ("reference accuracy", "-" if r["reference_accuracy"] is None else f"{r['reference_accuracy']:.4f}"),
        ("samples / reference", f"{r['num_samples']} / {r['num_reference']}"), ("seconds", r["seconds"])])
    if out is not None:
        atomic_write_json(out, r | provenance())
    else:
        click.echo(json.dumps(r, indent=2, sort_keys=True))
