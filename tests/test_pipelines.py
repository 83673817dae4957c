"""The Makefile pipelines: each target runs the subcommands in the pipeline's order, with the
flags that make the comparisons fair (a dry run: `make -n`, nothing is executed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def _plan(target: str, tmp_path: Path, *extra: str) -> list[str]:
    """The `reals ...` commands `make -n TARGET` would run, for empty experiment folders."""
    out = subprocess.run(["make", "-n", "-C", str(REPO), target, f"DEMO={tmp_path}/demo",
                          f"KL_SWEEP={tmp_path}/kl", f"REPRO={tmp_path}/r", f"ABL={tmp_path}/a", f"REPA={tmp_path}/p", *extra], capture_output=True, text=True, check=True).stdout
    lines = [line.split("bin/reals ", 1)[1] for line in out.replace("\\\n", " ").splitlines() if "bin/reals " in line]
    return [" ".join(line.split()) for line in lines if not line.startswith("assets")]  # an empty $(if) leaves 2 spaces


def _sub(command: str) -> str:
    words = command.split()
    return " ".join(words[:2]) if words[0] in ("data", "probe-seg", "probe-depth") else words[0]


def test_demo_runs_the_chain_in_order(tmp_path):
    plan = _plan("demo", tmp_path)
    assert [_sub(c) for c in plan] == [
        "data fashion-mnist", "data photos", "train-vae", "encode", "train-dit", "sample", "data fashion-mnist",
        "eval-fid", "eval-fid", "analyze", "train-vae", "encode", "analyze", "probe-seg fit", "probe-seg eval",
        "probe-depth fit", "probe-depth eval", "report"]
    reals_vae, baseline_vae = plan[2], plan[10]
    assert "--align-weight" not in reals_vae and "--align-weight 0" in baseline_vae
    assert reals_vae.replace(f" --out {tmp_path}/demo/reals/vae", "") == \
        baseline_vae.replace(f" --align-weight 0 --out {tmp_path}/demo/baseline/vae", "")  # one recipe, one change
    assert "--save-ref-stats" in plan[7] and f"--ref {tmp_path}/demo/fid-ref/stats.npz" in plan[8]
    assert f"--baseline-vae {tmp_path}/demo/baseline/vae" in plan[14] and "--latents" in plan[14]


def test_repro_small_gives_the_baseline_the_same_budget(tmp_path):
    plan = _plan("repro-small", tmp_path)
    dits = [c for c in plan if c.startswith("train-dit")]
    assert len(dits) == 2 and dits[0].replace("/reals/", "/baseline/") == dits[1]
    samples = sorted(c for c in plan if c.startswith("sample"))
    assert len(samples) == 4 and sum("--cfg 1.0" in c for c in samples) == 2
    assert '--out docs/repro-small.md --title "repro-small: the baseline VAE against ReaLS" --note "A single-seed ' \
           'miniature' in plan[-1] and "too small to tell ReaLS from the baseline" in plan[-1]


def test_kl_sweep_is_repros_reals_vae_with_only_the_kl_weight_changed(tmp_path):
    root = f"{tmp_path}/r"
    plan = _plan("kl-sweep", tmp_path, f"REPRO={root}", "KLS=1e-5 1e-3", f"KL_DOC={tmp_path}/doc")
    vaes = {c.split("--out ")[1]: c for c in plan if c.startswith("train-vae")}
    recipe = vaes[f"{root}/reals/vae"].replace(f" --out {root}/reals/vae", "")
    for kl in ("1e-5", "1e-3"):
        assert vaes[f"{tmp_path}/kl/kl{kl}/vae"] == f"{recipe} --kl {kl} --out {tmp_path}/kl/kl{kl}/vae"
    dits = {c.split("--out ")[1]: c for c in plan if c.startswith("train-dit")}
    for seed in (0, 1, 2):  # repro's SiT on each latent space; 1e-6 is repro's own runs
        assert dits[f"{tmp_path}/kl/kl1e-3/sit-s{seed}"] == dits[f"{root}/reals/sit-s{seed}"].replace(
            f"{root}/reals/", f"{tmp_path}/kl/kl1e-3/")
    assert not any("kl1e-6/" in c for c in plan if c.split()[0] in ("train-vae", "train-dit", "sample"))
    protocols = {c for c in plan if c.startswith(f"reproduction protocol {tmp_path}/kl ")}
    assert len(protocols) == 1 and '\'variants=["kl1e-6","kl1e-5","kl1e-3"]\'' in protocols.pop()
    assert plan[-1].startswith(f"reproduction collect {tmp_path}/kl --json {tmp_path}/doc.json --md {tmp_path}/doc.md")


def test_a_second_vae_seed_reaches_both_vaes_and_the_protocol(tmp_path):
    plan = _plan("repro", tmp_path, f"REPRO={tmp_path}/r", f"REPRO_DOC={tmp_path}/doc", "REPRO_VAE_SEED=1")
    vaes = [c for c in plan if c.startswith("train-vae")]
    assert len(vaes) == 2 and all("--seed 1" in v for v in vaes)
    assert vaes[0].replace(" --align-weight 0", "").replace("/baseline/", "/reals/") == vaes[1]  # one change
    assert all("vae_seed=1" in c for c in plan if c.startswith("reproduction protocol"))
    # Both probes read each variant's own generated latents: the first seed's final SiT step.
    evals = [c for c in plan if c.startswith(("probe-seg eval", "probe-depth eval"))]
    assert len(evals) == 2 and all(f"--latents {tmp_path}/r/reals/s0/step-0000400/samples/latents.zarr" in c and
                                   f"--baseline-latents {tmp_path}/r/baseline/s0/step-0000400/samples/latents.zarr"
                                   in c for c in evals)


def test_ablations_change_one_flag_of_the_repro_vae_recipe(tmp_path):
    root = f"{tmp_path}/r"
    plan = _plan("ablations", tmp_path, f"REPRO={root}", f"ABL={tmp_path}/a")
    vaes = {c.split("--out ")[1]: c for c in plan if c.startswith("train-vae")}
    recipe = vaes[f"{root}/reals/vae"].replace(f" --seed 0 --out {root}/reals/vae", "")
    for name, change in (("align0.3", "--align-weight 0.3"), ("align3", "--align-weight 3"),
                         ("adaptive", "--align-balance adaptive"), ("latent8", "--latent-channels 8")):
        assert vaes[f"{tmp_path}/a/{name}-s0/vae"] == f"{recipe} {change} --seed 0 --out {tmp_path}/a/{name}-s0/vae"
    evals = [c for c in plan if c.startswith("probe-seg eval")]
    assert {c.split("--vae ")[1].split()[0] for c in evals} == {
        f"{tmp_path}/a/{v}-s0/vae" for v in ("latent8", "align0.3", "align3", "adaptive", "align0", "align1")}
    assert all(f"--head {root}/seg" in c for c in evals)
    assert "--out docs/ablations.md" in plan[-1]


def test_repa_is_repros_reals_sit_plus_the_repa_flags(tmp_path):
    root = f"{tmp_path}/r"
    plan = _plan("repa", tmp_path, f"REPRO={root}", f"REPA={tmp_path}/p", f"REPA_DOC={tmp_path}/doc")
    dits = {c.split("--out ")[1]: c for c in plan if c.startswith("train-dit")}
    for seed in (0, 1, 2):
        alone, repa = dits[f"{root}/reals/sit-s{seed}"], dits[f"{tmp_path}/p/reals-repa/sit-s{seed}"]
        assert repa == alone.replace(f" --seed {seed} --out {root}/reals/sit-s{seed}",
                                     f" --repa-weight 0.5 --repa-depth 2 --repa-vae {root}/reals/vae --seed {seed} "
                                     f"--out {tmp_path}/p/reals-repa/sit-s{seed}")
    assert plan[-1].startswith(f"reproduction collect {tmp_path}/p --json {tmp_path}/doc.json")


def test_scale_multiplies_the_budgets(tmp_path):
    plan = _plan("demo", tmp_path, "SCALE=10", "DEVICE=cuda")
    assert "--steps 1500" in plan[2] and "--steps 3000" in plan[4] and "-n 5000" in plan[5]
    assert all("--device cuda" in c for c in plan if _sub(c) in ("train-vae", "train-dit", "sample", "eval-fid"))


@pytest.mark.parametrize("target", ["demo", "repro-small", "kl-sweep", "repro", "ablations", "repa"])
def test_an_interrupted_pipeline_continues_when_run_again(tmp_path, target):
    """The trainers refuse a folder with an unfinished run unless told to resume; the recipes say
    --auto-resume, so a rerun after Ctrl-C continues the step instead of stopping."""
    plan = _plan(target, tmp_path)
    trainers = [c for c in plan if c.split()[0] in ("train-vae", "train-dit")]
    assert trainers and all("--auto-resume" in c.split() for c in trainers)
