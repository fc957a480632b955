"""The review page as a tool to review with, built from a real review (tiny-encoder index, real charts and a
store whose reports carry planted markup): full-size pictures and trace overlays in the job folder, neighbours'
findings in English beside their quoted reports, truth beside prediction, refused charts with their picture,
everything escaped. `page_job` is shared with the browser test (built once per session on disk)."""
from __future__ import annotations

import csv
import json
import re
import shutil
import sqlite3
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import select

from rag_ecg.data.labels import english_statements
from rag_ecg.data.store import Case, ScpStatementRow, open_store
from rag_ecg.review.config import FULL_WIDTH
from rag_ecg.review.html import render_page
from rag_ecg.review.run import review

EVIL_NAME = "charts/a <img src=x onerror=window.pwned=1>.png"  # a chart's file name is data, never markup
PLANTED = " <script>window.pwned=2</script>"  # appended to every reference report of this store copy
GOOD, REFUSED = "charts/b.jpg", "charts/gradient.png"
TRUTH = {EVIL_NAME: "NORM", GOOD: "MI", REFUSED: "NORM"}  # chart key (the CSV's path) -> labels


def build_page_job(review_env: dict, base: Path) -> dict:
    """A labelled CSV of two good pictures and a refused one, reviewed against a store copy with planted
    markup in its reports (once per session: a marker file)."""
    marker = base / "job.json"
    if marker.exists():
        return json.loads(marker.read_text())
    charts = base / "charts"
    charts.mkdir(parents=True, exist_ok=True)
    src = Path(review_env["charts"])
    shutil.copy(src / "good/page.png", base / EVIL_NAME)
    shutil.copy(src / "good/page.jpg", base / GOOD)
    shutil.copy(src / "bad/gradient.png", base / REFUSED)
    with open(base / "charts.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "labels"])
        w.writerows(TRUTH.items())
    db = base / "review.db"
    a, b = sqlite3.connect(review_env["db"]), sqlite3.connect(db)
    a.backup(b)
    b.execute("UPDATE cases SET report = report || ?", (PLANTED,))
    b.commit()
    a.close()
    b.close()
    url = f"sqlite:///{db}"
    review(base / "charts.csv", base / "out", store=url, index_dir=review_env["index"], workers=1, batch_size=4,
           progress=False)
    job = {"out": str(base / "out"), "url": url, "base": str(base)}
    marker.write_text(json.dumps(job))
    return job


@pytest.fixture(scope="session")
def page_job(tmp_path_factory, review_env) -> dict:
    return build_page_job(review_env, tmp_path_factory.getbasetemp() / "review-page-job")


def rows_by_chart(out: Path) -> dict[str, dict]:
    return {r["chart"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


def test_full_size_pictures_and_overlays_live_in_the_job_folder(page_job):
    out = Path(page_job["out"])
    rows = rows_by_chart(out)
    ids = {}
    page = (out / "index.html").read_text()
    for chart, row in rows.items():
        tr = re.search(rf'<tr class="chart-row[^"]*" data-id="(\d+)"[^>]*data-chart="{re.escape(_esc(chart))}"', page)
        ids[chart] = int(tr.group(1))
    assert rows[EVIL_NAME]["status"] == rows[GOOD]["status"] == "done"
    assert rows[REFUSED]["status"] == "error"
    for chart, i in ids.items():
        full = out / "thumbs" / f"chart-{i}-full.jpg"
        with Image.open(full) as im, Image.open(out / "thumbs" / f"chart-{i}.jpg") as th, \
                Image.open(Path(page_job["base"]) / chart) as original:
            assert th.width == 320 and im.width == min(FULL_WIDTH, original.width) > th.width  # real full size
        assert f'data-full="thumbs/chart-{i}-full.jpg"' in page
        overlay = out / "thumbs" / f"chart-{i}-overlay.jpg"
        # a digitised picture has its read traces drawn; the refused one (no traces) has none, but its picture
        assert overlay.exists() == (chart != REFUSED)
        assert (f'data-overlay="thumbs/chart-{i}-overlay.jpg"' in page) == (chart != REFUSED)
    refused = page.split(f'data-id="{ids[REFUSED]}"')[1].split("</tr>")[0]
    assert f'src="thumbs/chart-{ids[REFUSED]}.jpg"' in refused
    assert re.search(r'class="refused">refused: [^<]*no readable ECG traces', refused)
    for n in rows[GOOD]["neighbours"]:  # every neighbour opens full size from the job folder (no network)
        assert (out / "thumbs" / f"case-{n['case_id']}-full.jpg").exists()
    assert "http://" not in page and "https://" not in page


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;").replace("'", "&#x27;")


def test_neighbours_show_english_findings_and_their_report_escaped(page_job):
    out = Path(page_job["out"])
    page = (out / "index.html").read_text()
    store = open_store(page_job["url"])
    with store.session() as s:
        desc = dict(s.execute(select(ScpStatementRow.code, ScpStatementRow.description)).all())
        cases = {c.id: (c.report, dict(c.codes or {})) for c in s.scalars(select(Case))}
    store.dispose()
    assert "normal ECG" in desc.values()
    shown = 0
    for row in rows_by_chart(out).values():
        for n in row["neighbours"]:
            fig = page.split(f'<figure class="nbf" data-case="{n["case_id"]}">')[1].split("</figure>")[0]
            report, codes = cases[n["case_id"]]
            for code, text, _ in english_statements(codes, desc):
                assert f"<li>{_esc(text)} " in fig  # the statement in English, from scp_statements.csv
            assert "&lt;script&gt;window.pwned=2&lt;/script&gt;" in fig  # the quoted report, as text
            assert f"{float(n['score']):.3f}" in fig
            shown += 1
    assert shown == 16
    body = page.split("<body>")[1].split("<script type='application/json'")[0]
    assert "<script" not in body and "<img src=x" not in body  # no user text became markup
    assert _esc(EVIL_NAME) in body
    assert not re.search(r"[a-zäöüå][ÄÖÜÅ]", body)  # PTB-XL's mangled umlauts are repaired on the page


def test_truth_beside_the_prediction_with_mismatches_marked(page_job):
    out = Path(page_job["out"])
    page = (out / "index.html").read_text()
    assert '<th data-key="truth"' in page
    for chart, row in rows_by_chart(out).items():
        tr = page.split(f'data-chart="{_esc(chart)}"')[0].rsplit("<tr ", 1)[1]
        predicted = {d["superclass"] for d in row["diagnoses"] if d["superclass"]}
        truth = {TRUTH[chart]}
        cell = page.split(f'data-chart="{_esc(chart)}"')[1].split('<td class="truth"')[1].split("</td>")[0]
        assert f"truth: {TRUTH[chart]}" in cell
        if row["status"] != "done":
            continue
        assert ("mismatch" in tr) == (predicted != truth)
        for c in truth - predicted:
            assert f'data-mark="missed">{c} missed' in cell
        for c in predicted - truth:
            assert f'data-mark="extra">{c} not in truth' in cell
    assert "charts&#x27; superclasses differ" in page or "charts' superclasses differ" in page


def test_similarity_share_and_stored_verdicts_render():
    job = {"id": 7, "key": "k" * 64, "input": "dir:/x", "status": "done", "settings": {}}
    rows = [{"id": 3, "chart": "x.png", "path": "/x.png", "status": "done", "diagnoses": [], "timings": {},
             "thumb": "thumbs/chart-3.jpg", "full": "thumbs/chart-3-full.jpg", "overlay": None,
             "verdict": {"verdict": "disagree", "comment": 'a "quote" <b>', "decided_at": "2026-11-29T10:00:00+00:00"},
             "neighbours": [{"case_id": 5, "score": 0.93, "similarity_pct": 97.2, "labels": ["NORM"],
                             "thumb": "thumbs/case-5.jpg", "full": "thumbs/case-5-full.jpg",
                             "statements": [("NORM", "normal ECG", 100.0)], "report": "sinus <i>rhythm</i>"}]}]
    html = render_page(job, {"by_status": {"done": 1}, "total": 1}, rows)
    assert "0.930 · closer than 97 % of best matches" in html
    assert 'data-verdict="disagree" data-comment="a &quot;quote&quot; &lt;b&gt;"' in html
    assert "data-job-key=" + "'" + "k" * 64 in html and 'data-full="thumbs/case-5-full.jpg"' in html
    assert "sinus &lt;i&gt;rhythm&lt;/i&gt;" in html and '<th data-key="truth"' not in html
