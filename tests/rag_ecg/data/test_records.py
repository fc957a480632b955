"""Records: real PTB-XL/LUDB reading, superclass mapping on real rows, and every bad-input case."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import wfdb

from rag_ecg.data.labels import ludb_superclasses
from rag_ecg.data.records import (MAX_HEADER_BYTES, MAX_SECONDS, STANDARD_LEADS, RecordError, normalize_lead_name,
                                  ptbxl_record, read_ludb, read_ptbxl_index, read_wfdb, validate)


def test_lead_name_normalisation():
    for spelling in ("aVR", "AVR", "avr", " avR "):
        assert normalize_lead_name(spelling) == "aVR"
    assert normalize_lead_name("v1") == "V1"
    assert normalize_lead_name("ii") == "II"
    assert normalize_lead_name("X") == "X"


def test_superclasses_match_ptbxl_database_on_every_real_row(ptbxl_dir):
    rows, statements = read_ptbxl_index(ptbxl_dir)
    truth = {r["ecg_id"]: sorted(r["superclass"].split())
             for r in csv.DictReader(open(ptbxl_dir / "ptbxl_database.csv"))}
    assert len(rows) == 1625
    mismatched = [r.ecg_id for r in rows if sorted(r.labels) != truth[r.ecg_id]]
    assert mismatched == []
    assert statements["IMI"].diagnostic_class == "MI"
    assert "rhythm" in statements["AFIB"].kinds


def test_ptbxl_record_reads_real_signal_and_metadata(ptbxl_dir):
    rows, _ = read_ptbxl_index(ptbxl_dir)
    row = next(r for r in rows if r.ecg_id == "103")
    rec = ptbxl_record(row)
    assert rec.signal.shape == (1000, 12) and rec.signal.dtype == np.float32
    assert rec.fs == 100 and rec.units == "NU" and rec.leads == list(STANDARD_LEADS)
    assert rec.labels == ["MI", "CD"] and rec.codes["LAFB"] == 100.0
    assert rec.sex == "M" and rec.age == 39.0 and "infarkt" in rec.report
    # NU is a per-lead z-score of the band-passed signal: std ~1 per lead, rendered at 0.1 mV per unit.
    assert np.allclose(rec.signal.std(axis=0), 1.0, atol=0.15)
    assert np.allclose(rec.signal_mv(), rec.signal * 0.1)


def test_ludb_record_in_millivolts_with_diagnoses(ludb_dir):
    rec = read_ludb(ludb_dir / "data" / "1")
    assert rec.signal.shape == (5000, 12) and rec.fs == 500 and rec.units == "mV"
    assert rec.leads == list(STANDARD_LEADS)  # header spells them i, ii, avr, ...
    assert rec.age == 51 and rec.sex == "F"
    assert rec.extra["rhythm"] == "Sinus bradycardia."[:-1]
    assert rec.labels == ["STTC", "HYP"]
    qrs_ptp = np.ptp(rec.lead("V2"))
    assert 0.5 < qrs_ptp < 6.0  # raw mV: a real precordial QRS


def test_ludb_mapping():
    assert ludb_superclasses(["Rhythm: Sinus rhythm", "Electric axis of the heart: normal"]) == ["NORM"]
    assert ludb_superclasses(["Rhythm: Atrial fibrillation"]) == []
    assert ludb_superclasses(["Complete left bundle branch block", "Stemi: anterior wall"]) == ["MI", "CD"]
    assert ludb_superclasses(["Left ventricular hypertrophy", "Ischemia: inferior wall"]) == ["STTC", "HYP"]


# ------------------------------------------------------------------ bad input, built from real records

@pytest.fixture
def real_copy(tmp_path, ptbxl_dir) -> Path:
    src = ptbxl_dir / "records100" / "00024_lr"
    for ext in (".hea", ".dat"):
        shutil.copy(src.with_suffix(ext), tmp_path / f"00024_lr{ext}")
    return tmp_path / "00024_lr"


def _rewrite_header(base: Path, fn) -> None:
    lines = base.with_suffix(".hea").read_text().splitlines()
    base.with_suffix(".hea").write_text("\n".join(fn(lines)) + "\n")


def _set_record_field(base: Path, index: int, value: str) -> None:
    """Rewrite one field of the header's record line (2: sampling rate, 3: samples per signal)."""
    def edit(lines):
        f = lines[0].split()
        f[index] = value
        return [" ".join(f)] + lines[1:]
    _rewrite_header(base, edit)


def test_real_copy_reads(real_copy):
    assert read_wfdb(real_copy).signal.shape == (1000, 12)


def test_truncated_dat(real_copy):
    dat = real_copy.with_suffix(".dat")
    dat.write_bytes(dat.read_bytes()[: dat.stat().st_size // 2])
    with pytest.raises(RecordError, match=r"00024_lr: header says 1000 samples but 00024_lr.dat holds 500 \(truncated"):
        read_wfdb(real_copy)


def test_header_lies_about_length(real_copy):
    _set_record_field(real_copy, 3, "2000")
    with pytest.raises(RecordError, match=r"00024_lr: header says 2000 samples but 00024_lr.dat holds 1000"):
        read_wfdb(real_copy)


def test_missing_signal_file(real_copy):
    real_copy.with_suffix(".dat").unlink()
    with pytest.raises(RecordError, match=r"00024_lr: signal file missing"):
        read_wfdb(real_copy)


def test_missing_header(tmp_path):
    with pytest.raises(RecordError, match=r"nothing: no WFDB header"):
        read_wfdb(tmp_path / "nothing")


def test_wrong_sampling_rate(real_copy):
    _set_record_field(real_copy, 2, "10")
    with pytest.raises(RecordError, match=r"00024_lr: sampling rate 10 Hz"):
        read_wfdb(real_copy)


def _write_variant(tmp_path: Path, name: str, signal: np.ndarray, leads: list[str], fs=100) -> Path:
    wfdb.wrsamp(name, fs=fs, units=["mV"] * len(leads), sig_name=leads, p_signal=signal,
                fmt=["16"] * len(leads), adc_gain=[1000.0] * len(leads), baseline=[0] * len(leads),
                write_dir=str(tmp_path))
    return tmp_path / name


def test_nan_lead(tmp_path, real_copy):
    sig = read_wfdb(real_copy).signal_mv().astype(np.float64)
    sig[:, 7] = np.nan
    base = _write_variant(tmp_path, "nanlead", sig, list(STANDARD_LEADS))
    with pytest.raises(RecordError, match=r"nanlead: NaN.* V2"):
        read_wfdb(base)


def test_flat_lead(tmp_path, real_copy):
    sig = read_wfdb(real_copy).signal_mv().astype(np.float64)
    sig[:, 2] = 0.0
    sig[:, 11] = 0.0
    base = _write_variant(tmp_path, "flat", sig, list(STANDARD_LEADS))
    with pytest.raises(RecordError, match=r"flat: flat-lined lead\(s\) III, V6"):
        read_wfdb(base)


def test_unknown_lead_set(tmp_path, real_copy):
    sig = read_wfdb(real_copy).signal_mv()[:, :3].astype(np.float64)
    base = _write_variant(tmp_path, "vcg", sig, ["X", "Y", "Z"])
    with pytest.raises(RecordError, match=r"vcg: not a standard 12-lead set: missing I, II"):
        read_wfdb(base)


def test_lead_order_is_canonicalised(tmp_path, real_copy):
    rec = read_wfdb(real_copy)
    order = list(reversed(range(12)))
    shuffled = [STANDARD_LEADS[i].upper() for i in order]
    base = _write_variant(tmp_path, "rev", rec.signal_mv()[:, order].astype(np.float64), shuffled)
    back = read_wfdb(base)
    assert back.leads == list(STANDARD_LEADS)
    assert np.allclose(back.signal, rec.signal_mv(), atol=2e-3)


def test_too_short(real_copy):
    rec = read_wfdb(real_copy)
    rec.signal = rec.signal[:100]
    with pytest.raises(RecordError, match=r"only 1.00 s of signal"):
        validate(rec)


# ------------------------------------------------------------------ resource limits and header paths

def test_a_long_holter_record_is_read_up_to_max_seconds_only(real_copy):
    # One hour of the real record (360 copies of its 10 s) behind a header that says so: only the first
    # MAX_SECONDS are read (wfdb's sampto), as the same samples the whole file holds.
    dat = real_copy.with_suffix(".dat")
    one = dat.read_bytes()
    dat.write_bytes(one * 360)

    _set_record_field(real_copy, 3, str(1000 * 360))
    rec = read_wfdb(real_copy)
    assert rec.signal.shape == (int(MAX_SECONDS * 100), 12) and rec.duration_s == MAX_SECONDS
    assert rec.extra["seconds_in_file"] == 3600.0
    assert np.array_equal(rec.signal[:1000], rec.signal[1000:2000])  # the 10 s repeat, as written


def test_a_truncated_holter_is_still_refused(real_copy):
    _set_record_field(real_copy, 3, str(1000 * 360))
    with pytest.raises(RecordError, match=r"00024_lr: header says 360000 samples but 00024_lr.dat holds 1000"):
        read_wfdb(real_copy)


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside/00024_lr.dat", "sub/../../00024_lr.dat",
                                  "..\\00024_lr.dat"])
def test_a_header_cannot_name_a_file_outside_its_folder(tmp_path, ptbxl_dir, name):
    # A real record one folder up, reachable by the crafted name: it must never be read.
    src = ptbxl_dir / "records100" / "00024_lr"
    (tmp_path / "outside").mkdir()
    shutil.copy(src.with_suffix(".dat"), tmp_path / "outside" / "00024_lr.dat")
    shutil.copy(src.with_suffix(".dat"), tmp_path / "00024_lr.dat")
    folder = tmp_path / "in" / "sub"
    folder.mkdir(parents=True)
    lines = src.with_suffix(".hea").read_text().splitlines()
    (folder / "evil.hea").write_text("\n".join(
        ["evil 12 100 1000"] + [ln.replace("00024_lr.dat", name, 1) for ln in lines[1:13]]) + "\n")
    with pytest.raises(RecordError) as err:
        read_wfdb(folder / "evil")
    assert str(err.value) == f"evil: evil.hea names a signal file outside its folder ({name!r})"


def test_a_multi_segment_header_cannot_climb_out_either(tmp_path, real_copy):
    (tmp_path / "multi.hea").write_text("multi/2 12 100 2000\n../x/00024_lr 1000\n00024_lr 1000\n")
    with pytest.raises(RecordError) as err:
        read_wfdb(tmp_path / "multi")
    assert str(err.value) == "multi: multi.hea names a signal file outside its folder ('../x/00024_lr')"


def test_header_limits_are_checked_before_any_signal_is_read(real_copy):
    real_copy.with_suffix(".dat").unlink()  # had the signal been read, this would say "signal file missing"

    _set_record_field(real_copy, 2, "1000000")
    with pytest.raises(RecordError, match=r"^00024_lr: sampling rate 1e\+06 Hz is outside 50-20000 Hz$"):
        read_wfdb(real_copy)
    hea = real_copy.with_suffix(".hea")
    hea.write_text(hea.read_text() + "#" + "x" * MAX_HEADER_BYTES + "\n")
    with pytest.raises(RecordError, match=r"^00024_lr: 00024_lr.hea is \d+ bytes, not a WFDB header"):
        read_wfdb(real_copy)
