"""Turning neighbour votes (and the encoder's own classifier) into probabilities, fitted away from the queries.

The index build (`index/build.py`) fits a `Calibration` and saves it in the index manifest; `Retriever` applies
it to every query. When the store holds a held-out split (PTB-XL fold 9), the build reads those ECGs as pictures
(drawn with random artifacts, digitised) and fits, per label, a logistic fusion of the neighbours' vote and the
encoder's superclass head on them, with F1-best thresholds: probabilities for what queries really look like.
Without one it falls back to Platt scaling of leave-one-patient-out votes on the library itself. A hospital
can refit the same on its own labelled charts (`cli.py calibrate`): `site_calibration.json` in the index folder,
used in place of the build's when it was made for the index's encoder.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from rag_ecg.eval.metrics import choose_thresholds

EPS = 1e-4  # votes are clipped to [EPS, 1 - EPS] before their logit
log = logging.getLogger(__name__)
SITE_CALIBRATION = "site_calibration.json"  # in an index folder: a refit on a site's own charts (index/site_calibration.py)


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
    site: dict | None = None  # label -> [a, b]: a site's recalibration, p' = sigmoid(a * logit(p) + b)

    def probability(self, label: str, vote: float, head_logit: float | None = None) -> float:
        """The label's probability from its vote and, when fitted and given, the encoder head's logit (then
        through the site's recalibration, when there is one)."""
        p = self._built(label, vote, head_logit)
        ab = (self.site or {}).get(label)
        return p if ab is None else float(_sigmoid(ab[0] * _logit(p) + ab[1]))

    def _built(self, label: str, vote: float, head_logit: float | None) -> float:
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


def index_calibration(index_dir: Path, manifest: dict, encoder_hash: str | None,
                      library: bool = False) -> tuple[Calibration, dict | None]:
    """The calibration an index folder's searches use: its site calibration when there is one for this encoder
    (unless `library`), else the build's; and the site file's content (None when not used)."""
    site = Path(index_dir) / SITE_CALIBRATION
    if not library and site.is_file():
        data = json.loads(site.read_text())
        if data.get("encoder_hash") == encoder_hash:
            return Calibration(**data["calibration"]), data
        log.warning("%s: made for another encoder than this index's; using the build's calibration "
                    "(run `python cli.py calibrate` again)", site)
    return Calibration(**manifest.get("calibration", {})), None


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


def fit_shift(z: np.ndarray, y: np.ndarray, iters: int = 50) -> float:
    """The b of p = sigmoid(z + b) with the least log loss (Newton steps on the one parameter; both classes
    present, so it is finite): where observed and predicted positives balance."""
    z, t, b = np.asarray(z, float), np.asarray(y, float), 0.0
    for _ in range(iters):
        p = _sigmoid(z + b)
        step = float(np.sum(p - t) / max(np.sum(p * (1 - p)), 1e-9))
        b -= float(np.clip(step, -5.0, 5.0))
        if abs(step) < 1e-9:
            break
    return b


def fit_platt(votes: np.ndarray, y: np.ndarray, iters: int = 50) -> tuple[float, float]:
    """1-D logistic regression p = sigmoid(a*v + b) by Newton steps (with a tiny ridge for separable data)."""
    a, b = fit_logistic(np.asarray(votes, float)[:, None], y, iters=iters)
    return float(a), float(b)


def fit_fusion(votes: np.ndarray, head_logits: np.ndarray, y: np.ndarray) -> list[float]:
    """Per-label logistic fusion of logit(vote) and the head's logit: [w_vote, w_head, b]."""
    return [float(w) for w in fit_logistic(np.c_[_logit(votes), head_logits], y)]


def fit_site(base: Calibration, votes: np.ndarray, head: np.ndarray | None, y: np.ndarray,
             labels: Sequence[str], fitted_on: str) -> Calibration:
    """`base` recalibrated on a site's labelled reads: per label a shift of the logit of `base`'s probability
    (one parameter, the correction for a different label mix: it keeps the charts' order, so AUC stays the
    build's — refitting the whole fusion on 50 LUDB charts lost 0.07 AUC, a free Platt slope diverged), and the
    F1-best threshold. A label the reads hold no positive or no negative of keeps `base`'s probability and
    threshold."""
    probs = _probabilities(replace(base, site=None), votes, head, labels)
    out = replace(base, site={}, thresholds=dict(base.thresholds or {}), fitted_on=fitted_on)
    refit = [j for j in range(len(labels)) if 0 < y[:, j].sum() < len(y)]
    for j in refit:
        out.site[labels[j]] = [1.0, fit_shift(_logit(probs[:, j]), y[:, j])]
    thresholds = choose_thresholds(y, _probabilities(out, votes, head, labels))
    for j in refit:
        if np.isfinite(thresholds[j]):  # in [0, 1]: 0 = state it always (F1-best where nearly all carry it)
            out.thresholds[labels[j]] = float(np.clip(thresholds[j], 0.0, 1.0))
    out.site = out.site or None
    return out


def fit_on_reads(base: Calibration, votes: np.ndarray, head: np.ndarray | None, y: np.ndarray,
                 labels: Sequence[str], fitted_on: str) -> Calibration:
    """`base` with probabilities and thresholds refitted on labelled reads: per label a logistic fusion of the
    vote's and the head's logits (Platt on the vote alone without a head) and the F1-best threshold. A label
    the reads hold no positive or no negative of keeps `base`'s fit (a set labelled for some classes only)."""
    out = replace(base, platt=dict(base.platt or {}), fusion=dict(base.fusion or {}) if head is not None else None,
                  thresholds=dict(base.thresholds or {}), fitted_on=fitted_on)
    refit = [j for j in range(len(labels)) if 0 < y[:, j].sum() < len(y)]
    for j in refit:
        out.platt[labels[j]] = list(fit_platt(votes[:, j], y[:, j]))
        if head is not None:
            out.fusion[labels[j]] = fit_fusion(votes[:, j], head[:, j], y[:, j])
    thresholds = choose_thresholds(y, _probabilities(out, votes, head, labels))
    for j in refit:
        if np.isfinite(thresholds[j]):
            out.thresholds[labels[j]] = float(thresholds[j])
    out.fusion = out.fusion or None
    return out


def _probabilities(cal: Calibration, votes: np.ndarray, head: np.ndarray | None, labels: Sequence[str]) -> np.ndarray:
    """(n, labels) probabilities `cal` gives reads with these votes (and head logits)."""
    return np.array([[cal.probability(lab, votes[i, j], None if head is None else head[i, j])
                      for j, lab in enumerate(labels)] for i in range(len(votes))])


def top_quantiles(best: np.ndarray) -> list[float]:
    """The 101 quantiles (0..100 %) of best-match similarities: the scale `Calibration.percentile` reads."""
    return [round(float(q), 6) for q in np.quantile(np.asarray(best, float), np.linspace(0, 1, 101))]
