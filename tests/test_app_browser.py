"""The web app in a real headless Chromium (Debian's chromium + chromium-driver, driven by selenium): a user uploads
a real picture through the page's form and sees the overlay, the similar cases with their pictures and the report
citing them; a text file named .png shows the CLI's one-line error. Skipped when chromium or chromedriver is
absent, unless RAG_ECG_REQUIRE_BROWSER=1 (CI installs both).
"""
from __future__ import annotations

import os
import re
import shutil

import httpx
import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from rag_ecg.data.images import ImageLoadError, load_image
from rag_ecg.reader.report import Report
from tests.test_app import PICTURE, start_app

LOADED = "return arguments[0].complete && arguments[0].naturalWidth > 0"


def _find(*names: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    msg = f"{names[0]} not installed (apt-get install -y chromium chromium-driver)"
    if os.environ.get("RAG_ECG_REQUIRE_BROWSER") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="module")
def pictures(shared_data):
    return shared_data / "real-pictures"


@pytest.fixture(scope="module")
def web(tiny_index, pictures):
    running = start_app(tiny_index, pictures)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    opts = Options()
    opts.binary_location = _find("chromium", "chromium-browser", "google-chrome")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,2400", "--hide-scrollbars",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(_find("chromedriver")), options=opts)  # no driver download
    driver.set_page_load_timeout(300)
    yield driver
    driver.quit()


def submit(browser, url: str, path) -> None:
    browser.get(url + "/")
    browser.find_element(By.ID, "file").send_keys(str(path))
    browser.find_element(By.ID, "submit").click()
    WebDriverWait(browser, 300).until(lambda d: d.find_elements(By.ID, "report") or d.find_elements(By.ID, "error"))


def test_uploading_a_real_picture_shows_overlay_neighbours_and_cited_cases(web, pictures, browser, tmp_path):
    submit(browser, web.url, pictures / PICTURE)
    assert not browser.find_elements(By.ID, "error"), browser.find_element(By.ID, "error").text
    assert re.fullmatch(re.escape(web.url) + r"/r/[\w-]+", browser.current_url)
    overlay = browser.find_element(By.ID, "overlay")
    assert browser.execute_script(LOADED, overlay)
    assert browser.execute_script("return arguments[0].naturalWidth", overlay) == load_image(pictures / PICTURE).width

    cards = browser.find_elements(By.CSS_SELECTOR, "#neighbours .case")
    assert len(cards) == 8
    for card in cards:  # each similar case: its page (served by the app), similarity and English findings
        assert browser.execute_script(LOADED, card.find_element(By.TAG_NAME, "img"))
        assert re.search(r"similarity \d\.\d{3}", card.text) and card.find_elements(By.CSS_SELECTOR, "ul li")

    # the cited case ids: those of the report itself (its JSON download), shown in its section and on the cards
    rid = browser.current_url.rsplit("/", 1)[1]
    cited = Report.from_dict(httpx.get(f"{web.url}/r/{rid}/report.json").json()).cited_case_ids
    assert cited and set(cited) <= {int(c.get_attribute("data-case-id")) for c in cards}
    report = browser.find_element(By.ID, "report")
    assert [int(x) for x in report.get_attribute("data-cited").split()] == sorted(cited)
    shown = {int(n) for n in re.findall(r"\d+", report.text)}
    assert set(cited) <= shown and "[case" in report.text
    marked = {int(c.get_attribute("data-case-id")) for c in cards if "cited" in c.get_attribute("class").split()}
    assert marked == set(cited)  # ...and exactly those cards are marked cited
    links = {a.text for a in browser.find_elements(By.CSS_SELECTOR, "#downloads a")}
    assert links == {"report (JSON)", "report (HTML)", "digitised record (WFDB, zip)", "overlay (PNG)"}

    shot = tmp_path / "app.png"
    assert browser.save_screenshot(str(shot))
    with Image.open(shot) as im:
        assert len(set(im.convert("L").resize((70, 120)).getdata())) > 20  # not a blank page


def test_a_text_file_named_png_shows_the_cli_error(web, browser, tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("Patient list, not a picture\n")
    with pytest.raises(ImageLoadError) as cli_error:
        load_image(fake)
    submit(browser, web.url, fake)
    assert browser.find_element(By.ID, "error").text == f"error: {cli_error.value}"
    assert not browser.find_elements(By.ID, "report")
    assert browser.find_element(By.ID, "file")  # the form is there to try again
