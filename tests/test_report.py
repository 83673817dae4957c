"""report: the table comes from the artifacts' own numbers, each probe result in its VAE's row."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from reals_cli.artifacts import atomic_write_json, write_manifest
from reals_cli.cli import main
from reals_cli.pipeline.report import write_report


def _vae(folder: Path, kl: float, align: float, psnr: float, std: list[float]) -> None:
    folder.mkdir(parents=True)
    (folder / "recon_0000010.png").write_bytes(b"\x89PNG fake")
    write_manifest(folder, "vae", 1, {"kl": kl, "align_weight": align},
                   metrics={"psnr": psnr, "lpips": 0.2, "align_cos_patch": 0.5, "align_cos_global": 0.6, "latent_std": std})


def _id(variant: Path) -> str:
    return json.loads((variant / "vae" / "manifest.json").read_text())["id"]


@pytest.fixture
def pipeline(tmp_path) -> Path:
    root = tmp_path / "demo"
    _vae(root / "reals" / "vae", 1e-6, 1.0, 20.5, [1.0, 3.0])
    _vae(root / "baseline" / "vae", 1e-6, 0.0, 21.0, [2.0, 2.0])
    write_manifest(root / "reals" / "sit", "dit", 1, {}, metrics={"final_loss": 0.53})
    atomic_write_json(root / "reals" / "fid.json", {"fid": 177.46, "sfid": 40.0, "precision": 0.06, "recall": 0.2,
                                                   "label": "FID-500 (not FID-50K)", "command": "reals eval-fid x", "wall_s": 12.0})
    atomic_write_json(root / "baseline" / "fid-nocfg.json", {"fid": 190.0})
    (root / "reals" / "analysis").mkdir()
    atomic_write_json(root / "reals" / "analysis" / "analysis.json", {"stores": [{"probe": {"test_accuracy": 0.821}}]})
    atomic_write_json(root / "seg" / "eval-test" / "metrics.json", {
        "vae": {"id": _id(root / "reals")}, "baseline_vae": {"id": _id(root / "baseline")},
        "data": {"format": "masks", "images": 10}, "teacher": "vgg16",
        "results": {"teacher": {"miou": 0.9, "accuracy": 0.95, "iou": [0.9, 0.9], "pixels": 10},
                    "reals": {"miou": 0.81, "accuracy": 0.9, "iou": [0.8, 0.82], "pixels": 10},
                    "baseline": {"miou": 0.75, "accuracy": 0.88, "iou": [0.7, 0.8], "pixels": 10}}})
    (root / "reals" / "samples").mkdir()
    np.savez(root / "reals" / "samples" / "samples.npz", arr_0=np.zeros((5, 2, 2, 3), np.uint8), arr_1=[2, 0, 2, 0, 2])
    (root / "reals" / "samples" / "grid.png").write_bytes(b"\x89PNG grid")
    atomic_write_json(root / "reals" / "samples" / "latents.zarr" / "zarr.json", {"attributes": {"classes": ["a", "b", "c"]}})
    atomic_write_json(root / "reals" / "latents.zarr" / "zarr.json",
                      {"zarr_format": 3, "attributes": {"command": "reals encode y", "wall_s": 20.4}})
    (root / "seg" / "eval-test" / "panels.png").write_bytes(b"\x89PNG panels")
    return root


def test_rows_hold_each_artifacts_numbers(pipeline):
    report = write_report(pipeline)
    assert list(report["rows"]) == ["baseline", "reals"]  # the baseline first, as in the paper's tables
    reals, baseline = report["rows"]["reals"], report["rows"]["baseline"]
    assert reals["psnr"] == 20.5 and reals["latent_std"] == 2.0 and reals["dit_loss"] == 0.53
    assert reals["fid"] == 177.46 and reals["probe_acc"] == 0.821 and "fid_nocfg" not in reals
    assert baseline["fid_nocfg"] == 190.0 and "fid" not in baseline
    assert (reals["miou"], baseline["miou"]) == (0.81, 0.75)  # the probe file names which VAE is which
    # Settings that do not vary (KL, and here not the alignment weight either) get no column.
    assert report["headers"][:3] == ["variant", "align weight", "PSNR"] and "KL weight" not in report["headers"]
    assert report["cells"][0][:3] == ["baseline", "0", "21.00"] and "–" in report["cells"][0]
    text = (pipeline / "report.md").read_text()
    assert "| reals | 1 | 20.50 |" in text and "FID-500 (not FID-50K)" in text
    assert "![probe-seg: image | ground truth | predictions](seg/eval-test/panels.png)" in text
    assert "| reals/fid.json | 12 | `reals eval-fid x` |" in text and "| reals/latents.zarr | 20 | `reals encode y` |" in text
    assert "samples, one row per class (top to bottom: a, c)](reals/samples/grid.png)" in text
    assert "| features | accuracy | miou |" in text and "| reals | 0.900 | 0.810 |" in text
    mtime = (pipeline / "report.md").stat().st_mtime_ns
    write_report(pipeline)
    assert (pipeline / "report.md").stat().st_mtime_ns == mtime  # unchanged content: not rewritten


def test_a_page_outside_the_folder_gets_its_own_pictures(pipeline, tmp_path):
    _vae(pipeline / "kl1e-02" / "vae", 1e-2, 1.0, 18.0, [0.5, 0.5])
    _vae(pipeline / "kl1e-04" / "vae", 1e-4, 1.0, 19.0, [0.8, 0.8])
    out = tmp_path / "docs" / "page.md"
    report = write_report(pipeline, out, title="t")
    assert [r.get("kl") for r in report["rows"].values()] == [1e-6, 1e-6, 1e-4, 1e-2]
    assert "KL weight" in report["headers"]
    text = out.read_text()
    assert "(page-images/seg-eval-test-panels.png)" in text
    assert (out.parent / "page-images" / "seg-eval-test-panels.png").read_bytes() == b"\x89PNG panels"


def test_cli_prints_the_table_and_refuses_an_empty_folder(pipeline, tmp_path):
    r = CliRunner().invoke(main, ["report", str(pipeline)])
    assert r.exit_code == 0 and "177.5" in r.output and "0.821" in r.output
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(main, ["report", str(tmp_path / "empty")])
    assert r.exit_code == 2
    assert r.output.strip() == (f"error: {tmp_path / 'empty'} holds no <variant>/vae/manifest.json: no finished "
                                "train-vae step to report on")


def test_a_note_stands_under_the_title_and_under_the_printed_table(pipeline):
    note = "Too small a budget to tell the variants apart; see make repro."
    result = CliRunner().invoke(main, ["report", str(pipeline), "--title", "T", "--note", note])
    assert result.exit_code == 0, result.output
    assert (pipeline / "report.md").read_text().startswith(f"# T\n\n> {note}\n\nMachine: ")
    assert result.output.rstrip().endswith(note)


def test_cli_refuses_an_out_folder_before_writing(pipeline, tmp_path):
    folder = tmp_path / "pages"
    folder.mkdir()
    r = CliRunner().invoke(main, ["report", str(pipeline), "--out", str(folder)])
    assert r.exit_code == 2
    assert r.output.strip() == f"error: --out {folder} is a folder; pass a file path, e.g. {folder / 'report.md'}"
    assert list(folder.iterdir()) == []


def test_each_variants_own_probe_evaluation_and_the_adaptive_weight_it_used(tmp_path):
    """make ablations scores each VAE alone (ROOT/<variant>/seg/eval-test): the score lands in that
    row, the teacher and the constant predictor above them; an adaptive run shows the weight it used."""
    root = tmp_path / "abl"
    _vae(root / "align0.3-s0" / "vae", 1e-6, 0.3, 22.0, [1.0])
    _vae(root / "adaptive-s0" / "vae", 1e-6, 1.0, 21.5, [1.0])
    manifest = json.loads((root / "adaptive-s0" / "vae" / "manifest.json").read_text())
    manifest["config"]["align_balance"] = "adaptive"
    atomic_write_json(root / "adaptive-s0" / "vae" / "manifest.json", manifest)
    (root / "adaptive-s0" / "vae" / "log.jsonl").write_text(
        "".join(json.dumps({"step": s, "align_w": w}) + "\n" for s, w in ((100, 9.0), (150, 2.0), (200, 4.0))))
    for name, miou in (("align0.3-s0", 0.4), ("adaptive-s0", 0.6)):
        atomic_write_json(root / name / "seg" / "eval-test" / "metrics.json", {
            "vae": {"id": _id(root / name)}, "data": {"format": "masks", "images": 10}, "teacher": "vgg16",
            "results": {"teacher": {"miou": 0.9}, "reals": {"miou": miou}, "constant": {"miou": 0.1}}})
    (root / "align0.3-s0" / "vae" / "val.jsonl").write_text("".join(
        json.dumps({"step": s, "psnr": p, "lpips": 0.3 - s / 1e4, "align_cos_patch": 0.5, "align_cos_global": c}) + "\n"
        for s, p, c in ((100, 18.0, 0.5), (200, 20.0, 0.6), (300, 21.0, 0.65), (400, 21.25, 0.66))))
    report = write_report(root)
    rows = report["rows"]
    text = (root / "report.md").read_text()
    # Flattened or not: each curve's change from the line nearest 3/4 of the run (300) to the end.
    assert "| VAE | steps | PSNR (dB) | LPIPS | cos patch | cos global |\n|---|---|---|---|---|---|\n" \
           "| align0.3-s0 | 300-400 | +0.25 | -0.0100 | +0.000 | +0.010 |" in text
    assert "![validation curves](report-val.png)" in text and (root / "report-val.png").stat().st_size > 1000
    assert (rows["align0.3-s0"]["miou"], rows["adaptive-s0"]["miou"]) == (0.4, 0.6)
    assert rows["adaptive-s0"]["align_w_used"] == 3.0 and "align_w_used" not in rows["align0.3-s0"]  # steps 101-200
    text = (root / "report.md").read_text()
    assert ("| features | miou |\n|---|---|\n| teacher (reference) | 0.900 |\n| constant (reference) | 0.100 |\n"
            "| adaptive-s0 | 0.600 |\n| align0.3-s0 | 0.400 |") in text


def test_variants_run_with_several_vae_seeds_get_intervals_over_the_seeds(tmp_path):
    """make ablations names its folders <recipe>-s<seed>: each recipe with two or more seeds gets
    its mean and 95% t-interval (against scipy), a single-seed recipe its value alone."""
    from scipy import stats

    psnr = {"align1": [22.14, 21.72, 21.9], "align3": [19.95]}
    for recipe, values in psnr.items():
        for seed, value in enumerate(values):
            _vae(tmp_path / "abl" / f"{recipe}-s{seed}" / "vae", 1e-6, 1.0, value, [4.0, 4.0])
    write_report(tmp_path / "abl", tmp_path / "abl.md")
    x = np.array(psnr["align1"])
    lo, hi = stats.t.interval(0.95, 2, loc=x.mean(), scale=stats.sem(x))
    text = (tmp_path / "abl.md").read_text()
    assert "## Across VAE seeds" in text
    assert f"| align1 | 0, 1, 2 | {x.mean():.2f} [{lo:.2f}, {hi:.2f}] | 0.200 [0.200, 0.200] |" in text
    assert "| align3 | 0 | 19.95 (1 seed) | 0.200 (1 seed) |" in text
    (tmp_path / "one").mkdir()
    for recipe in ("align1", "align3"):
        _vae(tmp_path / "one" / f"{recipe}-s0" / "vae", 1e-6, 1.0, 20.0, [4.0, 4.0])
    write_report(tmp_path / "one", tmp_path / "one.md")
    assert "Across VAE seeds" not in (tmp_path / "one.md").read_text()  # no recipe has two seeds
