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
    """The `reals ...` commands `make -n TARGET` would run, for an empty demo folder."""
    out = subprocess.run(["make", "-n", "-C", str(REPO), target, f"DEMO={tmp_path}/demo",
                          f"KL_SWEEP={tmp_path}/kl", *extra], capture_output=True, text=True, check=True).stdout
    lines = [line.split("bin/reals ", 1)[1] for line in out.replace("\\\n", " ").splitlines() if "bin/reals " in line]
    return [line for line in lines if not line.startswith("assets")]


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
    assert plan[-1].endswith('--out docs/repro-small.md --title "repro-small: the baseline VAE against ReaLS"')


def test_kl_sweep_varies_only_the_kl_weight(tmp_path):
    plan = _plan("kl-sweep", tmp_path, "KLS=1e-5 1e-3")
    vaes = [c for c in plan if c.startswith("train-vae")]
    assert [v.split("--kl ")[1].split()[0] for v in vaes[-2:]] == ["1e-5", "1e-3"]
    assert "--out docs/kl-sweep.md" in plan[-1]


def test_scale_multiplies_the_budgets(tmp_path):
    plan = _plan("demo", tmp_path, "SCALE=10", "DEVICE=cuda")
    assert "--steps 1500" in plan[2] and "--steps 3000" in plan[4] and "-n 5000" in plan[5]
    assert all("--device cuda" in c for c in plan if _sub(c) in ("train-vae", "train-dit", "sample", "eval-fid"))


@pytest.mark.parametrize("target", ["demo", "repro-small", "kl-sweep"])
def test_an_interrupted_pipeline_continues_when_run_again(tmp_path, target):
    """The trainers refuse a folder with an unfinished run unless told to resume; the recipes say
    --auto-resume, so a rerun after Ctrl-C continues the step instead of stopping."""
    plan = _plan(target, tmp_path)
    trainers = [c for c in plan if c.split()[0] in ("train-vae", "train-dit")]
    assert trainers and all("--auto-resume" in c.split() for c in trainers)
