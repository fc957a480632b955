"""Reports use the tracing's measurements: rate/axis/intervals filled and marked measured, rule-based findings
(an urgent STEMI one first), "not measurable" instead of invented values, and the LLM told them as facts."""
from __future__ import annotations

import json

import pytest

from rag_ecg.data.records import read_wfdb
from rag_ecg.measure.inputs import read_record_mv
from rag_ecg.measure.reference import read_reference
from rag_ecg.paper.render import render_page
from rag_ecg.reader.backends import get_backend
from rag_ecg.reader.interpret import interpret, report_command
from rag_ecg.reader.measured import measured_findings
from rag_ecg.reader.report import Report
from rag_ecg.reader.report_render import render_html, render_text
from rag_ecg.reader.retrieval import RetrievalBackend
from rag_ecg.reader.tracing import query_measurements
from tests.openai_server import OpenAITestServer, ptbxl_evidence
from tests.rag_ecg.reader.test_report import GOOD_JSON, answer

LUDB_BRADY = "1"  # LUDB record 1: "Sinus bradycardia" in its header, a woman ("<sex>: F")


def _constructed(**over) -> dict:
    """A measurement set as `cli.py measure --format json` gives it, with the values a test needs."""
    base = {"input": "constructed", "heart_rate_bpm": 118, "rr_irregular": False, "qrs_axis_deg": -52, "pr_ms": 232,
            "qrs_ms": 126, "qt_ms": 380, "qtc_bazett_ms": 470, "qtc_fridericia_ms": 440,
            "st_mv": {"I": 0.0, "II": -0.05, "V1": 0.21, "V2": 0.34, "V3": 0.31, "V4": 0.18, "V5": 0.02, "V6": 0.0},
            "stemi_criteria": ["V1", "V2", "V3", "V4"], "leads_used": {}, "confidence": {}, "not_measured": {},
            "error": None, "sex": "M"}
    return {**base, **over}


def test_retrieval_report_of_a_ludb_record_shows_its_measured_rate_and_findings(ludb_dir, ptbxl_dir):
    rec = ludb_dir / "data" / LUDB_BRADY
    sig, fs, sex, _ = read_record_mv(rec.with_suffix(".hea"))
    ref = read_reference(rec, sig, fs)
    ev = ptbxl_evidence(ptbxl_dir, ("24", "43", "55", "85", "103", "195"))
    out = json.loads(report_command(None, ev, fmt="json", measure_from=rec.with_suffix(".hea")))
    r = Report.from_dict(out)
    assert r.rate_bpm == pytest.approx(ref.heart_rate_bpm, abs=3)  # the cardiologists' beats: ~46 bpm
    assert r.measurements["sex"] == sex == "F" and r.measurements["heart_rate_bpm"] == r.rate_bpm
    assert {"rate_bpm", "axis", "pr_ms", "qrs_ms", "qt_ms", "qtc_ms"} <= set(r.measured_fields)
    assert r.intervals.qrs_ms == pytest.approx(ref.qrs_ms, abs=20) and r.axis.endswith("(normal)")
    assert [(f.code, f.basis, f.urgent) for f in r.measured_findings] == [("BRADY", "measured", False)]
    assert r.rhythm.cited and "SR" in r.rhythm.text  # the rhythm the neighbours vote stays theirs, cited
    text = render_text(r)
    assert f"Rate: {r.rate_bpm:g} bpm (measured)" in text and "Bradycardia: heart rate" in text
    assert text.index("Measured findings") < text.index("Findings (similar cases)")
    assert "URGENT" not in text
    page = render_html(r)
    assert 'class="measured"' in page and 'data-code="BRADY"' in page and 'class="urgent"' not in page


def test_the_record_drawn_as_a_picture_is_measured_through_the_digitiser(ludb_dir, tmp_path):
    rec = ludb_dir / "data" / LUDB_BRADY
    ref = read_reference(rec, *read_record_mv(rec.with_suffix(".hea"))[:2])
    path = tmp_path / "ludb1.png"
    render_page(read_wfdb(rec), preset="clean", seed=0, dpi=100).save(path)
    m = query_measurements(path)
    assert m["error"] is None and m["sex"] is None  # a picture says nothing of the patient's sex
    assert m["heart_rate_bpm"] == pytest.approx(ref.heart_rate_bpm, abs=4)


def test_stemi_is_the_first_finding_marked_urgent_and_each_rule_fires(ptbxl_dir):
    found = measured_findings(_constructed())
    assert [f.code for f in found] == ["STEMI", "TACHY", "LAD", "AVB1", "WIDE_QRS", "LONG_QTC"]
    assert found[0].urgent and not any(f.urgent for f in found[1:]) and {f.basis for f in found} == {"measured"}
    assert "V1, V2, V3, V4" in found[0].text and "V2 +3.4 mm" in found[0].text
    assert "threshold for men" in found[-1].text and "450" in found[-1].text
    # QTc thresholds by sex: 455 ms is long for men only; unknown sex uses 460 ms and says so
    assert [f.code for f in measured_findings(_constructed(qtc_bazett_ms=455, sex="F"))][-1] != "LONG_QTC"
    unknown = measured_findings(_constructed(qtc_bazett_ms=462, sex=None))
    assert unknown[-1].code == "LONG_QTC" and "sex unknown" in unknown[-1].text and "460" in unknown[-1].text
    assert [f.code for f in measured_findings(_constructed(heart_rate_bpm=44, qrs_axis_deg=120, stemi_criteria=None,
                                                           pr_ms=180, qrs_ms=100, qtc_bazett_ms=420))] == \
        ["BRADY", "RAD"]

    r = RetrievalBackend().compose(ptbxl_evidence(ptbxl_dir), _constructed())
    text = render_text(r)
    lines = text.splitlines()
    assert lines[3].startswith("*** URGENT: ST elevation meeting the STEMI criteria")  # before the rhythm
    assert text.index("URGENT") < text.index("Rhythm:") and r.measured_findings[0].code == "STEMI"
    page = render_html(r)
    assert page.index('class="urgent"') < page.index("<th>Rhythm</th>")


def test_a_value_not_measured_is_said_so_and_never_filled(ptbxl_dir):
    m = _constructed(pr_ms=None, qrs_axis_deg=None, stemi_criteria=None,
                     not_measured={"pr_ms": "irregularly irregular rhythm (atrial fibrillation?): no PR interval",
                                   "qrs_axis_deg": "fewer than two limb leads show a whole QRS"})
    r = RetrievalBackend().compose(ptbxl_evidence(ptbxl_dir), m)
    assert r.intervals.pr_ms is None and r.axis is None and "pr_ms" not in r.measured_fields
    assert not any(f.code in ("AVB1", "LAD", "RAD", "STEMI") for f in r.measured_findings)
    text = render_text(r)
    assert "PR not measurable (irregularly irregular rhythm" in text
    assert "Axis: not measurable (fewer than two limb leads" in text
    failed = query_measurements(ptbxl_dir / "no-such-record.hea")
    r = RetrievalBackend().compose(ptbxl_evidence(ptbxl_dir), failed)
    assert r.rate_bpm is None and r.measured_findings == [] and r.diagnoses is not None
    assert "Rate: not measurable (" in render_text(r) and "no-such-record" in render_text(r)
    # without measurements the report is what it was: nothing measured, nothing said about it
    plain = RetrievalBackend().compose(ptbxl_evidence(ptbxl_dir))
    assert plain.measurements is None and "Rate: not estimated" in render_text(plain)


def test_the_llm_prompt_carries_the_measured_block_and_the_report_keeps_them(ptbxl_dir):
    ev = ptbxl_evidence(ptbxl_dir)
    m = _constructed()
    with OpenAITestServer(replies=[answer(GOOD_JSON)]) as srv:
        be = get_backend("vllm", base_url=srv.url, timeout_s=10.0, max_retries=0, backoff_s=0.01, max_tokens=64)
        r = interpret(None, ev, be, measurements=m)
        prompt = srv.requests[0]["messages"][1]["content"]
    assert "Measured from the tracing" in prompt and "heart rate 118 bpm" in prompt and "PR 232 ms" in prompt
    assert "URGENT: ST elevation meeting the STEMI criteria" in prompt
    assert prompt.index("</evidence>") < prompt.index("Measured from the tracing") < prompt.index("Interpret the")
    assert r.measurements == m and r.measured_findings[0].code == "STEMI"
    assert r.measured_fields == []  # the LLM's own rate/axis/intervals are kept as its own
    assert render_text(r).splitlines()[3].startswith("*** URGENT")


def test_measured_stemi_overrides_neighbours_that_vote_normal(ptbxl_dir):
    """A real acute-MI printout drew 'normal ECG 0.94' from its neighbours: the measured ST elevation wins."""
    ev = ptbxl_evidence(ptbxl_dir, ("24", "43", "55", "85", "149", "158"))  # all six: NORM only
    plain = RetrievalBackend().compose(ev, _constructed(stemi_criteria=None))
    assert [d.superclass for d in plain.diagnoses if d.code is None] == ["NORM"] and plain.notes == []
    r = RetrievalBackend().compose(ev, _constructed())
    top = r.diagnoses[0]
    assert (top.superclass, top.basis, top.cited) == ("MI", "measured", [])
    assert "V1, V2, V3, V4" in top.label and top.confidence == pytest.approx(0.5)  # raised to the threshold
    assert "NORM" not in {d.superclass for d in r.diagnoses}
    assert any("Not called a normal ECG" in n and "(1.00)" in n for n in r.notes)
    assert r.impression.text.startswith("Measured: myocardial infarction") and "votes support" not in r.impression.text
    assert "measured (confidence 0.50)" in render_text(r)
    assert "0.50 (measured)" in render_html(r)
    # round trip: the basis survives the report JSON
    assert Report.from_dict(json.loads(json.dumps(r.to_dict()))).diagnoses[0].basis == "measured"


def test_measured_q_waves_state_an_infarct_of_undetermined_age(ptbxl_dir):
    ev = ptbxl_evidence(ptbxl_dir, ("24", "43", "55", "85", "149", "158"))  # all six: NORM only
    q = {"II": {"ms": 44.0, "mv": 0.31, "qs": False}, "aVF": {"ms": 40.0, "mv": 0.22, "qs": False}}
    m = _constructed(stemi_criteria=None, prior_mi_q_leads=["II", "aVF"], q_waves=q)
    r = RetrievalBackend().compose(ev, m)
    assert [f.code for f in r.measured_findings][0] == "PRIOR_MI_Q" and not r.measured_findings[0].urgent
    assert "II Q 44 ms 0.31 mV, aVF Q 40 ms 0.22 mV" in r.measured_findings[0].text
    top = r.diagnoses[0]
    assert (top.superclass, top.basis) == ("MI", "measured") and "age undetermined" in top.label
    assert "NORM" not in {d.superclass for d in r.diagnoses} and "URGENT" not in render_text(r)
