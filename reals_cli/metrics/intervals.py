"""Error bars over seeds: the mean and its two-sided Student-t interval, as the experiment pages
report every number (mean +- t(0.975, n - 1) * sd / sqrt(n), sd with n - 1)."""

from __future__ import annotations

import math

import numpy as np

CONFIDENCE = 0.95


def t_interval(values, confidence: float = CONFIDENCE) -> dict:
    """Mean and the two-sided Student-t interval of the mean; no interval for fewer than 2 values."""
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if not len(x):
        return {"mean": None, "lo": None, "hi": None, "n": 0, "sd": None}
    mean = float(x.mean())
    if len(x) < 2:
        return {"mean": mean, "lo": None, "hi": None, "n": 1, "sd": None}
    from scipy import stats  # here: scipy is slow to import, and one value needs none

    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, len(x) - 1)) * sd / math.sqrt(len(x))
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": int(len(x)), "sd": sd}


def format_interval(summary: dict, fmt: str) -> str:
    """A t_interval() result as a table cell: "mean [lo, hi]", "mean (1 seed)" or "–"."""
    if summary["mean"] is None:
        return "–"
    if summary["lo"] is None:
        return fmt.format(summary["mean"]) + " (1 seed)"
    return f"{fmt.format(summary['mean'])} [{fmt.format(summary['lo'])}, {fmt.format(summary['hi'])}]"
