"""The page header a printer adds: record id, age, sex, ventricular rate, intervals, speed and gain.

The rate is measured from lead II (`estimate_heart_rate`) when the record does not carry one; intervals are
printed only when supplied and otherwise shown as unknown, never invented.
"""
from __future__ import annotations

import numpy as np

from rag_ecg.data.records import ECGRecord
from rag_ecg.paper.layout import RenderConfig

UNKNOWN = "---"  # what the header prints for a value that was not measured (never estimated)


def _fmt(v, unit: str = "") -> str:
    if v is None:
        return UNKNOWN + (f" {unit}" if unit else "")
    return f"{v:.0f}{' ' + unit if unit else ''}"


def header_lines(record: ECGRecord, cfg: RenderConfig, heart_rate: float | None) -> list[str]:
    """The printed header: what is known about the record; intervals only when supplied, never invented."""
    iv = record.extra.get("intervals") or {}
    sex = {"M": "Male", "F": "Female"}.get(record.sex or "", UNKNOWN)
    age = f"{record.age:.0f} yr" if record.age is not None else UNKNOWN
    qt = f"{_fmt(iv.get('qt_ms'))}/{_fmt(iv.get('qtc_ms'))} ms"
    return [
        f"ID: {record.record_id}     Age: {age}     Sex: {sex}",
        f"Vent. rate: {_fmt(heart_rate, 'bpm')}     PR: {_fmt(iv.get('pr_ms'), 'ms')}     "
        f"QRS: {_fmt(iv.get('qrs_ms'), 'ms')}     QT/QTc: {qt}",
        f"{cfg.speed_mm_s:g} mm/s     {cfg.gain_mm_mv:g} mm/mV     {record.fs:g} Hz     12-lead ({cfg.layout})",
    ]


# ---------------------------------------------------------------- heart rate


def detect_r_peaks(lead_mv: np.ndarray, fs: float) -> np.ndarray:
    """Sample indices of QRS complexes in one lead ((samples,) mV): slope energy, 150 ms refractory."""
    x = np.asarray(lead_mv, np.float64)
    if x.size < int(fs):
        return np.zeros(0, np.int64)
    slope = np.diff(x - np.median(x)) * fs  # mV/s
    win = max(1, int(round(0.10 * fs)))
    energy = np.convolve(slope * slope, np.ones(win) / win, mode="same")
    thr = 0.25 * np.percentile(energy, 99.5)
    if thr <= 0:
        return np.zeros(0, np.int64)
    above = np.flatnonzero(np.diff(np.r_[0, (energy > thr).astype(np.int8), 0]))
    starts, ends = above[0::2], above[1::2]
    peaks: list[int] = []
    refractory = int(0.25 * fs)
    dev = np.abs(x - np.median(x))
    for s, e in zip(starts, ends):
        seg = dev[s:e + 1]
        p = s + int(np.argmax(seg)) if seg.size else s
        if peaks and p - peaks[-1] < refractory:
            if abs(x[p]) > abs(x[peaks[-1]]):
                peaks[-1] = p
            continue
        peaks.append(p)
    return np.asarray(peaks, np.int64)


def estimate_heart_rate(lead_mv: np.ndarray, fs: float) -> float | None:
    """Ventricular rate (bpm) from the median R-R interval of one lead; None if under 3 beats or implausible."""
    peaks = detect_r_peaks(lead_mv, fs)
    if peaks.size < 3:
        return None
    rate = 60.0 * fs / float(np.median(np.diff(peaks)))
    return rate if 20.0 <= rate <= 300.0 else None
