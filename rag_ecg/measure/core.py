"""One 12-lead signal in mV -> Measurements: beats, median beats, global fiducials, then each quantity.

Why this order: beats come from the longest lead(s) (the rhythm strip of a page), so rate and rhythm use
10 s even where the other leads show 2.5 s; intervals, axis and ST come from the leads' median beats, which
use every lead at whatever time it was printed (median_beat.py).
"""
from __future__ import annotations

import warnings

import numpy as np

from rag_ecg.data.records import STANDARD_LEADS
from rag_ecg.measure import median_beat
from rag_ecg.measure.axis import HEXAXIAL_DEG, frontal_axis
from rag_ecg.measure.beats import Beats, detect
from rag_ecg.measure.delineate import MIN_P_MV, Fiducials, delineate
from rag_ecg.measure.qwaves import prior_mi_leads, q_waves
from rag_ecg.measure.result import Measurements, Value
from rag_ecg.measure.signal import FS, to_working_rate
from rag_ecg.measure.stemi import stemi_leads, stemi_pairs

ST_OFFSET_S = 0.06  # ST measured at J + 60 ms
ST_FOR_STEMI = "j"  # the flag reads ST at the J point, as the criteria are written (J+60 over-calls: see stemi.py)
PR_BASELINE_S = (0.03, 0.01)  # the PR baseline: from 30 to 10 ms before the QRS onset
POINT_S = 0.004  # a point value is the mean over +-4 ms
PLAUSIBLE = {"qrs_ms": (40, 250), "pr_ms": (60, 400), "qt_ms": (200, 700)}


def measure_signal(signal_mv: np.ndarray, fs: float, sex: str | None = None, age: float | None = None,
                   input_name: str = "") -> Measurements:
    """(samples, 12) mV in STANDARD_LEADS order, NaN where a lead is not printed -> Measurements."""
    sig = to_working_rate(signal_mv, fs)
    beats = detect(sig, FS)
    anchor = tuple(STANDARD_LEADS[i] for i in beats.anchor_leads)
    hr = beats.heart_rate_bpm
    n_rr = len(beats.rr_s)
    if hr is None:
        return _nothing(input_name, "fewer than two beats found")
    hr_value = Value(hr, anchor, _share(n_rr, 4) * _share(beats.envelope_snr, 4.0))
    irr = beats.irregular
    rr_value = (Value.missing(f"{n_rr} RR intervals: too few to judge the rhythm") if irr is None
                else Value(float(irr), anchor, _share(n_rr, 8)))
    wins, r = median_beat.windows(sig, beats.peaks, FS)
    med, _ = median_beat.median(wins)
    fid = delineate(med, r, FS, float(np.median(beats.rr_s)))
    if fid.qrs_on is None:
        return _with(input_name, beats, hr_value, rr_value, "no lead shows a whole QRS")
    ms = FS / 1000.0
    lo, hi = fid.qrs_on - int(PR_BASELINE_S[0] * 1000 * ms), fid.qrs_on - int(PR_BASELINE_S[1] * 1000 * ms)
    wins = median_beat.level(wins, lo, hi)  # each beat levelled on its own PR segment, then the median again
    med, count = median_beat.median(wins)
    fid = delineate(med, r, FS, float(np.median(beats.rr_s)))
    out = _with(input_name, beats, hr_value, rr_value, "")
    _intervals(out, fid, beats, irr)
    _axis(out, med, fid)
    _st(out, wins, med, fid, sex, age)
    if fid.qrs_off is not None:
        out.q_waves = q_waves(med, fid.qrs_on, fid.qrs_off, FS)
        out.prior_mi_q_leads = prior_mi_leads(out.q_waves)
    return out


def _share(x: float, full: float) -> float:
    return float(np.clip(x / full, 0.0, 1.0))


def _nothing(input_name: str, why: str) -> Measurements:
    miss = Value.missing(why)
    return Measurements(miss, miss, miss, miss, miss, miss, miss, miss, input=input_name)


def _with(input_name: str, beats: Beats, hr: Value, rr: Value, why: str) -> Measurements:
    miss = Value.missing(why)
    return Measurements(hr, rr, miss, miss, miss, miss, miss, miss, beats=len(beats.peaks), input=input_name)


def _names(idx: list[int]) -> tuple[str, ...]:
    return tuple(STANDARD_LEADS[i] for i in idx)


def _interval(name: str, a: int | None, b: int | None, leads: list[int], conf: float, why: str) -> Value:
    if a is None or b is None:
        return Value.missing(why)
    v = (b - a) / FS * 1000.0
    lo, hi = PLAUSIBLE[name]
    if not lo <= v <= hi:
        return Value.missing(f"{v:.0f} ms is outside {lo}-{hi} ms: boundaries not found reliably")
    return Value(v, _names(leads), conf)


def _intervals(out: Measurements, fid: Fiducials, beats: Beats, irregular: bool | None) -> None:
    base = _share(len(beats.peaks), 4) * _share(len(fid.leads), 6)
    dur_on, dur_off = fid.duration if fid.duration else (None, None)  # not the J point's bounds: duration_bounds
    out.qrs_ms = _interval("qrs_ms", dur_on, dur_off, fid.leads, base * _share(fid.qrs_sharpness, 20),
                           "QRS boundaries not found")
    out.qt_ms = _interval("qt_ms", fid.qrs_on, fid.t_end, fid.t_leads, base, "T-wave end not found")
    if irregular:
        out.pr_ms = Value.missing("irregularly irregular rhythm (atrial fibrillation?): no PR interval")
    else:
        weak = f"no P wave found (spatial P magnitude {fid.p_mv:.3f} mV, below {MIN_P_MV:g})"
        why = ("no lead shows the 330 ms before the QRS" if not fid.p_leads else weak if fid.p_mv < MIN_P_MV
               else "no P wave found: the largest wave in the 330 ms before the QRS starts at that window's edge "
                    "(a preceding T wave, or a P wave too early to tell)")
        out.pr_ms = _interval("pr_ms", fid.p_on, fid.qrs_on, fid.p_leads, base * _share(fid.p_mv, 0.15), why)
    rr = float(np.median(beats.rr_s))
    if out.qt_ms.value is not None:
        qt = out.qt_ms
        out.qtc_bazett_ms = Value(qt.value / np.sqrt(rr), qt.leads, qt.confidence * out.heart_rate_bpm.confidence)
        out.qtc_fridericia_ms = Value(qt.value / np.cbrt(rr), qt.leads, qt.confidence * out.heart_rate_bpm.confidence)
    else:
        out.qtc_bazett_ms = out.qtc_fridericia_ms = Value.missing(out.qt_ms.why)


def _axis(out: Measurements, med: np.ndarray, fid: Fiducials) -> None:
    if fid.qrs_off is None:
        out.qrs_axis_deg = Value.missing("QRS offset not found")
        return
    areas = {}
    for ld in HEXAXIAL_DEG:
        seg = med[fid.qrs_on:fid.qrs_off + 1, STANDARD_LEADS.index(ld)]
        if len(seg) and np.isfinite(seg).all():
            areas[ld] = float(np.sum(seg) / FS)
    deg, conf = frontal_axis(areas)
    out.qrs_axis_deg = (Value.missing("fewer than two limb leads show a whole QRS") if deg is None
                        else Value(deg, tuple(areas), conf))


def _point(x: np.ndarray, at: int, half: int) -> float:
    seg = x[max(at - half, 0):at + half + 1]
    return float(np.mean(seg)) if len(seg) and np.isfinite(seg).all() else float("nan")


def _st(out: Measurements, wins: np.ndarray, med: np.ndarray, fid: Fiducials, sex, age) -> None:
    """ST at J and J+60 ms vs the PR baseline, per lead; confidence from the beats' spread at J+60."""
    if fid.qrs_off is None:
        return
    ms = FS / 1000.0
    half = int(POINT_S * 1000 * ms)
    base_lo, base_hi = fid.qrs_on - int(PR_BASELINE_S[0] * 1000 * ms), fid.qrs_on - int(PR_BASELINE_S[1] * 1000 * ms)
    j, j60 = fid.qrs_off, fid.qrs_off + int(ST_OFFSET_S * 1000 * ms)
    for i, ld in enumerate(STANDARD_LEADS):
        base_seg = med[base_lo:base_hi, i]
        if not len(base_seg) or not np.isfinite(base_seg).all():
            out.st_mv[ld] = out.st_j_mv[ld] = Value.missing("lead not printed at this beat's PR segment")
            continue
        base = float(np.median(base_seg))
        at60, atj = _point(med[:, i], j60, half) - base, _point(med[:, i], j, half) - base
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            per_beat = np.nanmean(wins[:, j60 - half:j60 + half + 1, i], axis=1)
        per_beat = per_beat[np.isfinite(per_beat)]
        spread = float(np.median(np.abs(per_beat - np.median(per_beat)))) if len(per_beat) >= 2 else 0.05
        conf = _share(len(per_beat), 3) * float(np.clip(1.0 - spread / 0.1, 0.0, 1.0))
        out.st_mv[ld] = Value(at60, (ld,), conf) if np.isfinite(at60) else Value.missing("lead not printed at J+60")
        out.st_j_mv[ld] = Value(atj, (ld,), conf) if np.isfinite(atj) else Value.missing("lead not printed at J")
    flag_on = out.st_j_mv if ST_FOR_STEMI == "j" else out.st_mv
    mm = {ld: None if v.value is None else 10.0 * v.value for ld, v in flag_on.items()}
    out.stemi_pairs = stemi_pairs(mm, sex, age)
    out.stemi_criteria = stemi_leads(out.stemi_pairs)
