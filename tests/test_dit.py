"""DiT network: official checkpoint layout, shapes, adaLN-Zero init, attention backends."""

from __future__ import annotations

import contextlib
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reals_cli.errors import UserError
from reals_cli.models.attention import attention, resolve_attention
from reals_cli.models.dit import DIT_MODELS, DiT, build_dit, dit_flops


def official_dit_xl2_layout() -> dict[str, tuple[int, ...]]:
    """Keys and shapes of `DiT-XL-2-256x256.pt`, written from the published architecture:
    depth 28, width 1152, 16 heads, patch 2, 32x32x4 latents in, 8 channels out,
    1000 classes + the null class, MLP ratio 4, 256 time frequencies."""
    d, depth, p, c_in, c_out, tokens = 1152, 28, 2, 4, 8, (32 // 2) ** 2
    layout = {
        "pos_embed": (1, tokens, d),
        "x_embedder.proj.weight": (d, c_in, p, p),
        "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256),
        "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d),
        "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (1001, d),
        "final_layer.linear.weight": (p * p * c_out, d),
        "final_layer.linear.bias": (p * p * c_out,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d),
        "final_layer.adaLN_modulation.1.bias": (2 * d,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        layout |= {
            b + "attn.qkv.weight": (3 * d, d),
            b + "attn.qkv.bias": (3 * d,),
            b + "attn.proj.weight": (d, d),
            b + "attn.proj.bias": (d,),
            b + "mlp.fc1.weight": (4 * d, d),
            b + "mlp.fc1.bias": (4 * d,),
            b + "mlp.fc2.weight": (d, 4 * d),
            b + "mlp.fc2.bias": (d,),
            b + "adaLN_modulation.1.weight": (6 * d, d),
            b + "adaLN_modulation.1.bias": (6 * d,),
        }
    return layout


def test_official_dit_xl2_checkpoint_layout_loads_strictly():
    layout = official_dit_xl2_layout()
    # DiT's train.py logs 675,129,632 parameters for XL/2 (pos_embed included); the paper says 675M.
    assert sum(math.prod(s) for s in layout.values()) == 675_129_632
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = build_dit("DiT-XL/2", input_size=32, in_channels=4, num_classes=1000)
        checkpoint = {k: torch.empty(s) for k, s in layout.items()}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == layout
    model.load_state_dict(checkpoint, strict=True, assign=True)
    assert sum(p.numel() for p in model.parameters()) + model.pos_embed.numel() == 675_129_632


def test_state_dict_round_trip_reproduces_outputs():
    torch.manual_seed(0)
    a = build_dit("DiT-S/8", 16, 4, 10)
    for p in a.parameters():
        torch.nn.init.normal_(p, std=0.05)
    b = build_dit("SiT-S/8", 16, 4, 10)  # SiT names build the same network
    b.load_state_dict(a.state_dict(), strict=True)
    a.eval(), b.eval()
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([3.0, 999.0]), torch.tensor([1, 10])
    assert torch.equal(a(x, t, y), b(x, t, y))


def test_pos_embed_is_mae_2d_sincos():
    model = build_dit("DiT-S/8", 32, 4, 10)
    d, grid = 384, 4
    omega = 1.0 / 10000 ** (torch.arange(d // 4, dtype=torch.float64) / (d // 4))
    for row, col in [(0, 0), (1, 3), (3, 2)]:
        token = model.pos_embed[0, row * grid + col].double()
        expected = torch.cat([(col * omega).sin(), (col * omega).cos(), (row * omega).sin(), (row * omega).cos()])
        torch.testing.assert_close(token, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", list(DIT_MODELS))
def test_forward_shapes_all_models(name):
    # On the meta device: full-size architectures, no memory, no arithmetic.
    with torch.device("meta"):
        model = build_dit(name, input_size=16, in_channels=4, num_classes=1000)
        out, feats = model(torch.empty(3, 4, 16, 16), torch.empty(3), torch.zeros(3, dtype=torch.long), return_features_at=2)
    assert out.shape == (3, 8, 16, 16)
    assert feats.shape == (3, (16 // DIT_MODELS[name]["patch_size"]) ** 2, DIT_MODELS[name]["hidden_size"])


def test_small_forward_is_exactly_zero_at_init_and_shapes():
    model = build_dit("DiT-S/8", 32, 4, 10)
    out = model(torch.randn(2, 4, 32, 32), torch.tensor([0, 500]), torch.tensor([3, 7]))
    assert out.shape == (2, 8, 32, 32) and torch.count_nonzero(out) == 0
    model = build_dit("DiT-S/8", 32, 4, 10, learn_sigma=False)
    assert model(torch.randn(1, 4, 32, 32), torch.tensor([0.5]), torch.tensor([0])).shape == (1, 4, 32, 32)


def _randomized(patch_size=4, **kwargs):
    """A tiny DiT (3 blocks, width 64) with random weights, so that outputs are not zero."""
    torch.manual_seed(0)
    model = DiT(16, patch_size, 4, hidden_size=64, depth=3, num_heads=4, num_classes=10, **kwargs)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model


def test_class_dropout_uses_null_class():
    model = _randomized(class_dropout=1.0).train()
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10.0, 20.0])
    dropped = model(x, t, torch.tensor([1, 2]))
    null = model.eval()(x, t, torch.full((2,), model.null_class))
    torch.testing.assert_close(dropped, null)
    assert model.y_embedder.embedding_table.num_embeddings == 11
    assert build_dit("DiT-S/8", 16, 4, 10, class_dropout=0).y_embedder.embedding_table.num_embeddings == 10


def test_features_are_tokens_after_block_k():
    model = _randomized(patch_size=2).eval()
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([0.1, 0.9]), torch.tensor([0, 1])
    out, feats = model(x, t, y, return_features_at=3)
    c = model.t_embedder(t) + model.y_embedder(y)
    h = model.x_embedder(x) + model.pos_embed
    for block in model.blocks[:3]:
        h = block(h, c)
    torch.testing.assert_close(feats, h)
    torch.testing.assert_close(out, model(x, t, y))


def test_gradient_checkpointing_gives_same_gradients():
    model = _randomized(qk_norm=True)
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([5.0, 50.0]), torch.tensor([0, 1])
    grads = []
    for flag in (False, True):
        model.grad_checkpointing = flag
        model.zero_grad()
        torch.manual_seed(1)  # the same label dropout in both runs
        model(x, t, y).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1)


def test_qk_norm_adds_keys_only_when_asked():
    with torch.device("meta"):
        keys, plain, rms = (set(build_dit("DiT-S/8", 16, 4, 10, qk_norm=q).state_dict()) for q in (True, False, "rmsnorm"))
    assert keys - plain == {f"blocks.{i}.attn.{n}_norm.{w}" for i in range(12) for n in "qk" for w in ("weight", "bias")}
    assert rms - plain == {f"blocks.{i}.attn.{n}_norm.weight" for i in range(12) for n in "qk"}


def test_flops_match_dit_paper():
    # DiT's Table 4 "Gflops" are multiply-adds at 256 px (32x32x4 latents); ours count 2 per MAC.
    paper = {"DiT-S/2": 6.06, "DiT-B/2": 23.01, "DiT-L/2": 80.71, "DiT-XL/2": 118.64, "DiT-XL/8": 7.39, "DiT-S/8": 0.36}
    for name, gmacs in paper.items():
        assert dit_flops(name, 32, 4) / 2e9 == pytest.approx(gmacs, rel=0.02)


@pytest.mark.parametrize("name, size", [("DiT-T/2", 8), ("DiT-S/4", 32)])
def test_flop_count_equals_torch_s_counter(name, size):
    """dit_flops against torch's FlopCounterMode (explicit attention, which it counts): the
    forward exactly, and a training step (forward + backward) at 3 forwards within 0.5%."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_dit(name, size, 4, 10, attn="math")
    x, t, y = torch.randn(2, 4, size, size), torch.rand(2), torch.tensor([1, 2])
    with FlopCounterMode(display=False) as forward, torch.no_grad():
        model(x, t, y)
    assert forward.get_total_flops() == 2 * dit_flops(name, size, 4)
    with FlopCounterMode(display=False) as step:
        model(x, t, y).square().mean().backward()
    assert step.get_total_flops() == pytest.approx(3 * 2 * dit_flops(name, size, 4), rel=5e-3)


def test_math_and_sdpa_attention_agree():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 17, 3, 32) for _ in range(3))
    torch.testing.assert_close(attention(q, k, v, "math"), attention(q, k, v, "sdpa"), atol=1e-5, rtol=1e-5)
    model = _randomized()
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([1.0, 2.0]), torch.tensor([0, 1])
    outs = []
    for backend in ("math", "sdpa"):
        for block in model.blocks:
            block.attn.backend = backend
        outs.append(model.eval()(x, t, y))
    torch.testing.assert_close(*outs, atol=1e-5, rtol=1e-5)


def test_resolve_attention_on_cpu():
    assert resolve_attention("auto", "cpu") == "sdpa"
    assert resolve_attention("math", "cpu") == "math"
    with pytest.raises(UserError):
        resolve_attention("xformers", "cpu")
    with pytest.raises(UserError):
        resolve_attention("flash", "cpu")


def test_xformers_cuda12_runtime_is_found_as_a_file_on_sys_path(tmp_path, monkeypatch):
    """Found where pip put it (a --target folder, a venv) even when `import nvidia.cuda_runtime`
    would not resolve: a regular `nvidia` package elsewhere on the path hides it."""
    import ctypes

    import reals_cli.models.attention

    lib = tmp_path / "site" / "nvidia" / "cuda_runtime" / "lib" / "libcudart.so.12"
    lib.parent.mkdir(parents=True)
    lib.touch()
    (tmp_path / "first" / "nvidia").mkdir(parents=True)
    (tmp_path / "first" / "nvidia" / "__init__.py").touch()  # a regular package, earlier on the path
    loaded = []
    monkeypatch.setattr(ctypes, "CDLL", lambda path, mode: loaded.append((path, mode)))
    monkeypatch.setattr("sys.path", [str(tmp_path / "first"), str(tmp_path / "site")])
    reals_cli.models.attention._preload_cuda12_runtime()
    assert loaded == [(str(lib), ctypes.RTLD_GLOBAL)]


def test_auto_and_sdpa_never_load_a_cuda_runtime(monkeypatch):
    """auto is sdpa on CUDA too (faster on the H100), so the CUDA 12 runtime that xformers'
    wheels link is loaded only for --attn xformers, and only into a torch of another CUDA."""
    import reals_cli.models.attention

    calls = []

    def preload():
        calls.append(torch.version.cuda)
        raise AssertionError("the CUDA 12 runtime was loaded")

    monkeypatch.setattr(reals_cli.models.attention, "_preload_cuda12_runtime", preload)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    reals_cli.models.attention._xformers_works.cache_clear()
    try:
        for device in ("cuda", "cpu"):
            assert resolve_attention("auto", device) == resolve_attention("sdpa", device) == "sdpa"
        model = build_dit("DiT-T/2", 8, 4, 3, attn="auto").eval()
        with torch.no_grad():
            model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.arange(2))
        assert calls == []
        with pytest.raises(UserError, match="xformers attention is not usable on cuda"):
            resolve_attention("xformers", "cuda")  # the failing preload makes xformers unusable
        assert calls == ["13.0"]
        reals_cli.models.attention._xformers_works.cache_clear()
        monkeypatch.setattr(torch.version, "cuda", "12.8")
        with contextlib.suppress(UserError):  # no GPU or no xformers here
            resolve_attention("xformers", "cuda")
        assert calls == ["13.0"]
    finally:
        reals_cli.models.attention._xformers_works.cache_clear()  # for the CUDA tests after this one


def test_importing_the_cli_loads_no_cuda_runtime(tmp_path):
    """Nor does importing every command and resolving auto on CUDA, with a CUDA 12 runtime where
    the preload would find it: the loader ends the process on libcudart (no except can catch that)."""
    lib = tmp_path / "nvidia" / "cuda_runtime" / "lib" / "libcudart.so.12"
    lib.parent.mkdir(parents=True)
    lib.touch()
    code = ("import ctypes, os, sys, torch\n"
            f"sys.path.append({str(tmp_path)!r})\n"
            "load = ctypes.CDLL\n"
            "def refuse(name, *a, **k):\n"
            "    if 'libcudart' in str(name):\n"
            "        os._exit(3)\n"
            "    return load(name, *a, **k)\n"
            "ctypes.CDLL = refuse\n"
            "torch.version.cuda = '13.0'\n"
            "import reals_cli.cli, reals_cli.pipeline.sample, reals_cli.pipeline.train_dit\n"
            "from reals_cli.models.attention import resolve_attention\n"
            "print(resolve_attention('auto', 'cuda'))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "sdpa\n", (done.returncode, done.stderr)


on_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _cuda_backends() -> list[str]:
    try:
        return ["sdpa", resolve_attention("xformers", "cuda")]
    except UserError:
        return ["sdpa"]


@on_cuda
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_attention_backends_match_math_on_cuda(dtype, tol):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 256, 16, 72, device="cuda", dtype=dtype) for _ in range(3))  # DiT-XL/2's heads
    for backend in _cuda_backends():
        torch.testing.assert_close(attention(q, k, v, backend), attention(q, k, v, "math"), atol=tol, rtol=tol)


@on_cuda
@pytest.mark.parametrize("qk_norm", [False, True])  # CUDA autocast runs the norms in fp32: v stays bf16
def test_backends_agree_in_a_bf16_dit_on_cuda(qk_norm):
    torch.manual_seed(0)
    model = build_dit("DiT-B/2", 32, 4, 1000, qk_norm=qk_norm).cuda().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))  # away from adaLN-Zero's identity blocks
    x, t, y = torch.randn(8, 4, 32, 32, device="cuda"), torch.rand(8, device="cuda"), torch.arange(8, device="cuda")

    def run(backend: str, bf16: bool) -> torch.Tensor:
        for block in model.blocks:
            block.attn.backend = backend
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16, enabled=bf16):
            return model(x, t, y).float()

    reference = run("math", bf16=False)
    for backend in _cuda_backends() + ["math"]:
        error = (run(backend, bf16=True) - reference).norm() / reference.norm()
        assert error < 2e-2, (backend, error.item())


@on_cuda
def test_dit_xl2_bf16_training_step_at_batch_64_on_cuda():
    from reals_cli.objectives.transport import Transport

    torch.manual_seed(0)
    model = build_dit("DiT-XL/2", 32, 4, 1000).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    objective = Transport()
    x1 = torch.randn(64, 4, 32, 32, device="cuda")
    for _ in range(2):  # the second step runs on weights the first one updated
        t, x0 = objective.sample_time(64, "cuda"), torch.randn_like(x1)
        x_t = objective.q_sample(x1, t, x0)
        with torch.autocast("cuda", torch.bfloat16):
            loss = objective.loss(model(x_t, t, torch.randint(0, 1000, (64,), device="cuda")).float(), x1, x_t, t, x0)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()


@pytest.mark.slow
def test_compiled_blocks_match_eager_and_share_one_graph(monkeypatch):
    import torch._dynamo

    import reals_cli.models.attention

    resolve = reals_cli.models.attention.resolve_attention

    def resolve_looking_at_files(name, device):  # as the xformers check does on CUDA: a graph break if traced
        Path(__file__).is_file()
        return resolve(name, device)

    monkeypatch.setattr(reals_cli.models.attention, "resolve_attention", resolve_looking_at_files)

    torch.manual_seed(0)
    model = build_dit("DiT-T/2", 8, 4, 3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))  # away from adaLN-Zero's identity blocks
    x, t, y = torch.randn(6, 4, 8, 8), torch.rand(6), torch.randint(0, 3, (6,))

    def forward_backward():
        model.zero_grad()
        out = model(x, t, y)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    eager_out, eager_grads = forward_backward()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model.compile_blocks("cpu")
    out, grads = forward_backward()
    torch.testing.assert_close(out, eager_out, atol=1e-5, rtol=1e-5)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-4)
    assert len(model.blocks) == 6 and torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["graph_break"]
    assert list(model.state_dict()) == list(build_dit("DiT-T/2", 8, 4, 3).state_dict())  # checkpoints unchanged


def test_the_official_constructor_keywords_build_the_same_network():
    """DiT's and SiT's models.py take `class_dropout_prob`; their configs pass as they are."""
    official = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=2, mlp_ratio=4.0,
                    class_dropout_prob=0.25, num_classes=5, learn_sigma=True)
    torch.manual_seed(0)
    theirs = DiT(**official)
    torch.manual_seed(0)
    ours = DiT(**{k: v for k, v in official.items() if k != "class_dropout_prob"}, class_dropout=0.25)
    assert theirs.y_embedder.dropout == 0.25 and theirs.y_embedder.embedding_table.num_embeddings == 6
    a, b = theirs.state_dict(), ours.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
