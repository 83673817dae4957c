"""Scores of the downstream probes: mIoU and pixel accuracy; RMSE, AbsRel and delta1.

Segmentation is scored the standard way (VOC devkit, mmsegmentation): one confusion
matrix over every labelled pixel of the split, IoU_k = TP / (TP + FP + FN), and a class
with no pixel in the ground truth or the prediction (union 0) has no IoU and is left
out of the mean. Label 255 means "ignore" (VOC's object borders) and is never counted.

Depth takes the formulas of DINOv2's depth toolbox: each metric per image over its valid
pixels, then averaged over the images. A pixel whose ground truth is 0, negative or not
finite has no measurement and is left out. Unlike the toolbox's NYU evaluation, there is
no Eigen crop and no 0.001-10 m mask (the images are centre crops at the VAE's size), so
these numbers are not comparable with published NYU ones.
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = 255


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """K x K counts, rows = ground truth, columns = prediction; target 255 is skipped.

    Targets must lie in [0, K) or be 255 (the loaders refuse others); predictions in [0, K).
    """
    pred, target = np.asarray(pred).ravel(), np.asarray(target).ravel()
    keep = target != IGNORE_INDEX
    index = target[keep].astype(np.int64) * num_classes + pred[keep].astype(np.int64)
    return np.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_scores(conf: np.ndarray) -> dict:
    """mIoU over the classes present in ground truth or prediction, pixel accuracy, per-class IoU."""
    conf = conf.astype(np.float64)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    present = union > 0
    iou = np.divide(tp, union, out=np.full_like(tp, np.nan), where=present)
    total = conf.sum()
    return {
        "miou": float(iou[present].mean()) if present.any() else float("nan"),
        "pixel_acc": float(tp.sum() / total) if total else float("nan"),
        "iou": [None if np.isnan(v) else float(v) for v in iou],
        "pixels": int(total),
    }


def valid_depth(target: np.ndarray) -> np.ndarray:
    """Pixels with a measurement: finite and positive (NYU marks missing depth with 0)."""
    with np.errstate(invalid="ignore"):
        return np.isfinite(target) & (target > 0)


def depth_image_scores(pred: np.ndarray, target: np.ndarray) -> dict | None:
    """RMSE (m), AbsRel and delta1 over one image's valid pixels; None if it has none."""
    valid = valid_depth(target)
    if not valid.any():
        return None
    p, g = np.asarray(pred, np.float64)[valid], np.asarray(target, np.float64)[valid]
    with np.errstate(divide="ignore"):  # a zero prediction is an infinite ratio: delta1 fails, as it should
        ratio = np.maximum(p / g, g / p)
    return {
        "rmse": float(np.sqrt(np.mean((p - g) ** 2))),
        "absrel": float(np.mean(np.abs(p - g) / g)),
        "delta1": float(np.mean(ratio < 1.25)),
    }


class SegMeter:
    """Accumulates one confusion matrix over batches of (prediction, target) label maps."""

    def __init__(self, num_classes: int):
        self.conf = np.zeros((num_classes, num_classes), np.int64)

    def add(self, pred: np.ndarray, target: np.ndarray) -> None:
        self.conf += confusion_matrix(pred, target, len(self.conf))

    def result(self) -> dict:
        return segmentation_scores(self.conf)


class DepthMeter:
    """Per-image depth scores, averaged over the images that have any valid pixel."""

    KEYS = ("rmse", "absrel", "delta1")

    def __init__(self):
        self.sums = dict.fromkeys(self.KEYS, 0.0)
        self.images = 0
        self.without_depth = 0

    def add(self, pred: np.ndarray, target: np.ndarray) -> None:
        for p, t in zip(pred, target):
            scores = depth_image_scores(p, t)
            if scores is None:
                self.without_depth += 1
                continue
            self.images += 1
            for k in self.KEYS:
                self.sums[k] += scores[k]

    def result(self) -> dict:
        n = self.images
        return {**{k: (v / n if n else float("nan")) for k, v in self.sums.items()},
                "images": n, "images_without_depth": self.without_depth}
