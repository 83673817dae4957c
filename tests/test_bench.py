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
