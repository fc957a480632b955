"""Review of what carts and phones hand over (issue 15 item 9): each page of a multi-page PDF is a chart of its own
(`x.pdf#page=N`: its own row, result and thumbnail, resumable; a killed loader costs that page only), a 1-page PDF
keeps its plain name, an iPhone HEIC is read upright, and a huge PDF is read up to its page cap."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from sqlalchemy import select

from rag_ecg.data.images import MAX_PDF_PAGES
from rag_ecg.data.records import read_wfdb
from rag_ecg.data.store import ReviewItem, open_store
from rag_ecg.paper.render import render_page
from rag_ecg.review.config import THUMBS
from rag_ecg.review.inputs import discover
from rag_ecg.review.loader import KILL_ON_ENV
from rag_ecg.review.run import review
from tests.rag_ecg.review.conftest import BATCH, comparable, fresh_store, rows_of

RECORDS = ("04240_lr", "04319_lr", "04192_lr")  # clean pages of records outside the store
PAGES = ["x.pdf#page=1", "x.pdf#page=2", "x.pdf#page=3", "x.pdf#page=4"]


def _pages(ptbxl_dir: Path) -> list[Image.Image]:
    return [render_page(read_wfdb(ptbxl_dir / "records100" / r), preset="clean", seed=0, dpi=100) for r in RECORDS]


def _save_pdf(path: Path, pages: list[Image.Image]) -> None:
    """Copies: Pillow keeps a saved image's `append_images`, and a later save of that image would reuse them."""
    first, *rest = [p.copy() for p in pages]
    first.save(path, "PDF", resolution=100.0, save_all=True, append_images=rest)


def _charts(folder: Path, ptbxl_dir: Path) -> list[Image.Image]:
    """x.pdf: three ECG pages and a blank one; one.pdf: a single page; phone.heic: an iPhone photo taken turned."""
    folder.mkdir(parents=True)
    pages = _pages(ptbxl_dir)
    _save_pdf(folder / "x.pdf", pages + [Image.new("RGB", pages[0].size, "white")])
    _save_pdf(folder / "one.pdf", pages[1:2])
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways, shown turned 90° clockwise: the upright page
    pages[2].transpose(Image.Transpose.ROTATE_90).save(folder / "phone.heic", format="HEIF", exif=exif.tobytes(),
                                                       quality=90)
    return pages


def _thumbs(url: str, out: Path) -> dict[str, Path]:
    """Each chart's thumbnail file (`thumbs/chart-<item id>.jpg`)."""
    store = open_store(url)
    with store.session() as s:
        ids = dict(s.execute(select(ReviewItem.chart_key, ReviewItem.id)).all())
    store.dispose()
    return {k: out / THUMBS / f"chart-{i}.jpg" for k, i in ids.items()}


def _which_page(thumb: Path, pages: list[Image.Image]) -> int:
    """The page a thumbnail shows: the one it differs least from."""
    with Image.open(thumb) as im:
        small = np.asarray(im.convert("RGB")).astype(int)
    diffs = [np.abs(np.asarray(p.resize((small.shape[1], small.shape[0]))).astype(int) - small).mean() for p in pages]
    return int(np.argmin(diffs))


def test_each_pdf_page_is_a_chart_with_its_own_row_and_a_killed_loader_costs_one_page(review_env, ptbxl_dir,
                                                                                        tmp_path, monkeypatch):
    pages = _charts(tmp_path / "charts", ptbxl_dir)
    url = fresh_store(review_env, tmp_path)
    out = tmp_path / "out"
    kw = dict(store=url, index_dir=review_env["index"], workers=2, batch_size=BATCH, progress=False)
    monkeypatch.setenv(KILL_ON_ENV, "x.pdf#page=2")  # the loader process opening page 2 SIGKILLs itself
    first = review(tmp_path / "charts", out, **kw)
    rows = rows_of(out)
    assert list(rows) == ["one.pdf", "phone.heic"] + PAGES  # in page order, one row each
    assert (first.total, first.done, first.error, first.pending) == (6, 4, 2, 0)
    assert rows["x.pdf#page=2"]["error"] == "x.pdf#page=2: crashed the chart loader process"
    blank = rows["x.pdf#page=4"]
    assert blank["status"] == "error" and blank["error"].startswith("x.pdf#page=4: no readable ECG traces")
    assert blank["path"] == str((tmp_path / "charts" / "x.pdf").resolve()) + "#page=4"
    assert all(rows[k]["status"] == "done" and rows[k]["neighbours"] for k in ("one.pdf", "phone.heic",
                                                                             "x.pdf#page=1", "x.pdf#page=3"))
    thumbs = _thumbs(url, out)
    assert {k: _which_page(thumbs[k], pages) for k in ("x.pdf#page=1", "x.pdf#page=3", "one.pdf", "phone.heic")} \
        == {"x.pdf#page=1": 0, "x.pdf#page=3": 2, "one.pdf": 1, "phone.heic": 2}  # each row read its own page
    with Image.open(thumbs["phone.heic"]) as im:
        assert im.width > im.height  # the photo's sideways pixels were turned upright (a landscape page)

    monkeypatch.delenv(KILL_ON_ENV)
    again = review(tmp_path / "charts", out, **kw)  # resumes: nothing pending, nothing redone
    assert (again.resumed, again.processed, again.key) == (True, 0, first.key)
    retried = review(tmp_path / "charts", out, **kw, retry_errors=True)  # the two error pages, once more
    assert (retried.processed, retried.done, retried.error) == (2, 5, 1)
    after = rows_of(out)
    assert after["x.pdf#page=2"]["status"] == "done" and after["x.pdf#page=4"]["status"] == "error"
    assert {k: comparable(v) for k, v in after.items() if k != "x.pdf#page=2"} == \
        {k: comparable(v) for k, v in rows.items() if k != "x.pdf#page=2"}

    _save_pdf(tmp_path / "charts" / "x.pdf", pages[::-1])  # replaced by a 3-page PDF, pages reversed
    redone = review(tmp_path / "charts", out, **kw)
    assert (redone.key, redone.processed) == (first.key, 3)  # its pages are redone, one.pdf and phone.heic not
    final = rows_of(out)
    assert [final[k]["status"] for k in PAGES] == ["done", "done", "done", "error"]  # page 4 is gone: row kept
    assert _which_page(_thumbs(url, out)["x.pdf#page=1"], pages) == 2
    assert final["x.pdf#page=1"]["neighbours"] == after["x.pdf#page=3"]["neighbours"]  # the same page, read alike


def test_a_huge_pdf_is_read_up_to_the_page_cap_and_a_csv_may_name_a_page(tmp_path):
    """Discovery only (nothing is rendered): a PDF of MAX_PDF_PAGES + 3 pages is that many charts plus one error
    row naming the pages left out; a CSV row `scan.pdf#page=2` is that page alone, with the file's identity."""
    folder = tmp_path / "in"
    folder.mkdir()
    small = [Image.new("RGB", (200, 150), "white") for _ in range(MAX_PDF_PAGES + 3)]
    small[0].save(folder / "huge.pdf", "PDF", resolution=100.0, save_all=True, append_images=small[1:])
    _, charts = discover(folder)
    assert [c.key for c in charts[:3]] == ["huge.pdf#page=1", "huge.pdf#page=2", "huge.pdf#page=3"]
    assert charts[MAX_PDF_PAGES - 1].key == f"huge.pdf#page={MAX_PDF_PAGES}" and len(charts) == MAX_PDF_PAGES + 1
    rest = charts[-1]
    assert rest.key == f"huge.pdf#pages={MAX_PDF_PAGES + 1}-{MAX_PDF_PAGES + 3}"
    assert rest.error.startswith(f"{rest.key}: not read (a PDF is read up to {MAX_PDF_PAGES} pages")
    assert len({c.fingerprint for c in charts}) == 1 and charts[0].fingerprint  # one file, one identity
    listing = tmp_path / "list.csv"
    listing.write_text("path\nin/huge.pdf#page=2\n")
    _, [one] = discover(listing)
    assert (one.key, one.path, one.error) == ("in/huge.pdf#page=2", f"{(folder / 'huge.pdf').resolve()}#page=2", None)
    assert one.fingerprint == charts[0].fingerprint
