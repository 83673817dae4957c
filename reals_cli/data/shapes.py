"""Rendered scenes of simple 3D shapes with exact depth and segmentation: an in-domain probe dataset.

A fixed pinhole camera looks down at a square of ground plane on which stand one to three
shapes (spheres, yaw-rotated boxes, upright cylinders), lit by one directional light
(Lambertian, with cast shadows) above a sky. Every pixel is one ray through the pixel
centre, intersected analytically in float64 (numpy, all rays at once), so the image, the
depth and the labels of a pixel describe the same point:

- depth: z-depth in metres (distance along the optical axis, as NYU's and Middlebury's),
  none (stored 0) where the ray meets only sky;
- segmentation: SEG_CLASSES, one class per shape type plus ground and background (sky);
- image label: the type of the scene's main shape, drawn uniformly and larger than the
  0-2 distractors of other types, so the class-conditional SiT and a classifier can use it.

Scene i of a split is a function of (seed, split, i) alone: the same seed gives the same
bytes, and a larger --count keeps the first scenes. On disk (`export_shapes`) the layout is
the class-folder one that `data fashion-mnist` writes, with two files beside each image:

    OUT/{train,test}/<k-shape>/<index:05d>.png        RGB
    OUT/{train,test}/<k-shape>/<index:05d>.mask.png   uint8 SEG_CLASSES indices
    OUT/{train,test}/<k-shape>/<index:05d>.depth.png  uint16 millimetres, 0 = sky

so train-vae, encode and eval-fid read the images, `probe-seg --format masks` the masks (with
the dataset's class names) and `probe-depth --format png` the depths.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import UserError
from .exports import _png_bytes, _write_new, class_folder
from .images import DEPTH_SUFFIX, MASK_SUFFIX

SHAPE_TYPES = ("sphere", "box", "cylinder")
SEG_CLASSES = ["background", "ground", *SHAPE_TYPES]
SHAPE_CLASSES = [class_folder(i, n) for i, n in enumerate(SHAPE_TYPES)]
FORMAT_VERSION = 1
SPLITS = {"train": 0, "test": 1}  # the split's entry in each scene's seed

# The camera: at (0, CAMERA_HEIGHT, 0), looking along +z tilted down by CAMERA_TILT_DEG, square
# image with a horizontal and vertical field of view of CAMERA_FOV_DEG (the same scene at any size).
CAMERA_HEIGHT = 1.6
CAMERA_TILT_DEG = 20.0
CAMERA_FOV_DEG = 50.0
GROUND_HALF = 12.0  # the ground is |x| <= 12, |z| <= 12 m: beyond it, sky; depths stay under 65.535 m
LIGHT = np.array([-0.5, 1.0, -0.6]) / np.linalg.norm([-0.5, 1.0, -0.6])
AMBIENT = 0.3
PALETTE = np.array([  # albedos of the shapes
    [0.85, 0.20, 0.20], [0.20, 0.60, 0.90], [0.25, 0.75, 0.30],
    [0.95, 0.80, 0.20], [0.70, 0.35, 0.85], [0.95, 0.55, 0.15],
])
GROUND_ALBEDO = (np.array([0.62, 0.60, 0.56]), np.array([0.48, 0.46, 0.43]))  # a 1 m checkerboard
SKY_TOP, SKY_HORIZON = np.array([0.45, 0.65, 0.95]), np.array([0.85, 0.90, 0.97])
DEPTH_SCALE = 1000.0  # depth PNG units per metre
_EPS = 1e-9


@dataclass(frozen=True)
class Shape:
    """One shape standing on the ground at (x, z): `size` is the radius (sphere, cylinder) or half
    the width (box); `height` the cylinder's or box's height (a sphere's is 2 * size)."""

    kind: str
    x: float
    z: float
    size: float
    height: float
    yaw: float  # boxes only: rotation about the vertical axis, radians
    color: tuple[float, float, float]


def camera_rays(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(origin 3, directions size x size x 3) with d . forward = 1, so a ray's parameter t is z-depth."""
    tilt = math.radians(CAMERA_TILT_DEG)
    forward = np.array([0.0, -math.sin(tilt), math.cos(tilt)])
    up = np.array([0.0, math.cos(tilt), math.sin(tilt)])
    right = np.array([1.0, 0.0, 0.0])
    focal = (size / 2) / math.tan(math.radians(CAMERA_FOV_DEG) / 2)
    offsets = (np.arange(size) + 0.5 - size / 2) / focal
    u, v = np.meshgrid(offsets, offsets)  # u: along the row (right), v: down the column
    dirs = forward + u[..., None] * right - v[..., None] * up
    return np.array([0.0, CAMERA_HEIGHT, 0.0]), dirs


def _ground(o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with np.errstate(divide="ignore", invalid="ignore"):
        t = -o[:, 1] / d[:, 1]
    p = o + t[:, None] * d
    hit = (d[:, 1] < 0) & (t > _EPS) & (np.abs(p[:, 0]) <= GROUND_HALF) & (np.abs(p[:, 2]) <= GROUND_HALF)
    return np.where(hit, t, np.inf), np.broadcast_to([0.0, 1.0, 0.0], d.shape)


def _sphere(s: Shape, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c = np.array([s.x, s.size, s.z])
    oc = o - c
    a = (d * d).sum(1)
    b = (d * oc).sum(1)
    disc = b * b - a * ((oc * oc).sum(1) - s.size**2)
    t = (-b - np.sqrt(np.maximum(disc, 0))) / a
    hit = (disc >= 0) & (t > _EPS)
    t = np.where(hit, t, np.inf)
    with np.errstate(invalid="ignore"):
        normal = (o + np.where(hit, t, 0)[:, None] * d - c) / s.size
    return t, normal


def _box(s: Shape, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The slab method in the box's own frame (rotation about y keeps t)."""
    cos, sin = math.cos(s.yaw), math.sin(s.yaw)
    rot = np.array([[cos, 0.0, sin], [0.0, 1.0, 0.0], [-sin, 0.0, cos]])  # local -> world
    half = np.array([s.size, s.height / 2, s.size])
    lo = (o - [s.x, s.height / 2, s.z]) @ rot  # world -> local: times rot's transpose, on rows
    ld = d @ rot
    ld = np.where(np.abs(ld) < 1e-300, 1e-300, ld)  # an axis-parallel ray: its slab is all or nothing
    t1, t2 = (-half - lo) / ld, (half - lo) / ld
    near, far = np.minimum(t1, t2), np.maximum(t1, t2)
    t_near, t_far = near.max(1), far.min(1)
    hit = (t_near <= t_far) & (t_near > _EPS)
    axis = near.argmax(1)
    local_n = np.zeros_like(d)
    local_n[np.arange(len(d)), axis] = -np.sign(ld[np.arange(len(d)), axis])
    return np.where(hit, t_near, np.inf), local_n @ rot.T


def _cylinder(s: Shape, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The side (xz quadratic, 0 <= y <= height) and the top cap; the bottom lies on the ground."""
    ox, oz = o[:, 0] - s.x, o[:, 2] - s.z
    a = d[:, 0] ** 2 + d[:, 2] ** 2
    b = ox * d[:, 0] + oz * d[:, 2]
    disc = b * b - a * (ox**2 + oz**2 - s.size**2)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_side = (-b - np.sqrt(np.maximum(disc, 0))) / a
        y = o[:, 1] + t_side * d[:, 1]
        side = (disc >= 0) & (a > 0) & (t_side > _EPS) & (y >= 0) & (y <= s.height)
        t_cap = (s.height - o[:, 1]) / d[:, 1]
        cx, cz = ox + t_cap * d[:, 0], oz + t_cap * d[:, 2]
        cap = (d[:, 1] != 0) & (t_cap > _EPS) & (cx**2 + cz**2 <= s.size**2)
    t_side, t_cap = np.where(side, t_side, np.inf), np.where(cap, t_cap, np.inf)
    t = np.minimum(t_side, t_cap)
    px, pz = ox + np.where(side, t_side, 0) * d[:, 0], oz + np.where(side, t_side, 0) * d[:, 2]
    side_n = np.stack([px, np.zeros_like(px), pz], 1) / s.size
    normal = np.where((t_cap < t_side)[:, None], [0.0, 1.0, 0.0], side_n)
    return t, normal


_INTERSECT = {"sphere": _sphere, "box": _box, "cylinder": _cylinder}


def intersect(shapes: list[Shape], o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest hit of rays (o, d: N x 3) with ground and shapes: (t, normal, what: -1 sky, 0 ground, k+1 shape k)."""
    hits = [_ground(o, d)] + [_INTERSECT[s.kind](s, o, d) for s in shapes]
    ts = np.stack([t for t, _ in hits])
    nearest = ts.argmin(0)
    t = ts[nearest, np.arange(len(d))]
    normal = np.stack([n for _, n in hits])[nearest, np.arange(len(d))]
    return t, normal, np.where(np.isfinite(t), nearest, -1)


def render(shapes: list[Shape], size: int) -> dict[str, np.ndarray]:
    """image (size x size x 3, float64 in [0, 1]), depth (z-depth in m, inf for sky) and labels (SEG_CLASSES)."""
    origin, dirs = camera_rays(size)
    d = dirs.reshape(-1, 3)
    o = np.broadcast_to(origin, d.shape)
    t, normal, what = intersect(shapes, o, d)
    solid = what >= 0
    point = o + np.where(solid, t, 0)[:, None] * d
    shadow_o = point + 1e-6 * normal
    lit = ~np.isfinite(intersect(shapes, shadow_o, np.broadcast_to(LIGHT, d.shape))[0])
    light = AMBIENT + (1 - AMBIENT) * np.clip(normal @ LIGHT, 0, None) * lit
    checker = (np.floor(point[:, 0]) + np.floor(point[:, 2])).astype(np.int64) % 2
    albedo = np.where(checker[:, None] == 0, GROUND_ALBEDO[0], GROUND_ALBEDO[1])
    for k, s in enumerate(shapes):
        albedo = np.where((what == k + 1)[:, None], s.color, albedo)
    elevation = np.clip(d[:, 1] / np.linalg.norm(d, axis=1) * 4, 0, 1)[:, None]  # 0 at the horizon
    sky = SKY_HORIZON + (SKY_TOP - SKY_HORIZON) * elevation
    image = np.where(solid[:, None], albedo * light[:, None], sky)
    kinds = np.array([-1, 0] + [SEG_CLASSES.index(s.kind) - 1 for s in shapes])  # what -> class - 1
    labels = kinds[what + 1] + 1
    return {"image": image.reshape(size, size, 3), "depth": np.where(solid, t, np.inf).reshape(size, size),
            "labels": labels.astype(np.uint8).reshape(size, size)}


def scene(seed: int, split: str, index: int) -> tuple[list[Shape], int]:
    """Scene `index` of `split`: its shapes (main shape first) and its class (the main shape's type)."""
    rng = np.random.default_rng([seed, SPLITS[split], index])
    label = int(rng.integers(len(SHAPE_TYPES)))
    others = [k for k in range(len(SHAPE_TYPES)) if k != label]
    kinds = [label] + [others[int(rng.integers(len(others)))] for _ in range(int(rng.integers(3)))]
    shapes: list[Shape] = []
    for n, kind in enumerate(kinds):
        size = rng.uniform(0.5, 0.8) if n == 0 else rng.uniform(0.25, 0.45)
        for _ in range(50):  # a free spot in view; a distractor that finds none is left out
            z = rng.uniform(2.5, 5.5)
            x = rng.uniform(-0.3, 0.3) * z
            if all(math.hypot(x - s.x, z - s.z) > 1.5 * (size + s.size) for s in shapes):
                break
        else:
            continue
        height = {"sphere": 2 * size, "box": rng.uniform(1.0, 2.0) * size, "cylinder": rng.uniform(1.5, 3.0) * size}
        shapes.append(Shape(SHAPE_TYPES[kind], float(x), float(z), float(size), float(height[SHAPE_TYPES[kind]]),
                            float(rng.uniform(0, math.pi / 2)), tuple(PALETTE[int(rng.integers(len(PALETTE)))])))
    return shapes, label


def depth_png(depth: np.ndarray) -> Image.Image:
    """Metres (inf: none) as a 16-bit PNG in millimetres, 0 = no measurement (probe_data.DepthPNGFolder)."""
    mm = np.where(np.isfinite(depth), np.rint(depth * DEPTH_SCALE), 0)
    if mm.max() > 65535:
        raise ValueError(f"depth {depth[np.isfinite(depth)].max():.1f} m does not fit a 16-bit PNG in mm")
    return Image.fromarray(mm.astype(np.uint16))


def export_shapes(out: str | os.PathLike, size: int = 32, count: int = 10_000, test_count: int | None = None,
                  seed: int = 0) -> dict[str, Any]:
    """Render `count` training and `test_count` test scenes into `out` (see the module docstring)."""
    from ..artifacts import MANIFEST, atomic_write_json, made_by, read_manifest, write_manifest

    started = time.perf_counter()
    test_count = max(1, count // 5) if test_count is None else test_count
    if size < 8 or count < 1 or test_count < 1:
        raise UserError(f"--size must be at least 8 and the counts positive, got size {size}, "
                        f"count {count}, test count {test_count}")
    out = Path(out)
    config = {"dataset": "shapes", "size": int(size), "count": int(count), "test_count": int(test_count),
              "seed": int(seed), "classes": SHAPE_CLASSES, "mask_classes": SEG_CLASSES,
              "depth": f"z-depth, uint16 PNG in 1/{DEPTH_SCALE:g} m, 0 = sky",
              "camera": {"height_m": CAMERA_HEIGHT, "tilt_deg": CAMERA_TILT_DEG, "fov_deg": CAMERA_FOV_DEG}}
    if (out / MANIFEST).is_file():
        old = read_manifest(out)
        if old.get("config") == config:
            return {"out": str(out), "already": True, **{s: old["metrics"][s] for s in SPLITS},
                    "seconds": time.perf_counter() - started}
        raise UserError(f"{out} already holds a '{old.get('kind')}' artifact{made_by(old)} made with other settings; "
                        f"choose another folder or delete it")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an empty folder; choose a new one")
    counts, per_class = {"train": count, "test": test_count}, {}
    for split, n in counts.items():
        for folder in SHAPE_CLASSES:
            (out / split / folder).mkdir(parents=True, exist_ok=True)
        tally = [0] * len(SHAPE_TYPES)
        for i in range(n):
            shapes, label = scene(seed, split, i)
            r = render(shapes, size)
            base = str(out / split / SHAPE_CLASSES[label] / f"{i:05d}")
            image = Image.fromarray(np.rint(np.clip(r["image"], 0, 1) * 255).astype(np.uint8), "RGB")
            _write_new(base + MASK_SUFFIX, _png_bytes(Image.fromarray(r["labels"], "L")))
            _write_new(base + DEPTH_SUFFIX, _png_bytes(depth_png(r["depth"])))
            _write_new(base + ".png", _png_bytes(image))  # the image last: ImageFolder lists images
            tally[label] += 1
        per_class[split] = tally
    atomic_write_json(out / "classes.json", [{"label": i, "folder": f, "name": n}
                                             for i, (f, n) in enumerate(zip(SHAPE_CLASSES, SHAPE_TYPES))])
    seconds = round(time.perf_counter() - started, 2)
    write_manifest(out, kind="dataset", format_version=FORMAT_VERSION, config=config,
                   metrics={**counts, "per_class": per_class, "seconds": seconds}, files=["classes.json"])
    return {"out": str(out), "already": False, **counts, "per_class": per_class, "seconds": seconds}
