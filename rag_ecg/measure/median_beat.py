"""Median beats: per lead, the sample-wise median over the beats that lead shows, aligned on the QRS fiducials.

Why per lead and NaN-aware: on a 3x4 page each lead is printed for 2.5 s (2-4 beats), at a different time
from the others; a lead's median beat takes the beats whose window it covers, sample by sample, so intervals
measured on the leads' median beats together use every lead printed at any time. Each beat is first levelled
on its own PR segment (when known), so baseline wander between beats does not blur the median.
"""
from __future__ import annotations

import warnings

import numpy as np

PRE_S = 0.45  # window before the QRS fiducial: the P wave of a PR up to ~350 ms
POST_S = 0.75  # window after it: the end of a QT up to ~700 ms


def windows(signal: np.ndarray, peaks: np.ndarray, fs: float) -> tuple[np.ndarray, int]:
    """(beats, W, 12) windows around each fiducial (NaN outside the signal or where not printed), R index."""
    pre, post = int(round(PRE_S * fs)), int(round(POST_S * fs))
    n = signal.shape[0]
    out = np.full((len(peaks), pre + post, signal.shape[1]), np.nan)
    for k, p in enumerate(peaks):
        a, b = p - pre, p + post
        s, e = max(a, 0), min(b, n)
        out[k, s - a:e - a] = signal[s:e]
    return out, pre


def level(beats: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Each beat of each lead minus its median over samples [lo, hi) (its PR segment); NaN if not covered."""
    seg = beats[:, max(lo, 0):max(hi, lo + 1), :]
    covered = np.isfinite(seg).all(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        base = np.nanmedian(seg, axis=1)
    base = np.where(covered, base, np.nan)
    return beats - base[:, None, :]


def median(beats: np.ndarray, min_beats: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(W, 12) sample-wise median over beats and (W, 12) count of beats behind each sample (NaN below min)."""
    count = np.isfinite(beats).sum(axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.nanmedian(beats, axis=0) if len(beats) else np.full(beats.shape[1:], np.nan)
    return np.where(count >= min_beats, med, np.nan), count
