"""evaluate_encoder on real PTB-XL records with a tiny encoder; the per-record seeds and the flattening."""
from __future__ import annotations

import numpy as np
import pytest

from rag_ecg.data.records import ptbxl_record, read_ptbxl_index
from rag_ecg.encoder.model import ECGEncoder
from rag_ecg.eval.encoder_eval import evaluate_encoder, flat_metrics, record_seed


def test_record_seed_and_flattening():
    assert record_seed("ptbxl:1") == record_seed("ptbxl:1") != record_seed("ptbxl:1", "query")
    flat = flat_metrics({"random": {"auc": 0.8, "per_class": {"MI": {"f1": 0.5, "threshold": None}}}, "k": 10})
    assert flat == {"random/auc": 0.8, "random/per_class/MI/f1": 0.5, "k": 10.0}


@pytest.fixture(scope="module")
def real_split(ptbxl_dir):
    """20 library records from folds 1-8 and 6 queries from fold 9 (real PTB-XL)."""
    rows, statements = read_ptbxl_index(ptbxl_dir)
    lib = [ptbxl_record(r) for r in [r for r in rows if r.fold <= 8][:20]]
    val = [ptbxl_record(r) for r in [r for r in rows if r.fold == 9][:6]]
    return lib, val, {c: s.description for c, s in statements.items()}


def test_evaluate_encoder_on_real_records(real_split):
    lib, val, desc = real_split
    enc = ECGEncoder.create("ecg-clip-tiny", seed=0)
    res = evaluate_encoder(enc, lib, val, ("random", "clean"), k=5, descriptions=desc, dpi=40, workers=0)
    assert res["library_size"] == 20 and res["n_queries"] == 6 and res["library_preset"] == "clean"
    for preset in ("random", "clean"):
        m = res[preset]
        assert set(m["per_class"]) == {"NORM", "MI", "STTC", "CD", "HYP"}
        for key in ("auc_binarized", "f1"):  # the headline figures are the macro means of the per-class ones
            assert m[key] == pytest.approx(np.mean([c[key] for c in m["per_class"].values()]), nan_ok=True), key
        assert set(m["image_to_report"]) == {"R@1", "R@5", "R@10"}
        assert m["image_to_report"]["R@10"] >= m["image_to_report"]["R@1"]
    # rendering in worker processes gives the very same pages, hence the same numbers
    again = evaluate_encoder(enc, lib, val, "random", k=5, descriptions=desc, dpi=40, workers=1)
    assert flat_metrics(again["random"]) == pytest.approx(flat_metrics(res["random"]), nan_ok=True)
