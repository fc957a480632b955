"""Reviewing with the page in a real headless Chromium (selenium + Debian chromium/chromedriver), offline:
enlarge a chart, toggle its trace overlay, open a neighbour, mark a verdict (kept over a reload), export the
CSV (a real download), import it with `cli.py review-import`, and see it pre-filled in a fresh browser.
Skipped when chromium/chromedriver/selenium are absent, unless RAG_ECG_REQUIRE_BROWSER=1 (CI installs them)."""
from __future__ import annotations

import csv
import os
import shutil
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from tests.rag_ecg.review.test_review_page import EVIL_NAME, GOOD, build_page_job

COMMENT = '=1+1 "quoted" <script>window.pwned=3</script>'


def _missing(msg: str):
    if os.environ.get("RAG_ECG_REQUIRE_BROWSER") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="module")
def page_job(tmp_path_factory, review_env) -> dict:
    return build_page_job(review_env, tmp_path_factory.getbasetemp() / "review-page-job")


@pytest.fixture
def browser(tmp_path):
    """Start headless Chromium sessions (each its own profile: a fresh one has no localStorage)."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("selenium not installed (pip install -e '.[test]')")
    chrome = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
    driver = shutil.which("chromedriver")
    if not chrome or not driver:
        _missing("chromium/chromedriver not installed (apt-get install -y chromium chromium-driver)")
    started = []

    def start(profile: str):
        opts = webdriver.ChromeOptions()
        opts.binary_location = chrome
        for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                  "--disable-background-networking", "--window-size=1400,1000", f"--user-data-dir={tmp_path / profile}"):
            opts.add_argument(a)
        opts.add_experimental_option("prefs", {"download.default_directory": str(tmp_path / "downloads"),
                                               "download.prompt_for_download": False})
        d = webdriver.Chrome(service=Service(driver), options=opts)
        started.append(d)
        return d

    yield start
    for d in started:
        d.quit()


def js(d, script: str, *args):
    return d.execute_script(script, *args)


def wait(d, script: str, timeout: float = 10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = js(d, script)
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for: {script}")


def row_id(d, chart: str) -> str:
    return js(d, "var c=arguments[0];return Array.prototype.find.call(document.querySelectorAll('tr.chart-row'),"
                 "function(t){return t.getAttribute('data-chart')===c;}).getAttribute('data-id')", chart)


def test_review_with_the_page_and_import_the_verdicts(page_job, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    out = Path(page_job["out"])
    url = (out / "index.html").as_uri()
    d = browser("profile-1")
    d.get(url)
    wait(d, "return document.body.getAttribute('data-ready')==='1'")
    assert js(d, "return document.body.getAttribute('data-images-loaded')===document.body.getAttribute('data-images')")
    good = row_id(d, GOOD)

    # enlarge a chart: the lightbox shows the full-size picture (decoded, wider than the 320-px thumbnail)
    d.find_element(By.CSS_SELECTOR, f'tr[data-id="{good}"] td.chart img.zoom').click()
    wait(d, "var i=document.getElementById('lb-img');return i&&i.complete&&i.naturalWidth>0")
    assert not js(d, "return document.getElementById('lightbox').hidden")
    assert js(d, "return document.getElementById('lb-img').getAttribute('src')") == f"thumbs/chart-{good}-full.jpg"
    assert js(d, "return document.getElementById('lb-img').naturalWidth") == 1169
    # ... and its digitised traces, a toggle away
    d.find_element(By.ID, "lb-overlay").click()
    wait(d, "var i=document.getElementById('lb-img');return i.getAttribute('src').indexOf('overlay')>0&&i.naturalWidth>0")
    assert js(d, "return document.getElementById('lightbox').getAttribute('data-showing')") == "overlay"
    d.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    assert js(d, "return document.getElementById('lightbox').hidden")
    # the table's toggle swaps the chart's picture for its overlay and back
    box = d.find_element(By.CSS_SELECTOR, f'tr[data-id="{good}"] input.overlay-toggle')
    box.click()
    img = f"document.querySelector('tr[data-id=\"{good}\"] td.chart img.zoom')"
    wait(d, f"return {img}.getAttribute('src')==='thumbs/chart-{good}-overlay.jpg'&&{img}.naturalWidth>0")
    box.click()
    assert js(d, f"return {img}.getAttribute('src')") == f"thumbs/chart-{good}.jpg"

    # a neighbour opens full size with its English findings and its report (planted markup stays text)
    nb = d.find_element(By.CSS_SELECTOR, f'tr[data-id="{good}"] figure.nbf img.zoom')
    js(d, "arguments[0].scrollIntoView()", nb)
    nb.click()
    wait(d, "var i=document.getElementById('lb-img');return i&&i.naturalWidth>0")
    info = js(d, "return document.getElementById('lb-info').textContent")
    assert js(d, "return document.getElementById('lb-title').textContent").startswith("case ")
    assert "<script>window.pwned=2</script>" in info and ("ECG" in info or "rhythm" in info or "infarction" in info)
    d.find_element(By.ID, "lb-close").click()
    assert js(d, "return window.pwned") is None  # no chart name, report or comment ever ran as code

    # a verdict and a comment, kept in the browser over a reload
    d.find_element(By.CSS_SELECTOR, f'tr[data-id="{good}"] input[value="disagree"]').click()
    area = d.find_element(By.CSS_SELECTOR, f'tr[data-id="{good}"] td.verdict textarea')
    area.send_keys(COMMENT)
    d.find_element(By.ID, "filter").click()  # leaving the box commits the comment (change event)
    d.refresh()
    wait(d, "return document.body.getAttribute('data-ready')==='1'")
    assert js(d, f"return document.querySelector('tr[data-id=\"{good}\"] input[value=disagree]').checked")
    assert js(d, f"return document.querySelector('tr[data-id=\"{good}\"] textarea').value") == COMMENT

    # export: a real download of the CSV
    d.find_element(By.ID, "export-verdicts").click()
    downloads = tmp_path / "downloads"
    end = time.monotonic() + 10
    while time.monotonic() < end and not list(downloads.glob("verdicts-*.csv")):
        time.sleep(0.1)
    (downloaded,) = list(downloads.glob("verdicts-*.csv"))
    exported = tmp_path / downloaded.name  # a copy: Chromium deletes a download it has not yet marked done at quit
    exported.write_bytes(downloaded.read_bytes())
    with open(exported, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["chart"] == GOOD and rows[0]["chart_id"] == good
    assert rows[0]["verdict"] == "disagree" and rows[0]["comment"] == "'" + COMMENT  # a spreadsheet sees text
    d.quit()

    # import with the CLI (twice: the same state), and a CSV naming an unknown chart is refused in one line
    runner = CliRunner()
    res = runner.invoke(app, ["review-import", str(exported), "--db", page_job["url"]])
    assert res.exit_code == 0, res.output
    assert "1 verdict(s) added, 0 updated, 0 unchanged" in res.output and "index.html" in res.output
    res = runner.invoke(app, ["review-import", str(exported), "--db", page_job["url"]])
    assert res.exit_code == 0 and "0 verdict(s) added, 0 updated, 1 unchanged" in res.output
    bad = tmp_path / "bad.csv"
    bad.write_text(exported.read_text().replace(f'"{good}","{GOOD}"', f'"99999","{GOOD}"'))
    res = runner.invoke(app, ["review-import", str(bad), "--db", page_job["url"]])
    assert res.exit_code == 2 and "not charts of review job" in res.output
    assert len(res.output.strip().splitlines()) == 1, res.output

    # the re-rendered page, in a fresh browser (no localStorage), shows the imported verdict pre-filled
    d = browser("profile-2")
    d.get(url)
    wait(d, "return document.body.getAttribute('data-ready')==='1'")
    assert js(d, f"return document.querySelector('tr[data-id=\"{good}\"] input[value=disagree]').checked")
    assert js(d, f"return document.querySelector('tr[data-id=\"{good}\"] textarea').value") == COMMENT
    assert js(d, f"return document.querySelector('tr[data-id=\"{good}\"] .vstate').textContent").startswith("imported")
    evil = row_id(d, EVIL_NAME)
    assert not js(d, f"return document.querySelector('tr[data-id=\"{evil}\"] input[value=agree]').checked")
    assert js(d, "return window.pwned") is None
