"""The eval figures and their bootstrap intervals, cross-checked against scikit-learn on real predictions: the
retrieval reader's reports for the session index's own library cases (each case's patient left out), scored
by `score_reports` exactly as `eval` scores a review job."""
from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import select

from rag_ecg.data.labels import SUPERCLASSES
from rag_ecg.data.store import Case
from rag_ecg.eval.bootstrap import (hamming_stat, intervals, macro_auc_stat, macro_f1_stat, resample_weights,
                                    weighted_auc)
from rag_ecg.eval.metrics import labels_to_matrix
from rag_ecg.eval.pipeline import LabelledChart, figure, markdown, score_reports
from rag_ecg.reader.retrieval import RetrievalBackend
from rag_ecg.search.retrieve import Retriever

sk = pytest.importorskip("sklearn.metrics", reason="scikit-learn is in the test extra: pip install -e '.[test]'")


@pytest.fixture(scope="module")
def real_eval(tiny_index, ingested_store):
    """Reports of the retrieval reader for every library case (own patient excluded), with their truth."""
    retriever = Retriever.open(tiny_index["index"], ingested_store)
    ids = [int(i) for i in retriever.image_index.ids]
    with ingested_store.session() as s:
        cases = {c.id: c for c in s.scalars(select(Case).where(Case.id.in_(ids)))}
    evidence = retriever.search_embeddings(retriever.image_index.vectors(ids), k=8,
                                           exclude_patients=[cases[i].patient_id for i in ids])
    backend = RetrievalBackend()
    reports = [backend.compose(ev).to_dict() for ev in evidence]
    truth = [LabelledChart(f"{i}.hea", str(i), list(cases[i].labels or []), dict(cases[i].codes or {})) for i in ids]
    y = labels_to_matrix([c.labels for c in truth])
    s = np.array([[ev.superclass_scores[c] for c in SUPERCLASSES] for ev in evidence])
    return reports, truth, y, s


def _sklearn_figures(y: np.ndarray, s: np.ndarray, p: np.ndarray) -> dict:
    both = [j for j in range(y.shape[1]) if 0 < y[:, j].sum() < len(y)]  # ECGBench: classes with both values
    return {"macro_auc_scores": np.mean([sk.roc_auc_score(y[:, j], s[:, j]) for j in both]),
            "macro_auc_binary": np.mean([sk.roc_auc_score(y[:, j], p[:, j]) for j in both]),
            "macro_f1": sk.f1_score(y, p, labels=[j for j in range(y.shape[1]) if y[:, j].any()], average="macro",
                                    zero_division=0),  # over the classes the set holds
            "hamming_loss": sk.hamming_loss(y, p)}


def test_eval_figures_equal_sklearn_on_real_retrieval_reports(real_eval):
    reports, truth, y, s = real_eval
    m = score_reports(reports, truth, code_superclass={})
    p = np.array([[c in {d.get("superclass") for d in r["diagnoses"]} for c in SUPERCLASSES] for r in reports],
                 dtype=np.uint8)
    assert len(truth) >= 50 and 0 < p.sum() < p.size and y[:, :4].sum(0).min() >= 5  # a real, mixed set
    ref = _sklearn_figures(y, s, p)
    for key, want in ref.items():
        assert m[key] == pytest.approx(want, abs=1e-12), key
        ci = m["ci95"][key]
        assert ci["value"] == pytest.approx(want, abs=1e-12)
        assert ci["lo"] <= want <= ci["hi"] and ci["hi"] - ci["lo"] > 0.01, (key, ci)
    assert m["bootstrap"] == {"resamples": 1000, "seed": 0, "level": 0.95, "unit": "chart"}
    assert set(m["ci95"]) >= {"superclass_report_f1", "scp_report_f1", "citations_valid"}
    assert score_reports(reports, truth, {})["ci95"] == m["ci95"]  # fixed seed: the same intervals every run


def test_every_bootstrap_resample_equals_sklearn_on_the_drawn_charts(real_eval):
    """The vectorised statistics (multiplicities, one matrix product for all resamples) against sklearn on
    the charts each resample actually drew, repeated ones included."""
    reports, truth, y, s = real_eval
    p = (s >= 0.5).astype(np.uint8)
    n = len(y)
    rng = np.random.default_rng(3)
    draws = [rng.integers(0, n, n) for _ in range(6)]
    w = np.stack([np.bincount(d, minlength=n) for d in draws]).astype(float)
    auc, f1, ham = macro_auc_stat(y, s)(w), macro_f1_stat(y, p)(w), hamming_stat(y, p)(w)
    for b, d in enumerate(draws):
        ref = _sklearn_figures(y[d], s[d], p[d])
        assert auc[b] == pytest.approx(ref["macro_auc_scores"], abs=1e-12)
        assert f1[b] == pytest.approx(ref["macro_f1"], abs=1e-12)
        assert ham[b] == pytest.approx(ref["hamming_loss"], abs=1e-12)
        assert weighted_auc(y[:, 0], s[:, 0], w[b:b + 1])[0] == pytest.approx(sk.roc_auc_score(y[d, 0], s[d, 0]))


def test_intervals_shrink_with_more_charts_and_show_in_the_table(real_eval):
    _, _, y, s = real_eval
    small = intervals({"auc": macro_auc_stat(y, s)}, len(y))["auc"]
    big_y, big_s = np.tile(y, (9, 1)), np.tile(s, (9, 1))  # the same mix, 9x the charts: interval ~1/3 as wide
    big = intervals({"auc": macro_auc_stat(big_y, big_s)}, len(big_y))["auc"]
    assert big["value"] == pytest.approx(small["value"])
    assert (big["hi"] - big["lo"]) < 0.5 * (small["hi"] - small["lo"])
    w = resample_weights(len(y), 50, seed=1)
    assert w.shape == (50, len(y)) and np.all(w.sum(1) == len(y))

    m = {"macro_f1": 0.8421, "ci95": {"macro_f1": {"value": 0.8421, "lo": 0.8112, "hi": 0.8734}},
         "hamming_loss": float("nan")}
    assert figure(m, "macro_f1") == "0.842 [0.81–0.87]"
    assert figure(m, "hamming_loss") == "—" and figure({"x": 0.5}, "x") == "0.500"
    md = markdown({"set": "s", "kind": "ptbxl", "index": "/i/x", "presets": {
        "clean": {"charts": 3, **m, "bootstrap": {"level": 0.95, "resamples": 1000, "seed": 0}}}})
    assert "| 0.842 [0.81–0.87] |" in md and "95 % percentile-bootstrap interval over charts" in md
