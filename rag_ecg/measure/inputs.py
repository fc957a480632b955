"""What `measure` reads: a WFDB record (its signal in mV) or a picture (through the digitiser), each -> Measurements.

Why the picture path is digitize -> calibrate -> to_millivolts: the millivolt and second scales come from the
page's own grid (or calibration pulse), so the ST deviations are in real mm of the paper and the intervals in
real ms. A WFDB record the digitiser wrote keeps NaN where a lead was not printed; the strict record reader
refuses NaN, so such a record is read as it is (lead names normalised, NaN kept).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import wfdb

from rag_ecg.data.images import load_image
from rag_ecg.data.records import STANDARD_LEADS, RecordError, normalize_lead_name, read_wfdb
from rag_ecg.errors import InputError
from rag_ecg.measure.core import measure_signal
from rag_ecg.measure.result import Measurements
from rag_ecg.paper.calibration import calibrate, to_millivolts
from rag_ecg.paper.digitize import Digitized, digitize, working_page

PAGE_FS = 500.0  # Hz a page read is measured at (the digitiser exports WFDB at it too)

WFDB_SUFFIXES = {".hea", ".dat"}


def is_wfdb(path: Path) -> bool:
    return path.suffix.lower() in WFDB_SUFFIXES or (not path.suffix and path.with_suffix(".hea").exists())


def _sex_age(comments: list[str]) -> tuple[str | None, float | None]:
    """LUDB-style `<sex>: F` / `<age>: 51` header comments (also `sex: M`, `age: 60`), if any."""
    sex = age = None
    for c in comments:
        m = re.match(r"\s*<?(sex|age)>?\s*:\s*(\S+)", c, re.I)
        if not m:
            continue
        if m.group(1).lower() == "sex" and m.group(2)[:1].upper() in ("M", "F"):
            sex = m.group(2)[:1].upper()
        elif m.group(1).lower() == "age":
            try:
                age = float(m.group(2))
            except ValueError:
                pass
    return sex, age


def read_record_mv(path: Path) -> tuple[np.ndarray, float, str | None, float | None]:
    """A WFDB record -> ((samples, 12) mV in STANDARD_LEADS order, fs, sex, age); NaN-bearing records allowed."""
    try:
        rec = read_wfdb(path)
        sex, age = _sex_age(rec.extra.get("comments", []))
        return rec.signal_mv(), rec.fs, sex, age
    except RecordError as exc:
        if "NaN" not in str(exc):
            raise
    base = path.with_suffix("") if path.suffix.lower() in WFDB_SUFFIXES else path
    rec = wfdb.rdrecord(str(base))
    names = [normalize_lead_name(n) for n in rec.sig_name]
    missing = [ld for ld in STANDARD_LEADS if ld not in names]
    if missing:
        raise RecordError(f"{base.name}: not a standard 12-lead set: missing {', '.join(missing)}")
    scale = {"mv": 1.0, "uv": 1e-3, "v": 1e3, "nu": 0.1}
    cols = []
    for ld in STANDARD_LEADS:
        k = names.index(ld)
        unit = (rec.units[k] if rec.units else "mV").strip().lower()
        if unit not in scale:
            raise RecordError(f"{base.name}: unknown signal unit {rec.units[k]!r}")
        cols.append(rec.p_signal[:, k] * scale[unit])
    sex, age = _sex_age(list(rec.comments or []))
    return np.stack(cols, axis=1), float(rec.fs), sex, age


def picture_mv(path: Path, speed_mm_s: float = 25.0, gain_mm_mv: float | None = None) -> np.ndarray:
    """A picture -> (5000, 12) mV at 500 Hz, NaN where a lead is not printed."""
    return page_mv(np.asarray(load_image(path)), speed_mm_s=speed_mm_s, gain_mm_mv=gain_mm_mv)


def page_mv(page: np.ndarray, read: Digitized | None = None, speed_mm_s: float = 25.0,
            gain_mm_mv: float | None = None) -> np.ndarray:
    """An (H, W, 3) uint8 page -> (5000, 12) mV at 500 Hz on its own millimetre scale; `read`: the digitiser's
    read of it when already made (a review reads each picture once)."""
    page = np.ascontiguousarray(page)
    read = digitize(page) if read is None else read
    cal = calibrate(working_page(page, read), read, speed_mm_s=speed_mm_s, gain_mm_mv=gain_mm_mv)
    return to_millivolts(read, cal, fs=PAGE_FS)


def measure_input(path: str | Path, sex: str | None = None, age: float | None = None, speed_mm_s: float = 25.0,
                  gain_mm_mv: float | None = None) -> Measurements:
    """A picture or WFDB record -> Measurements. `sex`/`age` override the record's header (pictures: unknown).
    Raises InputError (or another RagEcgError) when the input cannot be read."""
    path = Path(path)
    if not path.exists() and not path.with_suffix(".hea").exists():
        raise InputError(f"{path}: no such file")
    if is_wfdb(path):
        sig, fs, rec_sex, rec_age = read_record_mv(path)
    else:
        sig, fs, rec_sex, rec_age = picture_mv(path, speed_mm_s, gain_mm_mv), PAGE_FS, None, None
    if not np.isfinite(sig).any(axis=0).any():
        raise InputError(f"{path}: no lead holds any signal")
    return measure_signal(sig, fs, sex or rec_sex, age if age is not None else rec_age, input_name=str(path))
