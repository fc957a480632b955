"""ECGBench-style multi-label metrics (AUC, F1, Hamming, thresholds), retrieval recall@k and kNN label votes.

Pure numpy (no sklearn, no model code) so the library can score itself anywhere; AUC is the rank
(Mann-Whitney) statistic with tied scores given their average rank. `encoder_eval` runs them on an encoder.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rag_ecg.data.labels import SUPERCLASSES

# ---------------------------------------------------------------- labels


def labels_to_matrix(labels: Sequence[Sequence[str]], classes: Sequence[str] = SUPERCLASSES) -> np.ndarray:
    """Label lists -> (n, n_classes) uint8 indicator matrix in `classes` order; unknown labels ignored."""
    pos = {c: j for j, c in enumerate(classes)}
    out = np.zeros((len(labels), len(classes)), dtype=np.uint8)
    for i, labs in enumerate(labels):
        for lab in labs:
            if lab in pos:
                out[i, pos[lab]] = 1
    return out


# ---------------------------------------------------------------- AUC


def roc_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of one binary task: P(score_pos > score_neg) + 0.5 P(tie); NaN when a class is absent."""
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"roc_auc: {y.size} labels but {s.size} scores")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x, ties sharing the mean of the ranks they span."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # start index of each run of equal values
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], xs.size]  # exclusive
    mean_rank = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def per_class_auc(y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(n, c) labels and scores -> (c,) AUC per class (NaN where a class has only one value)."""
    y, s = _check_2d(y_true, scores, "per_class_auc")
    return np.array([roc_auc(y[:, j], s[:, j]) for j in range(y.shape[1])])


def macro_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Mean AUC over the classes that have both positives and negatives (NaN if none has)."""
    aucs = per_class_auc(y_true, scores)
    ok = ~np.isnan(aucs)
    return float(aucs[ok].mean()) if ok.any() else float("nan")


# ---------------------------------------------------------------- binarised multi-label metrics


def per_class_f1(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """(c,) F1 = 2TP / (2TP + FP + FN); 0 where the class is neither present nor predicted (as sklearn)."""
    y, p = _check_2d(y_true, y_pred, "per_class_f1")
    y, p = y.astype(bool), p.astype(bool)
    tp = (y & p).sum(0)
    fp = (~y & p).sum(0)
    fn = (y & ~p).sum(0)
    den = 2 * tp + fp + fn
    return np.where(den > 0, 2 * tp / np.maximum(den, 1), 0.0).astype(np.float64)


def scored_classes(y_true: np.ndarray) -> np.ndarray:
    """(c,) bool: the classes the set has positives of — what macro F1 averages over (all when none has).

    Why: a hospital's labelled CSV often speaks for some classes only (e.g. normal vs infarction); counting a
    class no chart carries as F1 0 whenever the reader states it once would score the set's labels, not the
    reader. PTB-XL's folds carry all five superclasses, so their figures are the usual ECGBench ones."""
    present = np.asarray(y_true).astype(bool).any(0)
    return present if present.any() else np.ones_like(present)


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean F1 over the classes the set has positives of (`scored_classes`)."""
    return float(per_class_f1(y_true, y_pred)[scored_classes(y_true)].mean())


def hamming_loss(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of (sample, class) cells predicted wrong."""
    y, p = _check_2d(y_true, y_pred, "hamming_loss")
    return float((y.astype(bool) != p.astype(bool)).mean())


def choose_thresholds(y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per-class score threshold maximising F1 on (training) data; predict positive when score >= t.

    Candidates are the midpoints between consecutive distinct scores (plus one above the maximum), so
    the choice does not sit on a training score. Ties in F1 go to the higher threshold. (c,) float64.
    """
    y, s = _check_2d(y_true, scores, "choose_thresholds")
    out = np.empty(y.shape[1])
    for j in range(y.shape[1]):
        yj, sj = y[:, j].astype(bool), s[:, j].astype(np.float64)
        u = np.unique(sj)
        cands = np.r_[u[0] - 1.0, (u[1:] + u[:-1]) / 2.0, u[-1] + 1.0] if u.size else np.array([0.5])
        # F1 for every candidate at once: sort scores descending, count positives above each cut
        order = np.argsort(-sj, kind="mergesort")
        ys, ss = yj[order], sj[order]
        n_pos = int(yj.sum())
        above = np.searchsorted(-ss, -cands, side="right")  # number of scores >= cand
        tp = np.r_[0, np.cumsum(ys)][above]
        pred = above
        den = pred + n_pos  # 2TP + FP + FN = predicted + actual
        f1 = np.where(den > 0, 2 * tp / np.maximum(den, 1), 0.0)
        best = np.flatnonzero(f1 == f1.max())
        out[j] = cands[best[-1]]
    return out


def binarize(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """(n, c) scores >= (c,) thresholds -> (n, c) uint8 predictions."""
    s = np.asarray(scores)
    return (s >= np.asarray(thresholds)[None, :]).astype(np.uint8)


def multilabel_metrics(y_true: np.ndarray, scores: np.ndarray, thresholds: np.ndarray,
                       classes: Sequence[str] = SUPERCLASSES) -> dict:
    """AUC from scores, and ECGBench's binarised AUC / F1 / Hamming loss (all in [0, 1])."""
    pred = binarize(scores, thresholds)
    auc_scores = per_class_auc(y_true, scores)
    auc_bin = per_class_auc(y_true, pred)
    f1 = per_class_f1(y_true, pred)
    return {
        "auc": _nanmean(auc_scores),
        "auc_binarized": _nanmean(auc_bin),
        "f1": float(f1.mean()),
        "hamming": hamming_loss(y_true, pred),
        "per_class": {c: {"auc": _num(a), "auc_binarized": _num(b), "f1": float(f), "threshold": float(t)}
                      for c, a, b, f, t in zip(classes, auc_scores, auc_bin, f1, thresholds)},
    }


# ---------------------------------------------------------------- retrieval


def recall_at_k(similarity: np.ndarray, relevant: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Fraction of queries with a relevant target among their top k, for each k.

    similarity (n_queries, n_targets), relevant same-shape bool. Ties are counted against the query:
    a relevant target's rank is the number of targets scoring at least as high, so a constant
    similarity earns no credit.
    """
    sim, rel = np.asarray(similarity, dtype=np.float64), np.asarray(relevant, dtype=bool)
    if sim.shape != rel.shape or sim.ndim != 2:
        raise ValueError(f"recall_at_k: similarity {sim.shape} and relevant {rel.shape} must be equal 2-D shapes")
    has = rel.any(1)
    if not has.any():
        raise ValueError("recall_at_k: no query has a relevant target")
    best = np.where(rel, sim, -np.inf).max(1)  # score of the best relevant target
    rank = (sim >= best[:, None]).sum(1)  # 1 = alone at the top
    return {f"R@{k}": float((rank[has] <= k).mean()) for k in ks}


def knn_scores(query: np.ndarray, reference: np.ndarray, ref_labels: np.ndarray, k: int = 10,
               temperature: float = 0.05, query_groups: Sequence | None = None,
               ref_groups: Sequence | None = None, batch: int = 1024) -> np.ndarray:
    """Similarity-weighted kNN votes: (nq, d) x (nr, d) embeddings, (nr, c) labels -> (nq, c) in [0, 1].

    Embeddings are L2-normalised, so the dot product is the cosine. The k most similar references vote
    with weights softmax(cos / temperature) over those k (temperature -> inf: plain majority). When
    groups are given, references in the query's own group (same patient, or itself for leave-one-out)
    are not allowed to vote.
    """
    q = np.asarray(query, dtype=np.float32)
    r = np.asarray(reference, dtype=np.float32)
    y = np.asarray(ref_labels, dtype=np.float64)
    if q.ndim != 2 or r.ndim != 2 or q.shape[1] != r.shape[1]:
        raise ValueError(f"knn_scores: query {q.shape} and reference {r.shape} must be (n, d) with equal d")
    if y.shape[0] != r.shape[0]:
        raise ValueError(f"knn_scores: {r.shape[0]} references but {y.shape[0]} label rows")
    if (query_groups is None) != (ref_groups is None):
        raise ValueError("knn_scores: give both query_groups and ref_groups, or neither")
    k = min(k, r.shape[0])
    if k < 1:
        raise ValueError("knn_scores: empty reference set")
    qg = rg = None
    if query_groups is not None:
        qg, rg = _group_codes(query_groups, ref_groups)
    out = np.empty((q.shape[0], y.shape[1]))
    for lo in range(0, q.shape[0], batch):
        sim = (q[lo:lo + batch] @ r.T).astype(np.float64)
        if qg is not None:
            sim[qg[lo:lo + batch, None] == rg[None, :]] = -np.inf
        idx = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        out[lo:lo + batch] = vote_scores(np.take_along_axis(sim, idx, axis=1), y[idx], temperature)
    return out


def vote_scores(similarities: np.ndarray, labels: np.ndarray, temperature: float = 0.05) -> np.ndarray:
    """Similarity-weighted label votes of given neighbours: (nq, k) cosines, (nq, k, c) 0/1 -> (nq, c) in [0, 1].

    Weights are softmax(cos / temperature) over each query's k neighbours; -inf similarities (excluded
    neighbours) get no weight, and a query with no admissible neighbour scores 0 everywhere.
    """
    s = np.asarray(similarities, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if s.ndim != 2 or y.ndim != 3 or y.shape[:2] != s.shape:
        raise ValueError(f"vote_scores: similarities {s.shape} must be (nq, k) and labels {y.shape} (nq, k, c)")
    if not temperature > 0:
        raise ValueError(f"vote_scores: temperature must be > 0, got {temperature}")
    ok = np.isfinite(s)
    lead = np.where(ok, s, -np.inf).max(1, keepdims=True) if s.shape[1] else np.zeros((s.shape[0], 1))
    lead = np.where(np.isfinite(lead), lead, 0.0)  # softmax shift: the best admissible similarity
    w = np.where(ok, np.exp((np.where(ok, s, 0.0) - lead) / temperature), 0.0)
    den = w.sum(1, keepdims=True)
    return np.einsum("qk,qkc->qc", w, y) / np.where(den > 0, den, 1.0)


def _group_codes(a: Sequence, b: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Map two sequences of hashable group ids onto shared integer codes (None never matches)."""
    table: dict = {}
    def code(v, fresh):
        if v is None:
            return next(fresh)
        return table.setdefault(v, len(table))
    neg = iter(range(-1, -10**12, -1))
    qa = np.array([code(v, neg) for v in a], dtype=np.int64)
    rb = np.array([code(v, neg) for v in b], dtype=np.int64)
    return qa, rb


def knn_classification(query: np.ndarray, query_labels: np.ndarray, reference: np.ndarray,
                       ref_labels: np.ndarray, k: int = 10, temperature: float = 0.05,
                       query_groups: Sequence | None = None, ref_groups: Sequence | None = None,
                       classes: Sequence[str] = SUPERCLASSES) -> dict:
    """kNN superclass metrics for queries against a labelled library.

    Thresholds come from the library alone: leave-one-out kNN scores of every library item (its own
    group excluded) choose each class's F1-best threshold; the queries are then binarised with them.
    """
    groups = ref_groups if ref_groups is not None else list(range(len(reference)))
    loo = knn_scores(reference, reference, ref_labels, k, temperature, groups, groups)
    thr = choose_thresholds(ref_labels, loo)
    s = knn_scores(query, reference, ref_labels, k, temperature, query_groups, ref_groups)
    out = multilabel_metrics(query_labels, s, thr, classes)
    out["loo_library_auc"] = macro_auc(ref_labels, loo)
    return out


# ---------------------------------------------------------------- helpers


def _check_2d(a, b, what: str) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim == 1:
        a, b = a[:, None], b.reshape(-1, 1)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"{what}: labels {a.shape} and predictions {b.shape} must be equal (n, c) shapes")
    return a, b


def _nanmean(x: np.ndarray) -> float:
    ok = ~np.isnan(x)
    return float(x[ok].mean()) if ok.any() else float("nan")


def _num(x: float) -> float | None:
    return None if np.isnan(x) else float(x)
