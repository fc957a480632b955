"""The cardiologists' measurements of a LUDB record, from its per-lead wave delineation (`<n>.i` ... `<n>.v6`).

Why here: the benchmark and the tests compare against the same reference. LUDB marks each lead's P, QRS and T
onset, peak and offset on the beats of the record's middle part. A beat is the QRS marks of all leads within
100 ms; its fiducials are the medians over the leads (robust to one lead's slip), its P onset from P waves
peaking in the 400 ms before its QRS onset, its T end from T waves peaking in the 600 ms after its QRS offset;
the record's reference is the median over beats. The axis reference is our hexaxial fit over the raw signal's
net QRS areas between the cardiologists' QRS onset and offset.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import wfdb

from rag_ecg.data.records import STANDARD_LEADS
from rag_ecg.measure.axis import HEXAXIAL_DEG, frontal_axis

ANNOTATION_EXT = {ld: ld.lower() for ld in STANDARD_LEADS}
GROUP_S = 0.1


@dataclass
class Reference:
    """One LUDB record's cardiologist measurements (None where the marks do not give one)."""

    record: str
    heart_rate_bpm: float | None
    pr_ms: float | None
    qrs_ms: float | None
    qt_ms: float | None
    qrs_axis_deg: float | None
    beats: np.ndarray  # QRS peak samples (median over leads) of the marked beats
    span: tuple[int, int]  # first and last marked sample
    st_j_mv: dict[str, float] | None = None  # lead -> ST at the marked J point (QRS offset) vs the PR baseline


def _waves(base: Path, ext: str) -> dict[str, list[tuple[int, int, int]]]:
    ann = wfdb.rdann(str(base), ext)
    sym, x = ann.symbol, ann.sample
    out: dict[str, list[tuple[int, int, int]]] = {"p": [], "N": [], "t": []}
    for k in range(1, len(sym) - 1):
        if sym[k] in out and sym[k - 1] == "(" and sym[k + 1] == ")":
            out[sym[k]].append((int(x[k - 1]), int(x[k]), int(x[k + 1])))
    return out


def _median_or_none(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def read_reference(base: str | Path, signal_mv: np.ndarray | None = None, fs: float = 500.0) -> Reference:
    """Record path without extension (its annotation files beside it) -> Reference."""
    base = Path(base)
    per_lead = {ld: _waves(base, ext) for ld, ext in ANNOTATION_EXT.items()}
    qrs = sorted((peak, on, off) for w in per_lead.values() for on, peak, off in w["N"])
    groups: list[list[tuple[int, int, int]]] = []
    for item in qrs:
        if groups and item[0] - groups[-1][0][0] <= GROUP_S * fs:
            groups[-1].append(item)
        else:
            groups.append([item])
    groups = [g for g in groups if len(g) >= 3]  # a QRS most leads marked, not one lead's stray mark
    p_marks = [m for w in per_lead.values() for m in w["p"]]
    t_marks = [m for w in per_lead.values() for m in w["t"]]
    peaks, prs, qrss, qts, ons, offs = [], [], [], [], [], []
    for g in groups:
        peak = float(np.median([m[0] for m in g]))
        on = float(np.median([m[1] for m in g]))
        off = float(np.median([m[2] for m in g]))
        peaks.append(peak)
        ons.append(on)
        offs.append(off)
        qrss.append((off - on) / fs * 1000)
        p_on = [a for a, pk, _ in p_marks if on - 0.4 * fs <= pk < on]
        if len(p_on) >= 3:
            prs.append((on - float(np.median(p_on))) / fs * 1000)
        t_off = [b for _, pk, b in t_marks if off < pk <= off + 0.6 * fs]
        if len(t_off) >= 3:
            qts.append((float(np.median(t_off)) - on) / fs * 1000)
    peaks_a = np.asarray(peaks)
    rr = np.diff(peaks_a) / fs
    rr = rr[rr < 2.0]
    hr = 60.0 / float(np.median(rr)) if len(rr) else None
    axis, st_j = None, None
    if signal_mv is not None and ons:
        st_j = _st_at_marks(signal_mv, ons, offs, fs)
        areas = {}
        for ld in HEXAXIAL_DEG:
            x = signal_mv[:, STANDARD_LEADS.index(ld)]
            beat_areas = []
            for on, off in zip(ons, offs):
                a, b = int(round(on)), int(round(off))
                level = float(np.median(x[max(a - 10, 0):a - 2])) if a > 12 else float(x[a])
                beat_areas.append(float(np.sum(x[a:b + 1] - level) / fs))
            areas[ld] = float(np.median(beat_areas))
        axis, _ = frontal_axis(areas)
    span = (int(min(m[1] for g in groups for m in g)), int(max(m[2] for g in groups for m in g))) if groups else (0, 0)
    return Reference(base.name, hr, _median_or_none(prs), _median_or_none(qrss), _median_or_none(qts), axis,
                     peaks_a.astype(int), span, st_j)


def _st_at_marks(signal_mv: np.ndarray, ons: list[float], offs: list[float], fs: float) -> dict[str, float]:
    """Per lead, the median over beats of the signal at the marked QRS offset (the J point, +-4 ms) minus its
    PR baseline (30 to 10 ms before the marked QRS onset): the ST the cardiologists' own marks give."""
    out = {}
    h = int(round(0.004 * fs))
    for i, ld in enumerate(STANDARD_LEADS):
        x = signal_mv[:, i]
        vals = []
        for on, off in zip(ons, offs):
            a, j = int(round(on)), int(round(off))
            lo, hi = a - int(round(0.03 * fs)), a - int(round(0.01 * fs))
            if lo >= 0 and j + h < len(x):
                vals.append(float(np.mean(x[j - h:j + h + 1]) - np.median(x[lo:hi])))
        if vals:
            out[ld] = float(np.median(vals))
    return out
