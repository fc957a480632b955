"""Expected calibration error: do the probabilities a report states match how often they come true?"""
from __future__ import annotations

import numpy as np


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, bins: int = 10) -> float:
    """ECE over every (chart, label) pair: |mean probability - observed rate| per equal-width bin, weighted by
    the bin's share of pairs (Guo et al. 2017, applied per label as multi-label probabilities are)."""
    y = np.asarray(y_true, float).ravel()
    p = np.clip(np.asarray(probs, float).ravel(), 0.0, 1.0)
    if y.shape != p.shape or not len(y):
        raise ValueError(f"expected_calibration_error: {y.shape} labels vs {p.shape} probabilities")
    which = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += abs(p[inside].mean() - y[inside].mean()) * inside.sum()
    return float(total / len(y))
