"""Report schema, answer parsing, citation check and rendering, on hand-written realistic answers."""
from __future__ import annotations

import base64
import html
import io
import json
import re
from dataclasses import replace

import pytest
from PIL import Image

from rag_ecg.reader.parse import ParseError, extract_json, parse_answer
from rag_ecg.reader.report import NOTICE, Diagnosis, Report, RetrievalInfo, Statement, check_citations, unparsed_report
from rag_ecg.reader.report_render import render_html, render_report, render_text, save_report
from tests.openai_server import ptbxl_evidence


@pytest.fixture(scope="module")
def evidence(ptbxl_dir):
    return ptbxl_evidence(ptbxl_dir)  # case ids 1000-1005


COT = """1. Rhythm: regular narrow complexes, each preceded by an upright P wave in II: sinus rhythm.
2. Rate: about 4 large squares between R waves, so roughly 75 bpm.
3. Axis: QRS positive in I, negative in aVF: left axis deviation, as in [case 1000].
4. Intervals: PR about 160 ms; QRS 100 ms; QT cannot be measured reliably.
5. Morphology: small Q waves in III and aVF; no ST elevation.
6. Comparison: [case 1000] (left anterior fascicular block) matches the axis; [case 1001] is normal.
7. Conclusion: left anterior fascicular block, possible old inferior infarction.
"""

GOOD_JSON = {
    "rhythm": {"text": "sinus rhythm", "cited": [1001, 1002]},
    "rate_bpm": 75,
    "axis": "left axis deviation",
    "intervals": {"pr_ms": 160, "qrs_ms": 100, "qt_ms": None, "qtc_ms": None},
    "findings": [{"text": "Left axis deviation as in [case 1000]", "cited": [1000]},
                 {"text": "Small Q waves in III and aVF", "cited": ["case 1000"]}],
    "diagnoses": [{"code": "LAFB", "superclass": "CD", "label": "left anterior fascicular block",
                   "confidence": 0.7, "cited": [1000]},
                  {"code": "IMI", "superclass": "MI", "label": "inferior myocardial infarction",
                   "confidence": 0.3, "cited": [1000]}],
    "impression": {"text": "Sinus rhythm with left anterior fascicular block.", "cited": [1000, 1001]},
}


def answer(obj, fence="```json") -> str:
    return f"{COT}\n{fence}\n{json.dumps(obj, indent=2)}\n```\n"


def test_parses_json_fenced_after_cot_text():
    r = parse_answer(answer(GOOD_JSON))
    assert r.parsed and r.rhythm == Statement("sinus rhythm", [1001, 1002])
    assert r.rate_bpm == 75.0 and r.axis == "left axis deviation"
    assert (r.intervals.pr_ms, r.intervals.qrs_ms, r.intervals.qt_ms) == (160.0, 100.0, None)
    assert r.findings[1].cited == [1000]  # "case 1000" string normalised to the id
    assert [d.code for d in r.diagnoses] == ["LAFB", "IMI"] and r.diagnoses[0].superclass == "CD"
    assert r.raw_text.startswith("1. Rhythm")
    # an unlabelled fence and bare JSON after the CoT work too; the last JSON object wins
    assert parse_answer(answer(GOOD_JSON, fence="```")).rate_bpm == 75.0
    bare = COT + "Example shape: {\"note\": 1}\nFinal: " + json.dumps(GOOD_JSON)
    assert parse_answer(bare).diagnoses[1].code == "IMI"


def test_good_answer_passes_citation_check(evidence):
    r = check_citations(parse_answer(answer(GOOD_JSON)), evidence)
    assert not r.dropped_citations
    assert r.cited_case_ids == [1001, 1002, 1000]
    assert set(r.cited_case_ids) <= set(evidence.case_ids)


def test_citation_to_a_case_not_retrieved_is_dropped_and_flagged(evidence):
    bad = json.loads(json.dumps(GOOD_JSON))
    bad["findings"].append({"text": "ST elevation as in a prior case", "cited": [1003, 4242]})
    bad["diagnoses"][1]["cited"] = [77]
    bad["impression"]["text"] = "Compare with [case 9999]."
    r = check_citations(parse_answer(answer(bad)), evidence)
    assert [f.text for f in r.findings] == ["Left axis deviation as in [case 1000]", "Small Q waves in III and aVF"]
    assert [d.code for d in r.diagnoses] == ["LAFB"]
    assert r.impression is None  # its inline citation named an unknown case
    dropped = {d.where: d.unknown for d in r.dropped_citations}
    assert dropped == {"findings[2]": [4242], "diagnoses[1]": [77], "impression": [9999]}
    assert 4242 not in r.cited_case_ids and 77 not in r.cited_case_ids
    text = render_text(r)
    assert "Removed by the citation check" in text and "4242" in text


@pytest.mark.parametrize("text,msg", [
    (COT + "```json\n{\"rhythm\": {\"text\": \"sinus rhythm\", \"cited\": [1001]},\n \"rate_bpm\": 7",
     "not closed"),
    (COT + "{\"rhythm\": {\"text\": \"sinus rhythm\", \"cited\": [1001]}, \"findings\": [", "not closed"),
    (COT, "no JSON object"),
    ("", "empty"),
])
def test_truncated_or_missing_json_raises_a_clear_error(text, msg):
    with pytest.raises(ParseError, match=msg):
        parse_answer(text)


@pytest.mark.parametrize("patch,msg", [
    ({"rate_bpm": 900}, "rate_bpm=900 is outside"),
    ({"rate_bpm": "fast"}, "rate_bpm must be a number"),
    ({"diagnoses": [{"label": "MI", "superclass": "MI", "confidence": 70, "cited": [1000]}]},
     r"diagnoses\[0\].confidence=70 is outside"),
    ({"diagnoses": [{"label": "MI", "superclass": "XYZ", "confidence": 0.5}]}, "superclass must be one of"),
    ({"diagnoses": [{"label": "MI"}]}, "confidence is missing"),
    ({"findings": [{"text": "x", "cited": ["the first one"]}]}, "must hold case ids"),
    ({"intervals": {"pr_ms": 2000}}, "intervals.pr_ms=2000"),
])
def test_invalid_fields_are_named(patch, msg):
    with pytest.raises(ParseError, match=msg):
        parse_answer(answer({**GOOD_JSON, **patch}))


def test_tolerates_unknowns_and_trailing_commas():
    text = COT + '```json\n{"rhythm": "sinus rhythm [case 1001]", "rate_bpm": "not estimable", "axis": "unknown",' \
                 '\n "intervals": {"pr_ms": "160 ms"}, "findings": [], "diagnoses": [],}\n```'
    r = parse_answer(text)
    assert r.rhythm == Statement("sinus rhythm [case 1001]", [1001])
    assert r.rate_bpm is None and r.axis is None and r.intervals.pr_ms == 160.0
    listed = parse_answer(json.dumps({"findings": [{"text": "Q waves", "cited": "case 1000, [case 1002]"}]}))
    assert listed.findings[0].cited == [1000, 1002]


def test_json_round_trip_and_unparsed_flag(evidence):
    r = check_citations(parse_answer(answer(GOOD_JSON)), evidence)
    again = Report.from_dict(json.loads(r.to_json()))
    assert again == r
    u = unparsed_report("lorem ipsum", "no JSON object found in the answer")
    assert not u.parsed and Report.from_dict(u.to_dict()) == u
    assert "could not be parsed" in render_text(u) and "lorem ipsum" in render_text(u)
    assert NOTICE.upper() in render_text(u)
    with pytest.raises(ValueError, match="expected text, json or html"):
        render_report(r, "pdf")


def _png(tmp_path, name, color):
    p = tmp_path / name
    Image.new("RGB", (800, 400), color).save(p)
    return p


def test_html_is_self_contained_and_escaped(evidence, tmp_path):
    r = parse_answer(answer(GOOD_JSON))
    r.findings.append(Statement("<script>alert('x')</script> & more", [1000]))
    r = replace(r, backend="hf", model="pulse", retrieval=RetrievalInfo.from_evidence(evidence))
    r = check_citations(r, evidence)
    page = render_html(r, query_image=_png(tmp_path, "q.png", "white"),
                       case_images={1000: _png(tmp_path, "c.png", "red"), 1001: tmp_path / "missing.png"})
    assert "<script>" not in page and html.escape("<script>alert('x')</script>") in page
    assert NOTICE in page
    urls = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(urls) == 2  # the query and case 1000; case 1001's file is missing
    thumb = Image.open(io.BytesIO(base64.b64decode(urls[1])))
    assert max(thumb.size) <= 360 and thumb.getpixel((5, 5)) == (255, 0, 0)
    assert "image unavailable" in page and "src=\"http" not in page
    saved = save_report(r, tmp_path / "out" / "report.html", query_image=_png(tmp_path, "q2.png", "white"))
    assert saved.read_text().startswith("<!DOCTYPE html>")
    assert not list((tmp_path / "out").glob(".*.tmp"))


def test_extract_json_prefers_last_fenced_block():
    text = "```json\n{\"rhythm\": \"draft\"}\n```\nOn reflection:\n```json\n{\"rhythm\": \"final\"}\n```"
    assert extract_json(text) == {"rhythm": "final"}


def test_diagnosis_defaults_label_from_superclass():
    r = parse_answer(answer({"diagnoses": [{"superclass": "hyp", "confidence": 0.6, "cited": [1003]}]}))
    assert r.diagnoses == [Diagnosis(label="hypertrophy", confidence=0.6, superclass="HYP", cited=[1003])]
