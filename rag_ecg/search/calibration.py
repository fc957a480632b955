"""Turning neighbour votes into probabilities: Platt scaling and decision thresholds fitted on the library alone.

The index build (`index/build.py`) fits a `Calibration` by leave-one-patient-out votes over the reference
library and saves it in the index manifest; `Retriever` applies it to every query's votes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Calibration:
    """Vote -> probability per label (Platt scaling) and decision thresholds, fitted on the library only."""

    temperature: float = 0.05  # softmax temperature of the similarity-weighted vote
    k: int = 10  # neighbours that vote
    platt: dict | None = None  # label -> [a, b]: p = sigmoid(a * vote + b)
    thresholds: dict | None = None  # label -> probability threshold that maximised F1 (leave-one-out)
    min_top_score: float | None = None  # queries whose best similarity is below this are not ECG-like

    def probability(self, label: str, vote: float) -> float:
        a, b = (self.platt or {}).get(label, (None, None))
        if a is None:
            return float(vote)
        return float(1.0 / (1.0 + np.exp(-(a * vote + b))))


def fit_platt(votes: np.ndarray, y: np.ndarray, iters: int = 50) -> tuple[float, float]:
    """1-D logistic regression p = sigmoid(a*v + b) by Newton steps (with a tiny ridge for separable data)."""
    v, t = np.asarray(votes, float), np.asarray(y, float)
    a, b = 1.0, 0.0
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(a * v + b)))
        w = p * (1 - p) + 1e-9
        g = np.array([np.sum((p - t) * v) + 1e-3 * a, np.sum(p - t)])
        h = np.array([[np.sum(w * v * v) + 1e-3, np.sum(w * v)], [np.sum(w * v), np.sum(w)]])
        step = np.linalg.solve(h, g)
        a, b = a - step[0], b - step[1]
        if np.abs(step).max() < 1e-8:
            break
    return float(a), float(b)
