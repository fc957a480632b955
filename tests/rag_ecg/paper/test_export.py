"""What `digitize` writes for a picture: a WFDB record in mV that wfdb reads back (NaN where a lead is not
printed), a JSON account of the read, an overlay PNG of the picture's size with the read drawn where it was read."""
from __future__ import annotations

import json

import numpy as np
import pytest
import wfdb
from PIL import Image

from rag_ecg.data.records import STANDARD_LEADS
from rag_ecg.paper.calibration import calibrate, to_millivolts, trace_ink
from rag_ecg.paper.digitize import digitize, working_page
from rag_ecg.paper.digitize_job import stems_for
from rag_ecg.paper.export import (output_paths, outputs_exist, read_quality, safe_stem, trace_points, write_outputs,
                                  write_wfdb)
from rag_ecg.paper.layout import RenderConfig
from rag_ecg.paper.render import render_page_and_layout


@pytest.fixture(scope="module")
def exported(ptb, tmp_path_factory):
    """A clean 3x4 page (no rhythm strip: every lead printed for 2.5 s only), read and written out."""
    image, result = render_page_and_layout(ptb, config=RenderConfig(layout="3x4", dpi=100), seed=2)
    page = np.asarray(image)
    read = digitize(page)
    work = working_page(page, read)
    ink = trace_ink(work)
    cal = calibrate(work, read, ink=ink)
    out = tmp_path_factory.mktemp("digitized")
    info = write_outputs(out, "page-1", page, read, cal, read_quality(read, ink), source="somewhere/page 1.png")
    return {"page": page, "read": read, "cal": cal, "out": out, "info": info, "result": result}


def test_wfdb_record_reads_back_in_millivolts_with_nan_where_not_printed(exported):
    rec = wfdb.rdrecord(str(exported["out"] / "page-1"))
    assert rec.sig_name == list(STANDARD_LEADS) and rec.units == ["mV"] * 12
    assert rec.fs == 500 and rec.sig_len == 5000 and rec.p_signal.shape == (5000, 12)
    mv = to_millivolts(exported["read"], exported["cal"], fs=500)
    assert np.array_equal(np.isnan(rec.p_signal), np.isnan(mv))
    assert np.nanmax(np.abs(rec.p_signal - mv)) <= 0.0006  # 1 uV steps
    scale = exported["cal"].time_scale  # the ticks between leads time the read: the grid does not rescale it
    assert exported["read"].time_axis == "ticks" and scale == 1.0
    for lead, col in (("I", 0), ("aVR", 1), ("V1", 2), ("V4", 3)):  # a 3x4 page prints each lead 2.5 s
        held = np.flatnonzero(np.isfinite(rec.p_signal[:, STANDARD_LEADS.index(lead)]))
        start, end = 1250 * col * scale, (1250 * (col + 1) - 1) * scale
        assert abs(held[0] - start) <= 3 and abs(held[-1] - end) <= 3, (lead, held[[0, -1]])
    qrs = np.nanmax(np.abs(rec.p_signal), axis=0)
    assert (qrs > 0.2).all() and (qrs < 5).all()  # millivolts, not pixels or page units


def test_json_tells_how_the_numbers_were_made(exported):
    info = json.loads(output_paths(exported["out"], "page-1")[".json"].read_text())
    assert info == json.loads(json.dumps(exported["info"]))
    assert info["layout"] == "3x4" and len(info["leads"]) == 12
    assert info["px_per_mm_source"] == "grid" and info["paper_speed_mm_s"] == 25.0 and info["gain_mm_mv"] == 10.0
    assert abs(info["px_per_mm"] / exported["result"].px_per_mm - 1) < 0.03  # in the picture's own pixels
    assert info["geometry"]["quarter_turns_ccw"] == 0 and abs(info["geometry"]["deskew_deg"]) < 0.5
    assert 0.9 < info["quality"]["on_ink"] <= 1 and info["quality"]["coverage"] == 1.0
    assert info["signal"]["seconds_held"]["I"] == pytest.approx(2.5, abs=0.02)
    truth = {b.lead: b for b in exported["result"].leads}
    for lead in info["leads"]:  # each lead's box on the picture overlaps where the renderer drew it
        x0, y0, x1, y1 = lead["box_picture"]
        tx0, ty0, tx1, ty1 = truth[lead["lead"]].box
        assert min(x1, tx1) - max(x0, tx0) > 0.8 * (tx1 - tx0) and min(y1, ty1) > max(y0, ty0), lead
        assert lead["t_end"] - lead["t_start"] == pytest.approx(2.5)


def test_overlay_is_the_picture_with_the_read_drawn_on_its_traces(exported):
    paths = output_paths(exported["out"], "page-1")
    over = np.asarray(Image.open(paths[".overlay.png"]).convert("RGB"))
    page = exported["page"]
    assert over.shape == page.shape
    changed = np.abs(over.astype(int) - page.astype(int)).sum(axis=2) > 60
    assert 0.003 < changed.mean() < 0.2
    # the drawn trace points land on the picture's pen ink (the picture-frame mapping of the read is right)
    dark = page.max(axis=2) < 100
    pts = np.concatenate([exported["read"].picture_points(p) for _, _, p in trace_points(exported["read"])])
    pts = pts[np.isfinite(pts).all(axis=1)]
    xi, yi = np.rint(pts[:, 0]).astype(int), np.rint(pts[:, 1]).astype(int)
    near = np.zeros_like(dark)
    for dy in (-2, -1, 0, 1, 2):
        for dx in (-2, -1, 0, 1, 2):
            near |= np.roll(np.roll(dark, dy, 0), dx, 1)
    assert near[yi, xi].mean() > 0.9
    assert outputs_exist(exported["out"], "page-1") and not outputs_exist(exported["out"], "page-2")


def test_a_lead_never_printed_is_all_missing(tmp_path):
    sig = np.random.default_rng(0).normal(0, 0.5, (5000, 12))
    sig[:, 4] = np.nan
    sig[2500:, 0] = np.nan
    write_wfdb(tmp_path, "rec", sig)
    back = wfdb.rdrecord(str(tmp_path / "rec")).p_signal
    assert np.isnan(back[:, 4]).all() and np.isnan(back[2500:, 0]).all() and np.isfinite(back[:2500, 0]).all()
    assert np.nanmax(np.abs(back - sig)) <= 0.0006
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rec.dat", "rec.hea"]  # no scratch left behind


def test_output_names_are_wfdb_safe_and_unique_in_a_batch(tmp_path):
    assert safe_stem("ECG scan (2).final") == "ECG_scan_2_final" and safe_stem("...") == "picture"
    names = stems_for([tmp_path / "a.png", tmp_path / "a.jpg", tmp_path / "b c.png", tmp_path / "sub" / "b c.png"])
    assert names == ["a_png", "a_jpg", "b_c_png", "b_c_png_2"]
