"""Signal plumbing for measurement: finite runs of a NaN-gapped lead and resampling to the working rate.

Why 500 Hz: LUDB's annotations and the digitiser's `to_millivolts` are at 500 Hz, and 2-ms steps keep the
delineation's rounding well inside the IEC tolerances; a 100-Hz PTB-XL record is resampled up (each finite run
on its own, so a lead's gaps stay NaN).
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np
from scipy.signal import resample_poly

from rag_ecg.errors import InputError

FS = 500.0  # working sampling rate, Hz


def finite_runs(x: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of finite samples in a 1-D array."""
    ok = np.isfinite(x).astype(np.int8)
    edges = np.diff(np.concatenate([[0], ok, [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def to_working_rate(signal: np.ndarray, fs: float) -> np.ndarray:
    """(samples, leads) at `fs` -> (samples', leads) float64 at FS; NaN gaps kept."""
    signal = np.asarray(signal, np.float64)
    if signal.ndim != 2 or signal.shape[1] != 12:
        raise InputError(f"measurement expects a (samples, 12) signal, got shape {signal.shape}")
    if not np.isfinite(fs) or fs <= 0:
        raise InputError(f"sampling rate {fs} Hz is not positive")
    if abs(fs - FS) < 1e-6:
        return signal.copy()
    up, down = _ratio(fs)
    n_out = int(round(signal.shape[0] * FS / fs))
    out = np.full((n_out, 12), np.nan)
    for lead in range(12):
        for s, e in finite_runs(signal[:, lead]):
            if e - s < 4:
                continue
            seg = resample_poly(signal[s:e, lead], up, down, padtype="line")
            a = int(round(s * FS / fs))
            b = min(n_out, a + len(seg))
            out[a:b, lead] = seg[: b - a]
    return out


def _ratio(fs: float) -> tuple[int, int]:
    frac = Fraction(FS / fs).limit_denominator(1000)
    return frac.numerator, frac.denominator
