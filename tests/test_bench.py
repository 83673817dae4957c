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
    monkeypatch.setattr("reals_cli.models.attention.resolve_attention", lambda name, device: "sdpa")
    rows = {what: value for what, value, _ in bench.bench_train_dit(SimpleNamespace(type="cuda"))}
    xl = "DiT-XL/2 `train_dit`, batch 64, sdpa attention, --compile"
    assert rows[f"{xl}: MFU (bf16 dense peak 989 TFLOP/s; goal for XL/2 >= 55%)"] == pytest.approx(50.0)
    assert rows[f"{xl}: final loss (finite: no NaN in bf16)"] == 0.25
    assert "DiT-XL/2 `train_dit`, batch 64, sdpa attention: training" in rows  # the eager run
    oom = "DiT-XL/2 `train_dit`, batch 128, sdpa attention, --compile: out of GPU memory"
    assert oom in rows and list(rows)[-1] == oom



def test_kernel_shares_sort_kernels_by_kind():
    """Kernel names as the H100 profile showed them: xformers' CUTLASS attention kernels are
    attention, not matmuls; CPU-side events are not counted; shares add up to 100."""
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [("fmha_cutlassF_bf16_aligned_64x128_rf_sm80", cuda, 20.0),
              ("nvjet_tst_256x128_64x4_2x1_v_bz_coopB_NNT", cuda, 40.0),
              ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", cuda, 10.0),
              ("triton_red_fused_native_layer_norm_0", cuda, 20.0),
              ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<adam>", cuda, 5.0),
              ("Memcpy DtoD (Device -> Device)", cuda, 5.0),
              ("aten::mm", cpu, 1000.0)]
    prof = SimpleNamespace(key_averages=lambda: [SimpleNamespace(key=k, device_type=d, self_device_time_total=t)
                                                 for k, d, t in events])
    per_step_ms, shares = bench._kernel_shares(prof, count=2)
    assert per_step_ms == pytest.approx(100.0 / 2 / 1e3)  # microseconds over 2 steps, in ms
    assert shares == {"matmuls (GEMM)": 50.0, "attention": 20.0, "fused elementwise and norms (Triton)": 20.0,
                      "optimizer, gradient clipping and EMA": 5.0, "other (copies, casts, eager elementwise)": 5.0}
    assert list(shares) == sorted(shares, key=shares.get, reverse=True)
    empty = SimpleNamespace(key_averages=lambda: [SimpleNamespace(key="aten::mm", device_type=cpu, self_device_time_total=1.0)])
    per_step_ms, shares = bench._kernel_shares(empty, count=2)
    assert shares == {} and per_step_ms != per_step_ms  # NaN: no kernel seen


def test_ratios_are_timed_interleaved_with_their_median_and_spread():
    order = []
    rates_a, rates_b = iter([10.0, 30.0, 20.0]), iter([10.0, 10.0, 5.0])
    a, b = bench._interleaved(lambda: order.append("A") or next(rates_a), lambda: order.append("B") or next(rates_b))
    assert order == ["A", "B"] * bench.PAIRS
    # pairs 1, 3 and 4: not the 2 of median(a) / median(b)
    assert bench._ratio("r", a, b) == ("r", 3.0, "x", {"min": 1.0, "max": 4.0, "pairs": 3})


def test_train_dit_on_a_cpu_alternates_train_dit_and_the_reference(monkeypatch):
    order = []

    def fake_run(device, name, compile, batch=None, steps=None):
        order.append(("train_dit", name, steps))
        return {"rate": 2.0 * len(order), "tflops": 0.1}

    def fake_reference(device, name):
        order.append(("reference", name))
        return 2.0

    monkeypatch.setattr(bench, "_train_dit_run", fake_run)
    monkeypatch.setattr(bench, "_reference_step_rate", fake_reference)
    rows = bench.bench_train_dit(torch.device("cpu"))
    assert order[:4] == [("train_dit", "DiT-S/2", 4), ("reference", "DiT-S/2")] * 2
    ratios = [row for row in rows if row[2] == "x"]
    assert [row[0] for row in ratios] == ["DiT-S/2 ratio `train_dit` / reference", "DiT-B/2 ratio `train_dit` / reference"]
    assert ratios[0][1:] == (3.0, "x", {"min": 1.0, "max": 5.0, "pairs": 3})  # train_dit at 2, 6, 10 images/s


def test_page_shows_the_spread_and_which_sections_were_kept(tmp_path):
    results = {
        "encode@cpu": {"benchmark": "encode", "device": "cpu", "machine": "m", "date": "2026-12-01", "command": "c",
                       "load": [0.5, 2.25], "cpus": 2, "rows": [["rate", 100.0, "images/s"],
                                                     ["ratio a / b", 0.95, "x", {"min": 0.93, "max": 0.97, "pairs": 3}]]},
        "sample@cuda": {"benchmark": "sample", "device": "cuda", "machine": "H100", "date": "2026-11-26", "command": "c",
                        "rows": [["images/s", 3.5, "images/s"]]},
    }
    bench.write_page(results, tmp_path / "b.md")
    page = (tmp_path / "b.md").read_text()
    assert "| ratio a / b | 0.95 | x | 0.93 to 0.97 (3 pairs) |" in page and "| rate | 100 | images/s |  |" in page
    assert "Load average (1 min) before and after: 0.50, 2.25 on 2 cores: shared with other jobs" in page
    cuda = page[page.index("## sample on cuda"):]
    assert "Kept from the run of 2026-11-26, not remeasured since." in cuda and "Kept" not in page[:page.index("## sample")]
