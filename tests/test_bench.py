"""The benchmark's arithmetic: the FLOP rate train-dit logs, the MFU rows made of it, and a run
that runs out of GPU memory reported without losing the rows measured before it."""

from types import SimpleNamespace

import pytest
import torch

from reals_cli import bench


def test_train_dit_rows_on_a_gpu(monkeypatch):
    def fake_run(device, name, compile, batch=None):
        if batch == 128:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return {"rate": 100.0, "tflops": 494.5, "loss": 0.25, "batch": batch or bench._dit_batch(device, name), "peak_gib": 10.0}

    monkeypatch.setattr(bench, "_train_dit_run", fake_run)
    monkeypatch.setattr(bench, "_peak_flops", lambda device: 989e12)
    monkeypatch.setattr("reals_cli.attention.resolve_attention", lambda name, device: "sdpa")
    rows = {what: value for what, value, _ in bench.bench_train_dit(SimpleNamespace(type="cuda"))}
    xl = "DiT-XL/2 `train_dit`, batch 64, sdpa attention, --compile"
    assert rows[f"{xl}: MFU (bf16 dense peak 989 TFLOP/s; goal for XL/2 >= 55%)"] == pytest.approx(50.0)
    assert rows[f"{xl}: final loss (finite: no NaN in bf16)"] == 0.25
    assert "DiT-XL/2 `train_dit`, batch 64, sdpa attention: training" in rows  # the eager run
    oom = "DiT-XL/2 `train_dit`, batch 128, sdpa attention, --compile: out of GPU memory"
    assert oom in rows and list(rows)[-1] == oom

