"""reals_cli.shapes: exact depth against closed-form ray intersections, masks that agree with depth,
deterministic files, and the layout the VAE, FID and probe readers take."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from reals_cli.data import shapes as S
from reals_cli.cli import main
from reals_cli.data.images import ImageFolder
from reals_cli.data.probe_sets import open_probe_data


def reference_ray(i: int, j: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(origin, unit direction, optical axis) of pixel (row i, column j): the camera-frame ray
    (x right, y up, z forward) rotated down by the tilt about the x axis."""
    f = (size / 2) / math.tan(math.radians(S.CAMERA_FOV_DEG) / 2)
    cam = np.array([(j + 0.5 - size / 2) / f, -(i + 0.5 - size / 2) / f, 1.0])
    a = math.radians(S.CAMERA_TILT_DEG)
    rot = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    w = rot @ cam
    return np.array([0.0, S.CAMERA_HEIGHT, 0.0]), w / np.linalg.norm(w), rot @ [0.0, 0.0, 1.0]


def ball(x=0.3, z=4.0, r=0.7):
    return S.Shape("sphere", x, z, r, 2 * r, 0.0, (1.0, 0.0, 0.0))


def test_sphere_pixel_depth_is_the_closed_form_intersection():
    size, s = 32, ball()
    out = S.render([s], size)
    centre = np.array([s.x, s.size, s.z])
    checked = 0
    for i, j in zip(*np.nonzero(out["labels"] == S.SEG_CLASSES.index("sphere"))):
        o, w, axis = reference_ray(i, j, size)
        oc = o - centre
        b = w @ oc
        dist = -b - math.sqrt(b * b - (oc @ oc - s.size**2))  # nearest root of |o + s w - c| = r, |w| = 1
        assert out["depth"][i, j] == pytest.approx(dist * (w @ axis), rel=1e-12)
        checked += 1
    assert checked > 20  # a sphere of radius 0.7 m at 4 m covers dozens of pixels at 32 px


def test_ground_and_sky_pixels_follow_the_plane():
    size = 24
    out = S.render([], size)
    for i in range(size):
        o, w, axis = reference_ray(i, 5, size)
        if w[1] < 0 and abs((o + (-o[1] / w[1]) * w)[2]) <= S.GROUND_HALF:
            assert out["labels"][i, 5] == S.SEG_CLASSES.index("ground")
            assert out["depth"][i, 5] == pytest.approx(-o[1] / w[1] * (w @ axis), rel=1e-12)
        else:
            assert out["labels"][i, 5] == S.SEG_CLASSES.index("background")
            assert np.isinf(out["depth"][i, 5])
    assert (out["labels"][0] == 0).all() and (out["labels"][-1] == 1).all()  # sky at the top, ground below


@pytest.mark.parametrize("index", range(6))
def test_masks_agree_with_depth(index):
    """Every pixel's 3D point (from its depth) lies on the surface its label names."""
    shapes, _ = S.scene(3, "train", index)
    size = 32
    out = S.render(shapes, size)
    for i in range(size):
        for j in range(size):
            label, depth = S.SEG_CLASSES[out["labels"][i, j]], out["depth"][i, j]
            o, w, axis = reference_ray(i, j, size)
            if label == "background":
                assert np.isinf(depth)
                continue
            p = o + depth / (w @ axis) * w
            if label == "ground":
                assert abs(p[1]) < 1e-9
                continue
            assert p[1] > -1e-9
            gaps = []
            for s in (s for s in shapes if s.kind == label):
                if s.kind == "sphere":
                    gaps.append(abs(np.linalg.norm(p - [s.x, s.size, s.z]) - s.size))
                elif s.kind == "cylinder":
                    radial = math.hypot(p[0] - s.x, p[2] - s.z)
                    gaps.append(min(abs(radial - s.size) if p[1] <= s.height + 1e-9 else np.inf,
                                    abs(p[1] - s.height) if radial <= s.size + 1e-9 else np.inf))
                else:  # the box's frame: rotate (x, z) back by the yaw; one coordinate is on its face
                    c, sn = math.cos(s.yaw), math.sin(s.yaw)
                    dx, dz = p[0] - s.x, p[2] - s.z
                    local = np.abs([c * dx - sn * dz, p[1] - s.height / 2, sn * dx + c * dz])
                    half = np.array([s.size, s.height / 2, s.size])
                    gaps.append(np.abs(local - half).min() if (local <= half + 1e-9).all() else np.inf)
            assert min(gaps) < 1e-9, (i, j, label)


def test_scene_class_is_the_main_shape_and_classes_are_balanced():
    labels = []
    for i in range(300):
        shapes, label = S.scene(0, "train", i)
        assert shapes[0].kind == S.SHAPE_TYPES[label]
        assert all(s.kind != shapes[0].kind and s.size < shapes[0].size for s in shapes[1:])
        labels.append(label)
    assert np.bincount(labels, minlength=3).min() > 70


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_export_is_deterministic_and_readable(tmp_path):
    a = S.export_shapes(tmp_path / "a", size=16, count=12, test_count=4, seed=5)
    S.export_shapes(tmp_path / "b", size=16, count=12, test_count=4, seed=5)
    S.export_shapes(tmp_path / "c", size=16, count=12, test_count=4, seed=6)
    S.export_shapes(tmp_path / "d", size=16, count=6, test_count=4, seed=5)
    fa, fb, fc, fd = (_files(tmp_path / k) for k in "abcd")
    assert len(fa) == 3 * 16 and fa == fb
    assert fa != fc
    assert all(fa[k] == v for k, v in fd.items())  # a larger count keeps the first scenes
    assert a["train"] == 12 and sum(a["per_class"]["train"]) == 12
    assert S.export_shapes(tmp_path / "a", size=16, count=12, test_count=4, seed=5)["already"]

    train = ImageFolder(tmp_path / "a", 16, flip=False)
    assert train.classes == S.SHAPE_CLASSES and len(train) == 12  # masks and depths are not images
    depth = open_probe_data("depth", tmp_path / "a", "test", 16)
    seg = open_probe_data("seg", tmp_path / "a", "test", 16)
    assert seg.classes == S.SEG_CLASSES and len(depth) == len(seg) == 4
    for k in range(4):
        index = int(Path(depth.keys[k]).stem)
        truth = S.render(S.scene(5, "test", index)[0], 16)
        image, metres = depth[k]
        np.testing.assert_allclose(metres.numpy(), np.where(np.isfinite(truth["depth"]), truth["depth"], 0), atol=5e-4)
        np.testing.assert_array_equal(seg[k][1].numpy(), truth["labels"])
        np.testing.assert_array_equal(image.mul(255).round().permute(1, 2, 0).numpy(),
                                      np.rint(np.clip(truth["image"], 0, 1) * 255))


def test_cli_refuses_another_export_in_the_same_folder(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(main, ["data", "shapes", str(tmp_path / "s"), "--size", "8", "--count", "2"])
    assert ok.exit_code == 0, ok.output
    again = runner.invoke(main, ["data", "shapes", str(tmp_path / "s"), "--size", "8", "--count", "3"])
    assert again.exit_code == 2 and "other settings" in again.output
