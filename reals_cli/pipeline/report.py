"""One Markdown page from a pipeline folder: the metrics table, the pictures, the commands.

The Makefile pipelines lay their artifacts out the same way, and this module reads that
layout (nothing is recomputed; a missing artifact is a blank cell):

    ROOT/<variant>/vae/               train-vae         (a variant: any folder holding vae/)
    ROOT/<variant>/latents.zarr       encode
    ROOT/<variant>/sit/               train-dit
    ROOT/<variant>/samples/, fid.json               sample + eval-fid with guidance
    ROOT/<variant>/samples-nocfg/, fid-nocfg.json   the same without guidance
    ROOT/<variant>/analysis/analysis.json           analyze (latent linear probe)
    ROOT/seg/eval-test/metrics.json, ROOT/depth/eval-test/metrics.json   probe-seg / probe-depth eval
    ROOT/<variant>/seg/eval-test/metrics.json, ...  the same, scoring that variant's VAE alone

The probe files name the VAEs they compared (by id); each result lands in the row of its VAE.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
from rich.table import Table

from ..artifacts import MANIFEST, atomic_path, atomic_write_bytes, check_output_file
from ..console import console
from ..errors import UserError
from ..metrics.intervals import format_interval, t_interval
from ..runtime import describe_machine

COLUMNS = [  # (header, key, format)
    ("KL weight", "kl", "{:g}"), ("align weight", "align_weight", "{:g}"),
    ("align weight used (adaptive, last 100 steps)", "align_w_used", "{:.3g}"), ("PSNR", "psnr", "{:.2f}"),
    ("LPIPS", "lpips", "{:.3f}"), ("cos patch", "cos_patch", "{:.3f}"), ("cos global", "cos_global", "{:.3f}"),
    ("latent std", "latent_std", "{:.2f}"), ("SiT loss", "dit_loss", "{:.3f}"),
    ("FID", "fid", "{:.1f}"), ("FID no cfg", "fid_nocfg", "{:.1f}"), ("sFID", "sfid", "{:.1f}"),
    ("Prec", "precision", "{:.3f}"), ("Rec", "recall", "{:.3f}"), ("probe acc", "probe_acc", "{:.3f}"),
    ("mIoU", "miou", "{:.3f}"), ("depth RMSE", "rmse", "{:.3f}"),
]


SETTINGS = ("kl", "align_weight")  # the VAE recipe's knobs among COLUMNS: shown only where they vary


def json_or_none(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def variants(root: Path) -> list[Path]:
    """Sub-folders holding a finished VAE: the `baseline` first, as in the paper's tables, then by KL weight."""
    found = [p for p in root.iterdir() if (p / "vae" / MANIFEST).is_file()]
    return sorted(found, key=lambda p: (p.name != "baseline", json_or_none(p / "vae" / MANIFEST)["config"].get("kl", 0), p.name))


# (task, the score each VAE's row shows, the heading of the task's own table)
PROBES = (("seg", "miou", "Segmentation probe"), ("depth", "rmse", "Depth probe"))


def probe_evaluations(root: Path) -> dict[str, dict]:
    """{task: its eval-test/metrics.json} for the probe evaluations under root."""
    found = {task: json_or_none(root / task / "eval-test" / "metrics.json") for task, _, _ in PROBES}
    return {task: m for task, m in found.items() if m}


def variant_probe_evaluations(folders: list[Path]) -> dict[str, dict[str, dict]]:
    """{variant: {task: metrics}} for the evaluations that scored one variant's VAE (ROOT/<variant>/<task>/eval-test)."""
    return {p.name: e for p in folders if (e := probe_evaluations(p))}


def probe_results(evaluations: dict[str, dict]) -> dict[str, dict]:
    """{VAE id: {"miou" or "rmse": value}}: each probe score under the VAE it was measured through."""
    by_vae: dict[str, dict] = {}
    for task, key, _ in PROBES:
        m = evaluations.get(task)
        for way, side in (("reals", "vae"), ("baseline", "baseline_vae")):
            if m and m.get(side) and way in m["results"]:
                by_vae.setdefault(m[side]["id"], {})[key] = m["results"][way][key]
    return by_vae


def variant_row(folder: Path, probes: dict[str, dict]) -> dict:
    """Every number the pipeline measured for one variant (absent ones left out)."""
    row: dict = {}
    vae = json_or_none(folder / "vae" / MANIFEST)
    if vae:
        v = vae["metrics"]
        row |= {"psnr": v.get("psnr"), "lpips": v.get("lpips"), "cos_patch": v.get("align_cos_patch"),
                "cos_global": v.get("align_cos_global"), "kl": vae["config"].get("kl"),
                "align_weight": vae["config"].get("align_weight")}
        if v.get("latent_std"):
            row["latent_std"] = sum(v["latent_std"]) / len(v["latent_std"])
        if vae["config"].get("align_balance") == "adaptive":  # the weight the gradient norms chose
            from .training import read_log  # here: torch, which it imports, is slow to load for a report

            steps = [r for r in read_log(folder / "vae" / "log.jsonl") if "align_w" in r]
            last = [r["align_w"] for r in steps if r["step"] > steps[-1]["step"] - 100] if steps else []
            row["align_w_used"] = sum(last) / len(last) if last else None
    dit = json_or_none(folder / "sit" / MANIFEST)
    if dit:
        row["dit_loss"] = dit["metrics"].get("final_loss")
    for name, suffix in (("fid.json", ""), ("fid-nocfg.json", "_nocfg")):
        fid = json_or_none(folder / name)
        if fid:
            row[f"fid{suffix}"] = fid.get("fid")
            if not suffix:
                row |= {k: fid.get(k) for k in ("sfid", "precision", "recall")}
                row["fid_label"] = fid.get("label")
    analysis = json_or_none(folder / "analysis" / "analysis.json")
    if analysis:
        row["probe_acc"] = analysis["stores"][0]["probe"]["test_accuracy"]
    row |= probes.get(vae["id"], {}) if vae else {}
    return {k: v for k, v in row.items() if v is not None}


def _cell(row: dict, key: str, fmt: str) -> str:
    return fmt.format(row[key]) if key in row else "–"


def results_table(rows: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """Headers and cells: the columns some row has; a setting (KL, alignment weight) only where it varies."""
    cols = [c for c in COLUMNS if any(c[1] in r for r in rows.values())
            and (c[1] not in SETTINGS or len({r.get(c[1]) for r in rows.values()}) > 1)]
    return ["variant", *[h for h, _, _ in cols]], [[name, *[_cell(r, k, f) for _, k, f in cols]] for name, r in rows.items()]


SEEDED = re.compile(r"^(?P<recipe>.+)-s(?P<seed>\d+)$")  # a variant folder <recipe>-s<VAE seed>
SEED_KEYS = ("align_w_used", "psnr", "lpips", "cos_patch", "cos_global", "latent_std", "miou", "rmse")


def seed_table(rows: dict[str, dict]) -> list[str]:
    """Markdown: each recipe that ran with several VAE seeds (variants named <recipe>-s<seed>),
    every number as its mean and 95% t-interval over the seeds. Nothing when no recipe has two."""
    groups: dict[str, list[tuple[int, dict]]] = {}
    for name, row in rows.items():
        if m := SEEDED.match(name):
            groups.setdefault(m["recipe"], []).append((int(m["seed"]), row))
    if not any(len(runs) > 1 for runs in groups.values()):
        return []
    cols = [c for c in COLUMNS if c[1] in SEED_KEYS and any(c[1] in r for runs in groups.values() for _, r in runs)]
    cells = [[recipe, ", ".join(str(seed) for seed, _ in sorted(runs, key=lambda sr: sr[0])),
              *[format_interval(t_interval([r.get(key) for _, r in runs]), fmt) for _, key, fmt in cols]]
             for recipe, runs in groups.items()]
    return ["## Across VAE seeds", "",
            "Mean over the VAE seeds with its 95% t-interval [lo, hi]; with two seeds t(0.975, 1) = 12.7, so an "
            "interval is about 9 times the gap between the two values.", "",
            markdown_table(["recipe", "VAE seeds", *[h for h, _, _ in cols]], cells), ""]


def markdown_table(headers: list[str], cells: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])


def _manifests(root: Path) -> list[tuple[Path, dict]]:
    """Every artifact and metrics file under root that records the command that made it, oldest first."""
    found = []
    for source in sorted(root.rglob("*.json")):
        path = source
        if path.name == "metrics.json" and (path.parent / MANIFEST).is_file():
            continue  # a probe evaluation's: its manifest records the same command
        if path.name in (MANIFEST, "metrics.json") or path.parent == root or path.name.startswith("fid"):
            m = json_or_none(path)
        elif path.name == "zarr.json" and path.parent.suffix == ".zarr" and not (path.parent.parent / MANIFEST).is_file():
            # an `encode` store keeps it in its attributes (a store inside another artifact is that one's)
            m = (json_or_none(path) or {}).get("attributes")
            path = path.parent
        else:
            continue
        if m and m.get("command"):
            found.append((path, m, source.stat().st_mtime))
    return [(path, m) for path, m, _ in sorted(found, key=lambda item: item[2])]


def _grid_rows(samples: Path) -> str:
    """The class of each row of `reals sample`'s grid: the first ten classes drawn, by class id."""
    classes = ((json_or_none(samples / "latents.zarr" / "zarr.json") or {}).get("attributes") or {}).get("classes")
    try:
        with np.load(samples / "samples.npz") as npz:
            labels = npz["arr_1"].tolist()
    except (OSError, KeyError, ValueError):
        return ""
    rows = sorted(list(dict.fromkeys(labels))[:10])
    return f" (top to bottom: {', '.join(classes[i] if classes else str(i) for i in rows)})"


def _image(md: list[str], out: Path, root: Path, title: str, path: Path) -> None:
    """Link a picture; a page outside ROOT (docs/) gets its own copy in <page>-images/."""
    if not path.is_file():
        return
    if not out.resolve().is_relative_to(root.resolve()):
        copy = out.parent / f"{out.stem}-images" / str(path.relative_to(root)).replace(os.sep, "-")
        copy.parent.mkdir(parents=True, exist_ok=True)
        if not copy.is_file() or copy.read_bytes() != path.read_bytes():
            atomic_write_bytes(copy, path.read_bytes())
        path = copy
    md += [f"**{title}**", "", f"![{title}]({os.path.relpath(path, out.parent)})", ""]


def write_report(root: str | os.PathLike, out: str | os.PathLike | None = None, title: str | None = None,
                 note: str | None = None) -> dict:
    """Write `out` (default ROOT/report.md) from the artifacts under `root`, with `note` (Markdown)
    under the title; return the rows."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder; run the pipeline first (e.g. `make demo`)")
    found = variants(root)
    if not found:
        raise UserError(f"{root} holds no <variant>/vae/{MANIFEST}: no finished train-vae step to report on")
    out = Path(out) if out else root / "report.md"
    check_output_file(out, "--out", "report.md")  # before the pictures and the plot are written beside it
    evaluations, own = probe_evaluations(root), variant_probe_evaluations(found)
    probes = probe_results(evaluations)
    for e in own.values():
        probes |= probe_results(e)
    rows = {p.name: variant_row(p, probes) for p in found}
    headers, cells = results_table(rows)
    md = [f"# {title or f'ReaLS pipeline report: {root}'}", "", *([f"> {note}", ""] if note else []),
          f"Machine: {describe_machine()}.", "",
          "## Results", "", markdown_table(headers, cells), ""]
    labels = sorted({r["fid_label"] for r in rows.values() if "fid_label" in r})
    md += [
        "PSNR, LPIPS and the alignment cosines (alignment-network output against the teacher's patch and "
        "global features) are measured on held-out images; latent std is the mean over channels. "
        f"FID, sFID, precision and recall: {', '.join(labels) or 'not run'}, against the test split. "
        "Probe acc: linear probe on pooled latents (`reals analyze`). mIoU and depth RMSE: heads fitted on "
        "teacher features of real images, applied to each VAE's alignment-network features (no training on them).",
        "",
    ]
    md += seed_table(rows)
    for task, _, label in PROBES:
        m = evaluations.get(task)
        if m:
            metrics = sorted(k for k, v in next(iter(m["results"].values())).items()
                             if isinstance(v, float))  # the scores, not the counts or per-class lists
            md += [f"### {label} ({m['data']['format']}, {m['data']['images']} test images, teacher {m['teacher']})", "",
                   markdown_table(["features", *metrics],
                                  [[way, *[f"{r[k]:.3f}" for k in metrics]] for way, r in m["results"].items()]), ""]
    for task, key, label in PROBES:
        scored = {name: e[task] for name, e in own.items() if task in e}
        if scored:
            first = next(iter(scored.values()))
            refs = [[f"{way} (reference)", f"{first['results'][way][key]:.3f}"] for way in ("teacher", "constant")
                    if way in first["results"]]
            md += [f"### {label}, each variant's VAE ({first['data']['images']} test images, teacher {first['teacher']})", "",
                   markdown_table(["features", key], refs + [[name, f"{m['results']['reals'][key]:.3f}"]
                                                            for name, m in scored.items()]), ""]
    md += ["## Pictures", ""]
    for p in found:
        recon = sorted((p / "vae").glob("recon_*.png"))
        if recon:
            _image(md, out, root, f"{p.name}: reconstructions (top: input, bottom: VAE)", recon[-1])
        _image(md, out, root, f"{p.name}: samples, one row per class{_grid_rows(p / 'samples')}", p / "samples" / "grid.png")
        _image(md, out, root, f"{p.name}: latent t-SNE coloured by class", next(iter(sorted((p / "analysis").glob("*.png"))), Path()))
    for task in ("seg", "depth"):
        _image(md, out, root, f"probe-{task}: image | ground truth | predictions", root / task / "eval-test" / "panels.png")
        for way in ("reals", "baseline"):  # probes.GENERATED_FILES, named here: probes imports torch
            _image(md, out, root, f"probe-{task} on {way}'s generated latents: decoded | teacher on decoded | aligned",
                   root / task / "eval-test" / f"generated-{way}.png")
    md += validation_curves({p.name: p / "vae" for p in found}, out.parent / f"{out.stem}-val.png")
    steps = _manifests(root)
    if steps:
        total = sum(m.get("wall_s") or 0 for _, m in steps)
        md += ["## Commands", "", f"Each step, in the order it ran ({total / 60:.1f} min in all):", "",
               markdown_table(["output", "seconds", "command"],
                              [[str(path.relative_to(root)), f"{m.get('wall_s') or 0:.0f}", f"`{m['command']}`"]
                               for path, m in steps]), ""]
    text = "\n".join(md)
    if not out.is_file() or out.read_text() != text:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out, text.encode())
    return {"out": str(out), "rows": rows, "headers": headers, "cells": cells, "note": note}


VAL_PANELS = (("psnr", "PSNR (dB)", "{:+.2f}"), ("lpips", "LPIPS", "{:+.4f}"),
              ("align_cos_patch", "cos patch", "{:+.3f}"), ("align_cos_global", "cos global", "{:+.3f}"))


def validation_curves(vaes: dict[str, Path], plot: Path) -> list[str]:
    """Markdown for the VAEs' validation curves (their val.jsonl, train-vae --val-every): a plot and
    each metric's change over the last quarter of training, the test of whether it has flattened.
    Nothing for VAEs without curves."""
    from .training import read_log  # here: torch, which it imports, is slow to load for a report

    curves = {name: lines for name, folder in vaes.items() if len(lines := read_log(folder / "val.jsonl")) >= 2}
    if not curves:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(VAL_PANELS), figsize=(4 * len(VAL_PANELS), 3.2))
    rows = []
    for name, lines in curves.items():
        steps = [r["step"] for r in lines]
        quarter = min(lines, key=lambda r: abs(r["step"] - 0.75 * steps[-1]))  # the line nearest 3/4 of the run
        rows.append([name, f"{quarter['step']}-{steps[-1]}",
                     *[fmt.format(lines[-1][k] - quarter[k]) for k, _, fmt in VAL_PANELS]])
        for ax, (key, label, _) in zip(axes, VAL_PANELS):
            ax.plot(steps, [r[key] for r in lines], marker=".", label=name)
            ax.set_title(label, fontsize=9)
            ax.set_xlabel("VAE step")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(plot) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return ["## VAE validation curves", "", f"![validation curves]({plot.name})", "",
            "Change over the last quarter of training (a curve that has flattened changes little):", "",
            markdown_table(["VAE", "steps", *[label for _, label, _ in VAL_PANELS]], rows), ""]


def print_table(report: dict) -> None:
    """The results with one column per variant: a terminal is narrower than the Markdown table."""
    table = Table(title=f"report: {report['out']}")
    table.add_column("")
    for row in report["cells"]:
        table.add_column(row[0], justify="right")
    for i, header in enumerate(report["headers"][1:], start=1):
        table.add_row(header, *[row[i] for row in report["cells"]])
    console.print(table, soft_wrap=True)
    if report.get("note"):
        console.print(report["note"], markup=False)
