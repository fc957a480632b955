"""Global wave boundaries (P onset, QRS onset and offset, T end) on the leads' median beats.

Why global and on median beats: the IEC 60601-2-25 intervals are global (one PR/QRS/QT per ECG over all leads),
and the median beat of each lead averages the digitiser's pixel noise over its beats. The QRS is where the
spatial velocity (sum over leads of |slope|, 40-Hz low-passed) stands above a share of its peak; the T end is
the tangent at the steepest fall of the spatial T magnitude (root of the summed squares of the leads' 15-Hz
low-passed deviation from the PR baseline) crossing zero (the PR baseline); the P onset is where the spatial P magnitude
rises above a share of its peak. The velocity's floor is its median over the beat window: a drawn trace read off a
page ripples (pen width, pixel steps) all along the beat, and a low percentile (the ripple's troughs) put the QRS
thresholds inside the ripple, so the QRS ran on into it (+10-15 ms on clean pages; signals: unchanged). The
reported QRS duration has its own, slower boundaries (`duration_bounds`). The shares were set on LUDB records 1-50
(bench/measure.py prints records 51-100 apart).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.signal import butter, sosfiltfilt

from rag_ecg.measure.signal import finite_runs

QRS_ON_SHARE = 0.05  # QRS onset: spatial velocity rises above this share of its QRS peak (over its floor)
QRS_OFF_SHARE = 0.05  # QRS offset: ... and falls below this share, for QUIET_S
QUIET_S = 0.012
QRS_HZ = 40.0  # the fiducials' velocity low-pass (J point, Q-wave window, QT, PR)
DURATION_HZ, DURATION_SHARE = 20.0, 0.12  # the reported QRS duration's low-pass and share (see duration_bounds)
FLOOR_PCT = 50  # the velocity floor: its median over the beat window, not a low percentile (see module doc)
P_ON_SHARE = 0.20  # P onset: spatial P magnitude rises above this share of the P peak (over its floor)
MIN_P_MV = 0.04  # a P wave's spatial magnitude below this (mV): no P wave to measure a PR from
T_SEARCH_S = (0.08, 0.65)  # T wave searched from QRS offset + 80 ms to the fiducial + 650 ms (or 0.8 RR) ...
T_FALL_S = 0.2  # the T wave's fall is sought within 200 ms of its peak
T_PEAK_MAX_S, T_PEAK_RR = 0.5, 0.6  # ... its peak within 500 ms (or 0.6 RR): not the next P wave


@dataclass
class Fiducials:
    """Sample indices in the median-beat window (None: not found) and what they rest on."""

    qrs_on: int | None
    qrs_off: int | None
    p_on: int | None
    t_end: int | None
    leads: list[int]  # leads whose median beat covers the QRS
    t_leads: list[int]  # ... and the T wave
    p_leads: list[int]  # ... and the P wave
    p_mv: float = 0.0  # spatial P magnitude at its peak
    qrs_sharpness: float = 0.0  # QRS spatial-velocity peak over its floor
    duration: tuple[int, int] | None = None  # QRS onset and offset for the reported QRS duration (duration_bounds)


def _lowpass(x: np.ndarray, fs: float, hz: float) -> np.ndarray:
    out = np.full_like(x, np.nan)
    sos = butter(2, hz / (fs / 2), output="sos")
    for s, e in finite_runs(x):
        if e - s > 30:
            out[s:e] = sosfiltfilt(sos, x[s:e])
    return out


def _covering(med: np.ndarray, lo: int, hi: int) -> list[int]:
    lo, hi = max(lo, 0), min(hi, med.shape[0])
    return [i for i in range(med.shape[1]) if np.isfinite(med[lo:hi, i]).all()]


def _qrs_bounds(med: np.ndarray, r: int, fs: float, leads: list[int], hz: float, on_share: float,
                off_share: float) -> tuple[int, int, float, float]:
    """QRS onset and offset where the spatial velocity (leads' |slope|, `hz` low-passed) crosses a share of its
    peak over its floor; also that peak height and floor."""
    ms = fs / 1000.0
    lp = np.stack([_lowpass(med[:, i], fs, hz) for i in leads], axis=1)
    sv = np.nansum(np.abs(np.gradient(lp, axis=0)), axis=1)
    sv[~np.isfinite(lp).all(axis=1)] = np.nan
    lo, hi = r - int(80 * ms), r + int(80 * ms)
    peak = lo + int(np.nanargmax(sv[lo:hi]))
    floor = float(np.nanpercentile(sv, FLOOR_PCT))
    height = float(sv[peak]) - floor
    on_thr = floor + on_share * height
    off_thr = floor + off_share * height
    qrs_on = peak
    while qrs_on > r - int(150 * ms) and not (sv[qrs_on] < on_thr):
        qrs_on -= 1
    quiet = max(1, int(QUIET_S * fs))
    qrs_off = peak
    stop = min(len(sv) - quiet, r + int(200 * ms))
    while qrs_off < stop and not (np.nanmax(sv[qrs_off:qrs_off + quiet]) < off_thr):
        qrs_off += 1
    return qrs_on, qrs_off, height, floor


def duration_bounds(med: np.ndarray, r: int, fs: float, leads: list[int]) -> tuple[int, int]:
    """QRS onset and offset for the reported QRS duration: the spatial velocity 20-Hz low-passed, 12 % of its peak.

    Why not the 40-Hz fiducials: a page read is the signal blurred (pen width, pixels, 100 samples/s: a kernel ~4 ms
    wide on clean pages, ~9 ms on photos), and blur spreads the QRS's steep slopes into the quiet segments either
    side, where a 40-Hz velocity still stands above its 5 % share: the QRS read wider (LUDB photo pages +17 ms over
    their signals). A 20-Hz low-pass is already wider than that blur, so its velocity changes less when the trace is
    blurred: a page reads a duration closer to its signal's (photo pages +17 -> +13 ms over their signals, clean
    +8 -> +5 ms over the cardiologists), and a signal no further from the cardiologists (MAE 8.3 -> 6.9 ms); its
    higher share (set on LUDB records 1-50's signals) keeps the slower velocity's tails out. The J point, the Q-wave
    window, QT and PR keep the 40-Hz fiducials: the 20-Hz offset lies after J (LUDB 64, inferior STEMI: 8 ms late,
    its ST elevation read under 1 mm).
    """
    qrs_on, qrs_off, _, _ = _qrs_bounds(med, r, fs, leads, DURATION_HZ, DURATION_SHARE, DURATION_SHARE)
    return qrs_on, qrs_off


def delineate(med: np.ndarray, r: int, fs: float, rr_s: float | None) -> Fiducials:
    """(W, 12) median beats (R fiducial at index r) -> global fiducials."""
    ms = fs / 1000.0
    leads = _covering(med, r - int(150 * ms), r + int(200 * ms))
    if not leads:
        return Fiducials(None, None, None, None, [], [], [])
    qrs_on, qrs_off, height, floor = _qrs_bounds(med, r, fs, leads, QRS_HZ, QRS_ON_SHARE, QRS_OFF_SHARE)
    fid = Fiducials(qrs_on, qrs_off, None, None, leads, [], [], qrs_sharpness=height / max(floor, 1e-9),
                    duration=duration_bounds(med, r, fs, leads))
    fid.t_end, fid.t_leads = _t_end(med, fs, qrs_on, qrs_off, r, rr_s)
    fid.p_on, fid.p_leads, fid.p_mv = _p_onset(med, fs, qrs_on)
    return fid


def _magnitude(med: np.ndarray, fs: float, leads: list[int], base_lo: int, base_hi: int) -> np.ndarray:
    """Root of the summed squares over `leads` of the 15-Hz low-passed deviation from each lead's PR level."""
    lp = np.stack([_lowpass(med[:, i], fs, 15.0) for i in leads], axis=1)
    base = np.nanmedian(lp[max(base_lo, 0):base_hi], axis=0)
    return np.sqrt(np.sum((lp - base) ** 2, axis=1))


def _t_end(med, fs, qrs_on, qrs_off, r, rr_s):
    ms = fs / 1000.0
    last = r + int(min(T_SEARCH_S[1], 0.8 * rr_s if rr_s else T_SEARCH_S[1], 0.74) * 1000 * ms)
    leads = _covering(med, qrs_on - int(30 * ms), last)
    if not leads:
        return None, []
    # the level the T returns to: 40-20 ms before the QRS, clear of the QRS's low-passed (and on a page blurred)
    # start, which 25-5 ms took in as an offset that kept the T magnitude off zero (photo pages: QT outliers)
    mag = _magnitude(med, fs, leads, qrs_on - int(40 * ms), qrs_on - int(20 * ms))
    start = qrs_off + int(T_SEARCH_S[0] * 1000 * ms)
    if last - start < int(60 * ms):
        return None, leads
    peak_last = min(last, r + int(min(T_PEAK_MAX_S, T_PEAK_RR * rr_s if rr_s else T_PEAK_MAX_S) * 1000 * ms))
    if peak_last - start < int(20 * ms):
        return None, leads
    tp = start + int(np.nanargmax(mag[start:peak_last]))
    tail = mag[tp:min(last, tp + int(T_FALL_S * 1000 * ms))]
    tail = tail[:int(np.argmin(tail)) + 1]  # the fall from the T peak to its trough (not the next P wave's)
    if len(tail) < 5:
        return None, leads
    slope = np.gradient(tail)
    k = int(np.argmin(slope))
    if slope[k] >= 0:
        return None, leads
    t_end = tp + k - tail[k] / slope[k]  # the tangent crosses the PR baseline (zero deviation)
    return int(round(min(t_end, last))), leads


def _p_onset(med, fs, qrs_on):
    ms = fs / 1000.0
    lo, hi = qrs_on - int(330 * ms), qrs_on - int(30 * ms)
    leads = _covering(med, max(lo, 0), qrs_on)
    if not leads or hi - max(lo, 0) < int(80 * ms):
        return None, leads, 0.0
    lo = max(lo, 0)
    mag = _magnitude(med, fs, leads, qrs_on - int(20 * ms), qrs_on - int(5 * ms))
    pp = lo + int(np.nanargmax(mag[lo:hi]))
    amp = float(mag[pp])
    before = mag[max(lo - int(80 * ms), 0):pp + 1]
    floor = float(np.nanmin(before))
    if amp < MIN_P_MV or pp - lo < 2:
        return None, leads, amp
    thr = floor + P_ON_SHARE * (amp - floor)
    p_on = pp
    while p_on > max(lo - int(80 * ms), 0) and mag[p_on] >= thr:
        p_on -= 1
    return p_on, leads, amp
