"""`reals probe-seg` and `reals probe-depth`: thin wrappers over `reals_cli.pipeline.probes`."""

from __future__ import annotations

from pathlib import Path

import click

from ..data.probe_sets import DEPTH_FORMATS, SEG_FORMATS
from .options import FINITE, FiniteFloat, device_option, precision_option, seed_option

TASKS = {
    "seg": ("probe-seg", "segmentation", SEG_FORMATS),
    "depth": ("probe-depth", "depth", DEPTH_FORMATS),
}


def _apply(f, decorators):
    for decorator in reversed(decorators):
        f = decorator(f)
    return f


def _classes(value: str | None) -> list[str] | None:
    """A comma-separated list, or a text file with one class name per line."""
    from ..errors import UserError

    if value is None:
        return None
    if Path(value).is_file():
        names = [line.strip() for line in Path(value).read_text().splitlines() if line.strip()]
    else:
        names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:  # an empty list would silently mean the format's default classes
        raise UserError(f"--classes {value!r} names no class; pass names separated by commas "
                        f"(e.g. background,object), or a file with one per line")
    return names


def _data_options(task: str, eval_: bool) -> list:
    formats = TASKS[task][2]
    data_help = ("VOC-layout folder, ADE20K folder, or class folders with <stem>.mask.png masks" if task == "seg" else
                 "nyu_depth_v2_labeled.mat, a folder of images + 16-bit <stem>.depth.png (mm), or 'motorcycle' (demo)")
    options = [
        click.option("--data", "data_path", required=eval_, help=data_help + "."),
        click.option("--format", "fmt", default="auto", show_default=True, type=click.Choice(["auto", *formats]),
                     help="Layout of --data (auto: detected)."),
        click.option("--limit", default=None, type=click.IntRange(min=1),
                     help="Use N evenly spaced images of the split [default: all]."),
    ]
    if task == "seg" and not eval_:  # at eval time the head's class list is used
        options.append(click.option("--classes", default=None,
                                    help="Class names, comma-separated or a file with one per line "
                                         "[default: VOC's 21, ADE's 150, or background,object for mask folders]."))
    if task == "depth":
        options += [
            click.option("--splits", default=None, type=click.Path(dir_okay=False),
                         help="NYU splits.mat (trainNdxs/testNdxs) [default: first 80% train, last 20% test]; "
                              "NYU only: the other formats have their own splits."),
            click.option("--depth-scale", default=1000.0, show_default=True, type=FiniteFloat(min=0, min_open=True),
                         help="Depth PNG units per metre (1000: millimetres)."),
        ]
    return options + [
        click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1), help="Images per batch."),
        click.option("--cache-dir", default=None, type=click.Path(file_okay=False),
                     help="Where teacher features are cached [default: $REALS_HOME/probe-features]."),
        device_option,
        precision_option,
    ]


def _spec(task, data_path, fmt, limit, classes=None, splits=None, depth_scale=1000.0):
    from ..pipeline.probes import DataSpec

    return DataSpec(task, data_path, fmt, limit, _classes(classes), splits, depth_scale)


def _make_group(task: str) -> click.Group:
    name, what, _ = TASKS[task]

    @click.group(name, help=f"Training-free {what}: a linear head fitted on teacher features, read from latents.")
    def group() -> None:
        pass

    def fit(data_path, vae, out, fmt, limit, classes=None, splits=None, depth_scale=1000.0, dinov2_head=None, **flags):
        from ..errors import UserError
        from ..pipeline.probes import fit_head

        if data_path is None and dinov2_head is None:
            raise UserError("--data is required (or --dinov2-head to import DINOv2's released depth head)"
                            if task == "depth" else "--data is required: the labelled images to fit the head on")
        fit_head(_spec(task, data_path, fmt, limit, classes, splits, depth_scale), vae, out,
                 dinov2_head=dinov2_head, **flags)

    fit_options = [
        *_data_options(task, eval_=False),
        click.option("--vae", required=True, help="The ReaLS VAE (`reals train-vae`): its teacher settings are used."),
        click.option("--out", required=True, help="Output folder for the head artifact."),
        click.option("--split", default="train", show_default=True, help="Split to fit on."),
        click.option("--epochs", default=20, show_default=True, type=click.IntRange(min=1), help="Passes over the split."),
        click.option("--lr", default=1e-3, show_default=True, type=FiniteFloat(min=0, min_open=True),
                     help="AdamW learning rate (decayed linearly to 0)."),
        seed_option,
    ]
    if task == "depth":
        fit_options += [
            click.option("--min-depth", default=None, type=FINITE,
                         help="Lowest bin centre, m [default: NYU 0.001, else the training data's minimum]."),
            click.option("--max-depth", default=None, type=FINITE,
                         help="Highest bin centre, m [default: NYU 10, else the training data's maximum]."),
            click.option("--bins", default=256, show_default=True, type=click.IntRange(min=1), help="Depth bins."),
            click.option("--dinov2-head", default=None, type=click.Path(dir_okay=False),
                         help="Import DINOv2's released dinov2_vit*14_*_linear_head.pth instead of fitting."),
        ]
    group.command("fit", help=f"Fit a {what} head on teacher features of labelled images (features cached).")(
        _apply(fit, fit_options))

    def eval_(data_path, vae, head, fmt, limit, splits=None, depth_scale=1000.0, **flags):
        from ..pipeline.probes import evaluate_head

        evaluate_head(_spec(task, data_path, fmt, limit, None, splits, depth_scale), vae, head, **flags)

    eval_options = [
        *_data_options(task, eval_=True),
        click.option("--vae", required=True, help="The ReaLS VAE whose aligned latents are scored (b)."),
        click.option("--head", required=True, help=f"A head folder made by `reals {name} fit`" + (
            " (a DINOv2 .pth goes through `fit --dinov2-head` first)." if task == "depth" else ".")),
        click.option("--baseline-vae", default=None, help="A VAE trained with --align-weight 0, scored the same way (c)."),
        click.option("--latents", default=None,
                     help="Generated latents of --vae, e.g. `reals sample`'s latents.zarr (or a .safetensors/.npz "
                          "with 'latents' N x C x h x w, unnormalised). They have no ground truth: the head on "
                          "align(latent) is scored against the head on the teacher's features of the decoded image."),
        click.option("--baseline-latents", default=None, help="Generated latents of --baseline-vae, scored the same way."),
        click.option("--latent-count", default=1000, show_default=True, type=click.IntRange(min=1),
                     help="Generated latents scored, from the first."),
        click.option("--out", default=None, help="Folder for metrics.json, panels and a manifest: new, empty or an "
                                                 "earlier eval's [default: HEAD/eval-SPLIT]."),
        click.option("--split", default="test", show_default=True, help="Held-out split (VOC: test reads val.txt)."),
        click.option("--panels", default=8, show_default=True, type=click.IntRange(min=0),
                     help="Images drawn in panels.png (and generated latents in generated-*.png); 0: no panels."),
    ]
    group.command("eval", help="Score the head on teacher features (a), the VAE's aligned latents (b) and a "
                               "baseline VAE's (c); write a table, metrics.json, panels and a manifest.")(
        _apply(eval_, eval_options))
    return group


probe_seg = _make_group("seg")
probe_depth = _make_group("depth")
