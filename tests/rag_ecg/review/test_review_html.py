"""The review page in a real headless browser (Debian chromium): every row and every picture is there.

Chromium loads `index.html` from disk with networking off; the page's own script marks each <img>
`data-loaded="1"` once decoded (naturalWidth > 0), and `--dump-dom` prints the DOM after load. A URL
hash `#sort=confidence:desc` makes the page's sorting code run in the browser. Skipped when chromium is
absent, unless RAG_ECG_REQUIRE_BROWSER=1 (CI installs it).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from rag_ecg.review.html import histogram_svg, render_page
from tests.rag_ecg.review.conftest import ALL_KEYS, GOOD_KEYS

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--virtual-time-budget=10000", "--hide-scrollbars"]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    msg = "chromium not installed (apt-get install -y chromium)"
    if os.environ.get("RAG_ECG_REQUIRE_BROWSER") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


def run_browser(url: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [chromium(), *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *extra, url]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=tmp_path)


class DomRows(HTMLParser):
    """Collects the table rows (chart key per row, in order), the <img> states and body attributes."""

    def __init__(self):
        super().__init__()
        self.rows: list[dict] = []
        self.imgs: list[dict] = []
        self.body: dict = {}
        self._in_key = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.body = a
        elif tag == "tr" and "chart-row" in (a.get("class") or ""):
            self.rows.append({"status": a.get("data-status"), "key": ""})
        elif tag == "img":
            self.imgs.append(a)
        elif tag == "div" and a.get("class") == "key" and self.rows:
            self._in_key = True

    def handle_endtag(self, tag):
        if tag == "div":
            self._in_key = False

    def handle_data(self, data):
        if self._in_key and self.rows and not self.rows[-1]["key"]:
            self.rows[-1]["key"] = data.strip()


def test_review_page_renders_every_row_and_picture_in_chromium(uninterrupted, tmp_path):
    out = uninterrupted["out"]
    page = (out / "index.html").read_text()
    assert "http://" not in page and "https://" not in page  # nothing to fetch from a network
    url = (out / "index.html").as_uri() + "#sort=confidence:desc"
    res = run_browser(url, tmp_path, "--dump-dom")
    assert res.returncode == 0, res.stderr[-2000:]
    dom = DomRows()
    dom.feed(res.stdout)
    assert dom.body.get("data-ready") == "1", "the page's load script did not run"
    assert sorted(r["key"] for r in dom.rows) == ALL_KEYS
    assert {r["key"]: r["status"] for r in dom.rows if r["status"] == "done"}.keys() == set(GOOD_KEYS)
    # 7 good charts + the gradient picture have thumbnails; each done chart shows its 8 neighbours
    chart_imgs = [i for i in dom.imgs if "thumbs/chart-" in i.get("src", "")]
    case_imgs = [i for i in dom.imgs if "thumbs/case-" in i.get("src", "")]
    assert len(chart_imgs) == 8 and len(case_imgs) == 7 * 8
    assert all(i.get("data-loaded") == "1" for i in dom.imgs), [i["src"] for i in dom.imgs if i.get("data-loaded") != "1"]
    assert dom.body.get("data-images-loaded") == str(len(dom.imgs))
    # the browser sorted the table by confidence, highest first (errors, without one, last)
    rows = {r["chart"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    conf = [rows[r["key"]]["top_confidence"] for r in dom.rows]
    known = [c for c in conf if c is not None]
    assert known == sorted(known, reverse=True) and conf[: len(known)] == known
    assert re.search(r'id="results"[^>]*data-sorted="confidence:desc"', res.stdout)

    shot = tmp_path / "review.png"
    res = run_browser((out / "index.html").as_uri(), tmp_path, f"--screenshot={shot}", "--window-size=1400,2200")
    assert res.returncode == 0 and shot.stat().st_size > 20_000, res.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1400, 2200)
        assert len(set(im.convert("L").resize((70, 110)).getdata())) > 20  # not a blank page
    shutil.copy(shot, out / "screenshot.png")  # kept beside the page for people to look at


def test_page_escapes_text_and_draws_the_summary():
    job = {"id": 1, "key": "k" * 64, "input": "dir:/x<script>", "status": "done",
           "settings": {"review": {"backend": "retrieval", "k": 8}, "index": {"path": "/i", "count": 3}}}
    rows = [{"id": 1, "chart": "a<b>.png", "path": "/x/a.png", "status": "error", "error": "a<b>.png: empty file",
             "diagnoses": [], "neighbours": [], "timings": {"total": 0.1}, "thumb": None, "top_confidence": None},
            {"id": 2, "chart": "c.png", "path": "/x/c.png", "status": "done", "error": None,
             "diagnoses": [{"label": "normal ECG", "code": None, "superclass": "NORM", "confidence": 0.9,
                            "cited": [5]}], "top_diagnosis": "NORM", "top_confidence": 0.9,
             "impression": "Like [case 5] </script>", "rhythm": None, "findings": [],
             "neighbours": [{"case_id": 5, "score": 0.93, "labels": ["NORM"], "thumb": "thumbs/case-5.jpg"}],
             "timings": {"total": 0.2}, "thumb": "thumbs/chart-2.jpg",
             "dropped_citations": [{"where": "impression", "text": "as in <b>[case 77]</b>", "unknown": [77]}]},
            {"id": 3, "chart": "d.png", "path": "/x/d.png", "status": "unparsed", "error": "d.png: not a report",
             "raw_answer": "Sinus <script>alert(1)</script>", "diagnoses": [], "neighbours": [],
             "timings": {"total": 0.3}, "thumb": None, "top_confidence": None}]
    summary = {"by_status": {"done": 1, "unparsed": 1, "error": 1, "pending": 0}, "by_superclass": {"NORM": 1},
               "confidence": [0.9], "total": 4}
    html = render_page(job, summary, rows)
    assert "<script>" not in html.split("<body>")[1].split("<script")[0]  # user text never becomes markup
    assert "a&lt;b&gt;.png" in html and "&lt;/script&gt;" in html
    assert html.count('class="chart-row"') == 3 and "Showing the first 3 of 4 charts" in html
    assert '<div class="count unparsed"><b>1</b>unparsed</div>' in html and 'data-status="unparsed"' in html
    assert "Sinus &lt;script&gt;alert(1)&lt;/script&gt;" in html  # the raw answer, shown as text
    assert "1 statement(s) dropped" in html and "impression: as in &lt;b&gt;[case 77]&lt;/b&gt; — case(s) 77" in html
    assert 'data-count="1"' in histogram_svg([0.9]) and histogram_svg([0.0, 1.0]).count('data-count="1"') == 2
    assert 'id="superclass-chart"' in html and 'id="confidence-histogram"' in html
