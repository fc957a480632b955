"""Turning neighbour votes (and the encoder's own classifier) into probabilities, fitted away from the queries.

The index build (`index/build.py`) fits a `Calibration` and saves it in the index manifest; `Retriever` applies
it to every query. When the store holds a held-out split (PTB-XL fold 9), the build reads those ECGs as pictures
(drawn with random artifacts, digitised) and fits, per label, a logistic fusion of the neighbours' vote and the
encoder's superclass head on them, with F1-best thresholds: probabilities for what queries really look like.
Without one it falls back to Platt scaling of leave-one-patient-out votes on the library itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EPS = 1e-4  # votes are clipped to [EPS, 1 - EPS] before their logit


@dataclass
class Calibration:
    """Vote (+ head logit) -> probability per label, decision thresholds, and the similarity scale."""

    temperature: float = 0.05  # softmax temperature of the similarity-weighted vote
    k: int = 10  # neighbours that vote
    platt: dict | None = None  # label -> [a, b]: p = sigmoid(a * vote + b)
    thresholds: dict | None = None  # label -> probability threshold that maximised F1
    min_top_score: float | None = None  # queries whose best similarity is below this are not ECG-like
    fusion: dict | None = None  # label -> [w_vote, w_head, b]: p = sigmoid(w_vote*logit(vote) + w_head*head + b)
    reference_top: list | None = None  # quantiles 0..100 of the best-match similarity of the calibration queries
    fitted_on: str = "library"  # what the probabilities were fitted on (said in reports and eval)

    def probability(self, label: str, vote: float, head_logit: float | None = None) -> float:
        """The label's probability from its vote and, when fitted and given, the encoder head's logit."""
        w = (self.fusion or {}).get(label)
        if w is not None and head_logit is not None:
            return float(_sigmoid(w[0] * _logit(vote) + w[1] * head_logit + w[2]))
        a, b = (self.platt or {}).get(label, (None, None))
        if a is None:
            return float(vote)
        return float(_sigmoid(a * vote + b))

    def percentile(self, score: float) -> float | None:
        """% of the calibration queries whose best match was less similar than `score` (None: not fitted).

        Similarities of trace embeddings crowd near 1 (0.98-0.999), so the raw cosine cannot tell a
        near-duplicate from a weak match; this scale can: 50 is a typical best match for a held-out ECG drawn as a picture."""
        if not self.reference_top:
            return None
        q = np.asarray(self.reference_top, float)
        return float(np.interp(score, q, np.linspace(0.0, 100.0, len(q)), left=0.0, right=100.0))


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, float)))


def _logit(v):
    v = np.clip(np.asarray(v, float), EPS, 1.0 - EPS)
    return np.log(v / (1.0 - v))


def fit_logistic(x: np.ndarray, y: np.ndarray, ridge: float = 1e-3, iters: int = 50) -> np.ndarray:
    """(n, f) features, (n,) 0/1 -> (f + 1,) weights (last: bias) of p = sigmoid(x @ w[:f] + w[f]) by Newton
    steps, with a small ridge on the weights (not the bias) so separable data stays finite."""
    X = np.c_[np.asarray(x, float).reshape(len(y), -1), np.ones(len(y))]
    t = np.asarray(y, float)
    w = np.zeros(X.shape[1])
    if X.shape[1] == 2:
        w[0] = 1.0
    reg = np.full(X.shape[1], ridge)
    reg[-1] = 0.0
    for _ in range(iters):
        p = _sigmoid(X @ w)
        g = X.T @ (p - t) + reg * w
        h = (X * (p * (1 - p) + 1e-9)[:, None]).T @ X + np.diag(reg + 1e-9)
        step = np.linalg.solve(h, g)
        w = w - step
        if np.abs(step).max() < 1e-8:
            break
    return w


def fit_platt(votes: np.ndarray, y: np.ndarray, iters: int = 50) -> tuple[float, float]:
    """1-D logistic regression p = sigmoid(a*v + b) by Newton steps (with a tiny ridge for separable data)."""
    a, b = fit_logistic(np.asarray(votes, float)[:, None], y, iters=iters)
    return float(a), float(b)


def fit_fusion(votes: np.ndarray, head_logits: np.ndarray, y: np.ndarray) -> list[float]:
    """Per-label logistic fusion of logit(vote) and the head's logit: [w_vote, w_head, b]."""
    return [float(w) for w in fit_logistic(np.c_[_logit(votes), head_logits], y)]


def top_quantiles(best: np.ndarray) -> list[float]:
    """The 101 quantiles (0..100 %) of best-match similarities: the scale `Calibration.percentile` reads."""
    return [round(float(q), 6) for q in np.quantile(np.asarray(best, float), np.linspace(0, 1, 101))]
