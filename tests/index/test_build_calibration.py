"""Index build for a trace encoder: the library embedded from its signals, probabilities fitted on held-out
pictures (fusion of neighbour vote + encoder head), and the similarity scale every neighbour carries."""
from __future__ import annotations

import json

import numpy as np
import pytest
from sqlalchemy import select

from index.build import BuildConfig, build_index, fit_on_queries, held_out_queries
from rag_ecg.data.labels import SUPERCLASSES
from rag_ecg.data.store import Case, load_case_record
from rag_ecg.encoder.model import ECGEncoder
from rag_ecg.eval.metrics import labels_to_matrix
from rag_ecg.paper.render import render_page
from rag_ecg.search.calibration import Calibration
from rag_ecg.search.retrieve import Retriever
from rag_ecg.search.vector_index import VectorIndex


@pytest.fixture(scope="module")
def trace_index(tmp_path_factory, ingested_store):
    base = tmp_path_factory.mktemp("trace_index")
    enc = ECGEncoder.create("ecg-clip-trace", seed=0, aux_classes=SUPERCLASSES)
    enc.save(base / "encoder")
    out = build_index(ingested_store, base / "encoder", name="trace", out_dir=base / "index",
                      cfg=BuildConfig(workers=1, page_width=300, calibration_queries=0), progress=False)
    return {"encoder": base / "encoder", "index": out}


def _cases(store, split):
    with store.session() as s:
        return [c for c in s.scalars(select(Case).order_by(Case.id)) if c.split == split]


def test_a_trace_library_is_embedded_from_its_signals_with_a_page_to_look_at(trace_index, ingested_store):
    enc = ECGEncoder.load(trace_index["encoder"])
    train = _cases(ingested_store, "train")
    ix = VectorIndex.load(trace_index["index"] / "images.faiss")
    some = train[:4]
    want = enc.embed_pixels(np.stack([enc.preprocess.perfect_read(load_case_record(c)) for c in some]))
    np.testing.assert_allclose(ix.vectors(np.array([c.id for c in some])), want, atol=1e-5)
    assert all((trace_index["index"] / "pages" / f"{c.id}.jpg").is_file() for c in some)


def test_probabilities_are_fitted_on_held_out_pictures(trace_index, ingested_store):
    enc = ECGEncoder.load(trace_index["encoder"])
    cfg = BuildConfig(workers=1)
    queries = held_out_queries(ingested_store, cfg)
    assert queries and {c.split for c in queries} == {"val"}  # fold 9: never in the library, never scored
    assert held_out_queries(ingested_store, BuildConfig(splits=None)) == []  # no held-out split to use
    ix = VectorIndex.load(trace_index["index"] / "images.faiss")
    library = _cases(ingested_store, "train")
    base = Calibration(k=cfg.k, temperature=cfg.temperature)
    assert fit_on_queries(base, ix, library, queries, cfg, enc) is base  # 12 held-out ECGs: too few to fit on
    cal = fit_on_queries(base, ix, library, queries, cfg, enc, min_queries=8)
    y = labels_to_matrix([c.labels or [] for c in queries], SUPERCLASSES)
    fitted = {lab for j, lab in enumerate(SUPERCLASSES) if 0 < y[:, j].sum() < len(y)}
    assert set(cal.fusion) == fitted == set(cal.platt) and "held-out" in cal.fitted_on
    assert set(cal.thresholds) <= fitted
    q = np.asarray(cal.reference_top)
    assert len(q) == 101 and np.all(np.diff(q) >= 0)
    assert cal.percentile(q[0] - 0.1) == 0.0 and cal.percentile(q[-1] + 0.1) == 100.0
    grid = [cal.percentile(x) for x in np.linspace(q[0], q[-1], 50)]
    assert grid == sorted(grid) and grid[0] < grid[-1]
    # the fused probability uses the head's logit: a strongly positive logit raises it, a negative one lowers it
    lab = sorted(fitted)[0]
    w = cal.fusion[lab]
    if abs(w[1]) > 1e-6:
        hi, lo = cal.probability(lab, 0.5, 4.0), cal.probability(lab, 0.5, -4.0)
        assert (hi > lo) == (w[1] > 0)
    assert cal.probability(lab, 0.5) == pytest.approx(Calibration(platt=cal.platt).probability(lab, 0.5))


def test_neighbours_carry_the_similarity_scale_and_fused_probabilities(trace_index, ingested_store, tmp_path):
    manifest = json.loads((trace_index["index"] / "manifest.json").read_text())
    assert manifest["calibration"]["reference_top"]  # library fallback: leave-one-patient-out best matches
    r = Retriever.open(trace_index["index"], ingested_store)
    val = _cases(ingested_store, "val")[:2]
    pages = [render_page(load_case_record(c), preset="photo", seed=3, dpi=100) for c in val]
    for ev in r.search_images(pages, k=5):
        pcts = [n.similarity_pct for n in ev.neighbours]
        assert all(0.0 <= p <= 100.0 for p in pcts) and pcts == sorted(pcts, reverse=True)
        assert all(0.0 <= v <= 1.0 for v in ev.superclass_scores.values())
    # a text query is not a picture: the encoder's head never joins its vote
    (ev,) = r.search_texts(["sinus rhythm"], k=5)
    assert all(n.similarity_pct is not None for n in ev.neighbours)
