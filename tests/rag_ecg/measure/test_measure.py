"""Measurements on real LUDB records against the cardiologists' delineation, on a page read back by the
digitiser, and the STEMI rule on constructed ST values."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from rag_ecg.data.records import read_ludb
from rag_ecg.measure import measure_signal
from rag_ecg.measure.inputs import picture_mv
from rag_ecg.measure.qwaves import prior_mi_leads
from rag_ecg.measure.reference import read_reference
from rag_ecg.measure.stemi import stemi_leads, stemi_pairs, v2v3_threshold_mm
from rag_ecg.paper.calibration import calibrate, to_millivolts
from rag_ecg.paper.digitize import digitize, working_page
from rag_ecg.paper.render import render_page_and_layout

CLI_KEYS = {"input", "heart_rate_bpm", "rr_irregular", "qrs_axis_deg", "pr_ms", "qrs_ms", "qt_ms", "qtc_bazett_ms",
            "qtc_fridericia_ms", "st_mv", "st_j_mv", "stemi_criteria", "leads_used", "error"}


@pytest.mark.parametrize("record", ["2", "14", "29"])
def test_intervals_match_the_cardiologists_marks(ludb_dir, record):
    rec = read_ludb(ludb_dir / "data" / record)
    ref = read_reference(ludb_dir / "data" / record, rec.signal_mv(), rec.fs)
    m = measure_signal(rec.signal_mv(), rec.fs, rec.sex, rec.age)
    assert abs(m.heart_rate_bpm.value - ref.heart_rate_bpm) <= 2
    assert abs(m.qrs_ms.value - ref.qrs_ms) <= 15
    assert abs(m.pr_ms.value - ref.pr_ms) <= 20
    assert abs(m.qt_ms.value - ref.qt_ms) <= 30
    assert abs((m.qrs_axis_deg.value - ref.qrs_axis_deg + 180) % 360 - 180) <= 15
    assert m.rr_irregular.value == 0.0
    assert np.isclose(m.qtc_bazett_ms.value, m.qt_ms.value / np.sqrt(60.0 / m.heart_rate_bpm.value), rtol=1e-6)
    assert set(m.st_mv) == {"I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"}


def test_atrial_fibrillation_has_no_pr(ludb_dir):
    rec = read_ludb(ludb_dir / "data" / "38")  # LUDB: atrial fibrillation
    m = measure_signal(rec.signal_mv(), rec.fs)
    assert m.rr_irregular.value == 1.0
    assert m.pr_ms.value is None and "irregular" in m.pr_ms.why
    assert m.to_dict()["pr_ms"] is None


def test_a_rendered_page_read_back_gives_the_records_rate(ludb_dir):
    rec = read_ludb(ludb_dir / "data" / "14")
    ref = read_reference(ludb_dir / "data" / "14")
    img, _ = render_page_and_layout(rec, preset="scan", seed=3, dpi=100)
    page = np.asarray(img)
    read = digitize(page)
    mv = to_millivolts(read, calibrate(working_page(page, read), read), fs=500.0)
    assert np.isnan(mv[:, 0]).mean() > 0.5  # lead I printed for 2.5 s only: the rest is NaN
    m = measure_signal(mv, 500.0)
    assert abs(m.heart_rate_bpm.value - ref.heart_rate_bpm) <= 3
    assert m.heart_rate_bpm.leads == ("II",)  # beats counted on the rhythm strip
    assert m.qrs_ms.value is not None and set(m.qrs_ms.leads) > {"I", "V6"}


def test_stemi_needs_two_contiguous_leads():
    assert stemi_pairs({"V4": 1.2, "V5": 1.1}) == [("V4", "V5")]
    assert stemi_leads(stemi_pairs({"V4": 1.2, "V5": 1.1})) == ["V4", "V5"]
    assert stemi_pairs({"V1": 1.2, "V4": 1.2, "III": 1.5, "aVL": 2.0}) == []  # elevated, but no two neighbours
    assert stemi_pairs({"II": 1.0, "aVF": 0.99}) == []  # 0.99 mm is below 1 mm
    assert stemi_pairs({"II": 1.1, "III": 1.3, "aVF": 1.2}) == [("II", "aVF"), ("aVF", "III"), ("II", "III")]
    assert stemi_pairs({"V4": 1.5, "V5": None}) == []  # a lead not printed meets nothing
    assert stemi_leads([]) is None


def test_stemi_flag_on_ludb_inferior_stemi_matches_the_cardiologists_j_points(ludb_dir):
    """LUDB 64 (inferior STEMI): ST read at the marked J points meets the criteria in II, III, aVF; ours too."""
    rec = read_ludb(ludb_dir / "data" / "64")
    ref = read_reference(ludb_dir / "data" / "64", rec.signal_mv(), rec.fs)
    marked = {ld: 10 * v for ld, v in ref.st_j_mv.items()}
    assert stemi_leads(stemi_pairs(marked, rec.sex, rec.age)) == ["II", "III", "aVF"]
    m = measure_signal(rec.signal_mv(), rec.fs, rec.sex, rec.age)
    assert m.stemi_criteria == ["II", "III", "aVF"]
    for ld in ("II", "III", "aVF", "V2"):
        assert abs(10 * m.st_j_mv[ld].value - marked[ld]) <= 0.5  # within half a millimetre of the marks


@pytest.mark.parametrize("name, q_leads", [("HMI_0011.jpg", {"II", "aVF", "V2", "V3"}), ("NORMAL_0022.jpg", None)])
def test_q_waves_on_real_hospital_printouts(shared_data, name, q_leads):
    """An old inferior + anterior infarct read off a real scan; a normal one whose Q waves in III and aVF do
    not meet the criteria (III does not count)."""
    m = measure_signal(picture_mv(shared_data / "real-pictures" / "khan" / name), 500.0)
    assert (set(m.prior_mi_q_leads) if m.prior_mi_q_leads else None) == q_leads


@pytest.mark.parametrize("name, flagged", [("MI_0006.jpg", True), ("NORMAL_0057.jpg", False)])
def test_stemi_flag_on_real_hospital_printouts(shared_data, name, flagged):
    """Real scans read by the digitiser: an acute anterior MI is flagged; a normal ECG whose healthy precordial
    ST rises into tall T waves (>= 1.5 mm at J+60 ms in V2-V5) is not, as the criteria read the J point."""
    mv = picture_mv(shared_data / "real-pictures" / "khan" / name)
    m = measure_signal(mv, 500.0)
    if flagged:
        assert {"V2", "V3", "V4", "V5"} <= set(m.stemi_criteria)
        assert all(m.st_j_mv[ld].value >= 0.2 for ld in ("V2", "V3", "V4"))  # tombstone ST: >= 2 mm
    else:
        assert m.stemi_criteria is None
        at60 = {ld: 10 * v.value for ld, v in m.st_mv.items() if v.value is not None}
        assert stemi_pairs(at60)  # read at J+60 ms, this normal ECG would have been flagged


@pytest.mark.parametrize("record, leads", [("7", ["V2", "V3"]), ("13", ["II", "aVF"]), ("1", None)])
def test_q_waves_of_prior_infarction_on_ludb(ludb_dir, record, leads):
    """LUDB 7: anterior infarct (QS in V1-V4); 13: inferior scar; 1: sinus bradycardia, no infarct."""
    rec = read_ludb(ludb_dir / "data" / record)
    m = measure_signal(rec.signal_mv(), rec.fs, rec.sex, rec.age)
    assert m.prior_mi_q_leads == leads
    assert m.to_dict()["prior_mi_q_leads"] == leads and set(m.to_dict()["q_waves"]) == set(m.q_waves)


def test_prior_mi_q_criteria_name_the_leads_the_definition_names():
    q = {ld: {"ms": 0.0, "mv": 0.0, "qs": False} for ld in ("I", "II", "III", "aVL", "aVF", "V1", "V2", "V3", "V4")}
    deep = {"ms": 40.0, "mv": 0.3, "qs": False}
    assert prior_mi_leads(q) is None
    assert prior_mi_leads({**q, "III": deep, "aVF": deep}) is None  # a Q in III does not count
    assert prior_mi_leads({**q, "II": deep, "aVF": deep}) == ["II", "aVF"]
    assert prior_mi_leads({**q, "II": deep}) is None  # one lead of a group is not enough
    assert prior_mi_leads({**q, "aVF": deep, "II": {"ms": 28.0, "mv": 0.3, "qs": False}}) is None  # < 30 ms
    assert prior_mi_leads({**q, "V2": {"ms": 22.0, "mv": 0.06, "qs": False}}) == ["V2"]  # any Q >= 20 ms in V2-V3
    qs = {"ms": 60.0, "mv": 0.8, "qs": True}
    assert prior_mi_leads({**q, "V1": qs}) is None  # QS in V1 is normal
    assert prior_mi_leads({**q, "V2": {**qs, "ms": 0.0}, "V3": {**qs, "ms": 0.0}}) == ["V2", "V3"]


def test_v2_v3_thresholds_depend_on_sex_and_age():
    st = {"V2": 1.8, "V3": 1.8}
    assert stemi_pairs(st, "F", 55) == [("V2", "V3")]  # women: 1.5 mm
    assert stemi_pairs(st, None, None) == [("V2", "V3")]  # unknown sex: 1.5 mm
    assert stemi_pairs(st, "M", 55) == []  # men >= 40: 2 mm
    assert stemi_pairs({"V2": 2.2, "V3": 2.2}, "M", 55) == [("V2", "V3")]
    assert stemi_pairs({"V2": 2.2, "V3": 2.2}, "M", 35) == []  # men < 40: 2.5 mm
    assert [v2v3_threshold_mm(s, a) for s, a in (("M", 39), ("M", 40), ("F", 30), (None, 30))] == [2.5, 2.0, 1.5, 1.5]
    assert stemi_pairs({"V3": 1.1, "V4": 1.1}, "M", 60) == []  # V3 needs 2 mm even next to V4
    assert stemi_pairs({"V3": 2.1, "V4": 1.1}, "M", 60) == [("V3", "V4")]


def test_cli_measure_json_and_the_bad_input_line(ludb_dir, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"not a picture at all")
    result = CliRunner().invoke(app, ["measure", str(ludb_dir / "data" / "2.hea"), str(bad), "--format", "json"])
    assert result.exit_code == 2
    out = json.loads(result.stdout)
    assert [set(o) >= CLI_KEYS for o in out] == [True, True]
    good, failed = out
    assert good["error"] is None and 55 <= good["heart_rate_bpm"] <= 75 and good["stemi_criteria"] is None
    assert set(good["st_mv"]) == {"I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"}
    assert failed["input"] == str(bad) and failed["heart_rate_bpm"] is None
    assert failed["error"].startswith("notes.png: not an image")
    assert f"error: {failed['error']}" in " ".join(result.stderr.split())
