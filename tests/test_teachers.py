import time

import pytest
import torch

from reals_cli.errors import UserError
from reals_cli.models.teachers import DINOv2Teacher, build_teacher


def _official_dinov2_state(dim=32, depth=2, grid=37, patch=14, mlp_ratio=4):
    """A random state dict in the key layout of the official dinov2_vit*14_pretrain.pth files."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g) * 0.02  # noqa: E731
    state = {
        "cls_token": r(1, 1, dim),
        "pos_embed": r(1, 1 + grid * grid, dim),
        "mask_token": r(1, dim),
        "patch_embed.proj.weight": r(dim, 3, patch, patch),
        "patch_embed.proj.bias": r(dim),
        "norm.weight": 1 + r(dim),
        "norm.bias": r(dim),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        state.update({
            b + "norm1.weight": 1 + r(dim), b + "norm1.bias": r(dim),
            b + "attn.qkv.weight": r(3 * dim, dim), b + "attn.qkv.bias": r(3 * dim),
            b + "attn.proj.weight": r(dim, dim), b + "attn.proj.bias": r(dim),
            b + "ls1.gamma": r(dim), b + "ls2.gamma": r(dim),
            b + "norm2.weight": 1 + r(dim), b + "norm2.bias": r(dim),
            b + "mlp.fc1.weight": r(mlp_ratio * dim, dim), b + "mlp.fc1.bias": r(mlp_ratio * dim),
            b + "mlp.fc2.weight": r(dim, mlp_ratio * dim), b + "mlp.fc2.bias": r(dim),
        })
    return state


TINY = dict(embed_dim=32, depth=2, num_heads=2)


def test_dinov2_loads_official_layout_and_returns_grids(tmp_path):
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    state = _official_dinov2_state()
    torch.save(state, path)
    teacher = DINOv2Teacher("dinov2-s", weights=path, resolution=56, **TINY)
    # Loaded, not random: the CLS token is the one in the file.
    assert torch.equal(teacher.model.cls_token, state["cls_token"])
    images = torch.rand(2, 3, 64, 64)  # resized to 56 by the teacher itself
    patch, glob = teacher(images)
    assert patch.shape == (2, 32, 4, 4) and glob.shape == (2, 32)
    assert teacher.grid(64) == 4
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    # The grid is the token sequence reshaped row-major.
    tokens = teacher.model.forward_features(teacher._prepare(images))
    assert torch.allclose(patch[:, :, 1, 2], tokens[:, 1 + 1 * 4 + 2])
    assert torch.allclose(glob, tokens[:, 0])


def test_dinov2_refuses_weights_of_another_size(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(_official_dinov2_state(dim=48), path)
    with pytest.raises(UserError, match=r"does not hold dinov2-s weights \(first mismatching key: cls_token\)"):
        DINOv2Teacher("dinov2-s", weights=path, resolution=56, **TINY)


def test_dinov2_missing_weights_file(tmp_path):
    with pytest.raises(UserError, match="--teacher-weights file not found"):
        DINOv2Teacher("dinov2-s", weights=tmp_path / "nope.pth", resolution=56, **TINY)


def test_dinov2_offline_fails_fast_naming_both_remedies(monkeypatch):
    import reals_cli.models.teachers as teachers

    monkeypatch.setattr(teachers, "_hub_reachable", lambda *a, **k: False)
    monkeypatch.setattr(teachers, "_hub_cache_file", lambda arch: None)
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        build_teacher("dinov2-b")
    assert time.monotonic() - start < 30
    assert "--teacher-weights" in str(err.value) and "internet" in str(err.value)


@pytest.mark.parametrize("resolution", [0, -14, 100])
def test_dinov2_resolution_is_a_positive_multiple_of_its_patch(resolution):
    with pytest.raises(UserError, match=rf"^--teacher-resolution must be a positive multiple of DINOv2's patch size 14 "
                                        rf"\(224 or 448, say\), got {resolution}$"):
        DINOv2Teacher("dinov2-s", resolution=resolution)


def test_unknown_teacher():
    with pytest.raises(UserError, match="unknown teacher 'clip'; choose one of dinov2-s, dinov2-b, dinov2-l, dinov2-g, vgg16"):
        build_teacher("clip")


def test_vgg_teacher_equals_torchvision(assets_home):
    from torchvision.models import vgg16

    from reals_cli.artifacts import load_weights
    from reals_cli.assets import asset_path

    teacher = build_teacher("vgg16")
    reference = vgg16(weights=None).eval()
    reference.features.load_state_dict({k.removeprefix("features."): v for k, v in load_weights(asset_path("vgg16")).items()})
    images = torch.rand(2, 3, 64, 64)
    patch, glob = teacher(images)
    x = (images - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        relu4_3 = reference.features[:23](x)
        relu5_3 = reference.features[23:30](relu4_3)
    assert patch.shape == (2, 512, 8, 8) and teacher.grid(64) == 8
    torch.testing.assert_close(patch, relu4_3, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(glob, relu5_3.mean(dim=(2, 3)), rtol=1e-5, atol=1e-5)


def test_lpips_zero_on_identity_and_grows_with_noise(assets_home):
    from reals_cli.models.perceptual import LPIPS

    lpips = LPIPS()
    g = torch.Generator().manual_seed(0)
    # Smooth images, so that noise is a real perceptual change.
    x = torch.nn.functional.interpolate(torch.rand(2, 3, 8, 8, generator=g), size=64, mode="bilinear") * 2 - 1
    assert torch.allclose(lpips(x, x), torch.zeros(2), atol=1e-7)
    noise = torch.randn(x.shape, generator=g)
    d = [lpips(x, (x + s * noise).clamp(-1, 1)).mean().item() for s in (0.05, 0.1, 0.2, 0.4)]
    assert all(a < b for a, b in zip(d, d[1:])), d
    assert d[0] > 0
