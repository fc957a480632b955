"""µV / V / mV: a real record rewritten by wfdb in another unit reads back as the same millivolts (a 1000x
scaling error would print every trace off the page or flat, and misjudge flat-lined leads)."""
from __future__ import annotations

import numpy as np
import pytest
import wfdb

from rag_ecg.data.records import RecordError, read_wfdb
from rag_ecg.paper.render import render_page


def _rewrite(rec, folder, name: str, unit: str, factor: float):
    """The record's millivolts times `factor`, written by wfdb with `unit` in the header."""
    sig = rec.signal_mv().astype(np.float64) * factor
    wfdb.wrsamp(name, fs=rec.fs, units=[unit] * 12, sig_name=list(rec.leads), p_signal=sig,
                fmt=["16"] * 12, write_dir=str(folder))
    return folder / name


@pytest.mark.parametrize("unit,factor", [("uV", 1000.0), ("V", 1e-3), ("mV", 1.0)])
def test_a_real_record_in_uv_or_v_reads_back_as_the_same_millivolts(ludb_dir, tmp_path, unit, factor):
    ref = read_wfdb(ludb_dir / "data" / "1")
    assert ref.units == "mV"
    mv = ref.signal_mv()
    back = read_wfdb(_rewrite(ref, tmp_path, f"r_{unit}", unit, factor))
    assert back.units == unit
    # raw samples are in the file's unit; millivolts are the same to the 16-bit quantisation step
    assert np.abs(back.signal - mv * factor).max() <= 1e-3 * np.abs(mv * factor).max()
    got = back.signal_mv()
    assert got.dtype == np.float32 and got.shape == mv.shape
    assert np.abs(got - mv).max() <= 1e-3 * np.abs(mv).max()
    assert np.ptp(mv, axis=0).max() > 0.5  # a real ECG: a 1000x error could not hide in the tolerance


def test_a_uv_record_renders_the_same_page_as_its_mv_original(ludb_dir, tmp_path):
    ref = read_wfdb(ludb_dir / "data" / "1")
    back = read_wfdb(_rewrite(ref, tmp_path, "r_uV", "uV", 1000.0))
    a = np.asarray(render_page(ref, preset="clean", seed=0, dpi=60).convert("L"), np.int16)
    b = np.asarray(render_page(back, preset="clean", seed=0, dpi=60).convert("L"), np.int16)
    assert a.shape == b.shape
    assert (np.abs(a - b) > 64).mean() < 0.002  # the same traces (to a quantisation pixel here and there)


def test_flat_line_check_is_in_millivolts(ludb_dir, tmp_path):
    """A lead spanning 4 µV is flat-lined whether the file says 4 µV or 0.004 mV (in µV units the raw
    samples span 4.0, which a unit-blind check would take for a 4 mV trace)."""
    ref = read_wfdb(ludb_dir / "data" / "1")
    sig = ref.signal_mv().astype(np.float64)
    sig[:, 0] = 0.002 * np.sin(np.linspace(0, 20, sig.shape[0]))  # lead I: a 4 µV span, in mV
    wfdb.wrsamp("flat", fs=ref.fs, units=["uV"] * 12, sig_name=list(ref.leads), p_signal=sig * 1000.0,
                fmt=["16"] * 12, write_dir=str(tmp_path))
    with pytest.raises(RecordError, match="flat-lined lead"):
        read_wfdb(tmp_path / "flat")


def test_an_unknown_unit_is_one_line_naming_the_record(ludb_dir, tmp_path):
    ref = read_wfdb(ludb_dir / "data" / "1")
    _rewrite(ref, tmp_path, "odd", "mmHg", 1.0)
    with pytest.raises(RecordError, match=r"odd: unknown signal unit 'mmHg'"):
        read_wfdb(tmp_path / "odd")
