"""Which way round a page is: a page scanned sideways (90° or 270°) or upside down is read the right way up.

`digitize` reads a page as given first; only a page refused that way is read turned a quarter both ways, and
the read whose traces skew upward is kept: QRS spikes point up in most leads a page prints and the calibration
pulse stands up at a row's left end (`row_skew`). On rendered PTB-XL pages this picks every sideways page right
(20 fold-9 pages x clean/scan); on the real Khan printouts the skew is weaker (7 of 27 upright pages skew below
-1.9), so skew is not used to turn an upright page over. Upside down is told by the pulses instead
(`rows.pulse_sides`): most rows end in a pulse hanging down and none starts with one standing up, and the page
turned 180° shows them standing up at the rows' starts. Measured: 52/52 real and ECG-Image-Kit pictures kept
upright, 45/52 of them turned 180° read the right way up (the rest: no pulse printed, read as they lie); own
fold-9 pages 40/40 upright, 34/40 at 180°, 79/80 sideways.
"""
from __future__ import annotations

import numpy as np


def row_skew(signal: np.ndarray, row_leads: list[list[int]]) -> float:
    """Median over printed rows of the skewness of the row's trace (its leads' time windows side by side).

    Upright pages: -1.1 .. 3.4; the same pages upside down: -4.4 .. -2.9 (40 PTB-XL fold-9 pages, clean and
    scan): QRS spikes point down, and the calibration pulse, now at the row's right end, drops below it."""
    n = signal.shape[1]
    vals = []
    for leads in row_leads:
        k = len(leads)
        row = np.concatenate([signal[lead, c * n // k:(c + 1) * n // k] for c, lead in enumerate(leads)])
        sd = float(row.std())
        if sd > 1e-6:
            vals.append(float(np.mean((row - row.mean()) ** 3)) / sd ** 3)
    return float(np.median(vals)) if vals else 0.0
