"""`cli.py digitize` on what carts and phones hand over (issue 15 item 9): every page of a multi-page PDF is read
into `<stem>-p<N>.*` (a 1-page PDF keeps `<stem>.*`), a page that holds no ECG is one line naming `x.pdf#page=N`,
an iPhone HEIC is read upright, a rerun skips what is done."""
from __future__ import annotations

import json

import numpy as np
import wfdb
from PIL import Image
from typer.testing import CliRunner

from cli import app
from rag_ecg.data.images import MAX_PDF_PAGES
from rag_ecg.data.records import read_wfdb
from rag_ecg.paper.digitize_job import Picture, pictures_of, stems_for
from rag_ecg.paper.render import render_page

runner = CliRunner()
SUFFIXES = (".dat", ".hea", ".json", ".overlay.png")


def test_every_pdf_page_and_a_heic_are_read(ptbxl_dir, tmp_path):
    pages = [render_page(read_wfdb(ptbxl_dir / "records100" / r), preset="clean", seed=0, dpi=100)
             for r in ("04240_lr", "04319_lr")]
    pics = tmp_path / "in"
    pics.mkdir()
    blank = Image.new("RGB", pages[0].size, "white")
    pages[0].save(pics / "cart.pdf", "PDF", resolution=100.0, save_all=True, append_images=[pages[1].copy(), blank])
    pages[1].save(pics / "single.pdf", "PDF", resolution=100.0)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways, shown turned 90° clockwise: the upright page
    pages[0].transpose(Image.Transpose.ROTATE_90).save(pics / "IMG_0001.HEIC", format="HEIF",
                                                       exif=exif.tobytes(), quality=90)
    out = tmp_path / "out"

    res = runner.invoke(app, ["digitize", str(pics), "--out", str(out)])
    assert res.exit_code == 2, res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and f"{pics / 'cart.pdf'}#page=3: no readable ECG traces" in errors[0], res.output
    assert "5 pictures: 4 read, 0 skipped (outputs exist), 1 failed" in res.output
    stems = ("IMG_0001", "cart-p1", "cart-p2", "single")
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{s}{x}" for s in stems for x in SUFFIXES)
    for stem, source in (("cart-p2", f"{pics / 'cart.pdf'}#page=2"), ("single", str(pics / "single.pdf")),
                         ("IMG_0001", str(pics / "IMG_0001.HEIC"))):
        desc = json.loads((out / f"{stem}.json").read_text())
        assert desc["picture"] == source and desc["layout"] == "3x4+II", stem
        assert desc["picture_size"][0] > desc["picture_size"][1], stem  # landscape: the HEIC was turned upright
        rec = wfdb.rdrecord(str(out / stem))
        assert rec.fs == 500 and rec.sig_len == 5000 and rec.units == ["mV"] * 12
    # the two cart pages are two ECGs: their signals differ; page 2 reads like the same page alone
    p1, p2, one = (wfdb.rdrecord(str(out / s)).p_signal for s in ("cart-p1", "cart-p2", "single"))
    assert np.array_equal(p2, one, equal_nan=True) and np.nanmean(np.abs(p1 - p2)) > 0.05

    again = runner.invoke(app, ["digitize", str(pics), "--out", str(out)])
    assert again.exit_code == 2 and "5 pictures: 0 read, 4 skipped (outputs exist), 1 failed" in again.output


def test_page_cap_and_output_names(tmp_path):
    """Listing only (nothing is read): a PDF past MAX_PDF_PAGES is that many pictures plus one failing line;
    page stems never collide with another file's stem."""
    small = [Image.new("RGB", (200, 150), "white") for _ in range(MAX_PDF_PAGES + 2)]
    huge = tmp_path / "huge.pdf"
    small[0].save(huge, "PDF", resolution=100.0, save_all=True, append_images=small[1:])
    two = tmp_path / "scan.pdf"
    small[0].save(two, "PDF", resolution=100.0, save_all=True, append_images=small[1:2])
    pics = pictures_of([huge, two, tmp_path / "scan-p2.png"])
    assert len(pics) == MAX_PDF_PAGES + 1 + 2 + 1
    assert pics[0] == Picture(huge, 0) and pics[MAX_PDF_PAGES - 1] == Picture(huge, MAX_PDF_PAGES - 1)
    cap = pics[MAX_PDF_PAGES]
    assert cap.error == (f"{huge}: pages {MAX_PDF_PAGES + 1}-{MAX_PDF_PAGES + 2} not read (a PDF is read up to "
                         f"{MAX_PDF_PAGES} pages; this one has {MAX_PDF_PAGES + 2}: split it)")
    assert stems_for(pics[-3:]) == ["scan-p1", "scan-p2", "scan-p2_2"]
