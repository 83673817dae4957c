"""`make repro`'s evidence: a protocol fixed before the runs, then every run's numbers gathered per
variant and per seed, with means and 95% t-intervals over seeds, into a JSON and a Markdown page.

Layout (what `make repro` writes and `collect` reads; <step> is 7 digits, as train-dit's kept folders):

    ROOT/protocol.json                               written once, before any run (`write_protocol`)
    ROOT/<variant>/vae/                              train-vae (one VAE per variant)
    ROOT/<variant>/sit-s<seed>/step-<step>/          train-dit --seed <seed> --keep-every
    ROOT/<variant>/s<seed>/step-<step>/fid.json      eval-fid of that step's samples
    ROOT/<variant>/s<seed>/step-<step>/classifier.json   classifier eval of the same samples
    ROOT/seg/eval-test/metrics.json, ROOT/depth/eval-test/metrics.json   probe evaluations

The protocol names at least `variants`, `seeds`, `steps` (the kept SiT steps; the last is
the final one) and `fid_samples`; every fid.json must hold exactly that many samples.
`fid_steps` (default: every kept step) are the steps Inception scores: on a CPU Inception at
299 px costs far more than sampling, so a budget may score it at the final step alone and
draw the convergence curve with the classifier, which every kept step gets. The
intervals are mean +- t(0.975, n - 1) * sd / sqrt(n) over the n seeds (sd with n - 1); the
paired difference (reals - baseline, seed by seed: the same SiT seed on each latent space)
gets one too. `compare` ([reference, treatment], default ["baseline", "reals"]) names the pair
of another experiment, e.g. ["reals", "reals-repa"]; the paper's goal is judged for the default pair only.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from ..artifacts import atomic_path, atomic_write_bytes, atomic_write_json
from ..errors import UserError
from ..metrics.intervals import format_interval, t_interval
from .report import COLUMNS, SETTINGS, json_or_none, markdown_table, probe_evaluations, probe_results, validation_curves, variant_row

PROTOCOL = "protocol.json"
REQUIRED = ("variants", "seeds", "steps", "fid_samples")
# (key in the JSON, file of one evaluated step, key in that file, label, format)
METRICS = (
    ("fid", "fid.json", "fid", "FID (Inception)", "{:.1f}"),
    ("sfid", "fid.json", "sfid", "sFID", "{:.1f}"),
    ("precision", "fid.json", "precision", "precision", "{:.3f}"),
    ("recall", "fid.json", "recall", "recall", "{:.3f}"),
    ("classifier_fd", "classifier.json", "fd", "classifier FD", "{:.2f}"),
    ("class_accuracy", "classifier.json", "class_accuracy", "class accuracy", "{:.3f}"),
)
GOAL = 0.15  # the paper: about 15% lower FID at an equal diffusion budget
DEFAULT_PAIR = ["baseline", "reals"]


def write_protocol(root: str | os.PathLike, settings: dict) -> dict:
    """ROOT/protocol.json, once: a later call with other settings is refused (the protocol is fixed before the runs)."""
    missing = [k for k in REQUIRED if k not in settings]
    if missing:
        raise UserError(f"the protocol needs {', '.join(missing)} (besides {', '.join(k for k in REQUIRED if k not in missing)})")
    path = Path(root) / PROTOCOL
    if path.is_file():
        old = json.loads(path.read_text())
        if old != settings:
            changed = sorted(k for k in old.keys() | settings.keys() if old.get(k) != settings.get(k))
            raise UserError(f"{path} fixes another protocol ({', '.join(changed)} differ); the protocol is fixed "
                            f"before the runs: use another ROOT, or delete the experiment to start it again")
        return old
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, settings)
    return settings


def step_folder(root: Path, variant: str, seed: int, step: int) -> Path:
    return root / variant / f"s{seed}" / f"step-{step:07d}"


def collect(root: str | os.PathLike) -> dict:
    """Every number of the experiment under `root`: {"protocol", "variants", "comparison"} (see the module docstring)."""
    root = Path(root)
    if not (root / PROTOCOL).is_file():
        raise UserError(f"{root} has no {PROTOCOL}: not a `make repro` experiment (its protocol is written first)")
    protocol = json.loads((root / PROTOCOL).read_text())
    seeds, steps = list(protocol["seeds"]), sorted(protocol["steps"])
    fid_steps = set(protocol.get("fid_steps", steps))
    missing, variants = [], {}
    probes = probe_results(probe_evaluations(root))
    for variant in protocol["variants"]:
        curves = {key: [] for key, *_ in METRICS}
        for step in steps:
            per_seed = {key: [] for key, *_ in METRICS}
            for seed in seeds:
                files = {}
                for name in {m[1] for m in METRICS}:
                    path = step_folder(root, variant, seed, step) / name
                    files[name] = json_or_none(path)
                    if files[name] is None and (name != "fid.json" or step in fid_steps):
                        missing.append(path)
                fid = files["fid.json"]
                if fid is not None and fid.get("num_samples") != protocol["fid_samples"]:
                    raise UserError(f"{step_folder(root, variant, seed, step) / 'fid.json'} is over "
                                    f"{fid.get('num_samples')} samples; the protocol fixes {protocol['fid_samples']}")
                for key, name, field, *_ in METRICS:
                    per_seed[key].append(None if files[name] is None else files[name].get(field))
            for key in curves:
                curves[key].append(per_seed[key])
        final = {key: curves[key][-1] for key in curves}
        variants[variant] = {
            **final,
            "summary": {key: t_interval(values) for key, values in final.items()},
            "curves": {"steps": steps, **{key: [{"per_seed": v, **t_interval(v)} for v in curves[key]] for key in curves}},
            "vae_and_probes": variant_row(root / variant, probes) if (root / variant / "vae").is_dir() else {},
        }
    if missing:
        raise UserError(f"{len(missing)} result files are missing under {root} (e.g. {missing[0]}); run `make repro` "
                        f"to finish the experiment")
    result = {"protocol": protocol, "variants": variants, "probes": probe_evaluations(root)}
    reference, treatment = protocol.get("compare", DEFAULT_PAIR)
    if reference in variants and treatment in variants:
        base, reals = variants[reference], variants[treatment]
        result["comparison"] = {
            key: {"paired_difference": t_interval([r - b for r, b in zip(reals[key], base[key])
                                                   if r is not None and b is not None]),
                  "ratio_of_means": (reals["summary"][key]["mean"] / base["summary"][key]["mean"]
                                     if base["summary"][key]["mean"] else None)}
            for key, *_ in METRICS}
        result["comparison"]["pair"] = [reference, treatment]
        if [reference, treatment] == DEFAULT_PAIR:
            result["comparison"]["goal"] = goal(base, reals, protocol.get("primary", "fid"))
    return result


def goal(base: dict, reals: dict, primary: str) -> dict:
    """The paper's claim as the issue states it: ReaLS's mean primary metric at least 15% below the
    baseline's, and the two seed intervals apart."""
    b, r = base["summary"][primary], reals["summary"][primary]
    if None in (b["mean"], r["mean"], b["lo"], r["lo"]):
        return {"metric": primary, "met": None, "why": "needs at least 2 seeds per variant"}
    reduction = 1 - r["mean"] / b["mean"]
    apart = r["hi"] < b["lo"]
    return {"metric": primary, "reduction": reduction, "intervals_apart": apart, "met": reduction >= GOAL and apart}


def plot_curves(result: dict, path: Path) -> None:
    """FID and classifier FD against SiT step, one line per variant (the mean) with its 95% band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(key, label) for key, _, _, label, _ in METRICS if key in ("fid", "classifier_fd")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
    for ax, (key, label) in zip(np.atleast_1d(axes), panels):
        for variant, data in result["variants"].items():
            scored = [(step, p) for step, p in zip(data["curves"]["steps"], data["curves"][key]) if p["mean"] is not None]
            steps, points = [step for step, _ in scored], [p for _, p in scored]  # Inception: its fid_steps only
            line, = ax.plot(steps, [p["mean"] for p in points], marker="o", label=variant)
            if all(p["lo"] is not None for p in points):
                ax.fill_between(steps, [p["lo"] for p in points], [p["hi"] for p in points],
                                color=line.get_color(), alpha=0.2)
        ax.set_xlabel("SiT training step")
        ax.set_ylabel(f"{label} ({result['protocol']['fid_samples']} samples)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"mean over {len(result['protocol']['seeds'])} SiT seeds, band: 95% t-interval", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def swept_setting(result: dict) -> tuple[str, str, str] | None:
    """The VAE setting that differs between the variants (a sweep such as make kl-sweep), if one does."""
    rows = [d["vae_and_probes"] for d in result["variants"].values()]
    for label, key, fmt in (c for c in COLUMNS if c[1] in SETTINGS):
        values = [r.get(key) for r in rows]
        if None not in values and len(set(values)) == len(values) > 1:
            return key, label, fmt
    return None


def plot_sweep(result: dict, path: Path) -> None:
    """The paper's Figure 5 layout: FID and classifier FD (mean, 95% bar) and the latent std
    against the swept setting, at the final SiT step; a log axis when the setting spans decades."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, label, _ = swept_setting(result)
    data = sorted(result["variants"].values(), key=lambda d: d["vae_and_probes"][key])
    x = [d["vae_and_probes"][key] for d in data]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, metric in zip(axes[:2], ("fid", "classifier_fd")):
        s = [d["summary"][metric] for d in data]
        err = [[0 if p["lo"] is None else p["mean"] - p["lo"] for p in s], [0 if p["hi"] is None else p["hi"] - p["mean"] for p in s]]
        ax.errorbar(x, [p["mean"] for p in s], yerr=err, marker="o", capsize=4)
        ax.set_ylabel(next(m[3] for m in METRICS if m[0] == metric) + f" ({result['protocol']['fid_samples']} samples)")
    axes[2].plot(x, [d["vae_and_probes"].get("latent_std") for d in data], marker="o")
    axes[2].set_ylabel("latent std (mean over channels)")
    for ax in axes:
        ax.set_xlabel(label)
        if min(x) > 0 and max(x) / min(x) >= 100:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    fig.suptitle(f"final SiT step, mean over {len(result['protocol']['seeds'])} SiT seeds, bars: 95% t-interval; "
                 f"one VAE per point", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def markdown(result: dict, title: str, plot_name: str, grids: dict[str, str] | None = None,
             sweep_plot: str | None = None) -> str:
    protocol, variants = result["protocol"], result["variants"]
    seeds = protocol["seeds"]
    lines = [f"# {title}", "", "## Protocol (fixed before the runs)", "",
             markdown_table(["setting", "value"], [[k, f"`{json.dumps(v)}`"] for k, v in protocol.items()]), "",
             "## Results at the final SiT step", "",
             f"Mean over {len(seeds)} SiT seeds ({', '.join(map(str, seeds))}) with its 95% t-interval "
             f"[lo, hi]; every FID is over {protocol['fid_samples']} samples.", ""]
    rows = [[variant, *[format_interval(data["summary"][key], fmt) for key, *_, fmt in METRICS]]
            for variant, data in variants.items()]
    lines += [markdown_table(["variant", *[m[3] for m in METRICS]], rows), ""]
    if "comparison" in result:
        rows = [[label, format_interval(result["comparison"][key]["paired_difference"], fmt),
                 "–" if result["comparison"][key]["ratio_of_means"] is None
                 else f"{result['comparison'][key]['ratio_of_means']:.3f}"]
                for key, _, _, label, fmt in METRICS]
        reference, treatment = result["comparison"]["pair"]
        lines += [f"### {treatment} against {reference}, seed by seed", "",
                  markdown_table(["metric", f"{treatment} - {reference} (paired)", f"{treatment} / {reference} (means)"],
                                 rows), ""]
        g = result["comparison"].get("goal")
        if g:
            verdict = (f"not decidable ({g['why']})" if g["met"] is None else
                       f"{'met' if g['met'] else 'not met'}: ReaLS's mean {g['metric']} is {100 * abs(g['reduction']):.1f}% "
                       f"{'below' if g['reduction'] >= 0 else 'above'} the baseline's, and the 95% intervals "
                       f"{'do not overlap' if g['intervals_apart'] else 'overlap'}")
            lines += [f"The paper's claim (mean primary metric at least {GOAL:.0%} below the baseline's, seed intervals "
                      f"apart): {verdict}.", ""]
    swept = swept_setting(result)
    if swept and sweep_plot:
        lines += [f"## Against the {swept[1]}", "", f"![FID and latent std against the {swept[1]}]({sweep_plot})", ""]
    if grids:
        seed, step = protocol["seeds"][0], max(protocol["steps"])
        lines += ["## Samples", "", f"SiT seed {seed} at step {step}, the same noise and labels in every variant "
                  f"(the first rows of each `samples/grid.png`).", ""]
        lines += [f"**{variant}**\n\n![{variant} samples]({path})\n" for variant, path in grids.items()]
    lines += ["## Convergence", "", f"![FID against SiT step]({plot_name})", ""]
    for key, _, _, label, fmt in METRICS[:1] + METRICS[4:5]:
        steps = next(iter(variants.values()))["curves"]["steps"]
        rows = [[variant, *[format_interval(p, fmt) for p in data["curves"][key]]] for variant, data in variants.items()]
        lines += [f"**{label} by SiT step**", "", markdown_table(["variant", *map(str, steps)], rows), ""]
    vae_rows = {v: d["vae_and_probes"] for v, d in variants.items() if d["vae_and_probes"]}
    if vae_rows:
        shown = ("psnr", "lpips", "cos_patch", "cos_global", "latent_std", "miou", "rmse")
        keys = [*([swept] if swept else []), *((k, h, f) for h, k, f in COLUMNS if k in shown)]
        rows = [[v, *[fmt.format(r[k]) if k in r else "–" for k, _, fmt in keys]] for v, r in vae_rows.items()]
        lines += ["## VAEs and probes (one VAE per variant: no interval)", "",
                  markdown_table(["variant", *[h for _, h, _ in keys]], rows), ""]
    for task, m in result["probes"].items():
        names = sorted({k for scores in m["results"].values() for k in scores if isinstance(scores[k], (int, float))})
        rows = [[way, *[("{:.3f}" if isinstance(scores[k], float) else "{}").format(scores[k]) if k in scores else "–"
                        for k in names]] for way, scores in m["results"].items()]
        lines += [f"### {task} probe", "", markdown_table(["features", *names], rows), ""]
        if m.get("generated"):
            lines += _generated_table(task, m["generated"], m["primary_metric"])
    return "\n".join(lines)


def _generated_table(task: str, generated: dict, primary: str) -> list[str]:
    """Each VAE's generated latents read through its alignment network, against the head on the
    teacher's features of the same latents decoded (they have no ground truth); primary score first."""
    scores = next(iter(generated.values()))["results"]["aligned"]
    keys = [primary, *sorted(k for k, v in scores.items() if isinstance(v, float) and k != primary)]
    rows = [[f"{way}: {source}", str(g["count"]), *[f"{g['results'][source][k]:.3f}" for k in keys]]
            for way, g in generated.items() for source in g["results"]]
    return [f"### {task} probe on generated latents", "",
            "Target: the head on the teacher's features of each decoded latent; `aligned`: the head on "
            "align(latent), the training-free path; `constant`: the training prior.", "",
            markdown_table(["VAE: features", "latents", *keys], rows), ""]


def copy_grids(root: Path, result: dict, folder: Path) -> dict[str, str]:
    """Each variant's sample grid at the final step of the first seed (the same seed and labels
    in every variant), copied into `folder`; {variant: file name}."""
    protocol, grids = result["protocol"], {}
    for variant in result["variants"]:
        grid = step_folder(root, variant, protocol["seeds"][0], max(protocol["steps"])) / "samples" / "grid.png"
        if grid.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            name = f"{variant}-samples.png"
            with atomic_path(folder / name) as tmp:
                shutil.copyfile(grid, tmp)
            grids[variant] = name
    return grids


def write_reproduction(root: str | os.PathLike, json_out: str | os.PathLike, md_out: str | os.PathLike,
                       title: str = "Reproduction: ReaLS against its baseline") -> dict:
    """collect(), then the JSON, the Markdown page, its plot (`<md stem>-fid.png` beside it; for a
    sweep of a VAE setting over 3 or more variants also `<md stem>-sweep.png`) and the sample grids (in `<md stem>-images/`)."""
    result = collect(root)
    md_out = Path(md_out)
    plot = md_out.with_name(f"{md_out.stem}-fid.png")
    md_out.parent.mkdir(parents=True, exist_ok=True)
    plot_curves(result, plot)
    # a curve needs three points; two variants are a comparison, which the tables above show
    sweep = md_out.with_name(f"{md_out.stem}-sweep.png") if swept_setting(result) and len(result["variants"]) >= 3 else None
    if sweep:
        plot_sweep(result, sweep)
    images = md_out.with_name(f"{md_out.stem}-images")
    grids = {v: f"{images.name}/{name}" for v, name in copy_grids(Path(root), result, images).items()}
    curves = validation_curves({v: Path(root) / v / "vae" for v in result["variants"]}, md_out.with_name(f"{md_out.stem}-val.png"))
    atomic_write_json(json_out, result)
    atomic_write_bytes(md_out, ("\n".join([markdown(result, title, plot.name, grids, sweep and sweep.name), *curves]) + "\n").encode())
    return result
