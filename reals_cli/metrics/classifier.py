"""A domain metric beside Inception FID: a small classifier trained on the training split.

Inception features of 32 px grey clothing or rendered shapes are weak, so small-image
generative papers also measure in the feature space of a classifier trained on the domain.
`train_classifier` fits a small CNN on a class-folder dataset's `train` split (random
flips, seeded) and writes a `classifier` artifact (classifier.safetensors + manifest, with
its accuracy on the `test` split). `classifier_metrics` then gives, for generated samples:

- classifier FD: the Frechet distance (fid.frechet_distance, float64 moments) between the
  samples' and the reference images' penultimate features (the pooled 64-d vector);
- class accuracy: the fraction of samples the classifier puts in the class they were drawn
  for (`reals sample` stores each sample's class in samples.npz's arr_1), with chance at
  1 / classes; the reference's accuracy is the same score on real images, its ceiling.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .. import artifacts
from ..errors import UserError
from .fid import ClassFolderImages, ImageSource, NpzImages, _Moments, frechet_distance, open_input

KIND = "classifier"
FORMAT_VERSION = 1
WEIGHTS = "classifier.safetensors"
WIDTHS = (16, 32, 64)  # channels of the three stages; the last is the feature dimension


class SmallCNN(nn.Module):
    """Three stages of two 3x3 convolutions (GroupNorm, SiLU) and a 2x2 max-pool, a global
    average pool (the features), then a linear layer (the logits). Input: uint8 N x 3 x H x W."""

    def __init__(self, num_classes: int, widths: tuple[int, ...] = WIDTHS):
        super().__init__()
        layers, cin = [], 3
        for w in widths:
            for _ in range(2):
                layers += [nn.Conv2d(cin, w, 3, padding=1), nn.GroupNorm(8, w), nn.SiLU()]
                cin = w
            layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 127.5 - 1
        return self.body(x).mean((2, 3))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.features(images)
        return feats, self.head(feats)


def _load_split(source: ClassFolderImages, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """A class-folder split in memory: uint8 images and their labels (small-image datasets only)."""
    images = torch.cat(list(source.batches(batch_size)))
    return images, torch.tensor([label for _, label in source.folder.samples])


def _open_split(data: str | os.PathLike, split: str, size: int) -> ClassFolderImages:
    root = Path(data)
    if not (root / split).is_dir():
        raise UserError(f"{root} has no {split}/ folder; the classifier needs a class-folder dataset with train/ and "
                        f"test/ splits (as `reals data fashion-mnist` or `reals data shapes` writes)")
    return ClassFolderImages(root / split, size)


@torch.no_grad()
def _accuracy(model: SmallCNN, images: torch.Tensor, labels: torch.Tensor, device, batch_size: int = 500) -> float:
    model.eval()
    right = sum(int((model(images[s:s + batch_size].to(device))[1].argmax(1).cpu() == labels[s:s + batch_size]).sum())
                for s in range(0, len(images), batch_size))
    return right / len(images)


def train_classifier(data: str | os.PathLike, out: str | os.PathLike, *, image_size: int = 32, epochs: int = 10,
                     batch_size: int = 128, lr: float = 2e-3, seed: int = 0, device: str = "auto") -> dict:
    """Fit SmallCNN on `data`/train (AdamW, cosine decay, random flips) and write the artifact to `out`."""
    from ..console import print_summary
    from ..runtime import resolve_device

    started = time.perf_counter()
    if min(image_size, epochs, batch_size) < 1 or lr <= 0:
        raise UserError("--image-size, --epochs and --batch-size must be at least 1 and --lr positive")
    out = Path(out)
    done = artifacts.check_output_folder(out, KIND, [WEIGHTS], "reals train-classifier")
    if done is not None:
        raise UserError(f"{out} already holds a classifier{artifacts.made_by(done)}; pass a new --out")
    dev = resolve_device(device)
    train_src, test_src = _open_split(data, "train", image_size), _open_split(data, "test", image_size)
    classes = train_src.folder.classes
    if test_src.folder.classes != classes:
        raise UserError(f"{data}: train/ and test/ have different class folders; their labels would not agree")
    images, labels = _load_split(train_src)
    test_images, test_labels = _load_split(test_src)

    torch.manual_seed(seed)
    model = SmallCNN(len(classes)).to(dev)
    g = torch.Generator().manual_seed(seed)
    steps = epochs * -(-len(images) // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=g)
        for s in range(0, len(images), batch_size):
            idx = order[s:s + batch_size]
            x = images[idx]
            flip = torch.rand(len(x), generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x).to(dev)
            loss = F.cross_entropy(model(x)[1], labels[idx].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    metrics = {"train_accuracy": _accuracy(model, images, labels, dev),
               "test_accuracy": _accuracy(model, test_images, test_labels, dev),
               "train_images": len(images), "test_images": len(test_images), "final_loss": loss.item(),
               "seconds": round(time.perf_counter() - started, 2)}
    out.mkdir(parents=True, exist_ok=True)
    artifacts.save_weights(out / WEIGHTS, {k: v.cpu() for k, v in model.state_dict().items()})
    config = {"arch": "SmallCNN", "widths": list(WIDTHS), "feature_dim": WIDTHS[-1], "classes": classes,
              "image_size": image_size, "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
              "augment": "horizontal flip p=0.5"}
    manifest = artifacts.write_manifest(out, KIND, FORMAT_VERSION, config, {"data": artifacts.describe_input(data)},
                                        metrics, files=[WEIGHTS])
    print_summary(f"classifier {out} ({manifest['id']})", [
        ("classes", len(classes)), ("train accuracy", f"{metrics['train_accuracy']:.4f}"),
        ("test accuracy", f"{metrics['test_accuracy']:.4f}"), ("seconds", metrics["seconds"])])
    return manifest


def load_classifier(path: str | os.PathLike, device: torch.device) -> tuple[SmallCNN, dict]:
    manifest = artifacts.read_manifest(path, KIND, FORMAT_VERSION)
    artifacts.verify_files(path, manifest, [WEIGHTS])
    model = SmallCNN(len(manifest["config"]["classes"]), tuple(manifest["config"]["widths"]))
    model.load_state_dict(artifacts.load_weights(Path(path) / WEIGHTS))
    return model.to(device).eval(), manifest


def _sample_labels(source: ImageSource) -> np.ndarray | None:
    """The classes the samples were drawn for: arr_1 of a `reals sample` npz, if there."""
    if not isinstance(source, NpzImages):
        return None
    with np.load(source.path) as z:
        return z["arr_1"].astype(np.int64) if "arr_1" in z.files else None


def _sample_classes(source: ImageSource) -> list[str] | None:
    """The class names the sampling model was trained with (its latent store's), for a `reals sample` folder."""
    from ..data.latent_store import open_store

    store = Path(source.path).parent / "latents.zarr"
    return open_store(store).classes if (store / "zarr.json").is_file() else None


@torch.no_grad()
def _pass(model: SmallCNN, source: ImageSource, device, batch_size: int) -> tuple[tuple, np.ndarray]:
    """(mu, sigma) of the features and every predicted class, in one pass."""
    moments, preds = _Moments(), []
    for batch in source.batches(batch_size):
        feats, logits = model(batch.to(device))
        moments.add(feats)
        preds.append(logits.argmax(1).cpu())
    return moments.result(), torch.cat(preds).numpy()


def classifier_metrics(samples: str | os.PathLike, classifier: str | os.PathLike, ref: str | os.PathLike,
                       batch_size: int = 250, device: str = "auto") -> dict:
    """Classifier FD and class accuracy of `samples` against the images `ref` (see the module docstring)."""
    from ..runtime import resolve_device

    started = time.perf_counter()
    dev = resolve_device(device)
    model, manifest = load_classifier(classifier, dev)
    config = manifest["config"]
    size = config["image_size"]
    sample_src = open_input(samples, classes=False)
    ref_src = open_input(ref, size)
    for role, src in (("SAMPLES", sample_src), ("--ref", ref_src)):
        if not isinstance(src, ImageSource):
            raise UserError(f"{role} {src.path} holds Inception statistics; the classifier needs images")
        if src.resolution != (size, size):
            raise UserError(f"{role} {src.path} is at {src.resolution[0]}x{src.resolution[1]}, but the classifier "
                            f"{classifier} was trained at {size}x{size}")
        if src.count < 2:
            raise UserError(f"{role} {src.path} holds {src.count} image(s); the Frechet distance needs at least 2")
    labels = _sample_labels(sample_src)
    names = _sample_classes(sample_src)
    if names is not None and names != config["classes"]:
        raise UserError(f"the samples' model was trained on classes {names[:3]}..., the classifier on "
                        f"{config['classes'][:3]}...; their labels do not agree")
    if labels is not None and (len(labels) != sample_src.count or labels.max() >= len(config["classes"])):
        raise UserError(f"{sample_src.path}: arr_1 holds {len(labels)} labels up to {labels.max()}, for "
                        f"{sample_src.count} images and a classifier of {len(config['classes'])} classes")
    (mu_s, sigma_s), pred_s = _pass(model, sample_src, dev, batch_size)
    (mu_r, sigma_r), pred_r = _pass(model, ref_src, dev, batch_size)
    result = {
        "label": f"classifier FD-{sample_src.count}",
        "fd": frechet_distance(mu_s, sigma_s, mu_r, sigma_r),
        "class_accuracy": None if labels is None else float((pred_s == labels).mean()),
        "per_class_accuracy": None if labels is None else [
            float((pred_s[labels == k] == k).mean()) if (labels == k).any() else None
            for k in range(len(config["classes"]))],
        "chance": 1 / len(config["classes"]),
        "reference_accuracy": None,
        "num_samples": sample_src.count, "num_reference": ref_src.count,
        "classifier": {"path": str(classifier), "id": manifest["id"], "test_accuracy": manifest["metrics"]["test_accuracy"],
                       "feature_dim": config["feature_dim"]},
        "samples": sample_src.describe(), "reference": ref_src.describe(), "protocol": sample_src.protocol,
    }
    if isinstance(ref_src, ClassFolderImages) and ref_src.folder.classes == config["classes"]:
        truth = np.array([label for _, label in ref_src.folder.samples])
        result["reference_accuracy"] = float((pred_r == truth).mean())
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result
