"""`reals data`: make and check image datasets (class-folder layout)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..runtime import SEED_MAX


@click.group("data", short_help="Export and check image datasets (class-folder layout).")
def data() -> None:
    """Make and check image datasets (one sub-folder per class, ImageNet train layout)."""


@data.command("fashion-mnist")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--size", default=64, show_default=True, type=click.IntRange(min=1), help="Output image side in pixels.")
@click.option("--limit", default=None, type=click.IntRange(min=1), help="Keep only the first N images of each split.")
@click.option(
    "--source", default=None, type=click.Path(path_type=Path),
    help="Folder with the four idx .gz files (default: the fetched offline asset, see `reals assets`).",
)
@click.option("--workers", default=None, type=click.IntRange(min=1), help="Worker processes [default: all CPUs].")
def fashion_mnist(out: Path, size: int, limit: int | None, source: Path | None, workers: int | None) -> None:
    """Export Fashion-MNIST to OUT/{train,test}/<class>/ as RGB PNGs with foreground masks.

    Resumable (files already written are kept); a finished export with the same
    settings is left as it is.
    """
    from ..console import console, print_summary
    from ..data.exports import export_fashion_mnist

    result = export_fashion_mnist(out, size=size, source=source, limit=limit, progress=True, workers=workers)
    if result["already"]:
        console.print(f"{out}: already exported with these settings; nothing to do", soft_wrap=True)
    print_summary(
        f"Fashion-MNIST -> {out}",
        [
            ("train images", result["train"]),
            ("test images", result["test"]),
            ("classes", f"{len(result['classes'])} ({result['classes'][0]} .. {result['classes'][-1]})"),
            ("size", f"{result['size']}x{result['size']} RGB + mask"),
            ("written / kept", f"{result['written']} / {result['kept']}"),
            ("seconds", f"{result['seconds']:.1f}"),
        ],
    )


@data.command("photos")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--size", default=32, show_default=True, type=click.IntRange(min=1), help="Output tile side in pixels.")
@click.option("--per-photo", default=300, show_default=True, type=click.IntRange(min=1), help="Tiles kept per photograph.")
def photos(out: Path, size: int, per_photo: int) -> None:
    """Cut scikit-image's photographs into tiles: OUT/train/<photo>/<x>_<y>.png.

    Natural images for `train-vae --extra-data`, at the depth demo's tile scale (96 px
    tiles every 32 px); the motorcycle's depth test columns are left out.
    """
    from ..console import print_summary
    from ..data.exports import export_photo_tiles

    result = export_photo_tiles(out, size=size, per_photo=per_photo)
    print_summary(f"photo tiles -> {out}", [("tiles", result["train"]), ("photos", len(result["per_photo"])),
                                            ("size", f"{size}x{size} RGB")])


@data.command("shapes")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--size", default=32, show_default=True, type=click.IntRange(min=8), help="Output image side in pixels.")
@click.option("--count", default=10_000, show_default=True, type=click.IntRange(min=1), help="Training scenes.")
@click.option("--test-count", default=None, type=click.IntRange(min=1), help="Test scenes [default: count / 5].")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, SEED_MAX),
              help="Scene i is a function of (seed, split, i).")
def shapes(out: Path, size: int, count: int, test_count: int | None, seed: int) -> None:
    """Render scenes of spheres, boxes and cylinders on a ground plane to OUT/{train,test}/<shape>/.

    Each image has an exact depth map (<stem>.depth.png, mm) and segmentation mask
    (<stem>.mask.png: background, ground, sphere, box, cylinder) beside it; its class is the
    type of its main shape. Deterministic: no download, the same seed gives the same files.
    """
    from ..console import console, print_summary
    from ..data.shapes import export_shapes

    result = export_shapes(out, size=size, count=count, test_count=test_count, seed=seed)
    if result["already"]:
        console.print(f"{out}: already rendered with these settings; nothing to do", soft_wrap=True)
    print_summary(f"shapes -> {out}", [("train images", result["train"]), ("test images", result["test"]),
                                       ("size", f"{size}x{size} RGB + mask + depth"),
                                       ("seconds", f"{result['seconds']:.1f}")])


@data.command("check")
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
@click.option("--split", default=None, help="Check only this split (train/test layouts); default: every split.")
@click.option("--masks", is_flag=True, help="Also check the <stem>.mask.png beside each image.")
@click.option("--workers", default=None, type=click.IntRange(min=1), help="Worker processes [default: all CPUs].")
@click.option("--show", default=10, show_default=True, type=click.IntRange(min=0), help="Bad files to list.")
def check(directory: Path, split: str | None, masks: bool, workers: int | None, show: int) -> None:
    """Decode every image in DIR and count the good and the bad ones.

    Exits with status 1 when any file is bad (so a Makefile stops there), 0 when all are good.
    """
    from ..console import console, labelled, print_summary
    from ..data.images import ImageFolder

    if split is None and (directory / "train").is_dir() and (directory / "test").is_dir():
        splits: list[str | None] = ["train", "test"]
    else:
        splits = [split]
    rows: list[tuple[str, object]] = []
    bad_all: list[tuple[str, str]] = []
    for s in splits:
        ds = ImageFolder(directory, size=8, flip=False, masks=masks, split=s)
        bad = ds.verify(workers=workers, progress=True)
        name = f"{s}: " if s else ""
        rows += [
            (f"{name}classes", len(ds.classes)),
            (f"{name}images", len(ds)),
            (f"{name}good", len(ds) - len(bad)),
            (f"{name}bad", len(bad)),
        ]
        bad_all += [(p, ds.bad[p]) for p in bad]
    print_summary(f"check {directory}", rows)
    for path, reason in bad_all[:show]:
        labelled("bad:", "yellow", f"{path}: {reason}")
    if len(bad_all) > show:
        console.print(f"... and {len(bad_all) - show} more")
    if bad_all:
        sys.exit(1)
