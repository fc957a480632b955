"""How well a read page follows the recorded signal: the scores bench/digitize.py and the tests report.

`agreement` is shape only (correlation, any gain); `snr_db` is the PhysioNet Challenge 2024 digitisation score,
which also charges a wrong millivolt scale and a misplaced time axis: per lead, over the samples both hold, after
the best shift within ±0.2 s and removal of a constant offset, 10·log10(Σ ref² / Σ (ref − read)²).
"""
from __future__ import annotations

import numpy as np

MIN_OVERLAP = 50  # samples both must hold for a lead to be scored (0.5 s at 100 Hz)


def agreement(signal: np.ndarray, mask: np.ndarray, truth: np.ndarray, truth_mask: np.ndarray,
              max_lag: int = 3) -> float:
    """Mean over the leads the page prints of the correlation of read and truth where both are printed, best within
    ±`max_lag` samples (a digitiser's time axis is good to a pixel or two, one QRS sample off ruins a plain
    correlation). A printed lead the read misses (or overlaps by MIN_OVERLAP samples or fewer) counts 0, so a read
    that keeps one clean lead scores below a full read: the score measures coverage as well as fidelity."""
    cors = []
    for lead in range(truth.shape[0]):
        printed = truth_mask[lead]
        if printed.sum() <= MIN_OVERLAP or truth[lead][printed].std() == 0:
            continue  # the page does not print this lead: no read could follow it
        best = []
        for lag in range(-max_lag, max_lag + 1):
            sig, m = np.roll(signal[lead], lag), np.roll(mask[lead], lag) & printed
            if m.sum() > MIN_OVERLAP and truth[lead][m].std() > 0 and sig[m].std() > 0:
                best.append(np.corrcoef(truth[lead][m], sig[m])[0, 1])
        cors.append(max(best) if best else 0.0)
    return float(np.mean(cors)) if cors else 0.0


def snr_db(read: np.ndarray, truth: np.ndarray, fs: float, max_shift_s: float = 0.2,
           fit_gain: bool = False) -> tuple[float, list[float]]:
    """(mean over the leads the truth prints, per-lead SNR in dB) of a read against the truth, both (12, n) in mV
    at `fs` with NaN where not printed. A printed lead the read misses scores 0 dB (the Challenge's score of an
    all-zero read). `fit_gain` scales each lead's read to the truth by least squares first: the SNR a read would
    reach with a perfect millivolt scale (how the issue measured reads that carried none)."""
    per_lead = []
    for lead in range(truth.shape[0]):
        ref_all = truth[lead]
        if np.isfinite(ref_all).sum() <= MIN_OVERLAP:
            continue
        best = None
        max_shift = int(round(max_shift_s * fs))
        for shift in range(-max_shift, max_shift + 1):
            got = _shifted(read[lead], shift)
            m = np.isfinite(ref_all) & np.isfinite(got)
            if m.sum() <= MIN_OVERLAP:
                continue
            ref, est = ref_all[m] - ref_all[m].mean(), got[m] - got[m].mean()
            if fit_gain and est.dot(est) > 0:
                est = est * (ref.dot(est) / est.dot(est))
            noise = float(((ref - est) ** 2).sum())
            signal = float((ref ** 2).sum())
            if signal > 0:
                snr = 10.0 * np.log10(signal / max(noise, 1e-12))
                best = snr if best is None else max(best, snr)
        per_lead.append(0.0 if best is None else best)
    return (float(np.mean(per_lead)) if per_lead else 0.0), per_lead


def _shifted(x: np.ndarray, shift: int) -> np.ndarray:
    """x moved `shift` samples later, NaN where nothing moved in (no wrap-around, unlike np.roll)."""
    out = np.full_like(x, np.nan, dtype=np.float64)
    if shift >= 0:
        out[shift:] = x[:x.size - shift]
    else:
        out[:shift] = x[-shift:]
    return out
