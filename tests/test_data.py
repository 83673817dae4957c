"""reals_cli.data.images: ADM crop, the class-folder dataset (bad files, modes, flips, masks), Fashion-MNIST export."""

from __future__ import annotations

import gzip
import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from reals_cli.cli import main
from reals_cli.data import exports, images
from reals_cli.data.exports import export_fashion_mnist
from reals_cli.data.images import ImageFolder, adm_center_crop
from reals_cli.errors import UserError

EXPECTED = "expected one sub-folder per class (ImageNet train layout) holding .jpg/.jpeg/.png/.webp/.bmp images"


# -- ADM center crop ------------------------------------------------------------------------------

def adm_reference(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """openai/guided-diffusion `center_crop_arr`, verbatim."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


def _noise(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


@pytest.mark.parametrize("w,h,size", [(256, 256, 64), (300, 200, 64), (200, 300, 64), (1000, 129, 64),
                                      (20, 30, 64), (1, 1, 4), (64, 64, 64), (511, 257, 256), (7, 1000, 32)])
def test_adm_crop_sizes(w, h, size):
    assert adm_center_crop(_noise(w, h), size).size == (size, size)
    assert adm_center_crop(_noise(w, h, mode="L"), size, mask=True).size == (size, size)


@pytest.mark.parametrize("w,h,size", [(300, 200, 64), (200, 531, 48), (20, 30, 64), (256, 256, 64)])
def test_adm_crop_matches_reference(w, h, size):
    img = _noise(w, h, seed=w + h)
    np.testing.assert_array_equal(np.array(adm_center_crop(img, size)), adm_reference(img, size))


def test_adm_crop_mask_keeps_geometry():
    # 400x200, left of x=150 is foreground: halve to 200x100, bicubic to 128x64, crop x 32..96,
    # so the edge lands at column 150 / 2 * 0.64 - 32 = 16 of the crop, in the image and in the mask
    w, h, size = 400, 200, 64
    fg = np.zeros((h, w), np.uint8)
    fg[:, :150] = 1
    m = np.array(adm_center_crop(Image.fromarray(fg, "L"), size, mask=True))
    assert m.shape == (size, size) and set(np.unique(m)) == {0, 1}
    assert (m[:, :16] == 1).all() and (m[:, 16:] == 0).all()
    x = np.array(adm_center_crop(Image.fromarray(fg * 255, "L"), size))
    assert (x[:, :15] > 250).all() and (x[:, 17:] < 5).all()


# -- the class-folder dataset ---------------------------------------------------------------------

def _jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def tree(tmp_path: Path) -> dict:
    root = tmp_path / "imgs"
    cat, dog = root / "cat", root / "dog"
    cat.mkdir(parents=True)
    dog.mkdir(parents=True)
    good = {}
    _noise(40, 50, 1).save(cat / "a.jpg")
    good["a"] = cat / "a.jpg"
    _noise(33, 33, 2).save(cat / "b.JPEG", format="JPEG")  # upper-case extension
    good["b"] = cat / "b.JPEG"
    full = _jpeg_bytes(_noise(64, 64, 3))
    (cat / "corrupt.jpg").write_bytes(full[: len(full) // 2])  # truncated download
    Image.new("RGB", (1, 1), (255, 0, 0)).save(cat / "tiny.png")  # 1x1 placeholder
    (cat / "notes.txt").write_text("not an image")
    (cat / ".hidden.jpg").write_bytes(b"junk")
    Image.new("CMYK", (30, 20), (0, 255, 255, 0)).save(dog / "cmyk.jpg")
    good["cmyk"] = dog / "cmyk.jpg"
    rgba = np.zeros((24, 24, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:, 12:, 3] = 255  # right half opaque, left half fully transparent
    Image.fromarray(rgba, "RGBA").save(dog / "rgba.png")
    good["rgba"] = dog / "rgba.png"
    Image.fromarray(np.full((16, 20), 77, np.uint8), "L").save(dog / "gray.png")
    good["gray"] = dog / "gray.png"
    Image.fromarray(np.full((16, 16), 65535, np.uint16)).save(dog / "deep.png")  # I;16
    good["deep"] = dog / "deep.png"
    _noise(20, 20, 4).convert("P").save(dog / "pal.bmp")
    good["pal"] = dog / "pal.bmp"
    Image.fromarray(np.full((12, 12, 2), 255, np.uint8), "LA").save(dog / "la.webp", lossless=True)
    good["la"] = dog / "la.webp"
    return {"root": root, "good": good, "bad": {str(cat / "corrupt.jpg"), str(cat / "tiny.png")}}


def test_imagefolder_lists_without_opening(tree):
    ds = ImageFolder(tree["root"], size=16)
    assert ds.classes == ["cat", "dog"]
    names = sorted(Path(p).name for p, _ in ds.samples)
    assert names == sorted(["a.jpg", "b.JPEG", "corrupt.jpg", "tiny.png", "cmyk.jpg", "rgba.png",
                            "gray.png", "deep.png", "pal.bmp", "la.webp"])
    assert {Path(p).name: lbl for p, lbl in ds.samples}["cmyk.jpg"] == 1
    assert len(ds) == 10 and ds.skipped == set()


def test_imagefolder_loads_good_skips_bad(tree, capsys):
    size = 16
    ds = ImageFolder(tree["root"], size=size, flip=False)
    seen = {}
    for i in range(len(ds)):
        x, label = ds[i]
        assert x.dtype == torch.float32 and x.shape == (3, size, size)
        assert 0.0 <= x.min() and x.max() <= 1.0
        seen[i] = (x, label)
    assert ds.skipped == tree["bad"]
    assert set(ds.bad) == tree["bad"]
    index = {p: i for i, (p, _) in enumerate(ds.samples)}
    # a bad index returns the next readable one
    bad_i = index[str(tree["root"] / "cat" / "corrupt.jpg")]
    nxt = (bad_i + 1) % len(ds)
    while ds.samples[nxt][0] in tree["bad"]:
        nxt = (nxt + 1) % len(ds)
    assert torch.equal(seen[bad_i][0], seen[nxt][0]) and seen[bad_i][1] == ds.samples[nxt][1]
    # colour conversions
    gray = seen[index[str(tree["good"]["gray"])]][0]
    assert torch.allclose(gray, torch.full_like(gray, 77 / 255))
    deep = seen[index[str(tree["good"]["deep"])]][0]
    assert torch.allclose(deep, torch.ones_like(deep))  # 65535 -> 255
    rgba = seen[index[str(tree["good"]["rgba"])]][0]
    assert rgba[:, :, :6].max() == 0.0  # transparent -> black
    assert torch.allclose(rgba[:, :, -6:], torch.full_like(rgba[:, :, -6:], 200 / 255))
    cmyk = seen[index[str(tree["good"]["cmyk"])]][0]
    assert cmyk[0].mean() > 0.9 and cmyk[1].mean() < 0.1  # (0, 255, 255, 0) CMYK is red
    # one warning at the first skip, one from report_skipped
    assert ds.report_skipped() == 2
    err = capsys.readouterr().err
    assert err.count("skipping unreadable image") == 1
    assert "skipped 2 unreadable images" in err


def test_verify_finds_bad_files(tree, monkeypatch):
    ds = ImageFolder(tree["root"], size=16)
    assert set(ds.verify(workers=1, progress=False)) == tree["bad"]
    assert "truncated" in ds.bad[str(tree["root"] / "cat" / "corrupt.jpg")]
    assert "1x1" in ds.bad[str(tree["root"] / "cat" / "tiny.png")]
    monkeypatch.setattr(images, "_POOL_MIN", 0)  # the multiprocessing path
    ds2 = ImageFolder(tree["root"], size=16)
    assert set(ds2.verify(workers=2, progress=True)) == tree["bad"]


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(UserError) as e:
        ImageFolder(tmp_path / "nope", size=8)
    assert str(e.value) == f"dataset folder not found: {tmp_path / 'nope'}"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError) as e:
        ImageFolder(empty, size=8)
    assert str(e.value) == f"no images found in {empty}: {EXPECTED} (it has no sub-folders)"
    classes = tmp_path / "classes"
    (classes / "a").mkdir(parents=True)
    (classes / "b").mkdir()
    (classes / "b" / "readme.txt").write_text("x")
    with pytest.raises(UserError) as e:
        ImageFolder(classes, size=8)
    assert str(e.value) == f"no images found in {classes}: {EXPECTED} (its 2 class folders hold no images)"
    flat = tmp_path / "flat"
    flat.mkdir()
    _noise(10, 10).save(flat / "x.png")
    with pytest.raises(UserError, match="it holds 1 images directly") as e:
        ImageFolder(flat, size=8)
    assert "\n" not in str(e.value)


def test_all_bad_raises_user_error(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x.jpg").write_bytes(b"not a jpeg")
    ds = ImageFolder(tmp_path, size=8)
    with pytest.raises(UserError, match="none of the 1 images"):
        ds[0]


def _half_image(tmp_path: Path) -> Path:
    root = tmp_path / "half"
    (root / "only").mkdir(parents=True)
    arr = np.zeros((32, 48, 3), np.uint8)
    arr[:, :24] = 255  # left half white
    Image.fromarray(arr).save(root / "only" / "x.png")
    m = np.zeros((32, 48), np.uint8)
    m[:, :24] = 1  # mask marks the white half
    Image.fromarray(m, "L").save(root / "only" / "x.mask.png")
    return root


def test_flip_is_random_per_access_and_masks_follow(tmp_path):
    root = _half_image(tmp_path)
    ds = ImageFolder(root, size=16, masks=True)
    assert len(ds) == 1  # the mask file is not an image of the dataset
    torch.manual_seed(0)
    sides = set()
    for _ in range(30):
        x, m, label = ds[0]
        assert label == 0 and m.dtype == torch.uint8 and m.shape == (16, 16)
        assert torch.equal((x[0] > 0.5).to(torch.uint8), m)  # the mask flips with its image
        sides.add("left" if x[0, :, 0].mean() > 0.5 else "right")
    assert sides == {"left", "right"}
    # the same seed gives the same flips; a generator works too
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = ImageFolder(root, size=16, generator=g1)
    b = ImageFolder(root, size=16, generator=g2)
    assert all(torch.equal(a[0][0], b[0][0]) for _ in range(10))
    no_flip = ImageFolder(root, size=16, flip=False)
    assert all(no_flip[0][0][0, :, 0].mean() > 0.5 for _ in range(10))


def test_masks_required_when_asked(tmp_path):
    root = _half_image(tmp_path)
    _noise(20, 20).save(root / "only" / "y.png")
    with pytest.raises(UserError, match=r"1 images in .* have no mask beside them"):
        ImageFolder(root, size=8, masks=True)
    assert len(ImageFolder(root, size=8)) == 2


# -- Fashion-MNIST export -------------------------------------------------------------------------

def _write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray,
               image_magic: int = 2051, label_magic: int = 2049) -> None:
    n, rows, cols = images.shape
    with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">iiii", image_magic, n, rows, cols) + images.astype(np.uint8).tobytes())
    with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">ii", label_magic, len(labels)) + labels.astype(np.uint8).tobytes())


def _fake_images(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    imgs = np.zeros((n, 28, 28), np.uint8)
    for i in range(n):  # an object on a black background
        y0, x0 = rng.integers(2, 12, 2)
        h, w = rng.integers(6, 14, 2)
        imgs[i, y0:y0 + h, x0:x0 + w] = rng.integers(1, 256, (h, w))
    return imgs


@pytest.fixture
def fm_source(tmp_path: Path) -> dict:
    src = tmp_path / "fm-src"
    src.mkdir()
    train, test = _fake_images(30, 0), _fake_images(10, 1)
    train_labels, test_labels = np.arange(30) % 10, (np.arange(10) * 3) % 10
    _write_idx(src, "train", train, train_labels)
    _write_idx(src, "t10k", test, test_labels)
    return {"src": src, "train": (train, train_labels), "test": (test, test_labels)}


def test_class_folder_names():
    assert exports.FASHION_MNIST_CLASSES == [
        "0-t-shirt-top", "1-trouser", "2-pullover", "3-dress", "4-coat",
        "5-sandal", "6-shirt", "7-sneaker", "8-bag", "9-ankle-boot",
    ]


@pytest.mark.parametrize("workers", [1, 2])
def test_export_tree_masks_and_noop(fm_source, tmp_path, monkeypatch, workers):
    monkeypatch.setattr(exports, "_EXPORT_CHUNK", 4)  # several tasks, so workers=2 really uses the pool
    out = tmp_path / "fm"
    result = export_fashion_mnist(out, size=32, source=fm_source["src"], progress=False, workers=workers)
    assert (result["train"], result["test"], result["written"], result["already"]) == (30, 10, 40, False)
    for split in ("train", "test"):
        images, labels = fm_source[split]
        assert sorted(p.name for p in (out / split).iterdir()) == exports.FASHION_MNIST_CLASSES
        files = sorted((out / split).rglob("*.png"))
        assert len(files) == 2 * len(images)
        for i, (px, label) in enumerate(zip(images, labels)):
            base = out / split / exports.FASHION_MNIST_CLASSES[label] / f"{i:05d}"
            img = Image.open(f"{base}.png")
            assert img.mode == "RGB" and img.size == (32, 32)
            arr = np.array(img)
            assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
            expected_img = np.array(Image.fromarray(px).resize((32, 32), Image.BICUBIC))
            np.testing.assert_array_equal(arr[..., 0], expected_img)
            mask = np.array(Image.open(f"{base}.mask.png"))
            expected = np.array(Image.fromarray((px > 0).astype(np.uint8)).resize((32, 32), Image.NEAREST))
            np.testing.assert_array_equal(mask, expected)
            assert set(np.unique(mask)) == {0, 1}
    classes = json.loads((out / "classes.json").read_text())
    assert [c["folder"] for c in classes] == exports.FASHION_MNIST_CLASSES and classes[0]["name"] == "T-shirt/top"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "dataset" and manifest["format_version"] == 1
    assert manifest["config"]["size"] == 32 and manifest["metrics"]["train"] == 30
    assert not list(out.rglob("*.tmp"))
    # a second run does nothing
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = export_fashion_mnist(out, size=32, source=fm_source["src"], progress=False)
    assert again["already"] and again["written"] == 0 and (again["train"], again["test"]) == (30, 10)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes
    # the dataset reads it, with labels in class order and masks aligned
    ds = ImageFolder(out, size=32, flip=False, masks=True, split="test")
    assert ds.classes == exports.FASHION_MNIST_CLASSES and len(ds) == 10
    x, m, label = ds[0]
    assert label == int(fm_source["test"][1][0]) and x.shape == (3, 32, 32) and m.shape == (32, 32)
    assert len(ImageFolder(out, size=32)) == 30  # train by default


def test_export_resumes_after_interruption(fm_source, tmp_path):
    out = tmp_path / "fm"
    export_fashion_mnist(out, size=28, source=fm_source["src"], progress=False)
    # exported at 28 px, the pixels are the idx bytes and the mask is exactly pixel > 0
    px = fm_source["train"][0][7]
    base = out / "train" / exports.FASHION_MNIST_CLASSES[7] / "00007"
    np.testing.assert_array_equal(np.array(Image.open(f"{base}.png"))[..., 0], px)
    np.testing.assert_array_equal(np.array(Image.open(f"{base}.mask.png")), (px > 0).astype(np.uint8))
    # simulate a run killed before the end: no manifest, some files missing
    (out / "manifest.json").unlink()
    Path(f"{base}.png").unlink()
    Path(f"{base}.mask.png").unlink()
    stale = Path(base).parent / ".00007.png.12345.tmp"  # left by a killed worker
    stale.write_bytes(b"half a png")
    kept = out / "train" / exports.FASHION_MNIST_CLASSES[0] / "00000.png"
    before = kept.stat().st_mtime_ns
    result = export_fashion_mnist(out, size=28, source=fm_source["src"], progress=False)
    assert result["written"] == 1 and result["kept"] == 39 and not result["already"]
    assert Path(f"{base}.png").is_file() and (out / "manifest.json").is_file()
    assert kept.stat().st_mtime_ns == before and not stale.exists()
    # other settings on an existing export are refused, not mixed in
    with pytest.raises(UserError, match="other settings"):
        export_fashion_mnist(out, size=32, source=fm_source["src"], progress=False)
    (out / "manifest.json").unlink()
    with pytest.raises(UserError, match="unfinished export made with other settings"):
        export_fashion_mnist(out, size=32, source=fm_source["src"], progress=False)
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "thesis.tex").write_text("x")
    with pytest.raises(UserError, match="is not empty"):
        export_fashion_mnist(stranger, size=32, source=fm_source["src"], progress=False)


def test_export_limit(fm_source, tmp_path):
    out = tmp_path / "fm"
    r = export_fashion_mnist(out, size=16, source=fm_source["src"], limit=5, progress=False)
    assert (r["train"], r["test"]) == (5, 5)
    assert len(list((out / "train").rglob("*.mask.png"))) == 5
    assert sorted(p.name for p in (out / "test").iterdir()) == exports.FASHION_MNIST_CLASSES


def test_export_rejects_bad_files(fm_source, tmp_path):
    src = fm_source["src"]
    images, labels = fm_source["train"]
    _write_idx(src, "train", images, labels, image_magic=2049)
    with pytest.raises(UserError, match="magic number 2049, expected 2051"):
        export_fashion_mnist(tmp_path / "o1", source=src, progress=False)
    _write_idx(src, "train", images, labels[:20])
    with pytest.raises(UserError, match="30 images but .* holds 20 labels"):
        export_fashion_mnist(tmp_path / "o2", source=src, progress=False)
    with gzip.open(src / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">iiii", 2051, 30, 28, 28) + b"\0" * 100)
    with pytest.raises(UserError, match="is damaged"):
        export_fashion_mnist(tmp_path / "o3", source=src, progress=False)
    (src / "train-images-idx3-ubyte.gz").write_bytes(b"plain bytes")
    with pytest.raises(UserError, match="not a readable gzip file"):
        export_fashion_mnist(tmp_path / "o4", source=src, progress=False)
    (src / "train-images-idx3-ubyte.gz").unlink()
    with pytest.raises(UserError, match="has no train-images-idx3-ubyte.gz"):
        export_fashion_mnist(tmp_path / "o5", source=src, progress=False)


# -- CLI ------------------------------------------------------------------------------------------

def test_cli_fashion_mnist_and_check(fm_source, tmp_path):
    out = tmp_path / "cli-out"
    runner = CliRunner()
    r = runner.invoke(main, ["data", "fashion-mnist", str(out), "--size", "16", "--limit", "6",
                             "--source", str(fm_source["src"])])
    assert r.exit_code == 0, r.output
    assert "train images" in r.output and "0-t-shirt-top" in r.output
    assert len(list((out / "train").rglob("*.mask.png"))) == 6 and (out / "manifest.json").is_file()
    r = runner.invoke(main, ["data", "fashion-mnist", str(out), "--size", "16", "--limit", "6",
                             "--source", str(fm_source["src"])])
    assert r.exit_code == 0 and "already exported" in r.output
    r = runner.invoke(main, ["data", "check", str(out), "--masks"])
    assert r.exit_code == 0, r.output
    assert "train: good" in r.output and "test: bad" in r.output


def test_cli_missing_source_is_one_line(tmp_path):
    r = CliRunner().invoke(main, ["data", "fashion-mnist", str(tmp_path / "o"), "--source", str(tmp_path / "nope")])
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "Fashion-MNIST source folder not found" in lines[0], r.output


def test_cli_check_counts_bad(tree):
    r = CliRunner().invoke(main, ["data", "check", str(tree["root"])])
    assert r.exit_code == 1, r.output  # bad files found: a Makefile stops here
    assert "Traceback" not in r.output
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip()
            for line in r.output.splitlines() if line.count("│") >= 3}
    assert rows["good"] == "8" and rows["bad"] == "2" and rows["images"] == "10"
    assert "corrupt.jpg" in r.output


def test_cli_check_help_names_the_exit_status():
    r = CliRunner().invoke(main, ["data", "check", "--help"])
    assert r.exit_code == 0 and "Exits with status 1 when any file is bad" in r.output, r.output


def test_cli_export_refuses_another_artifact(fm_source, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    command = f"reals analyze a.zarr --limit 100 --out {other}"
    (other / "manifest.json").write_text(json.dumps({"kind": "analysis", "config": {"limit": 100}, "command": command}))
    r = CliRunner().invoke(main, ["data", "fashion-mnist", str(other), "--source", str(fm_source["src"])])
    assert r.exit_code == 2 and r.output.strip().splitlines() == [
        f"error: {other} holds a 'analysis' artifact made by `{command}`, not a Fashion-MNIST export; "
        f"choose another folder"], r.output
    assert sorted(p.name for p in other.iterdir()) == ["manifest.json"]


def test_cli_check_empty_folder(tmp_path):
    r = CliRunner().invoke(main, ["data", "check", str(tmp_path)])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1
    assert "no images found in" in r.output


@pytest.mark.assets
def test_photo_tiles_keep_the_depth_test_columns_out(assets_home, tmp_path):
    from reals_cli.assets import asset_path
    from reals_cli.data.exports import export_photo_tiles
    from reals_cli.data.probe_sets import MotorcycleDepth

    result = export_photo_tiles(tmp_path / "photos", size=24, per_photo=5)
    assert result["per_photo"]["motorcycle_left"] == 5 and len(result["per_photo"]) == 15
    tiles = sorted((tmp_path / "photos" / "train" / "motorcycle_left").glob("*.png"))
    assert len(tiles) == 5
    full = Image.open(asset_path("motorcycle") / "motorcycle_left.png").convert("RGB")
    for tile in tiles:
        x, y = map(int, tile.stem.split("_"))
        assert x + MotorcycleDepth.TILE <= MotorcycleDepth.SPLIT_COLUMN and x % 32 == 0 == y % 32
        crop = full.crop((x, y, x + 96, y + 96)).resize((24, 24), Image.BICUBIC)
        assert np.array_equal(np.asarray(Image.open(tile)), np.asarray(crop))
    ds = ImageFolder(tmp_path / "photos", 24, flip=False)
    assert len(ds) == result["train"] and "astronaut" in ds.classes
