"""reals_cli.pipeline.reproduction: the fixed protocol, per-seed gathering and t-intervals (against scipy)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import stats

from reals_cli.artifacts import atomic_write_json
from reals_cli.cli import main
from reals_cli.errors import UserError
from reals_cli.metrics.intervals import t_interval
from reals_cli.pipeline.reproduction import collect, step_folder, write_protocol, write_reproduction

PROTOCOL = {"variants": ["baseline", "reals"], "seeds": [0, 1, 2], "steps": [100, 200], "fid_samples": 2000,
            "primary": "fid"}


def scipy_interval(x):
    x = np.asarray(x, np.float64)
    return stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))


@pytest.mark.parametrize("n", [2, 3, 7])
def test_t_interval_matches_scipy(n):
    x = np.random.default_rng(n).normal(30, 4, n)
    got = t_interval(x.tolist())
    lo, hi = scipy_interval(x)
    assert got["mean"] == pytest.approx(x.mean(), rel=1e-12)
    assert (got["lo"], got["hi"]) == (pytest.approx(lo, rel=1e-12), pytest.approx(hi, rel=1e-12))
    assert t_interval([5.0]) == {"mean": 5.0, "lo": None, "hi": None, "n": 1, "sd": None}


def _experiment(root, fid, fd=None, samples=2000, protocol=PROTOCOL):
    """fid[variant][step index][seed index]: writes the eval files of every run."""
    write_protocol(root, protocol)
    for variant, per_step in fid.items():
        for k, step in enumerate(PROTOCOL["steps"]):
            for i, seed in enumerate(PROTOCOL["seeds"]):
                folder = step_folder(root, variant, seed, step)
                folder.mkdir(parents=True)
                value = per_step[k][i]
                (folder / "fid.json").write_text(json.dumps({"fid": value, "sfid": value + 10, "precision": 0.5,
                                                             "recall": 0.2, "num_samples": samples}))
                (folder / "classifier.json").write_text(json.dumps({"fd": value / 10, "class_accuracy": 0.3 + 0.1 * i}))


FID = {"baseline": [[60.0, 64.0, 61.0], [40.0, 44.5, 41.0]], "reals": [[50.0, 52.0, 55.0], [33.0, 36.0, 34.5]]}


def test_collect_gathers_per_seed_values_with_intervals(tmp_path):
    _experiment(tmp_path, FID)
    r = collect(tmp_path)
    assert r["protocol"]["fid_samples"] == 2000
    for variant, per_step in FID.items():
        v = r["variants"][variant]
        assert v["fid"] == per_step[-1]  # the final step, one entry per seed
        assert v["classifier_fd"] == pytest.approx([x / 10 for x in per_step[-1]])
        lo, hi = scipy_interval(per_step[-1])
        assert (v["summary"]["fid"]["lo"], v["summary"]["fid"]["hi"]) == (pytest.approx(lo), pytest.approx(hi))
        assert v["curves"]["steps"] == [100, 200]
        assert [p["per_seed"] for p in v["curves"]["fid"]] == per_step
        lo0, hi0 = scipy_interval(per_step[0])
        assert v["curves"]["fid"][0]["lo"] == pytest.approx(lo0) and v["curves"]["fid"][0]["hi"] == pytest.approx(hi0)
    diff = np.subtract(FID["reals"][-1], FID["baseline"][-1])
    paired = r["comparison"]["fid"]["paired_difference"]
    assert paired["mean"] == pytest.approx(diff.mean())
    assert (paired["lo"], paired["hi"]) == tuple(pytest.approx(v) for v in scipy_interval(diff))
    assert r["comparison"]["fid"]["ratio_of_means"] == pytest.approx(np.mean(FID["reals"][-1]) / np.mean(FID["baseline"][-1]))
    # 17.4% lower, but reals's interval [30.8, 38.2] reaches into the baseline's [36.0, 47.7]
    assert r["comparison"]["goal"] == {"metric": "fid", "reduction": pytest.approx(1 - 34.5 / (125.5 / 3)),
                                       "intervals_apart": False, "met": False}


def test_another_pair_is_compared_seed_by_seed_without_the_papers_goal(tmp_path):
    """An ablation of ReaLS (e.g. ReaLS + REPA) names its pair in `compare`: reference, treatment."""
    fid = {"reals": FID["reals"], "reals-repa": FID["baseline"]}
    _experiment(tmp_path, fid, protocol=PROTOCOL | {"variants": ["reals", "reals-repa"], "compare": ["reals", "reals-repa"]})
    r = write_reproduction(tmp_path, tmp_path / "r.json", tmp_path / "r.md")
    diff = np.subtract(fid["reals-repa"][-1], fid["reals"][-1])
    assert r["comparison"]["fid"]["paired_difference"]["mean"] == pytest.approx(diff.mean())
    assert "goal" not in r["comparison"]
    page = (tmp_path / "r.md").read_text()
    assert "### reals-repa against reals, seed by seed" in page and "| metric | reals-repa - reals (paired) |" in page
    assert "The paper's claim" not in page


def test_collect_refuses_missing_runs_and_other_sample_counts(tmp_path):
    _experiment(tmp_path / "a", FID)
    (step_folder(tmp_path / "a", "reals", 2, 100) / "classifier.json").unlink()
    with pytest.raises(UserError, match="1 result files are missing"):
        collect(tmp_path / "a")
    _experiment(tmp_path / "b", FID, samples=500)
    with pytest.raises(UserError, match="over 500 samples; the protocol fixes 2000"):
        collect(tmp_path / "b")


def test_protocol_is_fixed_before_the_runs(tmp_path):
    write_protocol(tmp_path, PROTOCOL)
    assert write_protocol(tmp_path, dict(PROTOCOL)) == PROTOCOL  # the same again: nothing changes
    with pytest.raises(UserError, match="fid_samples differ"):
        write_protocol(tmp_path, PROTOCOL | {"fid_samples": 500})
    with pytest.raises(UserError, match="needs steps"):
        write_protocol(tmp_path / "new", {k: v for k, v in PROTOCOL.items() if k != "steps"})


def test_docs_and_cli(tmp_path):
    runner = CliRunner()
    root = tmp_path / "exp"
    ok = runner.invoke(main, ["reproduction", "protocol", str(root), "variants=[\"baseline\",\"reals\"]",
                              "seeds=[0,1,2]", "steps=[100,200]", "fid_samples=2000", "primary=fid"])
    assert ok.exit_code == 0, ok.output
    assert json.loads((root / "protocol.json").read_text()) == PROTOCOL
    changed = runner.invoke(main, ["reproduction", "protocol", str(root), "variants=[\"reals\"]", "seeds=[0]",
                                   "steps=[1]", "fid_samples=2"])
    assert changed.exit_code == 2 and "fixes another protocol" in changed.output
    _experiment(root, FID)
    out = runner.invoke(main, ["reproduction", "collect", str(root), "--json", str(tmp_path / "r.json"),
                               "--md", str(tmp_path / "r.md")])
    assert out.exit_code == 0, out.output
    page = (tmp_path / "r.md").read_text()
    assert page.index("## Protocol") < page.index("## Results")
    assert "| baseline | 41.8 [" in page and "apart): not met: ReaLS's mean fid is 17.5% below" in page and "![FID against SiT step](r-fid.png)" in page
    assert (tmp_path / "r-fid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "r.json").read_text())["variants"]["reals"]["fid"] == FID["reals"][-1]
    assert write_reproduction(root, tmp_path / "r2.json", tmp_path / "r2.md")["variants"].keys() == {"baseline", "reals"}


def test_the_page_scores_the_probes_on_generated_latents_under_their_own_heading(tmp_path):
    root = tmp_path / "exp"
    _experiment(root, FID)
    seg = {"miou": 0.5, "pixel_acc": 0.9, "pixels": 64}
    generated = {way: {"latents": f"{way}.zarr", "count": 7, "results": {
        "aligned": {"miou": miou, "pixel_acc": 0.8, "pixels": 64}, "constant": {"miou": 0.125, "pixel_acc": 0.5}}}
        for way, miou in (("reals", 0.625), ("baseline", 0.25))}
    atomic_write_json(root / "seg" / "eval-test" / "metrics.json", {
        "task": "seg", "results": {"teacher": seg, "reals": seg, "constant": seg}, "primary_metric": "miou",
        "generated": generated})
    page = write_reproduction(root, tmp_path / "r.json", tmp_path / "r.md") and (tmp_path / "r.md").read_text()
    table = page[page.index("### seg probe on generated latents"):]
    assert page.index("### seg probe\n") < page.index("### seg probe on generated latents")
    assert "| VAE: features | latents | miou | pixel_acc |" in table
    assert "| reals: aligned | 7 | 0.625 | 0.800 |" in table and "| baseline: aligned | 7 | 0.250 | 0.800 |" in table
    assert "| reals: constant | 7 | 0.125 | 0.500 |" in table
    assert json.loads((tmp_path / "r.json").read_text())["probes"]["seg"]["generated"] == generated


def test_goal_needs_both_the_reduction_and_apart_intervals():
    from reals_cli.pipeline.reproduction import goal

    def arm(values):
        return {"summary": {"fid": t_interval(values)}}

    assert goal(arm([40.0, 41.0, 42.0]), arm([30.0, 31.0, 32.0]), "fid")["met"] is True  # 26% lower, apart
    assert goal(arm([40.0, 41.0, 42.0]), arm([36.0, 37.0, 38.0]), "fid")["met"] is False  # apart, but 10% lower
    assert goal(arm([40.0]), arm([30.0]), "fid")["met"] is None  # one seed: no interval


def test_inception_at_the_fid_steps_only_and_the_classifier_at_every_step(tmp_path):
    """`fid_steps` [200]: step 100 needs no fid.json (its FID is None, not a missing run), the
    classifier's curve has both steps, and the page and plot are still written."""
    _experiment(tmp_path, FID)
    (tmp_path / "protocol.json").write_text(json.dumps(PROTOCOL | {"fid_steps": [200]}))
    for variant in FID:
        for seed in PROTOCOL["seeds"]:
            (step_folder(tmp_path, variant, seed, 100) / "fid.json").unlink()
    r = write_reproduction(tmp_path, tmp_path / "r.json", tmp_path / "r.md")
    for variant, per_step in FID.items():
        curves = r["variants"][variant]["curves"]
        assert curves["fid"][0]["mean"] is None and curves["fid"][1]["per_seed"] == per_step[1]
        assert [p["per_seed"] for p in curves["classifier_fd"]] == [[x / 10 for x in s] for s in per_step]
    (step_folder(tmp_path, "reals", 0, 200) / "fid.json").unlink()  # a fid step's file is still required
    with pytest.raises(UserError, match="1 result files are missing"):
        collect(tmp_path)


def test_the_page_shows_each_variants_samples_from_the_same_seed(tmp_path):
    from PIL import Image

    _experiment(tmp_path / "exp", FID)
    for k, variant in enumerate(FID):
        samples = step_folder(tmp_path / "exp", variant, 0, 200) / "samples"
        samples.mkdir()
        Image.new("RGB", (8, 4), (k * 200, 0, 0)).save(samples / "grid.png")
    write_reproduction(tmp_path / "exp", tmp_path / "doc.json", tmp_path / "doc.md")
    page = (tmp_path / "doc.md").read_text()
    assert page.index("## Samples") < page.index("## Convergence")
    for k, variant in enumerate(FID):
        assert f"![{variant} samples](doc-images/{variant}-samples.png)" in page
        assert Image.open(tmp_path / "doc-images" / f"{variant}-samples.png").getpixel((0, 0)) == (k * 200, 0, 0)


def _vaes(root, kls):
    for v, (kl, std) in kls.items():
        (root / v / "vae").mkdir()
        (root / v / "vae" / "manifest.json").write_text(json.dumps({
            "id": v, "config": {"kl": kl, "align_weight": 1.0}, "metrics": {"psnr": 20.0, "latent_std": std}}))


def test_a_kl_sweep_gets_its_setting_and_latent_std_in_the_table_and_a_plot_against_it(tmp_path):
    """make kl-sweep: the variants differ in the VAE's KL weight; the page tabulates it beside the
    latent std and draws FID (with the seeds' interval) against it."""
    kls = {"kl1e-6": (1e-6, [3.0, 3.4]), "kl1e-2": (1e-2, [2.8, 3.0]), "kl1": (1.0, [0.9, 1.1])}
    fid = {v: FID["reals"] for v in kls}
    _experiment(tmp_path, fid, protocol=PROTOCOL | {"variants": list(kls)})
    _vaes(tmp_path, kls)
    r = write_reproduction(tmp_path, tmp_path / "k.json", tmp_path / "k.md")
    assert "comparison" not in r  # no pair named: each variant's mean and interval only
    page = (tmp_path / "k.md").read_text()
    assert "| variant | KL weight | PSNR | LPIPS | cos patch | cos global | latent std | mIoU | depth RMSE |" in page
    assert "| kl1e-6 | 1e-06 | 20.00 | – | – | – | 3.20 |" in page and "| kl1 | 1 | 20.00 | – | – | – | 1.00 |" in page
    assert "![FID and latent std against the KL weight](k-sweep.png)" in page
    assert (tmp_path / "k-sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    two = {v: kls[v] for v in ("kl1e-6", "kl1")}
    _experiment(tmp_path / "two", {v: FID["reals"] for v in two}, protocol=PROTOCOL | {"variants": list(two)})
    _vaes(tmp_path / "two", two)
    write_reproduction(tmp_path / "two", tmp_path / "t.json", tmp_path / "t.md")
    page = (tmp_path / "t.md").read_text()
    assert "| kl1 | 1 | 20.00 |" in page and not (tmp_path / "t-sweep.png").exists()  # two points: no curve
