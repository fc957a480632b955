"""The batch review measures every chart's tracing: columns in results.csv/jsonl, the page shows them, an urgent
STEMI flag is visible, and a chart that is refused (no ECG) has them null."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

from rag_ecg.data.store import Case, open_store
from rag_ecg.encoder.model import ECGEncoder
from rag_ecg.measure.inputs import measure_input
from rag_ecg.review.html import render_page
from rag_ecg.review.jobs import case_meta
from rag_ecg.review.loader import LoadTask, load_chart
from rag_ecg.review.outputs import CSV_COLUMNS, MEASURE_COLUMNS
from tests.rag_ecg.review.conftest import GOOD, GOOD_KEYS, GOOD_WFDB, rows_of

FILLED = ("heart_rate_bpm", "rr_irregular", "qrs_axis_deg", "qrs_ms", "qt_ms", "qtc_bazett_ms")


def test_every_good_chart_is_measured_and_a_refused_one_is_not(uninterrupted, ptbxl_dir):
    out = uninterrupted["out"]
    rows = rows_of(out)
    with open(out / "results.csv", newline="") as f:
        table = {r["chart"]: r for r in csv.DictReader(f)}
    assert set(MEASURE_COLUMNS) | {"stemi_urgent", "measured_findings", "measure_error"} <= set(CSV_COLUMNS)
    for key in GOOD_KEYS:
        r = rows[key]
        assert all(r[k] is not None for k in FILLED), (key, {k: r[k] for k in MEASURE_COLUMNS})
        assert r["measure_error"] is None and r["report"]["measurements"]["heart_rate_bpm"] == r["heart_rate_bpm"]
        assert "rate_bpm" in r["report"]["measured_fields"] and r["report"]["rate_bpm"] == r["heart_rate_bpm"]
        assert all(f["basis"] == "measured" for f in r["report"]["measured_findings"])
        assert table[key]["heart_rate_bpm"] == str(r["heart_rate_bpm"]) and table[key]["qrs_ms"]
    # each chart's rate agrees with its source record measured directly: pictures through the digitiser
    recs = {rel: rec for rel, rec, _ in GOOD} | {f"{GOOD_WFDB[0]}/{GOOD_WFDB[1]}.hea": GOOD_WFDB[1]}
    for key, rec in recs.items():
        truth = measure_input(ptbxl_dir / "records100" / rec).heart_rate_bpm.value
        assert rows[key]["heart_rate_bpm"] == pytest.approx(truth, abs=4), key
    for key in ("bad/gradient.png", "bad/empty.png"):  # refused as no ECG / never opened: nothing measured
        assert all(rows[key][k] is None for k in MEASURE_COLUMNS) and rows[key]["stemi_urgent"] is False
        assert all(table[key][k] == "" for k in MEASURE_COLUMNS)
    page = (out / "index.html").read_text()
    assert page.count('<td class="measured"') == len(rows) and "Measured (rate, axis, intervals)" in page
    assert f"Rate {rows[GOOD_KEYS[0]]['heart_rate_bpm']:g} bpm" in page


def test_the_page_flags_a_chart_meeting_the_stemi_criteria_and_says_why_one_is_not_measurable():
    job = {"id": 1, "key": "k" * 64, "input": "dir:/x", "status": "done", "settings": {}}
    base = {"diagnoses": [], "neighbours": [], "timings": {"total": 0.1}, "thumb": None, "top_confidence": None,
            "status": "done", "error": None}
    stemi = {**base, "id": 1, "chart": "stemi.png", "path": "/x/stemi.png", "heart_rate_bpm": 96,
             "rr_irregular": False, "qrs_axis_deg": 30, "pr_ms": 150, "qrs_ms": 96, "qt_ms": 360,
             "qtc_bazett_ms": 455, "stemi_criteria": ["V2", "V3", "V4"], "stemi_urgent": True,
             "measured_findings": ["URGENT: ST elevation meeting the STEMI criteria ... — measured"]}
    failed = {**base, "id": 2, "chart": "blur.png", "path": "/x/blur.png", "measure_error": "fewer than <two> beats",
              **{k: None for k in MEASURE_COLUMNS}, "stemi_urgent": False, "measured_findings": []}
    html = render_page(job, {"by_status": {"done": 2}, "total": 2, "urgent": ["stemi.png"]}, [stemi, failed])
    assert 'data-urgent="stemi"' in html and "STEMI criteria met in V2, V3, V4" in html
    assert "id='urgent'" in html and "1 chart(s) with ST elevation meeting the STEMI criteria" in html
    assert html.index("id='urgent'") < html.index("id='results'")  # above the table, first thing to see
    assert "not measurable: fewer than &lt;two&gt; beats" in html
    assert "Rate 96 bpm, regular; axis +30°" in html


def test_a_store_chart_is_measured_from_its_record(review_env):
    """Store charts are drawn for the encoder but measured from their own signal (with the store's sex)."""
    store = open_store(review_env["url"])
    with store.session() as s:
        case = s.query(Case).filter(Case.sex.isnot(None)).order_by(Case.id).first()
        key, path, sex = f"case:{case.id}", case.signal_path, case.sex
    meta = case_meta(store, [key])[key]
    store.dispose()
    pre = ECGEncoder.load(Path(review_env["index"]) / "encoder").preprocess
    loaded = load_chart(LoadTask(1, key, path, "case", meta, pre, "clean", 100, 320, 0))
    assert loaded.error is None and loaded.measurements["sex"] == sex
    direct = measure_input(path)
    assert loaded.measurements["heart_rate_bpm"] == direct.heart_rate_bpm.rounded()
